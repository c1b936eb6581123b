"""How kept rows are stored: ``interaction_rows`` with integer batch and source codes, ``interactions``
the view users query, and the migration that moved catalogs of the earlier shape onto it."""

from __future__ import annotations

import duckdb
import pytest

from adapters_mgr.catalog.data_tables import source_ids
from adapters_mgr.catalog.db import Catalog
from adapters_mgr.catalog.migrations import MIGRATIONS, d002_interaction_rows
from adapters_mgr.data import digest
from adapters_mgr.data.api import DataAPI
from adapters_mgr.errors import IntegrityError

VIEW_COLUMNS = ["batch_id", "user_id", "item_id", "ts", "rating", "label", "source", "source_event_id"]


@pytest.fixture
def api(tmp_path):
    return DataAPI(Catalog(tmp_path / "root" / "catalog.duckdb"), tmp_path / "root")


def _two_sources(api, tmp_path):
    (tmp_path / "a.csv").write_text("user_id,item_id,rating,ts\nu1,i1,5,1000\nu2,i2,2,700000\nu3,i1,4,1400000\n")
    (tmp_path / "b.csv").write_text("uid,mid,stars,time\nu4,i3,3,1000\nu5,i2,5,1300000\n")
    api.add_source("a", tmp_path / "a.csv", ts_format="epoch_s")
    api.add_source("b", tmp_path / "b.csv", ts_format="epoch_s",
                   mapping={"user_id": "uid", "item_id": "mid", "rating": "stars", "ts": "time"})


def test_the_view_shows_batch_ids_and_source_names_of_windowed_batches(api, tmp_path):
    _two_sources(api, tmp_path)
    ids = api.sync(window="7d")
    assert len(ids) == 3  # t = 1000 s, 700,000 s and 1.3-1.4M s fall in three weeks
    rows = api.catalog.query("SELECT batch_id, user_id, source FROM interactions ORDER BY user_id")
    assert [(r["user_id"], r["source"]) for r in rows] == [("u1", "a"), ("u2", "a"), ("u3", "a"), ("u4", "b"),
                                                           ("u5", "b")]
    by_user = {r["user_id"]: r["batch_id"] for r in rows}
    assert by_user["u1"] == by_user["u4"] == ids[0] and by_user["u2"] == ids[1]
    assert by_user["u3"] == by_user["u5"] == ids[2]
    cols = [r["column_name"] for r in api.catalog.query(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'interactions' "
        "ORDER BY ordinal_position")]
    assert cols == VIEW_COLUMNS
    for bid in ids:
        assert api.verify(bid)["ok"]
        assert len(api.interactions(bid)) == api.batch(bid)["rows_kept"]
    # storage holds integers, not the strings
    stored = api.catalog.query("SELECT DISTINCT batch_seq, source_id FROM interaction_rows ORDER BY ALL")
    assert all(isinstance(r["batch_seq"], int) and isinstance(r["source_id"], int) for r in stored)


def test_a_removed_source_keeps_its_name_on_its_rows_and_gets_its_id_back(api, tmp_path):
    _two_sources(api, tmp_path)
    api.sync()
    before = api.catalog.query("SELECT id FROM data_source_ids WHERE name = 'b'")[0]["id"]
    api.remove_source("b")
    assert api.catalog.query("SELECT count(*) AS n FROM interactions WHERE source = 'b'")[0]["n"] == 2
    with api.catalog.transaction() as con:
        assert source_ids(con, ["c", "b", "a"])[1:] == [before, 0]
        assert source_ids(con, ["c"]) == source_ids(con, ["c"])  # asking twice adds nothing
    assert api.catalog.query("SELECT count(*) AS n FROM data_source_ids")[0]["n"] == 3


def test_migration_moves_every_row_of_an_older_catalog_and_the_view_reads_the_same(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("SET TimeZone = 'UTC'")
    con.execute("CREATE TABLE _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ)")
    for migration in MIGRATIONS:
        if migration is d002_interaction_rows:
            break
        migration(con)
        con.execute("INSERT INTO _migrations VALUES (?, now())", [migration.__name__])
    # a catalog as the previous release wrote it: strings in the interactions table
    con.execute("INSERT INTO data_sources VALUES ('gone', 'interactions', 'x.csv', 'csv', '{}', NULL, NULL, '{}', 0, "
                "now(), now())")
    con.execute("INSERT INTO batches (id, sha256, num_rows, created_at, seq, kind) VALUES "
                "('b000001', 'x', 2, now(), 1, 'interactions'), ('b000002', 'y', 1, now(), 2, 'interactions')")
    con.execute("""INSERT INTO interactions VALUES
        ('b000001', 'u1', 'i1', '2024-01-01 00:00:00+00', 5, 1, 'web', 'e1'),
        ('b000001', 'u2', 'i1', '2024-01-02 00:00:00+00', 2, 0, 'app', NULL),
        ('b000002', 'u1', 'i2', '2024-01-09 00:00:00+00', NULL, 1, 'web', 'e9')""")
    old = con.execute("SELECT * FROM interactions ORDER BY ALL").fetchall()
    con.close()
    api = DataAPI(Catalog(path), tmp_path / "root")
    with api.catalog.connect() as c:
        assert c.execute("SELECT * FROM interactions ORDER BY ALL").fetchall() == old
        kind = c.execute(
            "SELECT table_type FROM information_schema.tables WHERE table_name = 'interactions'").fetchone()
        assert kind == ("VIEW",)
        names = c.execute("SELECT name FROM data_source_ids ORDER BY id").fetchall()
    assert sorted(n for (n,) in names) == ["app", "gone", "web"]


def test_migration_refuses_rows_whose_batch_has_no_number(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    for migration in MIGRATIONS:
        if migration is d002_interaction_rows:
            break
        migration(con)
    con.execute("INSERT INTO batches (id, sha256, num_rows, created_at) VALUES ('odd', 'x', 1, now())")
    con.execute("INSERT INTO interactions VALUES ('odd', 'u1', 'i1', now(), 5, 1, 'web', NULL)")
    con.execute("BEGIN")
    with pytest.raises(RuntimeError, match="1 interactions rows have no numbered batch"):
        d002_interaction_rows(con)
    con.execute("ROLLBACK")
    assert con.execute("SELECT count(*) FROM interactions").fetchone() == (1,)


def test_verify_names_a_duckdb_version_change_instead_of_calling_the_catalog_altered(api, tmp_path):
    _two_sources(api, tmp_path)
    [bid] = api.sync()
    assert api.verify(bid)["ok"]
    with api.catalog.transaction() as con:  # as if recorded by another DuckDB whose hash() differs
        con.execute("UPDATE batches SET sha256 = 'f00d', digest_method = 'sha256(...) duckdb=0.0.1' WHERE id = ?",
                    [bid])
    with pytest.raises(IntegrityError, match=r"duckdb=0\.0\.1.*cannot be checked here \(the row count, 5, matches\)"):
        api.verify(bid)
    with api.catalog.transaction() as con:  # same method, different digest: the rows were altered
        con.execute("UPDATE batches SET digest_method = ? WHERE id = ?", [digest.METHOD, bid])
    with pytest.raises(IntegrityError, match="the catalog was altered"):
        api.verify(bid)
