"""Per-source SQL that reads new rows and brings them into the canonical shape, with rule checks.

Why the row-level rules are evaluated here: each source has its own constants (rating range,
label threshold, feedback columns, clock skew) and its own column names, so its projection is the
one place that knows them all. The result of every source has the same columns and is UNION ALL'd.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import duckdb

from adapters_mgr.data.sources import Source, describe, reader_sql, sql_literal
from adapters_mgr.data.timeparse import detect_ts_format, parse_duration, ts_expr

NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                 "UBIGINT", "FLOAT", "DOUBLE", "REAL")
_TRUE = "('1', '1.0', 'true', 't', 'yes', 'y')"
_FALSE = "('0', '0.0', 'false', 'f', 'no', 'n')"

STAGE_COLUMNS = (
    "source", "prio", "file", "user_id", "item_id", "ts", "ts_raw", "rating", "rating_raw", "label",
    "label_raw", "source_event_id", "rule", "detail", "chk_unknown",
)


def q(col: str) -> str:
    """A quoted identifier."""
    return '"' + col.replace('"', '""') + '"'


def _text(col: str | None) -> str:
    return "CAST(NULL AS VARCHAR)" if col is None else f"NULLIF(trim(CAST({q(col)} AS VARCHAR)), '')"


def detect_source_ts(con: duckdb.DuckDBPyConnection, src: Source, files: list[Path]) -> str:
    """Look at up to 1,000 timestamps of the source and name their form (recorded by the caller)."""
    col = q(src.mapping["ts"])
    sample = con.execute(
        f"SELECT {col} FROM {reader_sql(src.format, files, src.option('read'))} WHERE {col} IS NOT NULL LIMIT 1000"
    ).fetchall()
    return detect_ts_format([r[0] for r in sample])


def interaction_sql(
    con: duckdb.DuckDBPyConnection,
    src: Source,
    new_files: list[Path],
    changed_files: list[Path],
    watermark: datetime | None,
    now: datetime,
) -> str:
    """SELECT producing STAGE_COLUMNS for the rows of ``src`` that are new since its watermark."""
    files = new_files + changed_files
    types = describe(con, src.format, files, src.option("read"))
    m = src.mapping
    ts_col = m["ts"]
    numeric_ts = any(types.get(ts_col, "").startswith(t) for t in NUMERIC_TYPES)
    ts_sql = ts_expr(q(ts_col), src.effective_ts_format or "iso", numeric=numeric_ts)
    rating_col, label_col, event_col = m.get("rating"), m.get("label"), m.get("source_event_id")
    lo, hi = (float(x) for x in src.option("rating_range"))
    threshold = float(src.option("label_threshold"))
    skew = parse_duration(src.option("future_skew"), what="future_skew")
    future = now + skew

    rating_raw = _text(rating_col)
    rating = "CAST(NULL AS DOUBLE)" if rating_col is None else f"TRY_CAST({rating_raw} AS DOUBLE)"
    label_raw = _text(label_col)
    label_in = (
        "CAST(NULL AS TINYINT)" if label_col is None else
        f"CASE WHEN lower({label_raw}) IN {_TRUE} THEN 1::TINYINT "
        f"WHEN lower({label_raw}) IN {_FALSE} THEN 0::TINYINT END"
    )
    # Feedback: a mapped label wins; else rating >= threshold; implicit sources (neither) are positives.
    label = f"COALESCE(label_in, CASE WHEN rating IS NOT NULL THEN (rating >= {threshold})::TINYINT END"
    label += ", 1::TINYINT)" if rating_col is None and label_col is None else ")"
    parts = [f"{c}_raw IS NULL" for c, col in (("rating", rating_col), ("label", label_col)) if col is not None]
    feedback_missing = " AND ".join(parts) if parts else "false"

    rule = f"""CASE
        WHEN user_id IS NULL THEN 'missing_key'
        WHEN item_id IS NULL THEN 'missing_key'
        WHEN ts_raw IS NULL THEN 'missing_key'
        WHEN ts IS NULL THEN 'bad_timestamp'
        WHEN ts > {sql_literal(future.isoformat())}::TIMESTAMPTZ THEN 'future_timestamp'
        WHEN {feedback_missing} THEN 'missing_key'
        WHEN rating_raw IS NOT NULL AND (rating IS NULL OR isnan(rating) OR rating < {lo} OR rating > {hi})
            THEN 'rating_out_of_range'
        WHEN label_raw IS NOT NULL AND label_in IS NULL THEN 'label_out_of_range'
    END"""
    detail = f"""CASE
        WHEN user_id IS NULL THEN 'user_id is empty'
        WHEN item_id IS NULL THEN 'item_id is empty'
        WHEN ts_raw IS NULL THEN 'ts is empty'
        WHEN ts IS NULL THEN 'cannot parse ' || ts_raw || ' as {src.effective_ts_format}'
        WHEN ts > {sql_literal(future.isoformat())}::TIMESTAMPTZ
            THEN 'ts ' || CAST(ts AS VARCHAR) || ' is in the future'
        WHEN {feedback_missing} THEN 'no rating or label'
        WHEN rating_raw IS NOT NULL AND (rating IS NULL OR isnan(rating) OR rating < {lo} OR rating > {hi})
            THEN 'rating ' || rating_raw || ' outside [{lo:g}, {hi:g}]'
        WHEN label_raw IS NOT NULL AND label_in IS NULL THEN 'label ' || label_raw || ' is not 0/1/true/false'
    END"""
    inner = f"""
        SELECT {sql_literal(src.name)} AS source, {int(src.priority)} AS prio, filename AS file,
               {_text(m['user_id'])} AS user_id, {_text(m['item_id'])} AS item_id,
               {ts_sql} AS ts, {_text(ts_col)} AS ts_raw,
               {rating} AS rating, {rating_raw} AS rating_raw,
               {label_in} AS label_in, {label_raw} AS label_raw,
               {_text(event_col)} AS source_event_id
        FROM {reader_sql(src.format, files, src.option('read'))}
    """
    where = ""
    if changed_files and watermark is not None:
        new_list = sql_literal([str(f) for f in new_files]) if new_files else "[]"
        where = f"WHERE list_contains({new_list}, file) OR ts > {sql_literal(watermark.isoformat())}::TIMESTAMPTZ"
    check_unknown = "true" if src.option("check_unknown") else "false"
    return f"""
        SELECT source, prio, file, user_id, item_id, ts, ts_raw, rating, rating_raw,
               CAST({label} AS TINYINT) AS label,
               label_raw, source_event_id, {rule} AS rule, {detail} AS detail, {check_unknown} AS chk_unknown
        FROM ({inner}) {where}
    """


def raw_row_json(sources: list[Source]) -> str:
    """SQL for the quarantined row as read, keyed by the source's own column names."""
    cases = []
    for src in sources:
        m = src.mapping
        pairs = []
        for canonical, raw in (("user_id", "user_id"), ("item_id", "item_id"), ("ts", "ts_raw"),
                               ("rating", "rating_raw"), ("label", "label_raw"),
                               ("source_event_id", "source_event_id")):
            if canonical in m:
                pairs.append(f"{sql_literal(m[canonical])}, {raw}")
        cases.append(f"WHEN {sql_literal(src.name)} THEN json_object({', '.join(pairs)})")
    return "CASE source " + " ".join(cases) + " END"

