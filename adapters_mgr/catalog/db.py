"""Short-lived DuckDB connections with retry, and the transaction + event idiom.

DuckDB lets exactly one process hold a database file open read-write, and while it does no other
process can open it at all. So nothing here keeps a connection: each operation attaches the file,
does its work, and detaches (about 2 ms). Processes of adapters-mgr wait their turn on a kernel
file lock (``<catalog>.lock``, see :mod:`~adapters_mgr.catalog.filelock`) taken before attaching and
let go after detaching, so they queue instead of polling. A conflict with anything else that has the
file open (a plain ``duckdb`` session) is retried with jittered exponential back-off; either wait
ends at ``lock_timeout`` as :class:`~adapters_mgr.errors.Locked`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb

from adapters_mgr.catalog import filelock
from adapters_mgr.catalog.migrations import apply_migrations
from adapters_mgr.catalog.sql import atomic, fetch_dicts
from adapters_mgr.errors import Locked

WAL_CHECKPOINT_BYTES = 8 << 10
DEFAULT_LOCK_TIMEOUT = float(os.environ.get("ADAPTERS_MGR_LOCK_TIMEOUT", "60"))


def _queue_default() -> bool:
    """Whether processes queue on ``<catalog>.lock`` (``ADAPTERS_MGR_LOCK_QUEUE=0`` turns it off).

    Off is the back-off-only behaviour of before; it is kept for filesystems whose ``flock`` is not
    shared between machines (some network mounts), and so the concurrency benchmark can compare.
    """
    return filelock.AVAILABLE and os.environ.get("ADAPTERS_MGR_LOCK_QUEUE", "1").strip().lower() not in (
        "0", "false", "no", "off")

# Migrations are checked once per (process, file): re-running the check on every short-lived
# connection would cost a query each time on a hot path (rollback must stay well under 20 ms).
_migrated: set[str] = set()
_migrate_lock = threading.Lock()

# One in-memory DuckDB instance per process; each operation ATTACHes the catalog file, works, and
# DETACHes it, which releases the file lock exactly as closing a connection would. Measured here:
# an attach/detach cycle costs ~2 ms where duckdb.connect()+close() costs ~14 ms (instance start-up),
# which is the difference between a 20 ms and a 35 ms rollback.
_instance: duckdb.DuckDBPyConnection | None = None
_instance_pid: int | None = None
_instance_lock = threading.Lock()


def _abandon(obj: object) -> None:
    """Keep an object inherited through fork alive for good: its destructor must never run here.

    Why: destroying a DuckDB instance joins its worker threads (``TaskScheduler`` destructor), and
    ``fork`` copies only the calling thread, so in a child the join waits forever, holding the GIL.
    That was the fork hang: the child's first catalog call replaced the parent's instance, the
    old one's destructor ran and the call never returned (the lock timeout never started). A plain
    module-level list is not enough: interpreter shutdown clears modules and would run the destructor
    at exit, so the object gets one reference nothing ever drops (the price: the idle instance's memory
    stays allocated in the child).
    """
    if obj is not None:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _reset_after_fork() -> None:
    """In a forked child: forget the parent's DuckDB instance, attachments and locks.

    The instance is abandoned, never destroyed (see :func:`_abandon`); the locks are new because a
    parent thread may have held one at the moment of the fork, and no thread of the child would ever
    release it. The migration cache stays: migrations are on disk, not in the instance.
    """
    global _instance, _instance_pid, _instance_lock, _attachments, _attachments_lock, _migrate_lock
    _abandon(_instance)
    _instance, _instance_pid = None, None
    _instance_lock = threading.Lock()
    _attachments = {}
    _attachments_lock = threading.Lock()
    _migrate_lock = threading.Lock()


def _memory_instance() -> duckdb.DuckDBPyConnection:
    global _instance, _instance_pid
    if _instance_pid is not None and _instance_pid != os.getpid():
        # A fork that skipped the at-fork hook (a C-level fork()): same reset, same reason.
        _reset_after_fork()
    with _instance_lock:
        if _instance is None:
            _instance = duckdb.connect(":memory:")
            _instance.execute("SET TimeZone = 'UTC'")
            # Detaching would otherwise checkpoint after every write (~15-25 ms on a 100k-adapter
            # catalog); commits are already durable in the WAL. But replaying the WAL on the next
            # attach costs ~0.5 ms per transaction, so _detach checkpoints once it passes 8 KB
            # (~8 small transactions): replay stays under ~4 ms, checkpoints amortise to ~2 ms a write.
            _instance.execute("PRAGMA disable_checkpoint_on_shutdown")
            _instance_pid = os.getpid()
        return _instance


class _Attachment:
    """Reference-counted attachment of one catalog file, shared by nested operations in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = "cat_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        self.lock = threading.RLock()
        self.depth = 0
        self.wrote = False  # a transaction ran during this attachment (see Catalog._detach)
        self.queue_fd: int | None = None  # the descriptor holding <catalog>.lock while attached


_attachments: dict[str, _Attachment] = {}
_attachments_lock = threading.Lock()

# A forked child (multiprocessing's default on Linux, DataLoader workers, pre-fork servers) starts
# with fresh module state; see _reset_after_fork.
os.register_at_fork(after_in_child=_reset_after_fork)


def _attachment(path: Path) -> _Attachment:
    with _attachments_lock:
        att = _attachments.get(str(path))
        if att is None:
            att = _attachments[str(path)] = _Attachment(path)
        return att


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "could not set lock" in text or "conflicting lock" in text or "database is locked" in text


class Catalog:
    """The DuckDB file that is the single source of truth for state.

    >>> cat = Catalog(tmp_path / "catalog.duckdb")          # doctest: +SKIP
    >>> with cat.transaction() as con:                        # doctest: +SKIP
    ...     con.execute("SELECT count(*) FROM adapters").fetchone()
    """

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float | None = None,
                 queue: bool | None = None) -> None:
        self.path = Path(path)
        self.lock_timeout = DEFAULT_LOCK_TIMEOUT if lock_timeout is None else lock_timeout
        self.queue = _queue_default() if queue is None else (queue and filelock.AVAILABLE)

    @property
    def lock_path(self) -> Path:
        """The sidecar file adapters-mgr processes queue on; it holds no data and is never removed."""
        return self.path.with_name(self.path.name + ".lock")

    def _locked(self) -> Locked:
        return Locked(
            f"catalog {self.path} is locked by another process for more than "
            f"{self.lock_timeout:g}s; retry later or raise ADAPTERS_MGR_LOCK_TIMEOUT"
        )

    # -- connections -------------------------------------------------------------------------
    def _attach(self, att: _Attachment) -> None:
        """Wait in the queue (``<catalog>.lock``), then attach; a conflict left means an outside holder."""
        instance = _memory_instance()
        deadline = time.monotonic() + self.lock_timeout
        if self.queue:
            att.queue_fd = self._wait_in_queue()
        try:
            self._attach_file(instance, att, deadline)
        except BaseException:
            self._leave_queue(att)
            raise

    def _wait_in_queue(self) -> int | None:
        """The descriptor holding ``<catalog>.lock``, or :class:`Locked` at the timeout; ``None`` where
        no lock file can be made (a read-only folder: reads still work, with back-off alone as before)."""
        try:
            fd = filelock.acquire(self.lock_path, self.lock_timeout)
        except OSError:
            return None
        if fd is None:
            raise self._locked()
        return fd

    def _attach_file(self, instance: duckdb.DuckDBPyConnection, att: _Attachment, deadline: float) -> None:
        """ATTACH, retried with jittered exponential back-off while something else holds the file.

        With the queue on, that something is outside adapters-mgr (a plain ``duckdb`` session) or an
        adapters-mgr process with the queue turned off; this process keeps its place at the head of
        the queue meanwhile, so the processes behind it keep their order.
        """
        delay = 0.005
        quoted = str(self.path).replace("'", "''")
        while True:
            try:
                instance.execute(f"ATTACH '{quoted}' AS {att.name}")
                return
            except duckdb.Error as exc:  # IOException on lock conflicts
                if not _is_lock_error(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise self._locked() from exc
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.25)

    @staticmethod
    def _leave_queue(att: _Attachment) -> None:
        if att.queue_fd is not None:
            fd, att.queue_fd = att.queue_fd, None
            filelock.release(fd)

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for one operation; the file is detached on exit so other processes can get in.

        Nested calls in the same thread share the attachment; other threads wait for it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        att = _attachment(self.path)
        with att.lock:
            if att.depth == 0:
                self._attach(att)
                att.wrote = False
            att.depth += 1
            con = _memory_instance().cursor()
            try:
                con.execute(f"USE {att.name}")
                self._ensure_migrated(con)
                yield con
            finally:
                con.close()
                att.depth -= 1
                if att.depth == 0:
                    self._detach(att)

    def _detach(self, att: _Attachment) -> None:
        """Detach; checkpoint first when the WAL has grown (writers) or holds anything at all (readers).

        Every attach replays the WAL (~0.5 ms per KB) and a checkpoint of a small WAL costs ~5 ms. A
        writer checkpoints past 8 KB, so a run of writes pays ~1 ms each on average; the first *read*
        after writes checkpoints whatever is left, so the reads that follow attach with nothing to
        replay (~2-4 ms saved on every one of them).
        """
        instance = _memory_instance()
        wal = self.path.with_name(self.path.name + ".wal")
        limit = WAL_CHECKPOINT_BYTES if att.wrote else 0
        try:
            if wal.exists() and wal.stat().st_size > limit:
                instance.execute(f"CHECKPOINT {att.name}")  # keeps WAL replay on the next attach cheap
        finally:
            try:
                instance.execute(f"DETACH {att.name}")
            finally:  # after the detach: the next in line must find the file free
                self._leave_queue(att)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One atomic change: everything inside commits together or not at all."""
        with self.connect() as con, atomic(con):
            _attachment(self.path).wrote = True
            yield con

    def _ensure_migrated(self, con: duckdb.DuckDBPyConnection) -> None:
        key = str(self.path)
        if key in _migrated:
            return
        with _migrate_lock:
            if key not in _migrated:
                apply_migrations(con)
                _migrated.add(key)

    # -- helpers -----------------------------------------------------------------------------
    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows as dicts, read in one short connection."""
        with self.connect() as con:
            return fetch_dicts(con, sql, params)
