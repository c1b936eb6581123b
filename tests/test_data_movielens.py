"""MovieLens readers on small fixtures in both layouts, and the real ML-100K when it can be fetched."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from adapters_mgr.catalog.db import Catalog
from adapters_mgr.data import movielens
from adapters_mgr.data.api import DataAPI
from adapters_mgr.errors import NotFound

FIXTURES = Path(__file__).parent / "data_fixtures"


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("layout", ["grouplens", "recbole"])
def test_both_layouts_read_to_the_same_prepared_data(tmp_path, layout):
    out = movielens.prepare(FIXTURES / layout, tmp_path / "prep")
    ratings = _read(out / "ratings.csv")
    assert [(r["user_id"], r["item_id"], r["rating"], r["timestamp"]) for r in ratings][0] == \
        ("1", "10", "5", "881250949")
    assert len(ratings) == 4
    items = {r["item_id"]: r for r in _read(out / "items.csv")}
    assert items["10"]["title"] == "Toy Story" and items["10"]["year"] == "1995"
    assert items["10"]["genres"] == "Animation|Children's|Comedy"
    assert items["20"]["genres"] == "Action|Adventure|Thriller"
    assert items["30"]["title"].startswith("Cin")
    users = {r["user_id"]: r for r in _read(out / "users.csv")}
    assert users["2"] == {"user_id": "2", "age": "53", "gender": "F", "occupation": "other", "zip_code": "94043"}


def test_prepared_fixture_syncs_with_text(tmp_path):
    api = DataAPI(Catalog(tmp_path / "root" / "c.duckdb"), tmp_path / "root")
    movielens.register_movielens(api, movielens.prepare(FIXTURES / "recbole", tmp_path / "prep"))
    ids = api.sync(window="7d")
    assert sum(api.batch(i)["rows_kept"] for i in ids) == 4
    rows = api.training_rows(ids)
    last = rows[-1]
    assert last["item_text"].endswith("Cinema Paradiso (1988). Genres: Drama, Romance.")
    assert last["item_text"].startswith(("Rated ", "Not rated before.", "1 interactions before."))  # stats first
    assert "age 53, gender F, occupation other" in last["user_text"]


def test_prepare_rejects_unknown_layout(tmp_path):
    with pytest.raises(NotFound):
        movielens.prepare(tmp_path, tmp_path / "out")


@pytest.mark.integration
def test_real_ml100k_weekly_batches_cover_every_rating(tmp_path):
    cache = Path(os.environ.get("ADAPTERS_MGR_CACHE") or Path.home() / ".cache" / "adapters-mgr")
    try:
        folder = movielens.fetch(cache, timeout=5)
    except NotFound as exc:
        pytest.skip(f"ML-100K cannot be fetched here: {exc}")
    api = DataAPI(Catalog(tmp_path / "root" / "c.duckdb"), tmp_path / "root")
    movielens.register_movielens(api, folder)
    ids = api.sync(window="7d")
    bs = [api.batch(i) for i in ids]
    assert len(bs) > 25
    assert sum(b["rows_in"] for b in bs) == 100_000
    assert all(b["rows_in"] == b["rows_kept"] + b["rows_quarantined"] + b["rows_duplicate"] for b in bs)
    assert all(bs[k]["window_end"] == bs[k + 1]["window_start"] for k in range(len(bs) - 1))
    users = api.catalog.query("SELECT count(DISTINCT user_id) AS n FROM users")[0]["n"]
    items = api.catalog.query("SELECT count(DISTINCT item_id) AS n FROM items")[0]["n"]
    assert (users, items) == (943, 1682)


def test_fetch_command_and_script_prepare_the_cache_and_fail_in_one_line(tmp_path, monkeypatch, capsys):
    """The two entry points, offline: the 'download' writes the GroupLens fixture; then both fail."""
    import shutil
    import subprocess
    import sys

    from tests.test_cli import run

    calls = []

    def fake_grouplens(raw: Path, timeout: float) -> bool:
        calls.append("grouplens")
        shutil.copytree(FIXTURES / "grouplens", raw)
        return True

    monkeypatch.setattr(movielens, "_from_grouplens", fake_grouplens)
    cache = tmp_path / "cache"
    root = tmp_path / "root"
    code, out, err = run(capsys, root, "data", "fetch", "movielens", "--cache", str(cache), "--register", "--json")
    assert code == 0, err
    import json
    got = json.loads(out)
    assert Path(got["folder"]) == cache / "ml-100k" / "prepared" and len(got["sources"]) == 3
    assert {p.name for p in Path(got["folder"]).iterdir()} >= {"ratings.csv", "items.csv", "users.csv"}
    # cached: a second fetch downloads nothing
    code, out, err = run(capsys, root, "data", "fetch", "movielens", "--cache", str(cache))
    assert code == 0 and calls == ["grouplens"] and "ML-100K ready in" in out
    # the script reads the same cache (a separate process: no download needed, it is cached)
    script = Path(__file__).resolve().parents[1] / "scripts" / "fetch_movielens.py"
    done = subprocess.run([sys.executable, str(script), "--cache", str(cache)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith(str(cache / "ml-100k" / "prepared"))
    # nothing reachable: one line naming both ways and what to do, non-zero exit, nothing half-written
    monkeypatch.setattr(movielens, "_from_grouplens", lambda raw, timeout: False)
    monkeypatch.setattr(movielens, "_from_recbole_wheel", lambda raw, timeout: False)
    empty = tmp_path / "empty"
    code, out, err = run(capsys, root, "data", "fetch", "movielens", "--cache", str(empty))
    assert code != 0 and "Traceback" not in out + err
    [line] = err.strip().splitlines()  # progress lines go to stdout; the error is one line
    assert "cannot fetch MovieLens-100K" in line and "place u.data" in line
    assert not (empty / "ml-100k" / "prepared").exists()
