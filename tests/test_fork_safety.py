"""Issue 15, part 1: a process that used the catalog and then forks (multiprocessing's default on
Linux, DataLoader workers, pre-fork servers) must have a working catalog in the child.

Before the fix the child's first catalog call hung for good: it replaced the parent's in-memory DuckDB
instance, whose destructor joins worker threads that ``fork`` did not copy. Every child here runs
under a deadline, so a hang fails the test instead of hanging the run.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapters_mgr import AdapterManager
from adapters_mgr.catalog import db
from tests.conftest import lora_model, tiny_bert

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "fork"), reason="needs fork")

DEADLINE_S = 30.0  # a healthy child answers in well under a second; the old hang never answered
REPO = Path(__file__).resolve().parents[1]


def _child(q: Any, fn: Callable[[], Any]) -> None:
    try:
        start = time.perf_counter()
        q.put(("ok", fn(), time.perf_counter() - start))
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent
        q.put(("error", f"{type(exc).__name__}: {exc}", 0.0))


def in_forked_child(fn: Callable[[], Any], deadline: float = DEADLINE_S) -> Any:
    """``fn()`` run in a forked child; its result, or a test failure if it raised or hung past ``deadline``."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q, fn))
    proc.start()
    try:
        status, value, seconds = q.get(timeout=deadline)
    except queue.Empty:
        proc.kill()
        proc.join()
        pytest.fail(f"the forked child's catalog call did not return within {deadline:g}s (fork hang)")
    proc.join(deadline)
    assert not proc.is_alive(), "the forked child did not exit"
    assert status == "ok", value
    assert seconds < deadline
    return value


@pytest.fixture
def used(mgr, base_id, tmp_path) -> tuple[AdapterManager, list[int], Path]:
    """A manager the parent has used (register, promote, list), and a PEFT folder to register later."""
    ids = [mgr.register(lora_model(tiny_bert(0), seed=s), name="ranker") for s in (1, 2)]
    mgr.promote(ids[0], "production")
    folder = tmp_path / "later"
    lora_model(tiny_bert(0), seed=9).save_pretrained(str(folder))
    assert [a.id for a in mgr.list()] == ids[::-1]
    return mgr, ids, folder


def test_list_after_fork(used):
    mgr, ids, _ = used
    assert in_forked_child(lambda: [a.id for a in mgr.list()]) == ids[::-1]
    assert [a.id for a in mgr.list()] == ids[::-1]  # and the parent's catalog still works


def test_register_after_fork(used, base_id):
    mgr, ids, folder = used
    new_id = in_forked_child(lambda: mgr.register(folder, name="forked", base=base_id))
    assert new_id not in ids and mgr.get(new_id).name == "forked"  # the parent sees the child's write
    assert mgr.verify()["ok"]


def test_promote_and_rollback_after_fork(used):
    mgr, ids, _ = used
    assert in_forked_child(lambda: (mgr.promote(ids[1], "production"), mgr.alias_target("production"))) == (
        ids[1], ids[1])
    assert mgr.alias_target("production") == ids[1]
    assert in_forked_child(lambda: mgr.rollback("production")) == ids[0]
    assert mgr.alias_target("production") == ids[0]


def test_a_fresh_manager_in_the_child_and_two_generations_of_forks(used, root):
    mgr, ids, _ = used

    def grandchild_list() -> list[int]:  # a shorter deadline: the child, not the parent, kills a hung grandchild
        return in_forked_child(lambda: [a.id for a in AdapterManager(root).list()], deadline=DEADLINE_S / 3)

    assert in_forked_child(grandchild_list) == ids[::-1]


def test_a_fork_the_at_fork_hook_missed_is_caught_by_the_pid_check(used, monkeypatch):
    mgr, ids, _ = used
    mgr.list()  # the instance exists
    monkeypatch.setattr(db, "_instance_pid", -1)  # as a C-level fork() that ran no Python hook would leave it
    assert [a.id for a in mgr.list()] == ids[::-1]
    assert db._instance_pid == os.getpid()


def test_a_forked_child_exits_normally_after_using_the_catalog(root, mgr):
    """Interpreter shutdown in the child must not destroy the parent's instance either (that hangs too)."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from adapters_mgr import AdapterManager
        mgr = AdapterManager({str(root)!r})
        mgr.list()
        pid = os.fork()
        if pid == 0:
            mgr.list()
            sys.exit(0)  # a normal exit: atexit, module teardown, garbage collection
        deadline = time.monotonic() + {DEADLINE_S}
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                sys.exit(0 if os.waitstatus_to_exitcode(status) == 0 else 3)
            time.sleep(0.05)
        os.kill(pid, 9)
        sys.exit(4)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=DEADLINE_S + 60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


def test_a_scorer_built_before_the_fork_scores_in_the_child(tmp_path):
    """What a pre-fork server does: load the model once, fork workers, serve from each."""
    import numpy as np
    from peft import get_peft_model  # noqa: F401 - imported before the fork, as a server would

    from adapters_mgr.lora.base_model import load_base_model
    from adapters_mgr.lora.testing import tiny_base_folder

    mgr = AdapterManager(tmp_path / "root")
    mgr.init()
    base_folder = tiny_base_folder(tmp_path / "base")
    mgr.register_base(str(base_folder), name="tiny")
    aid = mgr.register(lora_model(load_base_model(str(base_folder), _seq_cls()), seed=3), name="ranker")
    mgr.promote(aid, "production")
    scorer = mgr.scorer("production", max_length=16)
    users, items = ["user a", "user b"], ["item x", "item y"]
    expected = scorer.score_texts(users, items)

    def child() -> tuple[list[float], int | None]:
        return scorer.score_texts(users, items).tolist(), scorer.refresh() and scorer.active

    scores, _ = in_forked_child(child)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    scorer.close()


def _seq_cls() -> Any:
    from adapters_mgr.lora.base_model import HeadSpec

    return HeadSpec("seq_cls", 2)
