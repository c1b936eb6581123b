"""Append-only, named schema migrations (the simonw/llm habit).

Each migration is a small function applied once and recorded in ``_migrations``. Never edit or
reorder a released migration: add a new one. Other parts of the package (the data side) contribute
their own lists, which are appended after the core ones in :data:`MIGRATIONS`.
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb

from adapters_mgr.catalog.sql import atomic, utcnow

Migration = Callable[[duckdb.DuckDBPyConnection], None]


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


def m003_lineage_index(con: duckdb.DuckDBPyConnection) -> None:
    """The chain index that keeps deep lineage walks fast (see :mod:`adapters_mgr.catalog.lineage_index`)."""
    from adapters_mgr.catalog import lineage_index

    lineage_index.create_tables(con)
    lineage_index.rebuild(con)


CORE_MIGRATIONS: list[Migration] = [m001_core, m002_recommendations, m003_lineage_index]


def all_migrations() -> list[Migration]:
    """Core migrations first, then each subsystem's, in a fixed order."""
    migrations = list(CORE_MIGRATIONS)
    try:
        from adapters_mgr.data.schema import DATA_MIGRATIONS
    except ImportError:  # the data side is optional while it is being built
        DATA_MIGRATIONS = []
    migrations.extend(DATA_MIGRATIONS)
    return migrations


def apply_migrations(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Apply every migration not yet recorded, each in its own transaction; return their names."""
    con.execute("CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ)")
    done = {row[0] for row in con.execute("SELECT name FROM _migrations").fetchall()}
    applied: list[str] = []
    for migration in all_migrations():
        name = migration.__name__
        if name in done:
            continue
        with atomic(con):
            migration(con)
            con.execute("INSERT INTO _migrations VALUES (?, ?)", [name, utcnow()])
        applied.append(name)
    return applied
