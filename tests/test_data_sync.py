"""Sync: every cleaning rule, every dedup path, idempotence, watermarks, windows, crash safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from adapters_mgr.catalog.db import Catalog
from adapters_mgr.data import classify, synthetic
from adapters_mgr.data.api import DataAPI
from adapters_mgr.errors import Conflict, InvalidInput, NotFound

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def api(tmp_path: Path) -> DataAPI:
    return DataAPI(Catalog(tmp_path / "root" / "catalog.duckdb"), tmp_path / "root")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def accounted(b: dict) -> bool:
    return b["rows_in"] == b["rows_kept"] + b["rows_quarantined"] + b["rows_duplicate"]


def test_every_rule_and_dedup_kind_matches_injected_truth(api, tmp_path):
    syn = synthetic.generate(tmp_path / "syn", rows=4000, users=50, items=40, seed=3)
    syn.register(api)
    [bid] = api.sync()
    b = api.batch(bid)
    assert accounted(b) and b["rows_in"] == syn.truth["rows"]
    assert b["quarantined_by_rule"] == syn.truth["bad_by_rule"]
    assert set(b["quarantined_by_rule"]) == {"missing_key", "bad_timestamp", "future_timestamp",
                                             "rating_out_of_range", "label_out_of_range", "unknown_user",
                                             "unknown_item"}
    assert b["duplicates_by_kind"] == syn.truth["duplicates_by_kind"]
    assert b["sources"] == ["events_a", "events_b"]  # two sources merged into one batch
    assert len(api.quarantine(batch=bid)) == b["rows_quarantined"]
    bad_ts = api.quarantine(rule="bad_timestamp")
    assert bad_ts and all(q["row"]["time"] == "not-a-time" and q["source"] == "events_b" for q in bad_ts)
    assert api.verify(bid)["ok"]


def test_injected_bot_bursts_are_all_caught_by_the_noise_rule_and_nothing_else_is(api, tmp_path):
    syn = synthetic.generate(tmp_path / "syn", rows=4000, users=50, items=40, seed=4, bursts=6)
    syn.register(api)
    [bid] = api.sync()
    b = api.batch(bid)
    assert syn.truth["noise"] == 6 * synthetic.BURST_SIZE and b["rows_in"] == syn.truth["rows"] == 4000
    assert b["quarantined_by_rule"] == syn.truth["bad_by_rule"]  # noise_burst included, every other rule exact
    bots = {q["row"]["user_id"] for q in api.quarantine(rule="noise_burst")}
    assert bots == {50 + k for k in range(6)}  # the bot users, and no regular user
    assert b["duplicates_by_kind"] == syn.truth["duplicates_by_kind"] and accounted(b)


def test_generator_drift_moves_tastes_and_the_second_source_can_be_jsonl(tmp_path):
    import duckdb

    def in_first_group(drift: float) -> tuple[float, float]:
        syn = synthetic.generate(tmp_path / f"d{drift}", rows=20_000, users=100, items=50, groups=5, drift=drift,
                                 dup_rate=0, bad_rate=0, share_a=1.0, seed=7)
        # share of a user's liked (rating >= 4) events in the item group it starts in, first vs last fifth
        early, late = duckdb.sql(
            f"""SELECT avg((item_id % 5 = user_id % 5)::INT) FILTER (WHERE q = 0),
                       avg((item_id % 5 = user_id % 5)::INT) FILTER (WHERE q = 4)
                FROM (SELECT *, ntile(5) OVER (ORDER BY ts) - 1 AS q FROM '{syn.files['a']}') WHERE rating >= 4"""
        ).fetchall()[0]
        return early, late

    early, late = in_first_group(0.9)
    assert early > 0.85 and late < 0.35  # by the last fifth most users have moved on to the next group
    assert in_first_group(0.0) == (1.0, 1.0)  # no drift: every liked event stays in the first group
    syn = synthetic.generate(tmp_path / "j", rows=2000, users=20, items=15, seed=2, b_format="json")
    assert syn.files["b"].suffix == ".jsonl"
    api = DataAPI(Catalog(tmp_path / "j" / "catalog.duckdb"), tmp_path / "j")
    syn.register(api)
    [bid] = api.sync()
    b = api.batch(bid)
    assert b["quarantined_by_rule"] == syn.truth["bad_by_rule"] and b["rows_in"] == syn.truth["rows"]


def test_each_timestamp_form_becomes_utc(api, tmp_path):
    want = datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC)
    s = int(want.timestamp())
    forms = {
        "epoch_s": str(s), "epoch_ms": str(s * 1000), "epoch_us": str(s * 1_000_000),
        "iso_z": "2021-03-04T05:06:07Z", "iso_offset": "2021-03-04T07:06:07+02:00", "iso_naive": "2021-03-04 05:06:07",
        "strptime": "04/03/2021 05:06:07",
    }
    for i, (name, value) in enumerate(forms.items()):
        write(tmp_path / f"{name}.csv", f"user_id,item_id,rating,ts\nu{i},i{i},4,{value}\n")
        fmt = "%d/%m/%Y %H:%M:%S" if name == "strptime" else None
        api.add_source(name.replace("_", "-"), tmp_path / f"{name}.csv", ts_format=fmt)
    api.sync()
    rows = api.interactions()
    assert len(rows) == len(forms) and all(r["ts"] == want for r in rows)
    detected = {s["name"]: s["ts_detected"] for s in api.sources()}
    assert detected["epoch-s"] == "epoch_s" and detected["epoch-ms"] == "epoch_ms"
    assert detected["epoch-us"] == "epoch_us" and detected["iso-z"] == "iso"


def test_rules_on_hand_written_rows(api, tmp_path):
    write(tmp_path / "a.csv", """
        uid,movie,stars,liked,time
        u1,i1,5,1,1000000000
        ,i1,5,1,1000000001
        u1,,5,1,1000000002
        u1,i2,5,1,
        u1,i3,5,1,yesterday
        u1,i4,5,1,99999999999
        u1,i5,0,1,1000000006
        u1,i6,abc,1,1000000007
        u1,i7,,,1000000008
        u1,i8,4,maybe,1000000009
        u1,i9,2,,1000000010
    """)
    api.add_source("a", tmp_path / "a.csv", ts_format="epoch_s",
                   mapping={"user_id": "uid", "item_id": "movie", "rating": "stars", "label": "liked", "ts": "time"})
    [bid] = api.sync()
    b = api.batch(bid)
    assert b["quarantined_by_rule"] == {"missing_key": 4, "bad_timestamp": 1, "future_timestamp": 1,
                                        "rating_out_of_range": 2, "label_out_of_range": 1}
    kept = {r["item_id"]: r for r in api.interactions(bid)}
    assert set(kept) == {"i1", "i9"} and kept["i9"]["label"] == 0  # no label -> rating 2 < 4
    details = {q["detail"] for q in api.quarantine(bid, rule="missing_key")}
    assert details == {"user_id is empty", "item_id is empty", "ts is empty", "no rating or label"}


def test_label_threshold_and_rating_range_are_configurable(api, tmp_path):
    write(tmp_path / "r.csv", "user_id,item_id,rating,ts\nu,a,7,1000\nu,b,8,2000\nu,c,11,3000\n")
    api.add_source("r", tmp_path / "r.csv", ts_format="epoch_s", label_threshold=8, rating_range=(0, 10))
    [bid] = api.sync()
    assert {r["item_id"]: r["label"] for r in api.interactions(bid)} == {"a": 0, "b": 1}
    assert api.batch(bid)["quarantined_by_rule"] == {"rating_out_of_range": 1}


def test_unknown_users_and_items_and_noise_rule(api, tmp_path):
    write(tmp_path / "users.csv", "user_id,age\nu1,30\nbot,1\n")
    write(tmp_path / "items.csv", "item_id,title\ni1,One\ni2,Two\n")
    lines = ["user_id,item_id,rating,ts", "u1,i1,5,1000", "u9,i1,5,1001", "u1,i9,5,1002"]
    lines += [f"bot,i{1 + k % 2},5,{2000 + k}" for k in range(5)]
    write(tmp_path / "ev.csv", "\n".join(lines) + "\n")
    api.add_source("users", tmp_path / "users.csv", kind="users")
    api.add_source("items", tmp_path / "items.csv", kind="items")
    api.add_source("ev", tmp_path / "ev.csv", ts_format="epoch_s", max_events_per_minute=3)
    [bid] = api.sync()
    b = api.batch(bid)
    assert b["quarantined_by_rule"] == {"unknown_user": 1, "unknown_item": 1, "noise_burst": 5}
    assert [r["user_id"] for r in api.interactions(bid)] == ["u1"]


def test_noise_rule_is_off_by_default(api, tmp_path):
    write(tmp_path / "ev.csv", "user_id,item_id,rating,ts\n" + "".join(f"bot,i{k},5,{2000 + k}\n" for k in range(50)))
    api.add_source("ev", tmp_path / "ev.csv", ts_format="epoch_s")
    [bid] = api.sync()
    assert api.batch(bid)["rows_kept"] == 50


def test_dedup_paths_exact_event_id_cross_source_and_earlier_batch(api, tmp_path):
    write(tmp_path / "a.csv", """
        user_id,item_id,rating,ts,event_id
        u1,i1,5,1000,e1
        u1,i1,5,1000,e1
        u2,i2,4,1000,e2
        u3,i3,3,1000,e3
        u4,i4,3,5000,e4
    """)
    write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in [
        {"u": "u2", "i": "i2", "s": 4, "t": 1000400, "ev": "x1"},   # same event, 0.4 s later: cross_source
        {"u": "u9", "i": "i9", "s": 4, "t": 9000000, "ev": "e3"},   # same event id as a's e3: cross_source
        {"u": "u5", "i": "i5", "s": 4, "t": 7000000, "ev": "x5"},   # new
        {"u": "u5", "i": "i6", "s": 4, "t": 7000000, "ev": "x5"},   # same id inside b: same_event_id
    ]) + "\n")
    api.add_source("a", tmp_path / "a.csv", ts_format="epoch_s")
    api.add_source("b", tmp_path / "b.jsonl", ts_format="epoch_ms",
                   mapping={"user_id": "u", "item_id": "i", "rating": "s", "ts": "t", "source_event_id": "ev"})
    [bid] = api.sync()
    b = api.batch(bid)
    assert b["duplicates_by_kind"] == {"exact": 1, "cross_source": 2, "same_event_id": 1}
    assert b["rows_kept"] == 5 and accounted(b)
    # the same events arriving again in a new file: already in earlier batches
    write(tmp_path / "c.csv", "user_id,item_id,rating,ts\nu1,i1,5,1000\nu4,i4,3,5000\nu7,i7,4,6000\n")
    api.add_source("c", tmp_path / "c.csv", ts_format="epoch_s")
    [bid2] = api.sync()
    b2 = api.batch(bid2)
    assert b2["duplicates_by_kind"] == {"earlier_batch": 2} and b2["rows_kept"] == 1
    kinds = {d["kind"] for d in api.duplicates()}
    assert kinds == {"exact", "cross_source", "same_event_id", "earlier_batch"}


def test_resync_is_idempotent_and_watermark_advances(api, tmp_path):
    f = write(tmp_path / "logs" / "day1.csv", "user_id,item_id,rating,ts\nu1,i1,5,1000\nu2,i1,3,2000\n")
    api.add_source("logs", str(tmp_path / "logs" / "*.csv"), ts_format="epoch_s")
    first = api.sync()
    assert len(first) == 1
    assert api.sync() == [] and len(api.batches()) == 1
    os.utime(f, ns=(0, 0))  # touched, not changed: still nothing new
    assert api.sync() == []
    assert api.sources()[0]["watermark"] == datetime.fromtimestamp(2000, UTC)
    # rows appended to a seen file: those at or after the watermark are read; the one already
    # kept at the watermark's time is recognised as an earlier batch's row
    with f.open("a") as fh:
        fh.write("u3,i2,4,3000\n")
    [second] = api.sync()
    b2 = api.batch(second)
    assert (b2["rows_in"], b2["rows_kept"], b2["duplicates_by_kind"]) == (2, 1, {"earlier_batch": 1})
    assert api.sources()[0]["watermark"] == datetime.fromtimestamp(3000, UTC)
    # a new file matching the glob is read in full
    write(tmp_path / "logs" / "day2.csv", "user_id,item_id,rating,ts\nu4,i3,4,500\n")
    [third] = api.sync()
    assert api.batch(third)["rows_kept"] == 1
    events = api.catalog.query("SELECT count(*) AS n FROM events WHERE operation = 'data.sync'")
    assert events[0]["n"] == 5  # one event per sync, no-op syncs included


def test_rows_appended_to_a_seen_file_are_all_accounted_and_none_twice(api, tmp_path):
    f = write(tmp_path / "ev.csv", "user_id,item_id,rating,ts\nu1,i1,5,1000\nu2,i1,3,2000\nu9,i9,5,9999999999\n")
    api.add_source("ev", f, ts_format="epoch_s")
    [first] = api.sync()
    assert api.batch(first)["quarantined_by_rule"] == {"future_timestamp": 1}
    os.utime(f, ns=(0, 0))  # touched: the future row is read again but is no new batch
    assert api.sync() == []
    # appended: an unparseable time, a time equal to the watermark, an empty time, a plain new row
    with f.open("a") as fh:
        fh.write("u3,i3,5,garbage\nu4,i4,5,2000\nu5,i5,5,\nu6,i6,4,3000\n")
    [second] = api.sync()
    b = api.batch(second)
    assert b["quarantined_by_rule"] == {"bad_timestamp": 1, "missing_key": 1}
    assert b["rows_kept"] == 2  # u4 (at the watermark, new) and u6
    assert b["duplicates_by_kind"] == {"earlier_batch": 2}  # u2 (kept before) and u9 (quarantined before)
    assert b["rows_in"] == b["rows_kept"] + b["rows_quarantined"] + b["rows_duplicate"] == 6
    assert sorted(r["user_id"] for r in api.interactions(second)) == ["u4", "u6"]
    assert [q["row"] for q in api.quarantine(batch=second, rule="bad_timestamp")] == [
        {"user_id": "u3", "item_id": "i3", "rating": "5", "ts": "garbage"}]
    assert len(api.quarantine(rule="future_timestamp")) == 1  # not quarantined a second time
    os.utime(f, ns=(1, 1))  # touched again: everything read is known
    assert api.sync() == []


def test_quarantine_keeps_the_whole_source_row(api, tmp_path):
    f = write(tmp_path / "ev.csv", "user_id,item_id,rating,ts,comment,device\nu1,i1,9,1000,too high,phone\n")
    api.add_source("ev", f, ts_format="epoch_s")
    api.sync()
    [q] = api.quarantine()
    assert q["rule"] == "rating_out_of_range"
    assert q["row"] == {"user_id": "u1", "item_id": "i1", "rating": "9", "ts": "1000", "comment": "too high",
                        "device": "phone"}
    # entity sources too: a user row without its key keeps every column
    write(tmp_path / "users.csv", "user_id,age,occupation,note\nu1,30,writer,ok\n,41,doctor,no id\n")
    api.add_source("users", tmp_path / "users.csv", kind="users", mapping={"user_id": "user_id", "age": "age"})
    api.sync()
    [uq] = [r for r in api.quarantine() if r["source"] == "users"]
    assert uq["rule"] == "missing_key"
    assert uq["row"] == {"user_id": None, "age": "41", "occupation": "doctor", "note": "no id"}


def test_noise_rule_counts_any_60_seconds_not_calendar_minutes(api, tmp_path):
    # 4 events of one user from 118 s to 121 s straddle a minute boundary; 3 more a minute apart are fine
    lines = ["user_id,item_id,rating,ts"] + [f"bot,i{k},5,{118 + k}" for k in range(4)]
    lines += [f"u1,i{k},5,{1000 + 60 * k}" for k in range(3)] + ["u2,i1,5,1000", "u2,i2,5,1060"]
    write(tmp_path / "ev.csv", "\n".join(lines) + "\n")
    api.add_source("ev", tmp_path / "ev.csv", ts_format="epoch_s", max_events_per_minute=3)
    [bid] = api.sync()
    assert api.batch(bid)["quarantined_by_rule"] == {"noise_burst": 4}
    assert {q["row"]["user_id"] for q in api.quarantine(rule="noise_burst")} == {"bot"}
    assert sorted(r["user_id"] for r in api.interactions(bid)) == ["u1", "u1", "u1", "u2", "u2"]


def test_a_source_added_before_its_files_gets_its_mapping_from_the_first_files(api, tmp_path):
    api.add_source("drop", str(tmp_path / "in" / "*.csv"), ts_format="epoch_s",  # nothing matches yet
                   mapping={"user_id": "uid", "item_id": "item_id", "ts": "timestamp"})
    assert api.sync() == []
    write(tmp_path / "in" / "1.csv", "uid,item_id,stars,timestamp\nu1,i1,5,1000\n")
    [bid] = api.sync()
    assert api.batch(bid)["rows_kept"] == 1
    assert api.sources()[0]["mapping"] == {"user_id": "uid", "item_id": "item_id", "ts": "timestamp",
                                           "rating": "stars"}  # completed from the file, and stored
    assert api.interactions(bid)[0]["rating"] == 5


def test_a_new_file_that_does_not_fit_the_mapping_stops_the_sync_and_names_it(api, tmp_path):
    write(tmp_path / "g" / "1.csv", "user_id,item_id,rating,ts\nu1,i1,5,1000\n")
    api.add_source("g", str(tmp_path / "g" / "*.csv"), ts_format="epoch_s")
    [first] = api.sync()
    bad = write(tmp_path / "g" / "2.csv", "who,what,stars,when\nu2,i2,4,2000\n")
    with pytest.raises(InvalidInput, match=r"source 'g', file .*2\.csv: .*no such column") as err:
        api.sync()
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    assert [b["id"] for b in api.batches()] == [first]  # nothing stored by the failed sync
    bad.unlink()
    write(tmp_path / "g" / "3.csv", "user_id,item_id,rating,ts\nu3,i3,4,3000\n")
    [second] = api.sync()
    assert api.batch(second)["rows_kept"] == 1


def test_window_cuts_history_into_consecutive_batches(api, tmp_path):
    day = 86400
    lines = ["user_id,item_id,rating,ts"] + [f"u{k},i{k},4,{k * day + 3600}" for k in range(20)]
    lines.append("u99,i99,4,garbage")
    write(tmp_path / "h.csv", "\n".join(lines) + "\n")
    api.add_source("h", tmp_path / "h.csv", ts_format="epoch_s")
    ids = api.sync(window="7d")
    bs = [api.batch(i) for i in ids]
    assert [b["rows_kept"] for b in bs] == [7, 7, 6]
    assert all(bs[k]["window_end"] == bs[k + 1]["window_start"] for k in range(2))
    assert bs[-1]["quarantined_by_rule"] == {"bad_timestamp": 1}  # rows without a time go to the last window
    assert sum(b["rows_in"] for b in bs) == 21
    assert len({b["sha256"] for b in bs}) == 3


def test_digest_is_content_only(tmp_path):
    rows = "user_id,item_id,rating,ts\nu1,i1,5,1000\nu2,i2,3,2000\n"
    swapped = "user_id,item_id,rating,ts\nu2,i2,3,2000\nu1,i1,5,1000\n"
    digests = []
    for k, text in enumerate((rows, swapped)):
        api = DataAPI(Catalog(tmp_path / f"r{k}" / "c.duckdb"), tmp_path / f"r{k}")
        write(tmp_path / f"f{k}.csv", text)
        api.add_source("s", tmp_path / f"f{k}.csv", ts_format="epoch_s")
        digests.append(api.batch(api.sync()[0])["sha256"])
    assert digests[0] == digests[1]


def test_entity_versions_keep_history(api, tmp_path):
    f = write(tmp_path / "items.csv", "item_id,title\ni1,Old title\n")
    api.add_source("items", f, kind="items")
    api.sync()
    write(f, "item_id,title\ni1,New title\n")
    os.utime(f, ns=(10**18, 10**18))
    api.sync()
    versions = api.catalog.query("SELECT attrs->>'title' AS t, valid_from FROM items ORDER BY valid_from")
    assert [v["t"] for v in versions] == ["Old title", "New title"]
    assert versions[0]["valid_from"].year == 1


def test_add_source_errors(api, tmp_path):
    f = write(tmp_path / "a.csv", "uid,movie,stars,time\nu1,i1,5,1000\n")
    with pytest.raises(InvalidInput, match="no such column"):
        api.add_source("a", f, mapping={"user_id": "nope"})
    g = write(tmp_path / "g.csv", "who,movie,stars,time\nu1,i1,5,1000\n")
    with pytest.raises(InvalidInput, match="no user_id"):
        api.add_source("g", g, mapping={"item_id": "movie", "ts": "time"})
    with pytest.raises(InvalidInput, match="ts_format"):
        api.add_source("a", f, ts_format="weird")
    mapping = {"user_id": "uid", "item_id": "movie", "rating": "stars", "ts": "time"}
    api.add_source("a", f, mapping=mapping)
    api.add_source("a", f, mapping=mapping)  # same definition: no-op
    with pytest.raises(Conflict):
        api.add_source("a", tmp_path / "other.csv", mapping=mapping)
    with pytest.raises(NotFound):
        api.batch("b999999")
    with pytest.raises(NotFound):
        api.sync(sources=["missing"])


@pytest.mark.parametrize("point", ["staged", "inserted", "side_tables", "before_commit"])
def test_crash_mid_sync_leaves_no_partial_batch(tmp_path, point):
    syn = synthetic.generate(tmp_path / "syn", rows=3000, users=30, items=20, seed=1)
    root = tmp_path / "root"
    api = DataAPI(Catalog(root / "catalog.duckdb"), root)
    syn.register(api)
    code = (f"from pathlib import Path; from adapters_mgr.catalog.db import Catalog; "
            f"from adapters_mgr.data.api import DataAPI; "
            f"DataAPI(Catalog({str(root / 'catalog.duckdb')!r}), Path({str(root)!r})).sync()")
    env = {**os.environ, "ADAPTERS_MGR_FAULT": f"sync:{point}"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 137, proc.stderr.decode()
    counts = api.catalog.query(
        "SELECT (SELECT count(*) FROM batches) AS b, (SELECT count(*) FROM interactions) AS i, "
        "(SELECT count(*) FROM quarantine) AS q, (SELECT count(*) FROM data_watermarks) AS w, "
        "(SELECT count(*) FROM events WHERE operation = 'data.sync') AS e")[0]
    assert counts == {"b": 0, "i": 0, "q": 0, "w": 0, "e": 0}
    [bid] = api.sync()
    b = api.batch(bid)
    assert b["rows_in"] == syn.truth["rows"] and accounted(b)
    assert api.verify(bid)["ok"]


def test_cross_source_tolerance_across_grid_boundaries(api, tmp_path):
    """Dedup looks only at rows sharing a (user, item, time bucket) key or a bucket-boundary key;
    pairs straddling a boundary (before 1970 too), and pairs exactly one tolerance apart, must
    still be found."""
    edge = classify.GRID * 1000  # bucket width in ms for the default 1 s tolerance
    pairs = [  # (ms in source a, ms in source b, duplicate?)
        (edge - 100, edge + 100, True),            # straddles a bucket boundary
        (2 * edge - 1, 2 * edge, True),            # straddles it by one millisecond
        (3 * edge - 500, 3 * edge + 500, True),    # exactly one tolerance (1 s) apart, across a boundary
        (4 * edge - 500, 4 * edge + 501, False),   # one millisecond more than the tolerance
        (5 * edge + 300, 5 * edge + 1300, True),   # exactly one tolerance apart inside a bucket
        (-edge - 100, -edge + 100, True),          # before 1970: division truncates toward zero
        (-400, 400, True),                         # around zero
        (7 * edge + 10, 7 * edge + 20, True),
    ]
    a = ["user_id,item_id,rating,ts"] + [f"u{k},i{k},4,{ta}" for k, (ta, _tb, _d) in enumerate(pairs)]
    b = ["user_id,item_id,rating,ts"] + [f"u{k},i{k},4,{tb}" for k, (_ta, tb, _d) in enumerate(pairs)]
    write(tmp_path / "a.csv", "\n".join(a) + "\n")
    write(tmp_path / "b.csv", "\n".join(b) + "\n")
    api.add_source("a", tmp_path / "a.csv", ts_format="epoch_ms")
    api.add_source("b", tmp_path / "b.csv", ts_format="epoch_ms")
    [bid] = api.sync()
    b1 = api.batch(bid)
    want = sum(d for _a, _b, d in pairs)
    assert b1["duplicates_by_kind"] == {"cross_source": want} and accounted(b1)
    dups = {d["user_id"] for d in api.duplicates()}
    assert dups == {f"u{k}" for k, (_a, _b, d) in enumerate(pairs) if d}
    assert all(d["source"] == "b" for d in api.duplicates())  # the earlier copy is kept
    # the same events again in a new file: earlier_batch through the same grids
    again = [f"u{k},i{k},4,{tb}" for k, (_ta, tb, _d) in enumerate(pairs)] + ["u99,i99,4,99000"]
    write(tmp_path / "c.csv", "\n".join(["user_id,item_id,rating,ts", *again]) + "\n")
    api.add_source("c", tmp_path / "c.csv", ts_format="epoch_ms")
    [bid2] = api.sync()
    b2 = api.batch(bid2)
    assert b2["duplicates_by_kind"] == {"earlier_batch": len(pairs)} and b2["rows_kept"] == 1


def test_sync_restores_duckdb_compression_setting(api, tmp_path):
    write(tmp_path / "e.csv", "user_id,item_id,rating,ts\nu1,i1,5,1000\n")
    api.add_source("e", tmp_path / "e.csv", ts_format="epoch_s")
    before = api.catalog.query("SELECT current_setting('disabled_compression_methods') AS v")[0]["v"]
    api.sync()
    after = api.catalog.query("SELECT current_setting('disabled_compression_methods') AS v")[0]["v"]
    assert after == before


def test_glob_source_records_the_file_of_each_quarantined_and_duplicate_row(api, tmp_path):
    f1 = write(tmp_path / "g" / "1.csv", "user_id,item_id,rating,ts\nu1,i1,5,1000\n,i2,5,1001\n")
    f2 = write(tmp_path / "g" / "2.csv", "user_id,item_id,rating,ts\nu1,i1,5,1000\nu3,i3,9,1002\n")
    api.add_source("g", str(tmp_path / "g" / "*.csv"), ts_format="epoch_s")
    [bid] = api.sync()
    b = api.batch(bid)
    assert b["rows_in"] == 4 and b["rows_kept"] == 1 and accounted(b)
    files = {q["rule"]: Path(q["file"]).name for q in api.quarantine(bid)}
    assert files == {"missing_key": f1.name, "rating_out_of_range": f2.name}
    [dup] = api.duplicates()
    assert dup["kind"] == "exact" and Path(dup["file"]).name == f2.name  # the copy in the later file


def test_repeated_marks_exactly_the_values_seen_more_than_once():
    import numpy as np

    rng = np.random.default_rng(7)
    values = rng.integers(0, 2**64 - 1, 50_000, dtype=np.uint64)
    values[10:20] = values[0]  # one value eleven times
    values[30] = values[40]  # one pair
    values[50] = values[0] ^ np.uint64(1)  # same top bits as a repeated value: passes the flags, not isin
    values[41] = values[0]
    want = np.zeros(len(values), dtype=bool)
    want[[0, *range(10, 20), 30, 40, 41]] = True
    assert classify._repeated(values).tolist() == want.tolist()
    # a NULL (masked) entry matches nothing, even where its stored value repeats
    masked = np.ma.masked_array(values.copy(), mask=np.arange(len(values)) == 41)
    want[41] = False
    assert classify._repeated(masked).tolist() == want.tolist()
    masked = np.ma.masked_array(values.copy(), mask=np.isin(np.arange(len(values)), [30, 41]))
    want[[30, 40]] = False  # 30 is NULL now, and it was the only twin of 40
    assert classify._repeated(masked).tolist() == want.tolist()
    # with none=0, zeros stand for "no key": they never match, not even each other
    zeros = values.copy()
    zeros[[5, 6, 7]] = 0
    want = np.zeros(len(values), dtype=bool)
    want[[0, *range(10, 20), 30, 40, 41]] = True
    assert classify._repeated(zeros, none=0).tolist() == want.tolist()
    assert classify._repeated(zeros)[[5, 6, 7]].all()  # without none=0 they are an ordinary value
    assert not classify._repeated(np.arange(1000, dtype=np.uint64) * np.uint64(2**50)).any()
    assert classify._repeated(np.array([], dtype=np.uint64)).tolist() == []


def test_sync_restores_duckdb_insertion_order_setting(api, tmp_path):
    write(tmp_path / "e.csv", "user_id,item_id,rating,ts\nu1,i1,5,1000\n")
    api.add_source("e", tmp_path / "e.csv", ts_format="epoch_s")
    sql = "SELECT current_setting('preserve_insertion_order') AS v"
    assert api.catalog.query(sql)[0]["v"] is True
    api.sync()
    assert api.catalog.query(sql)[0]["v"] is True


def test_not_in_dense_and_sparse_ids():
    import numpy as np

    from adapters_mgr.data.sync import _not_in

    base = np.int64(2**55)  # row ids of rows added in a transaction start at a large offset
    ids = base + np.arange(100, dtype=np.int64)[::-1]
    drop = base + np.array([3, 50, 99], dtype=np.int64)
    want = [int(i - base) not in (3, 50, 99) for i in ids]
    assert _not_in(ids, drop).tolist() == want
    sparse = np.array([0, 10**12, 5, 2**40], dtype=np.int64)
    assert _not_in(sparse, np.array([10**12, 7], dtype=np.int64)).tolist() == [True, False, True, True]
    assert _not_in(ids, np.array([], dtype=np.int64)).all()


def test_epoch_expression_is_the_utc_instant():
    """Epoch numbers become the UTC instant; out-of-range ones (even where scaling to microseconds
    would overflow a BIGINT) become NULL, i.e. a quarantined bad_timestamp, not a failed sync."""
    import duckdb

    from adapters_mgr.data.timeparse import ts_expr

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    values = [-1500, 0, 999, 1_704_067_200_123, 253_402_300_799, 10**14, 10**17, -(10**18), 2**62]
    for fmt, scale in (("epoch_s", 1_000_000), ("epoch_ms", 1_000), ("epoch_us", 1)):
        for sql_type in ("BIGINT", "DOUBLE", "VARCHAR"):
            rows = con.execute(
                f"SELECT x, {ts_expr('x', fmt, numeric=sql_type != 'VARCHAR')} AS got, "
                f"CASE WHEN x::HUGEINT * {scale} BETWEEN -6.2e16 AND 2.5e17 "
                f"THEN make_timestamp((x::HUGEINT * {scale})::BIGINT)::TIMESTAMPTZ END AS want "
                f"FROM (SELECT unnest(?::BIGINT[])::{sql_type} AS x)", [values]).fetchall()
            assert all(got == want for _x, got, want in rows), (fmt, sql_type, rows)
            assert sum(got is not None for _x, got, _w in rows) >= 3


def test_failed_sync_restores_duckdb_settings_and_writes_nothing(api, tmp_path, monkeypatch):
    from adapters_mgr.data import sync as sync_mod

    write(tmp_path / "e.csv", "user_id,item_id,rating,ts\nu1,i1,5,1000\nu2,i2,4,2000\n")
    api.add_source("e", tmp_path / "e.csv", ts_format="epoch_s")
    sql = ("SELECT current_setting('preserve_insertion_order') AS p, "
           "current_setting('disabled_compression_methods') AS c")
    before = api.catalog.query(sql)[0]

    def boom(point):
        if point == "inserted":
            raise RuntimeError("injected failure")

    monkeypatch.setattr(sync_mod, "_fault", boom)
    with pytest.raises(RuntimeError, match="injected"):
        api.sync()
    assert api.catalog.query(sql)[0] == before
    assert api.catalog.query("SELECT count(*) AS n FROM interactions")[0]["n"] == 0
    monkeypatch.undo()
    [bid] = api.sync()
    assert api.batch(bid)["rows_kept"] == 2


def test_the_data_calls_are_on_the_manager_too(tmp_path):
    from adapters_mgr import AdapterManager

    mgr = AdapterManager(tmp_path / "root")
    write(tmp_path / "ev.csv", "user_id,item_id,rating,ts\nu1,i1,5,1000\nu2,i1,9,2000\nu1,i2,4,700000\n")
    src = mgr.add_source("ev", tmp_path / "ev.csv", ts_format="epoch_s")
    assert src["name"] == "ev"
    ids = mgr.sync(window="7d")
    assert len(ids) == 2 and [b["id"] for b in mgr.batches()] == ids
    assert mgr.batch(ids[0])["quarantined_by_rule"] == {"rating_out_of_range": 1}
    assert [q["rule"] for q in mgr.quarantine(ids[0])] == ["rating_out_of_range"]
    assert mgr.quarantine(rule="rating_out_of_range", limit=0) == []
    a = mgr.replay_sample(ids[1], ratio=1.0, seed=3)
    assert a == mgr.replay_sample([ids[0]], ratio=1.0, seed=3) and len(a) == 1
    with pytest.raises(NotFound):
        mgr.batch("b999999")


def test_a_glob_that_matches_nothing_is_said_from_the_python_api(api, tmp_path):
    """Accepted (a folder may fill later) but never silent: a warning at add and at each sync."""
    from adapters_mgr.data.api import NoFilesMatched

    pattern = str(tmp_path / "landing" / "*.csv")
    with pytest.warns(NoFilesMatched, match="no file matches"):
        src = api.add_source("landing", pattern, format="csv")
    assert src["files_matched"] == 0
    with pytest.warns(NoFilesMatched, match="landing.*0 files matched"):
        assert api.sync() == []
    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "a.csv").write_text("user_id,item_id,rating,ts\nu1,i1,5,2024-01-01T00:00:00Z\n")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", NoFilesMatched)  # a glob that matches now says nothing
        assert len(api.sync()) == 1
        assert api.add_source("landing", pattern, format="csv")["files_matched"] == 1
