"""Per-source SQL that reads new rows and brings them into the canonical shape, with rule checks.

Why the row-level rules are evaluated here: each source has its own constants (rating range,
label threshold, feedback columns, clock skew) and its own column names, so its projection is the
one place that knows them all. The result of every source has the same columns and is UNION ALL'd.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb

from adapters_mgr.data import badlines
from adapters_mgr.data.sources import Reader, Source, open_reader, sql_literal
from adapters_mgr.data.timeparse import detect_ts_format, parse_duration, ts_expr

NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                 "UBIGINT", "FLOAT", "DOUBLE", "REAL")
_TRUE = "['1', '1.0', 'true', 't', 'yes', 'y']"
_FALSE = "['0', '0.0', 'false', 'f', 'no', 'n']"

STAGE_COLUMNS = (
    "sidx", "fidx", "user_id", "item_id", "ts", "rating", "label", "source_event_id", "rule", "detail", "raw_row",
)


def q(col: str) -> str:
    """A quoted identifier."""
    return '"' + col.replace('"', '""') + '"'


def row_struct(columns: Iterable[str]) -> str:
    """SQL for the source row as read: a struct of every column under its own name. Cheap to carry
    (it references the columns); turned into JSON only for the rows the quarantine keeps."""
    return "{" + ", ".join(f"{sql_literal(col)}: {q(col)}" for col in columns) + "}"


def _text(col: str | None, numeric: bool = False) -> str:
    if col is None:
        return "CAST(NULL AS VARCHAR)"
    if numeric:  # a number has no blanks to trim; casting it is all it takes
        return f"CAST({q(col)} AS VARCHAR)"
    return f"NULLIF(trim(CAST({q(col)} AS VARCHAR)), '')"


def _absent(col: str | None, numeric: bool, parsed: str) -> str:
    """SQL testing that the source value is absent (NULL or blank).

    Blank text never parses, so the trim is only evaluated on the rare rows whose ``parsed`` value
    is NULL (conditions short-circuit row-wise); numbers are never blank.
    """
    if col is None:
        return "true"
    if numeric:
        return f"({q(col)} IS NULL)"
    return f"({q(col)} IS NULL OR ({parsed} IS NULL AND trim(CAST({q(col)} AS VARCHAR)) = ''))"


def source_row(reader: Reader) -> str:
    """SQL for the source row as read, to carry along: the line itself for JSON read by line,
    else the struct of every column (see :func:`row_struct`); ``to_json`` makes either JSON text."""
    return "_json" if reader.by_line else row_struct(reader.columns)


def not_an_object(reader: Reader, col: str = "_json") -> str:
    """SQL: the row is a JSON line (column ``col``) holding no object (a number, an array): malformed."""
    return f"json_type({col}) <> 'OBJECT'" if reader.by_line else "false"


def detect_source_ts(con: duckdb.DuckDBPyConnection, src: Source, files: list[Path]) -> str:
    """Look at up to 1,000 timestamps of the source and name their form (recorded by the caller)."""
    col = q(src.mapping["ts"])
    reader = open_reader(con, src.format, files, src.option("read"))
    sample = con.execute(f"SELECT {col} FROM {reader.sql()} WHERE {col} IS NOT NULL LIMIT 1000").fetchall()
    return detect_ts_format([r[0] for r in sample])


def rejects_prefix(sidx: int) -> str:
    """The rejects tables of source ``sidx``'s read in this sync (see :mod:`adapters_mgr.data.badlines`)."""
    return f"_rej{int(sidx)}"


@dataclass
class StageSQL:
    """The staging SELECT of one source, and (when it re-reads changed files) the count of the
    changed files' rows it skips because they lie before the file's watermark: (fidx, skipped)."""

    rows: str
    skipped: str | None


def interaction_sql(
    con: duckdb.DuckDBPyConnection,
    src: Source,
    sidx: int,
    new_files: list[Path],
    changed_files: list[Path],
    changed_since: list[datetime | None],
    now: datetime,
    *,
    check_users: bool = False,
    check_items: bool = False,
) -> StageSQL:
    """SELECT producing STAGE_COLUMNS for the rows of ``src`` that are new since its watermark.

    One pass decides every row rule, including unknown users / items (``check_users`` /
    ``check_items``: the entity table is non-empty and the source checks). The row keeps only what
    later steps need: ``sidx`` (position of the source in this sync) and ``fidx`` (1-based position
    of the file in ``new_files + changed_files``) stand for the names, and the source row as read
    (every column, as JSON: what the quarantine keeps) is built only for quarantined rows (or for
    every row of a source with a noise rule, which can still quarantine later). Why: each byte kept
    here is written and read again by every later step, and at 10M rows that is most of a sync's time.

    Rows of a changed file are taken when they are at or after its watermark (``changed_since``:
    the source's watermark when the file was last read; None takes every row), or have no usable
    time (which cannot be compared with it): rows seen before are then recognised by dedup (kept
    ones as ``earlier_batch`` duplicates, quarantined ones against the quarantine), so nothing seen
    before is counted twice. The rows skipped are counted (``StageSQL.skipped``): the caller
    subtracts those the file held before the watermark at its last read, and reports the rest,
    rows appended before the watermark, as late rows.

    Lines the reader cannot read at all are not in this SELECT: they wait in the read's rejects
    tables (``rejects_prefix(sidx)``) for :mod:`adapters_mgr.data.badlines`.
    """
    files = new_files + changed_files
    reader = open_reader(con, src.format, files, src.option("read"))
    types = reader.columns
    m = src.mapping

    def numeric(field: str) -> bool:
        col = m.get(field)
        return col is not None and any(types.get(col, "").startswith(t) for t in NUMERIC_TYPES)

    ts_col = m["ts"]
    num_ts = numeric("ts")
    ts_sql = ts_expr(q(ts_col), src.effective_ts_format or "iso", numeric=num_ts)
    rating_col, label_col, event_col = m.get("rating"), m.get("label"), m.get("source_event_id")
    num_rating = numeric("rating")
    lo, hi = (float(x) for x in src.option("rating_range"))
    threshold = float(src.option("label_threshold"))
    skew = parse_duration(src.option("future_skew"), what="future_skew")
    future = f"{sql_literal((now + skew).isoformat())}::TIMESTAMPTZ"

    # the raw ts / rating / label columns travel under fixed names (a source column may be called "ts")
    raw_ts = "_raw_ts"
    raw_rating = "_raw_rating" if rating_col else None
    raw_label = "_raw_label" if label_col else None
    ts_raw = _text(raw_ts, num_ts)
    rating_raw = _text(raw_rating, num_rating)
    label_raw = _text(raw_label)
    rating_in = (
        "CAST(NULL AS DOUBLE)" if rating_col is None else
        f"CAST({q(rating_col)} AS DOUBLE)" if num_rating else f"TRY_CAST(CAST({q(rating_col)} AS VARCHAR) AS DOUBLE)"
    )
    rating_absent = _absent(raw_rating, num_rating, "rating")
    label_absent = _absent(raw_label, False, "label_in")
    label_text = f"CAST({q(label_col)} AS VARCHAR)" if label_col else ""
    label_in = (  # the usual '1' / '0' first, without building a lower-cased copy of every value
        "CAST(NULL AS TINYINT)" if label_col is None else
        f"CASE {label_text} WHEN '1' THEN 1::TINYINT WHEN '0' THEN 0::TINYINT ELSE CASE "
        f"WHEN list_contains({_TRUE}, lower(trim({label_text}))) THEN 1::TINYINT "
        f"WHEN list_contains({_FALSE}, lower(trim({label_text}))) THEN 0::TINYINT END END"
    )
    # Feedback: a mapped label wins; else rating >= threshold; implicit sources (neither) are positives.
    label = f"COALESCE(label_in, CASE WHEN rating IS NOT NULL THEN (rating >= {threshold})::TINYINT END"
    label += ", 1::TINYINT)" if rating_col is None and label_col is None else ")"
    parts = [absent for absent, col in ((rating_absent, rating_col), (label_absent, label_col)) if col is not None]
    feedback_missing = " AND ".join(parts) if parts else "false"
    bad_rating = f"(NOT {rating_absent} AND (rating IS NULL OR isnan(rating) OR rating < {lo} OR rating > {hi}))"
    bad_label = f"(NOT {label_absent} AND label_in IS NULL)"
    check_unknown = bool(src.option("check_unknown"))
    unknown_user = ("user_id NOT IN (SELECT DISTINCT user_id FROM users)"
                    if check_unknown and check_users else "false")
    unknown_item = ("item_id NOT IN (SELECT DISTINCT item_id FROM items)"
                    if check_unknown and check_items else "false")

    not_object = not_an_object(reader, '_src')
    rule = f"""CASE
        WHEN {not_object} THEN 'malformed_line'
        WHEN user_id IS NULL THEN 'missing_key'
        WHEN item_id IS NULL THEN 'missing_key'
        WHEN {_absent(raw_ts, num_ts, 'ts')} THEN 'missing_key'
        WHEN ts IS NULL THEN 'bad_timestamp'
        WHEN ts > {future} THEN 'future_timestamp'
        WHEN {feedback_missing} THEN 'missing_key'
        WHEN {bad_rating} THEN 'rating_out_of_range'
        WHEN {bad_label} THEN 'label_out_of_range'
        WHEN unknown_user THEN 'unknown_user'
        WHEN unknown_item THEN 'unknown_item'
    END"""
    # the reason in words, only for the few rows with a rule (a clean row stops at the first WHEN)
    detail = f"""CASE
        WHEN rule IS NULL THEN NULL
        WHEN {not_object} THEN 'the line is JSON but not an object'
        WHEN user_id IS NULL THEN 'user_id is empty'
        WHEN item_id IS NULL THEN 'item_id is empty'
        WHEN {_absent(raw_ts, num_ts, 'ts')} THEN 'ts is empty'
        WHEN ts IS NULL THEN 'cannot parse ' || {ts_raw} || ' as {src.effective_ts_format}'
        WHEN ts > {future} THEN 'ts ' || CAST(ts AS VARCHAR) || ' is in the future'
        WHEN {feedback_missing} THEN 'no rating or label'
        WHEN {bad_rating} THEN 'rating ' || {rating_raw} || ' outside [{lo:g}, {hi:g}]'
        WHEN {bad_label} THEN 'label ' || {label_raw} || ' is not 0/1/true/false'
        WHEN unknown_user THEN 'user ' || user_id || ' is not in users'
        WHEN unknown_item THEN 'item ' || item_id || ' is not in items'
    END"""
    fidx = "1" if len(files) == 1 else f"list_position({sql_literal([str(f) for f in files])}, filename)"
    where = ""
    since = {len(new_files) + k + 1: t for k, t in enumerate(changed_since) if t is not None}
    if since:
        after = "CASE fidx " + " ".join(f"WHEN {k} THEN ts >= {sql_literal(t.isoformat())}::TIMESTAMPTZ"
                                        for k, t in since.items()) + " ELSE true END"
        where = f"WHERE fidx <= {len(new_files)} OR ts IS NULL OR {after}"
    passthrough = "".join(f", {q(col)} AS {alias}" for col, alias in ((ts_col, raw_ts), (rating_col, raw_rating),
                                                                   (label_col, raw_label)) if col is not None)
    passthrough += f", {source_row(reader)} AS _src"
    inner = f"""
        SELECT CAST({fidx} AS INTEGER) AS fidx,
               {_text(m['user_id'], numeric('user_id'))} AS user_id,
               {_text(m['item_id'], numeric('item_id'))} AS item_id,
               {ts_sql} AS ts, {rating_in} AS rating, {label_in} AS label_in,
               {_text(event_col, numeric('source_event_id'))} AS source_event_id{passthrough}
        FROM {reader.sql(rejects_prefix(sidx))}
    """
    checked = f"""
        SELECT *, {unknown_user} AS unknown_user, {unknown_item} AS unknown_item FROM ({inner}) {where}
    """
    keep_raw = "true" if src.option("max_events_per_minute") else "rule IS NOT NULL"
    ruled = f"""
        SELECT *, CAST({label} AS TINYINT) AS label, {rule} AS rule FROM ({checked})
    """
    raw = "CAST(to_json(_src) AS VARCHAR)"
    if reader.by_line:  # a line holding no object is a bad line: its text, as for a line that is not JSON
        line = badlines.line_json("NULL", "CAST(_src AS VARCHAR)")
        raw = f"CASE WHEN rule = 'malformed_line' THEN {line} ELSE {raw} END"
    rows = f"""
        SELECT CAST({int(sidx)} AS UTINYINT) AS sidx, fidx, user_id, item_id, ts, rating, label, source_event_id,
               rule, {detail} AS detail, CASE WHEN {keep_raw} THEN {raw} END AS raw_row
        FROM ({ruled})
    """
    skipped = None
    if since:  # a second read, of the changed files only: their time column, counted below each one's watermark
        old = Reader(reader.fmt, changed_files, reader.options, by_line=reader.by_line, columns=reader.columns)
        names = sql_literal([str(f) for f in changed_files])
        pos = "1" if len(changed_files) == 1 else f"list_position({names}, filename)"
        before = "CASE fidx " + " ".join(f"WHEN {k} THEN ts < {sql_literal(t.isoformat())}::TIMESTAMPTZ"
                                         for k, t in since.items()) + " ELSE false END"
        skipped = f"""
            SELECT fidx, count(*) AS skipped FROM (
                SELECT {len(new_files)} + CAST({pos} AS INTEGER) AS fidx, {ts_sql} AS ts FROM {old.sql()})
            WHERE {before} GROUP BY fidx
        """
    return StageSQL(rows, skipped)
