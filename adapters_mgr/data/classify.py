"""Set-based cleaning and dedup over the staged rows of one sync, in DuckDB temp tables.

Order matters and is fixed: row rules (from the stage) -> unknown users/items -> noise rules ->
exact duplicates -> same source_event_id -> the same event from another source within a tolerance ->
events already in earlier batches. A row gets at most one outcome, so rows in = kept + quarantined
+ duplicates holds by construction. Lower ``prio`` (earlier registered source) wins ties.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb

from adapters_mgr.data.sources import Source

RULES = (
    "missing_key", "bad_timestamp", "future_timestamp", "rating_out_of_range", "label_out_of_range",
    "unknown_user", "unknown_item", "noise_burst",
)
DUP_KINDS = ("exact", "same_event_id", "cross_source", "earlier_batch")


def apply_entity_rules(con: duckdb.DuckDBPyConnection) -> None:
    """Quarantine events whose user or item is absent from a non-empty entity table.

    An empty entity table means "no entity source registered", so the rule stays silent rather
    than quarantining everything.
    """
    has_users = con.execute("SELECT count(*) > 0 FROM users").fetchone()[0]
    has_items = con.execute("SELECT count(*) > 0 FROM items").fetchone()[0]
    if not (has_users or has_items):
        return
    user_cond = "user_id NOT IN (SELECT user_id FROM users)" if has_users else "false"
    item_cond = "item_id NOT IN (SELECT item_id FROM items)" if has_items else "false"
    con.execute(
        f"""
        UPDATE _stage SET
            rule = CASE WHEN {user_cond} THEN 'unknown_user' ELSE 'unknown_item' END,
            detail = CASE WHEN {user_cond} THEN 'user ' || user_id || ' is not in users'
                          ELSE 'item ' || item_id || ' is not in items' END
        WHERE rule IS NULL AND chk_unknown AND ({user_cond} OR {item_cond})
        """
    )


def apply_noise_rules(con: duckdb.DuckDBPyConnection, sources: list[Source]) -> None:
    """Noise rule: a user with more than N events in one minute (per source) is a bot or a replay."""
    for src in sources:
        limit = src.option("max_events_per_minute")
        if not limit:
            continue
        con.execute(
            """
            UPDATE _stage SET rule = 'noise_burst',
                detail = 'more than ' || CAST(? AS VARCHAR) || ' events of user ' || user_id || ' in one minute'
            WHERE rule IS NULL AND source = ? AND (user_id, date_trunc('minute', ts)) IN (
                SELECT (user_id, date_trunc('minute', ts)) FROM _stage
                WHERE rule IS NULL AND source = ? GROUP BY ALL HAVING count(*) > ?)
            """,
            [int(limit), src.name, src.name, int(limit)],
        )


def classify(
    con: duckdb.DuckDBPyConnection,
    *,
    tolerance: timedelta,
    multi_source: bool,
) -> None:
    """Create ``_cls`` = ``_stage`` plus ``dup_kind`` for every clean row that duplicates another."""
    tol_us = int(tolerance.total_seconds() * 1_000_000)
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE _d1 AS
        WITH e AS (
            SELECT *, row_number() OVER (PARTITION BY rule, source, user_id, item_id, ts, rating, label,
                                         source_event_id ORDER BY file) AS rn_exact
            FROM _stage)
        SELECT * EXCLUDE (rn_exact),
            CASE WHEN rule IS NOT NULL THEN NULL
                 WHEN rn_exact > 1 THEN 'exact'
                 WHEN source_event_id IS NOT NULL AND row_number() OVER ev > 1
                 THEN CASE WHEN first_value(source) OVER ev <> source THEN 'cross_source' ELSE 'same_event_id' END
            END AS dup_kind
        FROM e
        WINDOW ev AS (PARTITION BY rule IS NULL AND rn_exact = 1, source_event_id
                      ORDER BY prio, ts, file, user_id, item_id)
        """
    )
    if multi_source:
        con.execute(
            f"""
            UPDATE _d1 SET dup_kind = 'cross_source'
            WHERE rule IS NULL AND dup_kind IS NULL AND EXISTS (
                SELECT 1 FROM _d1 b
                WHERE b.rule IS NULL AND b.dup_kind IS NULL AND b.user_id = _d1.user_id AND b.item_id = _d1.item_id
                  AND b.prio < _d1.prio AND abs(epoch_us(b.ts) - epoch_us(_d1.ts)) <= {tol_us})
            """
        )
    has_earlier = con.execute("SELECT EXISTS (SELECT 1 FROM interactions)").fetchone()[0]
    if has_earlier:
        lo, hi = con.execute("SELECT min(ts), max(ts) FROM _d1 WHERE rule IS NULL AND dup_kind IS NULL").fetchone()
        if lo is not None:
            con.execute(
                f"""
                CREATE OR REPLACE TEMP TABLE _prev AS
                SELECT user_id, item_id, ts, source_event_id FROM interactions
                WHERE ts BETWEEN ?::TIMESTAMPTZ - INTERVAL ({tol_us}) MICROSECOND
                             AND ?::TIMESTAMPTZ + INTERVAL ({tol_us}) MICROSECOND
                   OR source_event_id IN (SELECT source_event_id FROM _d1 WHERE source_event_id IS NOT NULL)
                """,
                [lo, hi],
            )
            con.execute(
                f"""
                UPDATE _d1 SET dup_kind = 'earlier_batch'
                WHERE rule IS NULL AND dup_kind IS NULL AND (
                    EXISTS (SELECT 1 FROM _prev p WHERE p.user_id = _d1.user_id AND p.item_id = _d1.item_id
                            AND abs(epoch_us(p.ts) - epoch_us(_d1.ts)) <= {tol_us})
                    OR (source_event_id IS NOT NULL
                        AND EXISTS (SELECT 1 FROM _prev p WHERE p.source_event_id = _d1.source_event_id)))
                """
            )


def assign_windows(
    con: duckdb.DuckDBPyConnection, window: timedelta | None, origin: datetime | None
) -> tuple[datetime | None, int]:
    """Add ``bno`` (batch number within this sync) to ``_d1``; return the origin used and the last bno.

    Rows without a usable time (unparseable or future timestamps) go to the last window: they
    arrived now, and the batch that records them must exist.
    """
    if window is None:
        con.execute("ALTER TABLE _d1 ADD COLUMN bno INTEGER DEFAULT 0")
        return None, 0
    valid = "ts IS NOT NULL AND coalesce(rule, '') NOT IN ('bad_timestamp', 'future_timestamp')"
    if origin is None:
        first = con.execute(f"SELECT min(ts) FROM _d1 WHERE {valid}").fetchone()[0]
        origin = first.replace(hour=0, minute=0, second=0, microsecond=0) if first is not None else None
    w_us = int(window.total_seconds() * 1_000_000)
    if origin is None:
        con.execute("ALTER TABLE _d1 ADD COLUMN bno INTEGER DEFAULT 0")
        return None, 0
    con.execute("ALTER TABLE _d1 ADD COLUMN bno INTEGER")
    con.execute(
        f"UPDATE _d1 SET bno = CASE WHEN {valid} THEN CAST(floor((epoch_us(ts) - epoch_us(?::TIMESTAMPTZ)) / {w_us}) "
        "AS INTEGER) END",
        [origin],
    )
    last = con.execute("SELECT max(bno) FROM _d1").fetchone()[0]
    last = 0 if last is None else int(last)
    con.execute("UPDATE _d1 SET bno = ? WHERE bno IS NULL", [last])
    return origin, last
