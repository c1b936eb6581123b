"""Model text as of the event time (no look-ahead), templates, replay and negative sampling."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from adapters_mgr.catalog.db import Catalog
from adapters_mgr.data import synthetic
from adapters_mgr.data.api import DataAPI
from adapters_mgr.errors import InvalidInput


@pytest.fixture
def api(tmp_path: Path) -> DataAPI:
    return DataAPI(Catalog(tmp_path / "root" / "catalog.duckdb"), tmp_path / "root")


def _small_log(api: DataAPI, tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text("item_id,title,year,genres\ni1,Alpha,1990,Drama\ni2,Beta,1991,Comedy|Drama\n"
                                        "i3,Gamma,1992,Horror\n")
    (tmp_path / "users.csv").write_text("user_id,age,gender,occupation\nu1,30,F,writer\nu2,40,M,doctor\n")
    (tmp_path / "ev.csv").write_text(
        "user_id,item_id,rating,ts\n"
        "u1,i1,5,1000\n"      # u1's first event
        "u2,i1,1,2000\n"
        "u1,i2,4,3000\n"      # the probe: sees u1's i1 only, and i2 unrated
        "u1,i3,1,4000\n"      # later events must not leak into the probe's text
        "u2,i2,2,5000\n"
    )
    api.add_source("users", tmp_path / "users.csv", kind="users")
    api.add_source("items", tmp_path / "items.csv", kind="items", list_attrs={"genres": "|"})
    api.add_source("ev", tmp_path / "ev.csv", ts_format="epoch_s")


def test_text_reflects_only_earlier_events(api, tmp_path):
    _small_log(api, tmp_path)
    ids = api.sync(window="1d")
    rows = {(r["user_id"], r["item_id"]): r for r in api.training_rows(ids)}
    probe = rows[("u1", "i2")]
    assert "Has rated 1 items before, mean rating 5.00" in probe["user_text"]
    assert "Recently liked: Alpha." in probe["user_text"]
    assert "Gamma" not in probe["user_text"] and "Horror" not in probe["user_text"]
    assert probe["item_text"] == "Not rated before. Beta (1991). Genres: Comedy, Drama."
    first = rows[("u1", "i1")]
    assert "No ratings yet" in first["user_text"] and "Not rated before" in first["item_text"]
    assert "Rated 1 times before, mean rating 5.00" in rows[("u2", "i1")]["item_text"]
    later = rows[("u2", "i2")]
    assert "Rated 1 times before, mean rating 4.00" in later["item_text"]
    # the point-in-time API renders exactly the same text as the training rows
    assert api.user_text("u1", probe["ts"]) == probe["user_text"]
    assert api.item_texts(probe["ts"])["i2"] == probe["item_text"]
    assert "Has rated 3 items before" in api.user_text("u1")


def test_as_of_stats_match_a_brute_force_recount(api, tmp_path):
    syn = synthetic.generate(tmp_path / "syn", rows=3000, users=20, items=15, seed=5)
    syn.register(api)
    ids = api.sync()
    rows = api.training_rows(ids, with_text=False)
    sample = rows[1500]
    earlier = [r for r in rows if r["ts"] < sample["ts"]]
    n_item = sum(1 for r in earlier if r["item_id"] == sample["item_id"])
    n_user = sum(1 for r in earlier if r["user_id"] == sample["user_id"])
    text = [r for r in api.training_rows(ids) if (r["user_id"], r["item_id"], r["ts"]) ==
            (sample["user_id"], sample["item_id"], sample["ts"])][0]
    assert f"Rated {n_item} times before" in text["item_text"]
    assert f"Has rated {n_user} items before" in text["user_text"]


def test_user_templates(api, tmp_path):
    _small_log(api, tmp_path)
    ids = api.sync()
    api.set_template("item", "{title} [{item_count} ratings]")
    rows = api.training_rows(ids, templates={"user": "{occupation}: {genre_affinity}"})
    probe = [r for r in rows if (r["user_id"], r["item_id"]) == ("u1", "i2")][0]
    assert probe["item_text"] == "Beta [0 ratings]"
    assert probe["user_text"] == "writer: Drama (1, avg 5.0)"
    with pytest.raises(InvalidInput):
        api.set_template("item", "{title")


def test_replay_sample_is_reproducible_and_respects_recency(api, tmp_path):
    syn = synthetic.generate(tmp_path / "syn", rows=6000, users=40, items=30, seed=2)
    syn.register(api)
    ids = api.sync(window="1h")
    assert len(ids) >= 3
    a = api.replay_sample(ids[-1], ratio=0.1, seed=7)
    b = api.replay_sample(ids[-1], ratio=0.1, seed=7)
    c = api.replay_sample(ids[-1], ratio=0.1, seed=8)
    assert a == b and a != c
    pool = sum(api.batch(i)["rows_kept"] for i in ids[:-1])
    assert len(a) == round(0.1 * pool) and all(r["batch_id"] in ids[:-1] for r in a)
    api.sync()  # later batches do not change a sample of earlier ones
    assert api.replay_sample(ids[-1], ratio=0.1, seed=7) == a
    recent = api.replay_sample(ids, ratio=1.0, seed=1, recency=1)
    assert {r["batch_id"] for r in recent} == {ids[-1]}
    span = api.replay_sample(ids, ratio=1.0, seed=1, recency="30m")
    newest = max(r["ts"] for r in span)
    assert min(r["ts"] for r in span) >= newest - timedelta(minutes=30)
    with_text = api.replay_sample(ids[-1], ratio=0.1, seed=7, with_text=True)
    def key(r: dict) -> tuple:
        return r["user_id"], r["item_id"], r["ts"]

    assert [key(r) for r in with_text] == [key(r) for r in a]
    assert all(r["user_text"].startswith("User ") and r["item_text"] for r in with_text)
    with pytest.raises(InvalidInput):
        api.replay_sample(ids[-1], ratio=0, seed=1)


def test_negative_sampling_never_picks_a_positive(api, tmp_path):
    (tmp_path / "clicks.csv").write_text("user_id,item_id,ts\n" + "".join(
        f"u{u},i{(u * 3 + k) % 12},{1000 + u * 100 + k}\n" for u in range(6) for k in range(8)))
    api.add_source("clicks", tmp_path / "clicks.csv", ts_format="epoch_s")  # implicit: no rating, no label
    ids = api.sync()
    pos = api.interactions(ids)
    assert all(r["label"] == 1 and r["rating"] is None for r in pos)
    negs = api.negative_samples(ids, per_positive=3, seed=11)
    assert len(negs) == 3 * len(pos)
    positives = {(r["user_id"], r["item_id"]) for r in pos}
    assert not any((n["user_id"], n["item_id"]) in positives for n in negs)
    assert negs == api.negative_samples(ids, per_positive=3, seed=11)
    assert negs != api.negative_samples(ids, per_positive=3, seed=12)
    rows = api.training_rows(ids, negatives=1, seed=3)
    assert sum(r["label"] == 0 for r in rows) == len(pos) and all(r["item_text"] for r in rows)


def test_item_and_user_text_use_the_attributes_valid_at_the_event(api, tmp_path):
    # two versions of each entity: the second valid from t=3500 (epoch seconds)
    (tmp_path / "items.csv").write_text("item_id,title,year,genres,since\ni1,Old Title,1990,Drama,0\n"
                                        "i1,New Title,1990,Horror,3500\n")
    (tmp_path / "users.csv").write_text("user_id,age,gender,occupation,since\nu1,30,F,student,0\n"
                                        "u1,30,F,doctor,3500\n")
    (tmp_path / "ev.csv").write_text("user_id,item_id,rating,ts\nu1,i1,5,3000\nu1,i1,4,4000\n")
    api.add_source("items", tmp_path / "items.csv", kind="items", list_attrs={"genres": "|"},
                   mapping={"item_id": "item_id", "valid_from": "since", "title": "title", "year": "year",
                            "genres": "genres"}, ts_format="epoch_s")
    api.add_source("users", tmp_path / "users.csv", kind="users", ts_format="epoch_s",
                   mapping={"user_id": "user_id", "valid_from": "since", "age": "age", "gender": "gender",
                            "occupation": "occupation"})
    api.add_source("ev", tmp_path / "ev.csv", ts_format="epoch_s")
    ids = api.sync()
    before, after = sorted(api.training_rows(ids), key=lambda r: r["ts"])
    assert "Old Title" in before["item_text"] and "Drama" in before["item_text"]
    assert "New Title" not in before["item_text"] and "Horror" not in before["item_text"]
    assert "New Title" in after["item_text"] and "Horror" in after["item_text"]
    assert "student" in before["user_text"] and "doctor" not in before["user_text"]
    assert "doctor" in after["user_text"]


def test_recently_disliked_titles_are_as_of_the_event(api, tmp_path):
    """``{recent_disliked}``: the user's last 5 negatively rated titles strictly before the event,
    newest first; the training rows and the point-in-time API agree."""
    _small_log(api, tmp_path)
    (tmp_path / "ev2.csv").write_text("user_id,item_id,rating,ts\nu1,i1,2,6000\nu1,i2,5,7000\n")
    api.add_source("ev2", tmp_path / "ev2.csv", ts_format="epoch_s")
    api.set_template("user", "liked: {recent_items} | disliked: {recent_disliked}")
    ids = api.sync(window="1d")
    rows = {(r["user_id"], r["item_id"], r["ts"].timestamp()): r for r in api.training_rows(ids)}
    assert rows[("u1", "i2", 3000)]["user_text"] == "liked: Alpha | disliked: none yet"
    assert rows[("u1", "i1", 6000)]["user_text"] == "liked: Beta; Alpha | disliked: Gamma"   # i3 at 4000
    last = rows[("u1", "i2", 7000)]
    assert last["user_text"] == "liked: Beta; Alpha | disliked: Alpha; Gamma"          # i1 again at 6000
    assert api.user_text("u1", last["ts"]) == last["user_text"]
    assert rows[("u2", "i2", 5000)]["user_text"] == "liked: none yet | disliked: Alpha"
