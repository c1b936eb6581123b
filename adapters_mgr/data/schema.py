"""The data side's tables, as append-only named migrations applied after the core ones.

Why here and not in ``catalog/migrations.py``: the data side owns its schema, but it lives in the
one catalog file so adapters can link to batches in the same transaction-consistent store. Never
edit a released migration; append ``d002_...`` instead.

Tables (all queryable by users directly):

- ``batches`` (core table, extended here): one immutable row per batch with its sources, time
  range, window, rows in / kept / quarantined / duplicates, counts per rule and per duplicate kind,
  and a sha256 over its canonical sorted kept rows.
- ``interactions``: every kept row with the batch it arrived in.
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


DATA_MIGRATIONS = [d001_data_core]
