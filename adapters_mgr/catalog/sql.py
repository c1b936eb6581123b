"""SQL idioms every catalog writer shares: a transaction on an open connection, rows as dicts,
JSON columns with stable text, UTC timestamps, and the event-log row that goes with every change."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import duckdb


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_json(value: Any) -> str | None:
    """JSON text for a catalog column; sorted keys so equal values store equal text."""
    if value is None:
        return None
    return json.dumps(value, sort_keys=True, default=str)


def from_json(text: Any) -> Any:
    if text is None:
        return None
    if isinstance(text, dict | list):
        return text
    return json.loads(text)


@contextlib.contextmanager
def atomic(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN on an open connection; COMMIT when the block ends, ROLLBACK if it raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def fetch_dicts(con: duckdb.DuckDBPyConnection, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    cur = con.execute(sql, params)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


def log_event(
    con: duckdb.DuckDBPyConnection,
    operation: str,
    args: dict[str, Any] | None = None,
    outcome: str = "ok",
    detail: Any = None,
) -> int:
    """Append one row to the event log inside the caller's transaction; returns the event id."""
    row = con.execute(
        "INSERT INTO events (ts, operation, args, outcome, detail, pid) VALUES (?, ?, ?, ?, ?, ?) "
        "RETURNING id",
        [utcnow(), operation, to_json(args or {}), outcome, to_json(detail), os.getpid()],
    ).fetchone()
    assert row is not None
    return int(row[0])
