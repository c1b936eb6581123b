"""Subprocess entry points for the multi-process and crash tests (run with ``python -m tests.workers``)."""

from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def contend(root: str, worker: int, rounds: int) -> None:
    """Register, promote and roll back in a loop, as a busy pipeline would."""
    from adapters_mgr import AdapterManager, Conflict
    from tests.conftest import lora_model, tiny_bert

    mgr = AdapterManager(root, lock_timeout=120)
    base = tiny_bert(0)
    for i in range(rounds):
        model = lora_model(base, seed=1000 * worker + i)
        aid = mgr.register(model, name="shared", metrics={"worker": worker, "round": i})
        mgr.promote(aid, "production")
        if i % 2 == 1:
            with contextlib.suppress(Conflict):  # a fresh alias may have nothing to roll back to
                mgr.rollback("production")
        base = model.unload()  # drop LoRA layers; the base tensors are untouched
    print("done", worker)


def register_one(root: str, seed: int) -> None:
    """Register one adapter (the fault hook may kill us part-way)."""
    from adapters_mgr import AdapterManager
    from tests.conftest import lora_model, tiny_bert

    mgr = AdapterManager(root)
    mgr.register(lora_model(tiny_bert(0), seed=seed), name="crashy")
    print("registered")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "contend":
        contend(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "register_one":
        register_one(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown worker command {cmd}")
