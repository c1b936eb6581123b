"""A manager with a tiny BERT base (real WordPiece tokenizer) and a synced synthetic stream."""

from __future__ import annotations

from pathlib import Path

from adapters_mgr import AdapterManager
from adapters_mgr.lora.testing import tiny_base_folder

__all__ = ["synced_manager", "tiny_base_folder"]


def synced_manager(root: Path, workdir: Path, *, rows: int = 2400, window: str = "20m") -> AdapterManager:
    from adapters_mgr.data import synthetic

    mgr = AdapterManager(root)
    mgr.init()
    mgr.register_base(str(tiny_base_folder(workdir / "tiny-base")), name="tiny")
    data = synthetic.generate(workdir / "stream", rows=rows, users=40, items=30, seed=0)
    data.register(mgr.data)
    mgr.data.sync(window=window)
    return mgr
