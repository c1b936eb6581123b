"""Lines a reader could not read (malformed, not UTF-8): collected from DuckDB's rejects tables.

Why not refuse the file: one bad line in the middle of a 10M-row file would stop every sync of
the source until someone edits the file. DuckDB's CSV reader keeps each line it cannot read, with
its line number, its text and the reason, in the rejects tables of the read (``store_rejects``;
the line-by-line JSON read is a CSV read of one JSON column, so a line that is not JSON is a
rejected cast). Each such line becomes one quarantined row:

- ``malformed_line``: too few or too many fields, an unterminated quote, a line that is not JSON;
- ``bad_encoding``: bytes that are not UTF-8. DuckDB shows them as ``?``; the text kept is the
  line's own bytes, decoded as UTF-8 with each bad byte written as ``\\xNN`` (read back from the
  file at the position DuckDB reports, for the first ``MAX_RAW_LINES`` such lines of a sync).

The quarantine keeps the line's number and text (``line_no``, ``line_text``; ``row`` is NULL: a
line that could not be read has no columns).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import duckdb

from adapters_mgr.data.sources import COMPRESSED, rejects_tables, sql_literal

RULES = ("malformed_line", "bad_encoding")
MAX_RAW_LINES = 10_000  # bad-encoding lines whose raw bytes are read back from the file, per sync
MAX_TEXT = 65_536       # characters of a rejected line kept in the quarantine
_WINDOW = 1 << 20


def line_json(line_no: str, text: str) -> str:
    """SQL: the JSON text a staged bad line carries as its ``raw_row`` (its number and text); the same
    expression over the quarantine's ``line_no`` / ``line_text`` recognises one quarantined before."""
    return f"CAST(json_object('line', CAST({line_no} AS BIGINT), 'text', {text}) AS VARCHAR)"


def exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    return bool(con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND temporary", [table]).fetchone()[0])


def drop(con: duckdb.DuckDBPyConnection, prefix: str) -> None:
    """Drop the rejects tables of reads made under ``prefix`` (DuckDB appends to existing ones)."""
    for table in rejects_tables(prefix):
        con.execute(f"DROP TABLE IF EXISTS {table}")


def collect(con: duckdb.DuckDBPyConnection, prefix: str, files: list[Path], into: str = "_bad") -> int:
    """Create temp table ``into`` (fidx, file, line_no, rule, detail, text): one row per line the
    reads under ``prefix`` of ``files`` rejected (``fidx``: 1-based position in ``files``). Returns
    the number of lines; 0 (and an empty table) when the reads kept no rejects at all."""
    errors, scans = rejects_tables(prefix)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {into} (fidx INTEGER, file VARCHAR, line_no BIGINT, rule VARCHAR, "
                "detail VARCHAR, text VARCHAR, pos BIGINT)")
    if not (exists(con, errors) and exists(con, scans)):
        return 0
    names = sql_literal([str(f) for f in files])
    con.execute(
        f"""
        INSERT INTO {into}
        SELECT fidx, file, line_no,
               CASE WHEN enc THEN 'bad_encoding' ELSE 'malformed_line' END AS rule,
               'line ' || line_no || CASE
                   WHEN enc THEN ' is not UTF-8 (its text shows each bad byte as \\xNN); re-encode the file, '
                                 || 'or pass read={{''encoding'': ''latin-1''}}'
                   WHEN by_line THEN ' is not valid JSON'
                   ELSE ': ' || lower(etype) || ' (' || msg || ')' END AS detail,
               left(text, {MAX_TEXT}) AS text, pos
        FROM (
            SELECT list_position({names}, s.file_path) AS fidx, s.file_path AS file, CAST(e.line AS BIGINT) AS line_no,
                   bool_or(e.error_type = 'INVALID ENCODING') AS enc,
                   bool_or(s.columns LIKE '%''_json'': ''JSON''%') AS by_line,
                   arg_min(e.error_type, e.column_idx) AS etype, arg_min(e.error_message, e.column_idx) AS msg,
                   rtrim(ltrim(arg_min(e.csv_line, e.column_idx), chr(13) || chr(10)), chr(13) || chr(10)) AS text,
                   min(e.line_byte_position) AS pos
            FROM {errors} e JOIN {scans} s USING (scan_id, file_id)
            GROUP BY ALL)
        """
    )
    _raw_texts(con, into)
    return int(con.execute(f"SELECT count(*) FROM {into}").fetchone()[0])


def _raw_texts(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """Replace DuckDB's text of bad-encoding lines (bad bytes shown as ``?``) by the line's bytes."""
    rows = con.execute(f"SELECT rowid, file, pos FROM {table} WHERE rule = 'bad_encoding' AND pos IS NOT NULL "
                       f"ORDER BY file, pos LIMIT {MAX_RAW_LINES}").fetchall()
    fixed = [(text, rid) for rid, file, pos in rows if (text := raw_line(Path(file), int(pos))) is not None]
    if fixed:
        con.executemany(f"UPDATE {table} SET text = ? WHERE rowid = ?", fixed)


def raw_line(path: Path, pos: int) -> str | None:
    """The line of ``path`` around byte ``pos`` (DuckDB's line position, which is the line's first
    byte or the one after it), decoded as UTF-8 with bad bytes as ``\\xNN``; None if unreadable."""
    start = max(0, pos - 2)
    try:
        if path.suffix.lower() == ".gz":
            opener = gzip.open
        elif path.suffix.lower() in COMPRESSED:
            return None
        else:
            opener = open
        with opener(path, "rb") as fh:
            fh.seek(start)
            data = fh.read(_WINDOW)
    except (OSError, EOFError):
        return None
    if not data:
        return None
    newline = data.rfind(b"\n", 0, pos - start)  # the line starts after the last newline before ``pos``
    if newline < 0 and start > 0:
        return None
    begin = newline + 1
    end = data.find(b"\n", begin)
    line = data[begin:] if end < 0 else data[begin:end]
    return line.rstrip(b"\r").decode("utf-8", errors="backslashreplace")[:MAX_TEXT]
