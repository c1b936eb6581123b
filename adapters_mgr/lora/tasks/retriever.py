"""The ``retriever`` recipe: a two-tower model whose two towers are the same LoRA-adapted encoder.

User text and item text are each encoded by the shared frozen BERT plus ONE LoRA adapter, pooled by
attention-masked mean, and L2-normalised; their score is the cosine similarity. Training uses
positive interactions only, with in-batch negatives: a symmetric InfoNCE loss over the batch's
user x item similarity matrix divided by a temperature. Off-diagonal pairs that are not true
negatives (the same user or the same item appearing twice in a batch) are masked out.

Because item embeddings do not depend on the user, a whole catalog is encoded once and ranked by a
matrix product: this is the recipe that makes recomputing everyone's recommendations affordable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters_mgr.errors import InvalidInput
from adapters_mgr.lora import metrics
from adapters_mgr.lora.base_model import HeadSpec
from adapters_mgr.lora.examples import (
    Interactions,
    RetrievalEvalSet,
    as_interactions,
    as_retrieval_eval,
    positives,
)
from adapters_mgr.lora.tasks.base import Task, register_task


class RetrieverTask(Task):
    name = "retriever"
    primary_metric = "ndcg@10"

    def __init__(self, temperature: float = 0.05, k: int = 10) -> None:
        if not temperature > 0:
            raise InvalidInput(f"retriever temperature must be positive, got {temperature!r}; try 0.05")
        self.temperature = float(temperature)
        self.k = int(k)

    @property
    def head(self) -> HeadSpec:
        """The bare encoder (no task head)."""
        return HeadSpec("encoder")

    def task_model(self, base: nn.Module) -> nn.Module:
        """The bare encoder: a BertModel as is, or the backbone of a BertFor... model (shared, not copied)."""
        from peft import PeftModel

        model = base.get_base_model() if isinstance(base, PeftModel) else base
        if type(model).__name__.endswith(("ForSequenceClassification", "ForMaskedLM", "ForPreTraining")):
            model = model.base_model
        if not hasattr(model, "embeddings") and not hasattr(model, "get_input_embeddings"):
            raise InvalidInput(f"the retriever needs a transformer encoder base, got {type(model).__name__}")
        return model

    def parse_train(self, examples: Any) -> Interactions:
        what = "retriever training examples"
        return positives(as_interactions(examples, need_labels=False, what=what), what)

    def parse_eval(self, examples: Any) -> RetrievalEvalSet:
        return as_retrieval_eval(examples, "retriever eval examples")

    def collate(self, data: Interactions, tokenizer: Any, max_length: int) -> Callable[[list[int]], dict[str, Any]]:
        _, user_idx = np.unique(data.user_ids.astype(str), return_inverse=True)
        _, item_idx = np.unique(data.item_ids.astype(str), return_inverse=True)

        def collate_fn(index: list[int]) -> dict[str, Any]:
            # one forward over users + items: keeps DDP happy (each parameter used once per step)
            texts = [data.user_texts[i] for i in index] + [data.item_texts[i] for i in index]
            batch = dict(tokenize_texts(tokenizer, texts, max_length))
            batch["user_idx"] = torch.as_tensor(user_idx.reshape(-1)[index], dtype=torch.long)
            batch["item_idx"] = torch.as_tensor(item_idx.reshape(-1)[index], dtype=torch.long)
            return batch

        return collate_fn

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        user_idx = batch.pop("user_idx")
        item_idx = batch.pop("item_idx")
        emb = embed_batch(model, batch)
        n = user_idx.shape[0]
        users, items = emb[:n], emb[n:]
        logits = users @ items.T / self.temperature
        same = (user_idx[:, None] == user_idx[None, :]) | (item_idx[:, None] == item_idx[None, :])
        false_negative = same & ~torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(false_negative, torch.finfo(logits.dtype).min)
        target = torch.arange(n, device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def evaluate(self, scorer: Any, eval_set: RetrievalEvalSet) -> dict[str, float]:
        item_ids = list(eval_set.catalog)
        rows = eval_set.rows
        users, relevant, exclude = metrics.ranking_targets(rows.user_ids.tolist(), rows.item_ids.tolist(),
                                                           item_ids, eval_set.seen)
        first_text: dict[Any, str] = {}
        for uid, text in zip(rows.user_ids.tolist(), rows.user_texts, strict=True):
            first_text.setdefault(uid, text)
        user_texts = [first_text[uid] for uid in users]
        item_emb = scorer.encode_items([eval_set.catalog[i] for i in item_ids])
        user_emb = scorer.encode_users(user_texts)
        result: dict[str, float] = dict(metrics.ranking_metrics(user_emb @ item_emb.T, relevant, exclude, k=self.k))
        result["n_items"] = len(item_ids)
        return result


def tokenize_texts(tokenizer: Any, texts: list[str], max_length: int) -> Any:
    return tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


def embed_batch(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Attention-masked mean of the last hidden states, L2-normalised (float32)."""
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def encode_texts(
    model: nn.Module, tokenizer: Any, texts: list[str], *, max_length: int, batch_size: int, device: torch.device
) -> np.ndarray:
    """Unit-norm embeddings under the currently active adapter(s), float32 (n, hidden)."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenize_texts(tokenizer, list(texts[start:start + batch_size]), max_length)
        chunks.append(embed_batch(model, {k: v.to(device) for k, v in batch.items()}).cpu().numpy())
    if not chunks:
        hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0))
        return np.zeros((0, hidden), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)


register_task("retriever", RetrieverTask)
