"""Append-only, named schema migrations (the simonw/llm habit).

Each migration is a small function applied once and recorded in ``_migrations``. Never edit or
reorder a released migration: add a new one. Other parts of the package (the data side) contribute
their own lists, which are appended after the core ones in :data:`MIGRATIONS`.
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb

from adapters_mgr.catalog.db import utcnow

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


CORE_MIGRATIONS: list[Migration] = [m001_core]


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
        con.execute("BEGIN TRANSACTION")
        try:
            migration(con)
            con.execute("INSERT INTO _migrations VALUES (?, ?)", [name, utcnow()])
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        applied.append(name)
    return applied
