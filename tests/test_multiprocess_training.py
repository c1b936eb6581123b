"""Data-parallel training through the real CLI under ``torchrun`` (2 CPU processes, gloo, loopback).

What is asserted:
- 2 processes register exactly once (one node, one ``train`` event, one JSON document on stdout),
  and record ``processes: 2``;
- the ranker with every dropout at 0 trains the same adapter as one process on the same global
  batches, within float tolerance (the data-parallel maths in ``lora/trainer.py``'s docstring);
- the retriever (in-batch negatives per process: a different objective, so no equality) trains and
  registers once;
- a process that dies (rank 1 mid-training, or rank 0 after training) registers nothing, and
  ``gc`` removes what is left (at most rank 0's temporary folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters_mgr import AdapterManager
from adapters_mgr.lora.testing import tiny_base_folder

REPO = Path(__file__).resolve().parents[1]
# one global batch order for both runs: 135 training rows after the 10% hold-out -> 32,32,32,32,7
# (the last global batch splits 3/4 between the processes, which exercises the per-slice weights)
KNOBS = {"max_length": 32, "max_train_rows": 150, "batch_size": 32, "lr": 5e-3, "epochs": 2}


def _cli_knobs(**extra: object) -> list[str]:
    args: list[str] = []
    for key, value in {**KNOBS, **extra}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> tuple[Path, str]:
    """A root with a tiny BERT base whose own dropout is 0 (so the ranker is deterministic in
    training mode) and one synced batch of synthetic interactions; copied by each test."""
    from adapters_mgr.data import synthetic

    work = tmp_path_factory.mktemp("mp")
    folder = tiny_base_folder(work / "tiny-base")
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # weights (and hash) unchanged
    (folder / "config.json").write_text(json.dumps(config))
    mgr = AdapterManager(work / "root")
    mgr.init()
    mgr.register_base(str(folder), name="tiny")
    synthetic.generate(work / "stream", rows=600, users=40, items=30, seed=0).register(mgr.data)
    mgr.data.sync(window="20m")
    return mgr.root, mgr.data.batches()[-1]["id"]


def _copy(clean: Path, dest: Path) -> AdapterManager:
    shutil.copytree(clean, dest)
    return AdapterManager(dest)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(root: Path, *train_args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2 -m adapters_mgr.cli.main --root ROOT train ...`` on loopback."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ADAPTERS_MGR_FAULT")}
    # PYTHONFAULTHANDLER: a process killed by a signal (SIGABRT, SIGSEGV) prints its Python stack
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONFAULTHANDLER="1")
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    if fault:
        env["ADAPTERS_MGR_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "adapters_mgr.cli.main", "--root", str(root), "train",
           *train_args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _why(proc: subprocess.CompletedProcess[str]) -> str:
    """The launch's stderr without the libraries' warnings, for an assertion message."""
    lines = [line for line in proc.stderr.splitlines() if "Warning" not in line and "warnings.warn" not in line]
    return "\n".join(lines)[-6000:]


def _weights(mgr: AdapterManager, node_id: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(mgr.workspace.adapter_folder(node_id) / "adapter_model.safetensors"))


def _train_events(mgr: AdapterManager) -> int:
    return mgr.catalog.query("SELECT count(*) AS n FROM events WHERE operation = 'train' AND outcome = 'ok'")[0]["n"]


def test_shard_slices_cover_each_global_batch_once_with_weights_summing_to_one():
    from adapters_mgr.lora.trainer import _shard

    for world in (1, 2, 3):
        for size in (1, 2, 7, 32):
            index = list(range(100, 100 + size))
            seen: list[int] = []
            share = 0.0
            for rank in range(world):
                batch, n_local, n_global = _shard(lambda part: {"rows": part}, rank, world)(index)
                assert n_global == size
                if n_local:
                    assert batch["rows"] == index[len(seen):len(seen) + n_local]  # contiguous, in order
                    seen += batch["rows"]
                else:  # an empty slice still runs one row, weighted 0 by the loop
                    assert batch["rows"] == index[:1]
                share += n_local / n_global
            assert seen == index and share == pytest.approx(1.0)


def test_two_processes_register_once_and_equal_one_process(clean_root, tmp_path):
    clean, batch = clean_root
    two = _copy(clean, tmp_path / "two")
    proc = _torchrun(two.root, batch, "--base", "tiny", "--task", "ranker", "--dropout", "0", "--json", *_cli_knobs())
    assert proc.returncode == 0, _why(proc)
    report = json.loads(proc.stdout)  # one JSON document: the other process printed nothing
    assert report["extra"]["processes"] == 2
    nodes = two.list(status="all")
    assert [n.id for n in nodes] == [report["node_id"]] and _train_events(two) == 1
    node = two.get(report["node_id"])
    assert node.hyperparams["processes"] == 2 and node.hyperparams["dropout"] == 0.0

    one = _copy(clean, tmp_path / "one")
    single = one.train_update([batch], task="ranker", base="tiny", dropout=0.0, progress=False, **KNOBS)
    assert "processes" not in one.get(single.node_id).hyperparams
    a, b = _weights(two, report["node_id"]), _weights(one, single.node_id)
    assert a.keys() == b.keys() and len(a) >= 4
    for key in a:  # same global batches, averaged gradients: equal up to float summation order
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    assert report["metrics"]["train_loss"] == pytest.approx(single.metrics["train_loss"], rel=1e-5)
    assert report["metrics"]["auc"] == pytest.approx(single.metrics["auc"], abs=1e-6)


def test_retriever_two_processes_trains_and_registers_once(clean_root, tmp_path):
    """Per-process in-batch negatives: each process contrasts its own half of every global batch, so
    the objective differs from one process (no equality to test); it trains and registers once."""
    clean, batch = clean_root
    mgr = _copy(clean, tmp_path / "ret")
    proc = _torchrun(mgr.root, batch, "--base", "tiny", "--task", "retriever", "--json", *_cli_knobs())
    assert proc.returncode == 0, _why(proc)
    report = json.loads(proc.stdout)
    assert [n.id for n in mgr.list(status="all")] == [report["node_id"]] and _train_events(mgr) == 1
    node = mgr.get(report["node_id"])
    assert node.task == "retriever" and node.hyperparams["processes"] == 2
    assert 0.0 < report["metrics"]["train_loss"] < 100 and report["metrics"]["primary_metric"] in report["metrics"]


@pytest.mark.parametrize("fault", ["train:rank1:step2", "train:trained"],
                         ids=["rank1-dies-mid-training", "rank0-dies-after-training"])
def test_a_dead_process_registers_nothing(clean_root, tmp_path, fault):
    clean, batch = clean_root
    mgr = _copy(clean, tmp_path / "crash")
    proc = _torchrun(mgr.root, batch, "--base", "tiny", "--task", "ranker", *_cli_knobs(epochs=1), fault=fault)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert re.search(r"exitcode\s*:\s*137", proc.stderr), _why(proc)  # the faulted process, per torchrun
    assert "trained node" not in proc.stdout
    assert mgr.list(status="all") == [] and _train_events(mgr) == 0
    mgr.gc(grace=0)  # rank 0's temporary folder, if it was killed before removing it
    assert not any((mgr.root / "store" / "tmp").glob("update-*"))
    assert mgr.verify()["ok"]
