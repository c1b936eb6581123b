"""The data side's tables, as append-only named migrations applied after the core ones.

Why here and not in ``catalog/migrations.py``: the data side owns its schema, but it lives in the
one catalog file so adapters can link to batches in the same transaction-consistent store. Never
edit a released migration; append ``d002_...`` instead.

Tables (all queryable by users directly):

- ``batches`` (core table, extended here): one immutable row per batch with its sources, time
  range, window, rows in / kept / quarantined / duplicates, counts per rule and per duplicate kind,
  and a sha256 over its canonical sorted kept rows.
- ``interactions``: every kept row with the batch and source it arrived from. A view (since
  ``d002``) over ``interaction_rows``, which stores the batch as its ``seq`` number and the source as
  a small id (``data_source_ids``); see :func:`d002_interaction_rows` for why.
- ``quarantine``: every row a cleaning rule rejected, with the rule and the source row.
- ``duplicates``: every row dropped as a duplicate, with the kind of duplicate.
- ``users`` / ``items``: entity attribute versions, each with the time it became valid.
- ``data_sources``, ``data_source_files``, ``data_watermarks``, ``data_syncs``, ``data_templates``.
"""

from __future__ import annotations

import duckdb


def d001_data_core(con: duckdb.DuckDBPyConnection) -> None:
    for column, sql_type in [
        ("seq", "INTEGER"),
        ("kind", "VARCHAR"),
        ("sync_id", "VARCHAR"),
        ("sources", "JSON"),
        ("ts_min", "TIMESTAMPTZ"),
        ("ts_max", "TIMESTAMPTZ"),
        ("window_start", "TIMESTAMPTZ"),
        ("window_end", "TIMESTAMPTZ"),
        ("rows_in", "BIGINT"),
        ("rows_kept", "BIGINT"),
        ("rows_quarantined", "BIGINT"),
        ("rows_duplicate", "BIGINT"),
        ("quarantined_by_rule", "JSON"),
        ("duplicates_by_kind", "JSON"),
        ("num_users", "BIGINT"),
        ("num_items", "BIGINT"),
        ("digest_method", "VARCHAR"),
    ]:
        con.execute(f"ALTER TABLE batches ADD COLUMN IF NOT EXISTS {column} {sql_type}")
    con.execute(
        """
        CREATE TABLE data_sources (
            name        VARCHAR PRIMARY KEY,
            kind        VARCHAR NOT NULL,      -- interactions | users | items
            uri         VARCHAR NOT NULL,      -- file or glob
            format      VARCHAR NOT NULL,      -- csv | json | parquet
            mapping     JSON NOT NULL,         -- canonical field -> source column
            ts_format   VARCHAR,               -- as given: epoch_s | epoch_ms | epoch_us | iso | strptime pattern
            ts_detected VARCHAR,               -- what detection found when ts_format was not given
            options     JSON NOT NULL,         -- reader options, label threshold, rating range, rules...
            priority    INTEGER NOT NULL,      -- lower wins when the same event comes from two sources
            created_at  TIMESTAMPTZ NOT NULL,
            updated_at  TIMESTAMPTZ NOT NULL
        );

        CREATE TABLE data_source_files (
            source      VARCHAR NOT NULL,
            path        VARCHAR NOT NULL,
            size        BIGINT NOT NULL,
            mtime_ns    BIGINT NOT NULL,
            first_sync  VARCHAR NOT NULL,
            last_sync   VARCHAR NOT NULL,
            PRIMARY KEY (source, path)
        );

        CREATE TABLE data_watermarks (
            source      VARCHAR PRIMARY KEY,
            ts_max      TIMESTAMPTZ,           -- newest valid event time taken in from this source
            last_sync   VARCHAR NOT NULL,
            updated_at  TIMESTAMPTZ NOT NULL
        );

        CREATE TABLE data_syncs (
            id          VARCHAR PRIMARY KEY,
            started_at  TIMESTAMPTZ NOT NULL,
            finished_at TIMESTAMPTZ NOT NULL,
            sources     JSON,
            window_spec VARCHAR,
            rows_read   BIGINT,
            batch_ids   JSON,
            detail      JSON
        );

        CREATE TABLE interactions (
            batch_id        VARCHAR NOT NULL,
            user_id         VARCHAR NOT NULL,
            item_id         VARCHAR NOT NULL,
            ts              TIMESTAMPTZ NOT NULL,
            rating          DOUBLE,
            label           TINYINT NOT NULL,
            source          VARCHAR NOT NULL,
            source_event_id VARCHAR
        );

        CREATE TABLE quarantine (
            sync_id   VARCHAR NOT NULL,
            batch_id  VARCHAR,                 -- NULL for entity sources (users / items)
            source    VARCHAR NOT NULL,
            rule      VARCHAR NOT NULL,
            detail    VARCHAR,
            file      VARCHAR,
            row       JSON                     -- the source row's mapped columns, as read
        );

        CREATE TABLE duplicates (
            sync_id         VARCHAR NOT NULL,
            batch_id        VARCHAR,
            source          VARCHAR NOT NULL,
            kind            VARCHAR NOT NULL,  -- exact | same_event_id | cross_source | earlier_batch
            user_id         VARCHAR,
            item_id         VARCHAR,
            ts              TIMESTAMPTZ,
            source_event_id VARCHAR,
            file            VARCHAR
        );

        CREATE TABLE users (
            user_id     VARCHAR NOT NULL,
            valid_from  TIMESTAMPTZ NOT NULL,
            attrs       JSON NOT NULL,
            source      VARCHAR NOT NULL,
            sync_id     VARCHAR NOT NULL,
            PRIMARY KEY (user_id, valid_from)
        );

        CREATE TABLE items (
            item_id     VARCHAR NOT NULL,
            valid_from  TIMESTAMPTZ NOT NULL,
            attrs       JSON NOT NULL,
            source      VARCHAR NOT NULL,
            sync_id     VARCHAR NOT NULL,
            PRIMARY KEY (item_id, valid_from)
        );

        CREATE TABLE data_templates (
            kind        VARCHAR PRIMARY KEY,   -- user | item
            template    VARCHAR NOT NULL,
            updated_at  TIMESTAMPTZ NOT NULL
        );
        """
    )


# The user-facing shape of a kept row (the view keeps d001's columns, so plain SQL keeps working).
INTERACTIONS_VIEW = """
CREATE VIEW interactions AS
SELECT b.id AS batch_id, r.user_id, r.item_id, r.ts, r.rating, r.label, s.name AS source, r.source_event_id
FROM interaction_rows r
JOIN batches b ON b.seq = r.batch_seq
JOIN data_source_ids s ON s.id = r.source_id
"""


def d002_interaction_rows(con: duckdb.DuckDBPyConnection) -> None:
    """Store each kept row's batch and source as integers; ``interactions`` becomes a view.

    Why: writing the kept rows is the largest step of a sync after reading them, and DuckDB stores
    the short per-row strings uncompressed (at any compression setting tried, 2.0.1). The batch id
    and source name are the same for millions of rows; as integers they compress to almost
    nothing. Measured on 9.8M kept rows: the insert takes 3.6 instead of 4.8 CPU s (2.0 instead of
    2.7 s). Readers keep the ``interactions`` columns through the view; internal readers that need
    neither batch nor source read ``interaction_rows`` and skip the two small joins.

    ``data_source_ids`` is never pruned: a removed source's rows keep their name, and a source
    re-added under the same name gets its old id back.
    """
    con.execute(
        """
        CREATE TABLE data_source_ids (
            id    INTEGER PRIMARY KEY,
            name  VARCHAR NOT NULL UNIQUE
        );
        CREATE TABLE interaction_rows (
            batch_seq       INTEGER NOT NULL,      -- batches.seq
            user_id         VARCHAR NOT NULL,
            item_id         VARCHAR NOT NULL,
            ts              TIMESTAMPTZ NOT NULL,
            rating          DOUBLE,
            label           TINYINT NOT NULL,
            source_id       INTEGER NOT NULL,      -- data_source_ids.id
            source_event_id VARCHAR
        );
        """
    )
    names = con.execute("SELECT name FROM data_sources UNION SELECT DISTINCT source FROM interactions").fetchall()
    source_ids(con, sorted(name for (name,) in names))
    con.execute(
        """
        INSERT INTO interaction_rows
        SELECT b.seq, i.user_id, i.item_id, i.ts, i.rating, i.label, s.id, i.source_event_id
        FROM interactions i JOIN batches b ON b.id = i.batch_id JOIN data_source_ids s ON s.name = i.source
        WHERE b.seq IS NOT NULL;
        """
    )
    moved, before = con.execute(
        "SELECT (SELECT count(*) FROM interaction_rows), (SELECT count(*) FROM interactions)").fetchone()
    if moved != before:  # a row whose batch has no seq number: refuse rather than drop it
        raise RuntimeError(f"migration d002: {before - moved} interactions rows have no numbered batch; "
                           "the catalog is left as it was")
    con.execute("DROP TABLE interactions")
    con.execute(INTERACTIONS_VIEW)


def source_ids(con: duckdb.DuckDBPyConnection, names: list[str]) -> list[int]:
    """The ``data_source_ids`` id of each name, adding names not seen before (in the caller's transaction)."""
    con.execute(
        "INSERT INTO data_source_ids SELECT (SELECT coalesce(max(id), -1) FROM data_source_ids) + row_number() "
        "OVER (ORDER BY name), name FROM (SELECT DISTINCT unnest(?::VARCHAR[]) AS name) "
        "WHERE name NOT IN (SELECT name FROM data_source_ids)",
        [names],
    )
    ids = dict(con.execute("SELECT name, id FROM data_source_ids WHERE name IN (SELECT unnest(?::VARCHAR[]))",
                           [names]).fetchall())
    return [int(ids[n]) for n in names]


DATA_MIGRATIONS = [d001_data_core, d002_interaction_rows]
