"""A manager with a tiny BERT base (real WordPiece tokenizer) and a synced synthetic stream."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from adapters_mgr import AdapterManager
from adapters_mgr.base import embedded_model_path


def tiny_base_folder(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT (hidden 16) saved with the embedded model's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    src = embedded_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


def synced_manager(root: Path, workdir: Path, *, rows: int = 2400, window: str = "20m") -> AdapterManager:
    from adapters_mgr.data import synthetic

    mgr = AdapterManager(root)
    mgr.init()
    mgr.register_base(str(tiny_base_folder(workdir / "tiny-base")), name="tiny")
    data = synthetic.generate(workdir / "stream", rows=rows, users=40, items=30, seed=0)
    data.register(mgr.data)
    mgr.data.sync(window=window)
    return mgr
