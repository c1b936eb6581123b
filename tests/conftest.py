"""Shared fixtures: a tiny random BERT (fast), a manager in a temp root, LoRA adapters on it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny test models: one thread each. With OpenMP's default (all cores) a 16-wide matmul costs ~200x
# more on a busy 2-core machine (measured: 6.8 ms vs 0.03 ms per call), and subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    max_position_embeddings=32, type_vocab_size=2,
)


def tiny_bert(seed: int = 0, head: str = "seq_cls"):
    """A tiny randomly initialised BERT; same seed -> same weights."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(**TINY, num_labels=2)
    model = BertForSequenceClassification(config) if head == "seq_cls" else BertModel(config)
    return model.eval()


def lora_model(base, seed: int = 1, r: int = 4, task_type: str = "SEQ_CLS", targets=("query", "value")):
    """Wrap ``base`` with a LoRA whose B matrices are random (so the adapter changes outputs)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type=task_type, init_lora_weights=False)
    model = get_peft_model(base, cfg)
    return model.eval()


def sample_inputs(n: int = 3, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def mgr(root: Path):
    from adapters_mgr import AdapterManager

    m = AdapterManager(root)
    m.init()
    return m


@pytest.fixture
def base_id(mgr) -> str:
    return mgr.register_base(tiny_bert(0), name="tiny-bert")
