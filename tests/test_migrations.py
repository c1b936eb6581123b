"""The migration registry: ``@migration`` appends in file order, each is applied once and recorded by name."""

from __future__ import annotations

import duckdb
import pytest

from adapters_mgr.catalog import migrations
from adapters_mgr.catalog.db import Catalog
from adapters_mgr.catalog.migrations import MIGRATIONS, apply_migrations, migration

# The names released catalogs hold in ``_migrations``: never rename or reorder these.
RELEASED = ["m001_core", "m002_recommendations", "m003_lineage_index", "d001_data_core", "d002_interaction_rows",
            "d003_bad_lines_and_late_rows", "m004_evaluations"]


def _recorded(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [name for (name,) in con.execute("SELECT name FROM _migrations ORDER BY applied_at, name").fetchall()]


@pytest.fixture
def registry(monkeypatch):
    """A throw-away copy of the registry: ``@migration`` appends to it, ``apply_migrations`` reads it."""
    fresh = list(MIGRATIONS)
    monkeypatch.setattr(migrations, "MIGRATIONS", fresh)
    return fresh


def test_the_registry_holds_the_released_migrations_in_order():
    assert [fn.__name__ for fn in MIGRATIONS] == RELEASED
    assert len(set(MIGRATIONS)) == len(MIGRATIONS)


def test_the_decorator_appends_and_returns_the_function(registry):
    def m999_probe(con):  # pragma: no cover - never applied here
        raise AssertionError

    assert migration(m999_probe) is m999_probe
    assert registry[-1] is m999_probe and [fn.__name__ for fn in registry[:-1]] == RELEASED


def test_a_fresh_catalog_records_exactly_the_registered_names_and_reopening_applies_nothing(tmp_path):
    con = duckdb.connect(str(tmp_path / "c.duckdb"))
    assert apply_migrations(con) == RELEASED
    assert _recorded(con) == RELEASED
    assert apply_migrations(con) == []
    assert _recorded(con) == RELEASED


def test_a_catalog_opens_with_every_migration_recorded(tmp_path):
    cat = Catalog(tmp_path / "root" / "catalog.duckdb")
    with cat.connect() as con:
        assert _recorded(con) == RELEASED
        assert apply_migrations(con) == []


def test_a_newly_registered_migration_is_applied_once_after_the_others(tmp_path, registry):
    con = duckdb.connect(str(tmp_path / "c.duckdb"))
    apply_migrations(con)
    calls = []

    @migration
    def m999_add_notes(c: duckdb.DuckDBPyConnection) -> None:
        calls.append(1)
        c.execute("CREATE TABLE notes (adapter_id INTEGER, text VARCHAR)")

    assert apply_migrations(con) == ["m999_add_notes"]
    assert apply_migrations(con) == []
    assert calls == [1]
    assert _recorded(con) == [*RELEASED, "m999_add_notes"]
    assert con.execute("SELECT count(*) FROM notes").fetchone() == (0,)


def test_a_failing_migration_leaves_nothing_behind_and_is_retried(tmp_path, registry):
    con = duckdb.connect(str(tmp_path / "c.duckdb"))
    apply_migrations(con)
    broken = True

    @migration
    def m999_flaky(c: duckdb.DuckDBPyConnection) -> None:
        c.execute("CREATE TABLE flaky (x INTEGER)")
        if broken:
            raise RuntimeError("half way")

    with pytest.raises(RuntimeError, match="half way"):
        apply_migrations(con)
    assert _recorded(con) == RELEASED
    assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'flaky'").fetchone() == (0,)
    broken = False
    assert apply_migrations(con) == ["m999_flaky"]


def test_migrations_apply_in_registry_order_and_skip_recorded_ones(tmp_path, registry):
    con = duckdb.connect(str(tmp_path / "c.duckdb"))
    apply_migrations(con)
    order = []

    @migration
    def m998_first(c):
        order.append("m998_first")

    @migration
    def m997_second(c):  # registered later, so applied later, whatever its name sorts as
        order.append("m997_second")

    con.execute("INSERT INTO _migrations VALUES ('m998_first', now())")  # as if applied by another process
    assert apply_migrations(con) == ["m997_second"]
    assert order == ["m997_second"]
    con.execute("DELETE FROM _migrations WHERE name IN ('m998_first', 'm997_second')")
    order.clear()
    assert apply_migrations(con) == ["m998_first", "m997_second"]
    assert order == ["m998_first", "m997_second"]
