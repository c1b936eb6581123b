"""Short-lived DuckDB connections with retry, and the transaction + event idiom.

DuckDB lets exactly one process hold a database file open read-write, and while it does no other
process can open it at all. So nothing here keeps a connection: each operation opens, does one
transaction, and closes (about 10 ms). A lock conflict is retried with jittered exponential back-off
until ``lock_timeout`` and then becomes :class:`~adapters_mgr.errors.Locked`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from adapters_mgr.errors import Locked

DEFAULT_LOCK_TIMEOUT = float(os.environ.get("ADAPTERS_MGR_LOCK_TIMEOUT", "60"))

# Migrations are checked once per (process, file): re-running the check on every short-lived
# connection would cost a query each time on a hot path (rollback must stay well under 20 ms).
_migrated: set[str] = set()
_migrate_lock = threading.Lock()


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "could not set lock" in text or "conflicting lock" in text or "database is locked" in text


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


class Catalog:
    """The DuckDB file that is the single source of truth for state.

    >>> cat = Catalog(tmp_path / "catalog.duckdb")          # doctest: +SKIP
    >>> with cat.transaction() as con:                        # doctest: +SKIP
    ...     con.execute("SELECT count(*) FROM adapters").fetchone()
    """

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float | None = None) -> None:
        self.path = Path(path)
        self.lock_timeout = DEFAULT_LOCK_TIMEOUT if lock_timeout is None else lock_timeout

    # -- connections -------------------------------------------------------------------------
    def _open(self) -> duckdb.DuckDBPyConnection:
        # Always read-write: a read-only open is refused while any writer holds the file anyway,
        # and mixing modes inside one process is an error in DuckDB.
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.005
        while True:
            try:
                return duckdb.connect(str(self.path))
            except duckdb.Error as exc:  # IOException on lock conflicts
                if not _is_lock_error(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise Locked(
                        f"catalog {self.path} is locked by another process for more than "
                        f"{self.lock_timeout:.0f}s; retry later or raise ADAPTERS_MGR_LOCK_TIMEOUT"
                    ) from exc
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.25)

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for one operation; closed on exit so other processes can get in."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._open()
        try:
            self._ensure_migrated(con)
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One atomic change: everything inside commits together or not at all."""
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _ensure_migrated(self, con: duckdb.DuckDBPyConnection) -> None:
        key = str(self.path)
        if key in _migrated:
            return
        from adapters_mgr.catalog.migrations import apply_migrations

        with _migrate_lock:
            if key not in _migrated:
                apply_migrations(con)
                _migrated.add(key)

    # -- helpers -----------------------------------------------------------------------------
    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows as dicts, read in one short connection."""
        with self.connect() as con:
            return fetch_dicts(con, sql, params)


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
