from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters_mgr import AdapterManager, Locked
from adapters_mgr.catalog.db import Catalog
from tests.conftest import tiny_bert

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.workers", *args], cwd=REPO, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_several_processes_register_promote_and_roll_back_at_once(mgr, base_id, root):
    workers, rounds = 4, 6
    procs = [_run(["contend", str(root), str(w), str(rounds)]) for w in range(workers)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    adapters = mgr.list(name="shared")
    assert len(adapters) == workers * rounds  # nothing lost, nothing duplicated
    assert sorted(a.version for a in adapters) == list(range(1, workers * rounds + 1))
    assert len({a.weights_sha256 for a in adapters}) == workers * rounds
    assert len(mgr.store.keys()) == workers * rounds
    history = mgr.alias_history("production")
    assert sum(h["action"] == "promote" for h in history) == workers * rounds
    # every move recorded continues from the previous one: no lost update
    for prev, cur in zip(history, history[1:], strict=False):
        assert cur["from_id"] == prev["to_id"]
    assert mgr.get("production").id == history[-1]["to_id"]
    assert mgr.verify()["ok"]


@pytest.mark.parametrize("point", ["register:staged", "register:renamed", "register:in_txn"])
def test_crash_while_registering_leaves_nothing_half_visible(mgr, base_id, root, point):
    p = _run(["register_one", str(root), "5"], env={"ADAPTERS_MGR_FAULT": point})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 137, (out, err)
    assert "registered" not in out
    assert mgr.list(name="crashy") == []  # nothing visible
    report = mgr.verify()
    kinds = {pr["kind"] for pr in report["problems"]}
    expected = {"register:staged": {"staging_leftover"}, "register:renamed": {"orphan_folder"},
                "register:in_txn": {"orphan_folder"}}[point]
    assert kinds == expected
    mgr.gc(grace=0)  # right after: no other writer
    assert mgr.verify()["ok"]
    # and the operation works when rerun
    p = _run(["register_one", str(root), "5"])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert [a.version for a in mgr.list(name="crashy")] == [1]
    assert mgr.verify()["ok"]


def test_lock_held_too_long_raises_locked(root):
    AdapterManager(root).init()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb,sys,time; c=duckdb.connect(sys.argv[1]); print('held', flush=True); "
         "time.sleep(30)", str(root / "catalog.duckdb")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Locked, match="locked by another process"):
            Catalog(root / "catalog.duckdb", lock_timeout=0.5).query("SELECT 1")
    finally:
        holder.kill()
        holder.wait()
    assert Catalog(root / "catalog.duckdb", lock_timeout=5).query("SELECT 1 AS one") == [{"one": 1}]


def test_tiny_bert_is_deterministic():
    from adapters_mgr.lora.base_model import weights_sha256

    assert weights_sha256(tiny_bert(0)) == weights_sha256(tiny_bert(0))
