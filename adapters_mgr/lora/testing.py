"""Tiny random BERT bases and synthetic interactions for fast tests (no hub, no download).

Why in the package: the trainer's tests, the manager's tests and the benchmark's ``--quick`` mode all
need a model that trains in milliseconds and a stream whose signal a recommender can learn.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters_mgr.lora.base_model import embedded_model_path, quiet_transformers

GENRES = ("rock", "jazz", "pop", "folk")
_WORDS = ("user", "item", "age", "genre", "likes", "group", "a", "b", "song", "film", *GENRES)


def tiny_tokenizer(folder: str | Path) -> Any:
    """A WordPiece tokenizer over a ~40-token vocabulary written to ``folder/vocab.txt``."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *digits]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder))


def tiny_config(vocab_size: int = 64, hidden: int = 32) -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=64, type_vocab_size=2)


def tiny_base(kind: str = "seq_cls", seed: int = 0, head_seed: int | None = None, vocab_size: int = 64) -> Any:
    """A frozen random BERT in eval mode: ``seq_cls`` (2 labels) or ``encoder``. The backbone depends
    on ``seed`` only; ``head_seed`` re-draws the classifier (as a per-process random head would)."""
    from transformers import BertForSequenceClassification, BertModel

    config = tiny_config(vocab_size)
    torch.manual_seed(seed)
    if kind == "encoder":
        model = BertModel(config, add_pooling_layer=False)
    else:
        config.num_labels = 2
        model = BertForSequenceClassification(config)
        if head_seed is not None:
            generator = torch.Generator().manual_seed(head_seed)
            with torch.no_grad():
                model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=generator))
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def synthetic_rows(n: int, seed: int = 0, n_users: int = 12, n_items: int = 16,
                   flip: bool = False) -> list[dict[str, Any]]:
    """Interactions whose label is learnable from the texts: user u likes genre ``GENRES[u % 2]``
    (``flip`` swaps the tastes, a drift); items carry their genre in the text."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        u = int(rng.integers(n_users))
        i = int(rng.integers(n_items))
        genre = GENRES[i % len(GENRES)]
        liked = GENRES[(u + int(flip)) % 2]
        rows.append({
            "user_id": f"u{u}", "item_id": f"i{i}",
            "user_text": f"user {u} age {20 + u % 3}", "item_text": f"item {i} genre {genre}",
            "label": int(genre == liked),
        })
    return rows


def item_catalog(n_items: int = 16) -> dict[str, str]:
    return {f"i{i}": f"item {i} genre {GENRES[i % len(GENRES)]}" for i in range(n_items)}


def tiny_base_folder(folder: str | Path, seed: int = 0, hidden: int = 16) -> Path:
    """A random 2-layer BERT (real 30,522-token WordPiece vocabulary) saved with the embedded model's
    tokenizer: for demos (`--quick`), benchmarks' quick modes and tests that go through the catalog."""
    from transformers import BertConfig, BertForSequenceClassification

    quiet_transformers()
    folder = Path(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    src = embedded_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder
