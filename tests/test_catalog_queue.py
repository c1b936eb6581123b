"""Issue 16, part 4: adapters-mgr processes queue for the catalog on a kernel lock (``<catalog>.lock``).

Fairness itself is timed by ``benchmarks/bench_concurrency.py``; these tests check the structure it
rests on: the lock is taken for an operation and let go after it, a second process waits while the
first holds it and goes on after, a waiter that times out leaves nothing held, a plain ``duckdb``
session still makes us raise ``Locked`` after the timeout, a killed holder wedges no one, and a
forked child waits its turn like any other process.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from adapters_mgr import Locked
from adapters_mgr.catalog import filelock
from adapters_mgr.catalog.db import Catalog

pytestmark = pytest.mark.skipif(not filelock.AVAILABLE or not hasattr(os, "fork"), reason="needs flock and fork")

REPO = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys
    from adapters_mgr.catalog.db import Catalog
    with Catalog(sys.argv[1], lock_timeout=30).connect() as con:
        con.execute("SELECT 1")
        print("held", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
""")


def lock_is_free(path: Path) -> bool:
    """Whether nobody holds ``path`` (tried without waiting from a descriptor of our own)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing our only descriptor lets go of what it took
    return True


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    catalog = Catalog(tmp_path / "catalog.duckdb", lock_timeout=10)
    catalog.query("SELECT 1")  # created and migrated
    return catalog


@pytest.fixture
def holder(cat: Catalog):
    """Another process inside a catalog operation until told to leave (a line on its stdin)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(cat.path)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO), "ADAPTERS_MGR_LOCK_QUEUE": "1"})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def leave(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "released"


def test_the_lock_is_held_during_an_operation_and_let_go_after(cat):
    assert cat.queue
    with cat.connect() as con:
        assert not lock_is_free(cat.lock_path)
        with cat.connect() as nested:  # nested operations share the one place in the queue
            nested.execute("SELECT 1")
        assert not lock_is_free(cat.lock_path)
        con.execute("SELECT 1")
    assert lock_is_free(cat.lock_path)
    with pytest.raises(ZeroDivisionError), cat.connect():
        raise ZeroDivisionError  # an operation that fails lets go too
    assert lock_is_free(cat.lock_path)


def test_a_second_process_waits_while_the_first_holds_and_goes_on_after(cat, holder):
    done: list[object] = []
    waiter = threading.Thread(target=lambda: done.append(cat.query("SELECT 42 AS v")))
    waiter.start()
    waiter.join(1.0)
    assert not done, "the waiter got in while another process held the catalog"
    leave(holder)
    waiter.join(20)
    assert done == [[{"v": 42}]]
    assert lock_is_free(cat.lock_path)


def test_a_waiter_that_times_out_holds_nothing_afterwards(cat, holder):
    short = Catalog(cat.path, lock_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(Locked, match="locked by another process"):
        short.query("SELECT 1")
    assert time.monotonic() - started >= 0.3
    leave(holder)
    # the abandoned wait got the lock when the holder left, and let it go at once
    deadline = time.monotonic() + 10
    while not lock_is_free(cat.lock_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock_is_free(cat.lock_path)
    assert Catalog(cat.path, lock_timeout=5).query("SELECT 1 AS one") == [{"one": 1}]


def test_a_plain_duckdb_session_still_means_locked_after_the_timeout(cat):
    outside = subprocess.Popen(
        [sys.executable, "-c", "import duckdb,sys,time; c=duckdb.connect(sys.argv[1]); print('held', flush=True); "
         "time.sleep(30)", str(cat.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert outside.stdout is not None and outside.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(Locked, match="locked by another process"):
            Catalog(cat.path, lock_timeout=0.5).query("SELECT 1")
        assert time.monotonic() - started >= 0.5
        assert lock_is_free(cat.lock_path)  # the failed attach gave its place in the queue back
    finally:
        outside.kill()
        outside.wait()
    assert Catalog(cat.path, lock_timeout=5).query("SELECT 1 AS one") == [{"one": 1}]


def test_a_killed_holder_wedges_no_one(cat, holder):
    holder.kill()  # SIGKILL inside the operation: no chance to let go by itself
    holder.wait()
    started = time.monotonic()
    assert Catalog(cat.path, lock_timeout=10).query("SELECT 7 AS v") == [{"v": 7}]
    assert time.monotonic() - started < 5


def test_a_forked_child_waits_its_turn_and_goes_on(cat, holder):
    """The parent has used the catalog (not in the middle of an operation: that is not supported);
    its forked child queues behind another process like anyone else, and goes on when it leaves."""
    from tests.test_fork_safety import in_forked_child

    threading.Timer(1.0, leave, args=(holder,)).start()  # the holder leaves while the child waits
    started = time.monotonic()
    assert in_forked_child(lambda: Catalog(cat.path, lock_timeout=20).query("SELECT 5 AS v")) == [{"v": 5}]
    assert time.monotonic() - started >= 1.0
    assert lock_is_free(cat.lock_path)
    assert cat.query("SELECT 6 AS v") == [{"v": 6}]


def test_the_queue_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERS_MGR_LOCK_QUEUE", "0")
    off = Catalog(tmp_path / "catalog.duckdb")
    assert not off.queue
    assert off.query("SELECT 1 AS one") == [{"one": 1}]
    assert not off.lock_path.exists()  # back-off only, as before the queue
