"""Set-based cleaning and dedup over the staged rows of one sync, in DuckDB temp tables.

Order matters and is fixed: row rules (from the stage) -> unknown users/items -> noise rules ->
exact duplicates and the same event from another source within a tolerance (one window pass) ->
the same source_event_id -> events already in earlier batches. A row gets at most one outcome,
so rows in = kept + quarantined + duplicates holds by construction.
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
    """Create ``_d1`` = ``_stage`` plus ``dup_kind`` for every clean row that duplicates another.

    One window pass over (user_id, item_id) ordered by time finds both exact copies (the previous
    row is identical, same source) and the same event from another source (the previous row is from
    a different source within ``tolerance``); the earliest copy is kept, then the higher-priority
    source. Chains count: each copy is compared with its predecessor. Rows sharing a
    ``source_event_id`` are rare, so they are found by aggregation and ranked on that small set.
    """
    tol_us = int(tolerance.total_seconds() * 1_000_000)
    cross = f"prev_source <> source AND epoch_us(ts) - prev_t <= {tol_us}" if multi_source else "false"
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _d1 AS
        WITH clean AS (
            SELECT *,
                lag(source) OVER w AS prev_source, lag(epoch_us(ts)) OVER w AS prev_t,
                lag(rating) OVER w AS prev_rating, lag(label) OVER w AS prev_label,
                lag(source_event_id) OVER w AS prev_event
            FROM _stage WHERE rule IS NULL
            WINDOW w AS (PARTITION BY user_id, item_id ORDER BY ts, prio, rating, label, source_event_id, file))
        SELECT * EXCLUDE (prev_source, prev_t, prev_rating, prev_label, prev_event),
            CASE WHEN prev_source = source AND prev_t = epoch_us(ts) AND prev_rating IS NOT DISTINCT FROM rating
                      AND prev_label IS NOT DISTINCT FROM label AND prev_event IS NOT DISTINCT FROM source_event_id
                 THEN 'exact'
                 WHEN {cross} THEN 'cross_source'
            END AS dup_kind
        FROM clean
        UNION ALL
        SELECT *, CAST(NULL AS VARCHAR) AS dup_kind FROM _stage WHERE rule IS NOT NULL
        """
    )
    # the same source_event_id on surviving rows: keep the best-priority, earliest one
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE _ev AS
        SELECT source_event_id FROM _d1
        WHERE rule IS NULL AND dup_kind IS NULL AND source_event_id IS NOT NULL
        GROUP BY 1 HAVING count(*) > 1
        """
    )
    if con.execute("SELECT count(*) FROM _ev").fetchone()[0]:
        con.execute(
            """
            UPDATE _d1 SET dup_kind = r.kind FROM (
                SELECT source, user_id, item_id, ts, source_event_id,
                       CASE WHEN first_value(source) OVER ev <> source THEN 'cross_source' ELSE 'same_event_id' END
                           AS kind,
                       row_number() OVER ev AS rn
                FROM _d1 WHERE rule IS NULL AND dup_kind IS NULL AND source_event_id IN (SELECT * FROM _ev)
                WINDOW ev AS (PARTITION BY source_event_id ORDER BY prio, ts, user_id, item_id, rating, label)) r
            WHERE r.rn > 1 AND _d1.rule IS NULL AND _d1.dup_kind IS NULL
              AND _d1.source_event_id = r.source_event_id AND _d1.source = r.source AND _d1.user_id = r.user_id
              AND _d1.item_id = r.item_id AND _d1.ts = r.ts
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
