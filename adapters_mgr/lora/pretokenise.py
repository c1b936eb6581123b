"""Tokenise a training set once, pad each batch from the stored ids.

Why: the training loop called the tokenizer on every batch of every epoch. The stored ids padded per
batch give exactly the tensors ``tokenizer(..., padding=True)`` gives (same ids, same masks, same
padding side), so a trained adapter's bytes do not change; the tokenizer runs once per update
instead of once per batch per epoch. Padding by hand instead of ``tokenizer.pad``: that call warns
on every fast tokenizer and copies through Python dicts per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class Pretokenised:
    """Every row's ids (truncated, unpadded), padded per batch to the batch's longest row."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int) -> None:
        args = (list(texts), list(pairs)) if pairs is not None else (list(texts),)
        encoded = tokenizer(*args, truncation=True, max_length=max_length, padding=False)
        self.columns = {k: list(v) for k, v in encoded.items()}
        self.pad_values = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
        self.right = getattr(tokenizer, "padding_side", "right") != "left"

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def batch(self, index: Sequence[int]) -> dict[str, torch.Tensor]:
        """The rows ``index`` as padded ``long`` tensors, as the tokenizer would have returned them."""
        ids = self.columns["input_ids"]
        width = max(len(ids[i]) for i in index)
        out: dict[str, torch.Tensor] = {}
        for name, column in self.columns.items():
            pad = self.pad_values.get(name, 0)
            tensor = torch.full((len(index), width), pad, dtype=torch.long)
            for row, i in enumerate(index):
                values = torch.as_tensor(column[i], dtype=torch.long)
                if self.right:
                    tensor[row, : len(values)] = values
                else:
                    tensor[row, width - len(values):] = values
            out[name] = tensor
        return out


__all__ = ["Pretokenised"]
