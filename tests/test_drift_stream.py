"""The drift stream: seeded, catalog growth, labels from known probabilities, a trend that drifts,
and batches of a real sync that are exactly its periods, with p_like found for every row."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest

from adapters_mgr.catalog.db import Catalog
from adapters_mgr.data.api import DataAPI
from adapters_mgr.data.drift_stream import GAP_MS, GENRE_WORDS, generate_drift, true_probabilities
from adapters_mgr.data.synthetic import GENRES
from adapters_mgr.lora.metrics import auc


def table(path: Path, order: str = "ts") -> dict[str, np.ndarray]:
    with duckdb.connect() as con:
        cols = con.execute(f"SELECT * FROM '{path}' ORDER BY {order}").fetchnumpy()
    return {k: np.asarray(v) for k, v in cols.items()}


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return generate_drift(tmp_path_factory.mktemp("drift") / "stream", seed=0)


@pytest.fixture(scope="module")
def truth(stream):
    return table(stream.files["truth"])


def genre_matrix(stream) -> np.ndarray:
    items = table(stream.files["items"], "item_id")
    return np.array([[g in str(x).split("|") for g in GENRES] for x in items["genres"]])


def test_same_seed_same_stream_other_seed_differs(tmp_path, stream):
    again = generate_drift(tmp_path / "again", seed=0)
    other = generate_drift(tmp_path / "other", seed=1)
    for name in ("events", "truth", "items"):
        a, b = table(stream.files[name], "1"), table(again.files[name], "1")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    assert (tmp_path / "again" / "users.csv").read_text() == Path(stream.files["users"]).read_text()
    assert json.loads(Path(again.files["truth_json"]).read_text()) == stream.truth
    a, c = table(stream.files["truth"]), table(other.files["truth"])
    assert not np.array_equal(a["p_like"], c["p_like"]) and not np.array_equal(a["ts"], c["ts"])


def test_files_are_clean_and_labels_follow_ratings(stream, truth):
    ev = table(stream.files["events"])
    n = stream.truth["events"]
    assert n == (stream.truth["params"]["init_periods"] + stream.truth["params"]["periods"] + 1) * 1200
    assert len(ev["event_id"]) == n == len(set(ev["event_id"].tolist()))
    assert np.all(np.diff(ev["ts"]) > 0)  # unique, strictly increasing times
    assert np.diff(ev["ts"]).min() >= GAP_MS  # never within a dedup tolerance of each other
    assert np.array_equal(ev["event_id"], truth["event_id"]) and np.array_equal(ev["ts"], truth["ts"])
    assert np.array_equal(ev["user_id"], truth["user_id"]) and np.array_equal(ev["item_id"], truth["item_id"])
    assert set(np.unique(ev["rating"]).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.array_equal(truth["label"], (ev["rating"] >= 4).astype(truth["label"].dtype))
    assert 0.45 < stream.truth["like_rate"] < 0.55
    users = Path(stream.files["users"]).read_text().splitlines()
    assert users[0] == "user_id,age,gender,occupation" and len(users) == 301
    assert ev["user_id"].max() < 300 and ev["item_id"].max() < stream.truth["items"]


def test_titles_carry_genres_and_are_unique(stream):
    items = table(stream.files["items"], "item_id")
    assert len(set(items["title"].tolist())) == len(items["title"]) == stream.truth["items"]
    for title, genres in zip(items["title"], items["genres"], strict=True):
        words = str(title).split()[:-1]
        allowed = {w for g in str(genres).split("|") for w in GENRE_WORDS[g]}
        assert 2 <= len(words) <= 3 and len(set(words)) == len(words) and set(words) <= allowed, (title, genres)


def test_catalog_grows_and_no_event_precedes_its_release(stream, truth):
    release = np.array(stream.truth["item_release_period"])
    p = stream.truth["params"]
    n_periods = stream.truth["periods_total"]
    assert (release == 0).sum() == p["items_initial"]
    assert all((release == t).sum() == p["new_items_per_period"] for t in range(1, n_periods))
    period_ms = int(p["period_seconds"] * 1000)
    start_ms = int(datetime.fromisoformat(p["start"]).timestamp() * 1000)
    item, per = truth["item_id"], truth["period"]
    assert np.array_equal(per, (truth["ts"] - start_ms) // period_ms)  # the period column is the time's
    assert np.all(per >= release[item]) and np.all(truth["ts"] >= start_ms + release[item] * period_ms)
    seen: set[int] = set()
    for t in range(n_periods):
        here = set(item[per == t].tolist())
        if t:
            fresh = {i for i in here - seen if release[i] == t}
            assert len(fresh) >= p["new_items_per_period"] // 2, (t, len(fresh))  # new, cold items get exposure
        seen |= here


def test_labels_follow_the_true_probabilities(truth):
    p, y = truth["p_like"], truth["label"]
    lo, hi = np.quantile(p, [0.1, 0.9])
    assert y[p >= hi].mean() - y[p <= lo].mean() > 0.6
    assert abs(y.mean() - p.mean()) < 0.03


def test_oracle_auc_in_truth_matches_a_recomputation(stream, truth):
    p, y, per = truth["p_like"], truth["label"], truth["period"]
    assert stream.truth["oracle_auc"] == pytest.approx(auc(y, p), abs=1e-12)
    assert 0.78 < stream.truth["oracle_auc"] < 0.88
    for row in stream.truth["per_period"]:
        m = per == row["period"]
        assert row["events"] == m.sum() == 1200
        assert row["oracle_auc"] == pytest.approx(auc(y[m], p[m]), abs=1e-12)
        assert row["like_rate"] == pytest.approx(y[m].mean())


def _genre_rate_spread(stream) -> float:
    """Mean over genres of the std across periods of the genre's like rate."""
    t = table(stream.files["truth"])
    g = genre_matrix(stream)[t["item_id"]]
    rates = np.array([[t["label"][(t["period"] == p) & g[:, k]].mean() for k in range(len(GENRES))]
                      for p in range(stream.truth["periods_total"])])
    return float(rates.std(axis=0).mean())


def test_the_genre_trend_drifts_and_moves_like_rates(tmp_path, stream):
    trend = np.array(stream.truth["trend"])
    assert trend.shape == (stream.truth["periods_total"], len(GENRES))
    assert np.allclose(trend.sum(axis=1), 0, atol=1e-4)  # centred: which genres, not how much overall
    assert np.abs(np.diff(trend, axis=0)).mean() > 0.3
    assert np.argmax(trend[0]) != np.argmax(trend[-1]) or np.argmin(trend[0]) != np.argmin(trend[-1])
    control = generate_drift(tmp_path / "flat", seed=0, drift=0.0)
    assert np.abs(np.array(control.truth["trend"])).max() == 0
    drifting, flat = _genre_rate_spread(stream), _genre_rate_spread(control)
    assert drifting > 0.07 and flat < 0.05 and drifting > 2 * flat, (drifting, flat)


def test_sync_batches_are_the_periods_and_every_row_has_its_p_like(tmp_path, stream, truth):
    api = DataAPI(Catalog(tmp_path / "root" / "catalog.duckdb"), tmp_path / "root")
    stream.register(api)
    ids = api.sync(window=stream.truth["window"])
    assert stream.truth["window"] == "7d"
    batches = api.batches()
    assert [b["id"] for b in batches] == ids and len(ids) == stream.truth["periods_total"] == 10
    start = datetime(2024, 1, 1, tzinfo=UTC)
    for i, b in enumerate(batches):
        assert (b["rows_in"], b["rows_kept"], b["rows_quarantined"], b["rows_duplicate"]) == (1200, 1200, 0, 0)
        assert b["window_start"] == start + i * timedelta(days=7)
        rows = api.training_rows(b["id"], with_text=False)
        ms = np.array([(r["ts"] - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1) for r in rows])
        m = truth["period"] == i
        assert np.array_equal(ms, truth["ts"][m])  # exactly the period's events, nothing else
        assert [int(r["user_id"]) for r in rows] == truth["user_id"][m].tolist()
        assert np.array_equal(true_probabilities(stream, rows), truth["p_like"][m])
        assert [r["label"] for r in rows] == truth["label"][m].tolist()
    last = ids[-1]
    with_text = api.training_rows(last)
    cols = api.training_rows(last, with_text=False, columns=True)
    expected = truth["p_like"][truth["period"] == len(ids) - 1]
    assert np.array_equal(true_probabilities(stream, with_text), expected)
    assert np.array_equal(true_probabilities(stream, cols), expected)
    assert np.array_equal(true_probabilities(stream, api.interactions(last, columns=True)), expected)
    assert true_probabilities(stream, []).shape == (0,)
    bad = dict(with_text[3], ts=with_text[3]["ts"] + timedelta(milliseconds=1))
    with pytest.raises(LookupError, match="1 of 2 rows are not events"):
        true_probabilities(stream, [with_text[0], bad])
    other_user = dict(with_text[3], user_id=str(int(with_text[3]["user_id"]) + 1))
    with pytest.raises(LookupError):
        true_probabilities(stream, [other_user])
    with pytest.raises(LookupError, match="integer ids"):
        true_probabilities(stream, [dict(with_text[3], item_id="movie-7")])


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="midnight UTC"):
        generate_drift(tmp_path / "a", start=datetime(2024, 1, 1, 6, tzinfo=UTC))
    with pytest.raises(ValueError, match="midnight UTC"):
        generate_drift(tmp_path / "b", start=datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="do not fit"):
        generate_drift(tmp_path / "c", period=timedelta(minutes=10), events_per_period=400)
    with pytest.raises(ValueError, match="persistence"):
        generate_drift(tmp_path / "d", persistence=1.0)


def test_a_short_period_stream_still_aligns(tmp_path):
    s = generate_drift(tmp_path / "s", users=30, items_initial=20, new_items_per_period=5, init_periods=1,
                       periods=1, events_per_period=100, period=timedelta(hours=1), seed=3)
    api = DataAPI(Catalog(tmp_path / "root" / "catalog.duckdb"), tmp_path / "root")
    s.register(api)
    assert s.truth["window"] == "1h"
    ids = api.sync(window=s.truth["window"])
    assert len(ids) == 3
    t = table(s.files["truth"])
    for i, b in enumerate(api.batches()):
        assert b["rows_kept"] == 100 == (t["period"] == i).sum()
        assert np.array_equal(true_probabilities(s, api.training_rows(b["id"], with_text=False)),
                              t["p_like"][t["period"] == i])
