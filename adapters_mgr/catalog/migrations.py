"""Append-only, named schema migrations (the simonw/llm habit): the catalog's whole schema.

The catalog is the one database, so every table's DDL is here, the data side's included: each
migration is a function decorated with :func:`migration`, which appends it to :data:`MIGRATIONS` in
the order of this file. :func:`apply_migrations` runs each one not yet recorded in ``_migrations``,
once, in that order, in its own transaction, and records its function name.

Never edit, rename or reorder a released migration (the recorded names are the functions' names):
append a new one at the bottom of this file, so the order stays the order they were written in. The
``m`` migrations are the core tables, the ``d`` ones the data side's (see
:mod:`adapters_mgr.catalog.data_tables`).
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb

from adapters_mgr.catalog import lineage_index
from adapters_mgr.catalog.data_tables import source_ids
from adapters_mgr.catalog.sql import atomic, utcnow

Migration = Callable[[duckdb.DuckDBPyConnection], None]

MIGRATIONS: list[Migration] = []
"""Every migration, in the order it is applied; filled by :func:`migration` as this module loads."""


def migration(fn: Migration) -> Migration:
    """Register ``fn`` as the next migration; it is recorded in ``_migrations`` under ``fn.__name__``."""
    MIGRATIONS.append(fn)
    return fn


def apply_migrations(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Apply every registered migration not yet recorded, each in its own transaction; return their names."""
    con.execute("CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ)")
    done = {row[0] for row in con.execute("SELECT name FROM _migrations").fetchall()}
    applied: list[str] = []
    for fn in MIGRATIONS:
        name = fn.__name__
        if name in done:
            continue
        with atomic(con):
            fn(con)
            con.execute("INSERT INTO _migrations VALUES (?, ?)", [name, utcnow()])
        applied.append(name)
    return applied


# -- core tables -------------------------------------------------------------------------------


@migration
def m001_core(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        """
        CREATE SEQUENCE IF NOT EXISTS adapter_id_seq START 1;
        CREATE SEQUENCE IF NOT EXISTS event_id_seq START 1;
        CREATE SEQUENCE IF NOT EXISTS alias_move_id_seq START 1;

        CREATE TABLE base_models (
            id              VARCHAR PRIMARY KEY,      -- 'base-' + first 12 hex of weights_sha256
            name            VARCHAR NOT NULL,
            source          VARCHAR,                  -- folder or hub id it loads from
            weights_sha256  VARCHAR NOT NULL UNIQUE,  -- over tensor names, dtypes, shapes and bytes
            architecture    VARCHAR,
            config          JSON,
            num_parameters  BIGINT,
            created_at      TIMESTAMPTZ NOT NULL
        );

        CREATE TABLE adapters (
            id               INTEGER PRIMARY KEY DEFAULT nextval('adapter_id_seq'),
            name             VARCHAR NOT NULL,
            version          INTEGER NOT NULL,
            kind             VARCHAR NOT NULL,        -- trained | merged | stack | imported
            task             VARCHAR,                 -- ranker | retriever | free text
            base_id          VARCHAR NOT NULL REFERENCES base_models(id),
            peft_config      JSON,
            lora_rank        INTEGER,
            lora_alpha       DOUBLE,
            target_modules   JSON,
            store_key        VARCHAR,                 -- folder name under store/objects (NULL for stacks)
            bytes            BIGINT,
            weights_sha256   VARCHAR,
            config_sha256    VARCHAR,
            trainable_params BIGINT,
            hyperparams      JSON,
            metrics          JSON,
            stack_mode       VARCHAR,                 -- weights | ensemble, for kind = 'stack'
            status           VARCHAR NOT NULL DEFAULT 'active',  -- active | deleted | missing | corrupt
            description      VARCHAR,
            created_at       TIMESTAMPTZ NOT NULL,
            updated_at       TIMESTAMPTZ NOT NULL,
            UNIQUE (name, version)
        );
        CREATE INDEX adapters_name ON adapters(name);

        CREATE TABLE lineage (
            child_id   INTEGER NOT NULL,
            parent_id  INTEGER NOT NULL,
            relation   VARCHAR NOT NULL,   -- warm_start | stacked_on | merged_from | imported
            weight     DOUBLE,
            ord        INTEGER NOT NULL DEFAULT 0,
            params     JSON,
            PRIMARY KEY (child_id, parent_id, relation)
        );

        CREATE TABLE batches (
            id          VARCHAR PRIMARY KEY,
            sha256      VARCHAR,
            num_rows    BIGINT,
            created_at  TIMESTAMPTZ NOT NULL
        );

        CREATE TABLE adapter_batches (
            adapter_id  INTEGER NOT NULL,
            batch_id    VARCHAR NOT NULL,
            role        VARCHAR NOT NULL,  -- train | eval
            PRIMARY KEY (adapter_id, batch_id, role)
        );

        CREATE TABLE aliases (
            name        VARCHAR PRIMARY KEY,
            adapter_id  INTEGER NOT NULL,
            updated_at  TIMESTAMPTZ NOT NULL
        );

        CREATE TABLE alias_history (
            id          BIGINT PRIMARY KEY DEFAULT nextval('alias_move_id_seq'),
            alias       VARCHAR NOT NULL,
            from_id     INTEGER,
            to_id       INTEGER,
            action      VARCHAR NOT NULL,  -- set | promote | rollback | remove
            reason      VARCHAR,
            moved_at    TIMESTAMPTZ NOT NULL
        );

        CREATE TABLE events (
            id         BIGINT PRIMARY KEY DEFAULT nextval('event_id_seq'),
            ts         TIMESTAMPTZ NOT NULL,
            operation  VARCHAR NOT NULL,
            args       JSON,
            outcome    VARCHAR NOT NULL,   -- ok | error | forced
            detail     JSON,
            pid        INTEGER
        );
        """
    )


@migration
def m002_recommendations(con: duckdb.DuckDBPyConnection) -> None:
    """Recomputed top-K lists, each row with the node that produced it (lineage for recommendations)."""
    con.execute(
        """
        CREATE SEQUENCE IF NOT EXISTS rec_run_id_seq START 1;
        CREATE TABLE recommendation_runs (
            id              BIGINT PRIMARY KEY DEFAULT nextval('rec_run_id_seq'),
            alias           VARCHAR,            -- what was followed (NULL when a node id was given)
            node_id         INTEGER NOT NULL,   -- the retriever node
            ranker_node_id  INTEGER,            -- the reranking node, if any
            k               INTEGER NOT NULL,
            users_mode      VARCHAR NOT NULL,   -- all | changed | list
            num_users       INTEGER NOT NULL,
            max_batch_seq   INTEGER,            -- newest data batch seen; 'changed' users are newer than this
            wall_s          DOUBLE,
            created_at      TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE recommendations (
            run_id    BIGINT NOT NULL,
            user_id   VARCHAR NOT NULL,
            rank      INTEGER NOT NULL,
            item_id   VARCHAR NOT NULL,
            score     DOUBLE NOT NULL,
            node_id   INTEGER NOT NULL
        );
        -- the newest complete list per (alias, user): a run is visible only once committed whole
        CREATE VIEW current_recommendations AS
        SELECT r.user_id, r.rank, r.item_id, r.score, r.node_id, r.run_id, runs.alias, runs.ranker_node_id,
               runs.created_at
        FROM recommendations r
        JOIN recommendation_runs runs ON runs.id = r.run_id
        JOIN (SELECT coalesce(runs2.alias, '') AS alias_key, r2.user_id, max(r2.run_id) AS run_id
              FROM recommendations r2 JOIN recommendation_runs runs2 ON runs2.id = r2.run_id
              GROUP BY 1, 2) latest
          ON latest.run_id = r.run_id AND latest.user_id = r.user_id;
        """
    )


@migration
def m003_lineage_index(con: duckdb.DuckDBPyConnection) -> None:
    """The chain index that keeps deep lineage walks fast (see :mod:`adapters_mgr.catalog.lineage_index`)."""
    lineage_index.create_tables(con)
    lineage_index.rebuild(con)


# -- the data side's tables (batches, interactions, sources...; see catalog/data_tables.py) -----


@migration
def d001_data_core(con: duckdb.DuckDBPyConnection) -> None:
    """The data side's tables; ``batches`` gains its data columns."""
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


@migration
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


@migration
def d003_bad_lines_and_late_rows(con: duckdb.DuckDBPyConnection) -> None:
    """Quarantine whole lines a reader could not read; count per file what the watermark skips.

    ``quarantine.line_no`` / ``line_text``: a line that could not be read (``malformed_line``,
    ``bad_encoding``) has no columns for ``row``; its number in the file and its text are kept
    instead (NULL for rows that were read).

    ``data_source_files.before_ts`` / ``rows_before``: the source's watermark after the file was
    last read, and how many of the file's rows then lay before it. A later read of the changed file
    skips the rows before ``before_ts``; those beyond ``rows_before`` were appended since, and the
    sync reports them as late rows instead of losing count of them. NULL for files read before this
    migration (their late rows cannot be told apart, and are reported as unmeasured once).
    """
    con.execute(
        """
        ALTER TABLE quarantine ADD COLUMN line_no BIGINT;
        ALTER TABLE quarantine ADD COLUMN line_text VARCHAR;
        ALTER TABLE data_source_files ADD COLUMN before_ts TIMESTAMPTZ;
        ALTER TABLE data_source_files ADD COLUMN rows_before BIGINT;
        """
    )


@migration
def m004_evaluations(con: duckdb.DuckDBPyConnection) -> None:
    """A node's metrics on a set of eval examples, computed once and reused.

    Why: the promotion gate, compaction and the demo each evaluated the same node on the same batch
    again, on other subsamples or token lengths, and printed different figures for the same thing.
    A node is immutable, so its figures on the same examples (digest of the rows as scored, prior
    offsets included) at the same ``max_length`` never change: the first evaluation is recorded here
    and every later one reads it. ``rows`` and ``batch_ids`` label the figure where it is shown.
    """
    con.execute(
        """
        CREATE TABLE IF NOT EXISTS evaluations (
            node_id INTEGER NOT NULL,
            examples_sha VARCHAR NOT NULL,
            max_length INTEGER NOT NULL,
            batch_ids JSON,
            rows INTEGER NOT NULL,
            metrics JSON NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (node_id, examples_sha, max_length)
        )
        """
    )
