"""The ``retriever`` recipe: a two-tower model whose two towers are the same LoRA-adapted encoder.

User text and item text are each encoded by the shared frozen BERT plus ONE LoRA adapter, pooled by
attention-masked mean, and L2-normalised; their score is the cosine similarity. Training uses
positive interactions only, with in-batch negatives: a symmetric InfoNCE loss over the batch's
user x item similarity matrix divided by a temperature. Off-diagonal pairs that are not true
negatives (the same user or the same item appearing twice in a batch) are masked out.

Because item embeddings do not depend on the user, a whole catalog is encoded once and ranked by a
matrix product: this is the recipe that makes recomputing everyone's recommendations affordable.

With the popularity term (``RetrieverTask(popularity={...})``, the recipe of
:mod:`adapters_mgr.data.popularity`, recorded under ``hyperparams['popularity_recipe']``) the score is

    score(u, i) = sim_weight * cos(u, i) + pop_weight * log(count_i + smoothing)

with ``count_i`` the item's interactions strictly before the as-of time. The two weights are learned
scalars kept OUTSIDE the PEFT folder (the folder stays a standard one; plain peft gives the
encoder, hence the cosine): they start at ``sim_weight = 0``, ``pop_weight = 1``, so an untrained
retriever ranks exactly like popularity, and training learns how much the text similarity adds.
Their learned values are recorded with the adapter (``learned()``), and evaluation and the scorer
read them back. Training with the term:

- the in-batch logits are ``sim_weight * cos + pop_weight * log(count_j + smoothing)`` where
  ``count_j`` is the column's item count as of ITS row's time (an approximation for the row's
  negatives, whose own time differs);
- logQ correction (``logq``, on by default; Yi et al. 2019): in-batch negatives are drawn in
  proportion to the items' frequency in the training rows, so ``log q_j = log(n_j / n)`` is
  subtracted from every logit of column j (positive included), which makes the in-batch softmax an
  estimate of the full-catalog softmax instead of one that punishes popular items;
- false negatives (same user or same item elsewhere in the batch) stay masked; the loss stays the
  symmetric InfoNCE (the popularity and logQ terms are constant within a column, so the
  item-to-user direction does not see them).

Without it (no recipe: every retriever adapter registered before) the score is the cosine, and the
loss divides it by ``temperature`` exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
from adapters_mgr.lora.pretokenise import Pretokenised
from adapters_mgr.lora.tasks.base import Task, register_task

RECORD_KEY = "popularity_recipe"  # = adapters_mgr.data.popularity.RECORD_KEY (lora does not import data)
SCALAR_LR = 0.01


class RetrieverTask(Task):
    name = "retriever"
    primary_metric = "ndcg@10"

    def __init__(self, temperature: float = 0.05, k: int = 10, popularity: Mapping[str, Any] | None = None,
                 scalar_lr: float = SCALAR_LR) -> None:
        if not temperature > 0:
            raise InvalidInput(f"retriever temperature must be positive, got {temperature!r}; try 0.05")
        self.temperature = float(temperature)
        self.k = int(k)
        self.recipe = dict(popularity) if popularity and popularity.get("kind", "log") != "none" else None
        self.scalar_lr = float(scalar_lr)
        self._weights: nn.Parameter | None = None
        if self.recipe is not None:
            smoothing = float(self.recipe.get("smoothing", 1.0))
            if not smoothing > 0:
                raise InvalidInput(f"retriever popularity smoothing must be positive, got {smoothing!r}")
            self.smoothing = smoothing
            self.logq = bool(self.recipe.get("logq", True))
            # trained as (sim_weight * temperature, pop_weight): Adam moves both by ~scalar_lr a step,
            # which is ~1/temperature times faster for sim_weight (its useful range is ~0..20)
            start = [float(self.recipe.get("sim_weight", 0.0)) * self.temperature,
                     float(self.recipe.get("pop_weight", 1.0))]
            self._weights = nn.Parameter(torch.tensor(start, dtype=torch.float64))
            self._start = self._weights.detach().clone()
            # until training moves them, the weights read back exactly as recorded (no round trip
            # through ``* temperature``): evaluation then scores exactly as the scorer does
            self._recorded = (float(self.recipe.get("sim_weight", 0.0)), float(self.recipe.get("pop_weight", 1.0)))

    # -- the popularity term -------------------------------------------------------------------------
    @property
    def uses_popularity(self) -> bool:
        return self.recipe is not None

    def _untrained(self) -> bool:
        return torch.equal(self._weights.detach(), self._start)

    @property
    def sim_weight(self) -> float:
        if self._weights is None:
            return 1.0
        return self._recorded[0] if self._untrained() else float(self._weights.detach()[0]) / self.temperature

    @property
    def pop_weight(self) -> float:
        if self._weights is None:
            return 0.0
        return self._recorded[1] if self._untrained() else float(self._weights.detach()[1])

    def scalars(self) -> list[nn.Parameter]:
        return [self._weights] if self._weights is not None else []

    def learned(self) -> dict[str, Any]:
        if self.recipe is None:
            return {}
        return {RECORD_KEY: {**self.recipe, "sim_weight": self.sim_weight, "pop_weight": self.pop_weight,
                             "start_sim_weight": float(self.recipe.get("sim_weight", 0.0)),
                             "start_pop_weight": float(self.recipe.get("pop_weight", 1.0))}}

    def popularity_term(self, counts: Any) -> np.ndarray:
        """``log(count + smoothing)`` per count (float64)."""
        return np.log(np.asarray(counts, dtype=np.float64) + self.smoothing)

    def scores(self, user_emb: np.ndarray, item_emb: np.ndarray, item_counts: Any = None) -> np.ndarray:
        """The (users x items) score matrix: the dot product, or with the popularity term
        ``sim_weight * dot + pop_weight * log(count + smoothing)`` (float64; ``item_counts`` per item)."""
        sim = np.asarray(user_emb, dtype=np.float64) @ np.asarray(item_emb, dtype=np.float64).T
        if self.recipe is None:
            return sim
        if item_counts is None:
            raise InvalidInput("this retriever adds an item popularity term: pass the items' as-of counts")
        return self.sim_weight * sim + self.pop_weight * self.popularity_term(item_counts)[None, :]

    @property
    def head(self) -> HeadSpec:
        """The bare encoder (no task head)."""
        return HeadSpec("encoder")

    def task_model(self, base: nn.Module) -> nn.Module:
        """The bare encoder: a BertModel as is, or the backbone of a BertFor... model (shared, not copied)."""
        return encoder_of(base, "the retriever")

    def parse_train(self, examples: Any) -> Interactions:
        what = "retriever training examples"
        return positives(as_interactions(examples, need_labels=False, what=what), what)

    def parse_eval(self, examples: Any) -> RetrievalEvalSet:
        return as_retrieval_eval(examples, "retriever eval examples")

    def collate(self, data: Interactions, tokenizer: Any, max_length: int) -> Callable[[list[int]], dict[str, Any]]:
        _, user_idx = np.unique(data.user_ids.astype(str), return_inverse=True)
        _, item_idx, item_freq = np.unique(data.item_ids.astype(str), return_inverse=True, return_counts=True)
        pop = logq = None
        if self.recipe is not None:
            if data.item_counts is None:
                raise InvalidInput("retriever training rows lack the column 'item_pop_count' (the item's "
                                   "interactions before the row): a retriever with the popularity term needs it")
            pop = self.popularity_term(data.item_counts)
            # log of each row's item's share of the training rows: its in-batch sampling probability
            logq = np.log(item_freq[item_idx.reshape(-1)] / len(data)) if self.logq else np.zeros(len(data))

        # users then items, tokenised once (every epoch reuses them); row i's item is row n + i
        n = len(data)
        encoded = Pretokenised(tokenizer, [*data.user_texts, *data.item_texts], None, max_length)

        def collate_fn(index: list[int]) -> dict[str, Any]:
            # one forward over users + items: keeps DDP happy (each parameter used once per step)
            batch: dict[str, Any] = encoded.batch([*index, *(n + i for i in index)])
            batch["user_idx"] = torch.as_tensor(user_idx.reshape(-1)[index], dtype=torch.long)
            batch["item_idx"] = torch.as_tensor(item_idx.reshape(-1)[index], dtype=torch.long)
            if pop is not None:
                batch["item_pop"] = torch.as_tensor(pop[index], dtype=torch.float32)
                batch["item_logq"] = torch.as_tensor(logq[index], dtype=torch.float32)
            return batch

        return collate_fn

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        user_idx = batch.pop("user_idx")
        item_idx = batch.pop("item_idx")
        item_pop, item_logq = batch.pop("item_pop", None), batch.pop("item_logq", None)
        emb = embed_batch(model, batch)
        n = user_idx.shape[0]
        users, items = emb[:n], emb[n:]
        if self._weights is None:
            logits = users @ items.T / self.temperature
        else:
            weights = self._weights.to(device=users.device, dtype=users.dtype)
            logits = popularity_logits(users @ items.T, weights[0] / self.temperature, weights[1], item_pop, item_logq)
        return in_batch_loss(logits, user_idx, item_idx)

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
        if self.recipe is None:
            scores = user_emb @ item_emb.T
        else:
            if eval_set.popularity is None:
                raise InvalidInput("this retriever adds an item popularity term: its eval examples need "
                                   "'popularity' (item_id -> interactions before the period)")
            counts = [eval_set.popularity.get(i, 0) for i in item_ids]
            scores = self.scores(user_emb, item_emb, counts)
        result: dict[str, float] = dict(metrics.ranking_metrics(scores, relevant, exclude, k=self.k))
        result["n_items"] = len(item_ids)
        if self.recipe is not None:
            result["sim_weight"] = self.sim_weight
            result["pop_weight"] = self.pop_weight
        return result


def encoder_of(base: nn.Module, who: str) -> nn.Module:
    """The bare encoder of ``base``: a BertModel as is, or the backbone of a BertFor... model (shared,
    not copied); ``who`` names the recipe in the error."""
    from peft import PeftModel

    model = base.get_base_model() if isinstance(base, PeftModel) else base
    if type(model).__name__.endswith(("ForSequenceClassification", "ForMaskedLM", "ForPreTraining")):
        model = model.base_model
    if not hasattr(model, "embeddings") and not hasattr(model, "get_input_embeddings"):
        raise InvalidInput(f"{who} needs a transformer encoder base, got {type(model).__name__}")
    return model


def popularity_logits(sim: torch.Tensor, sim_weight: torch.Tensor, pop_weight: torch.Tensor, item_pop: torch.Tensor,
                      item_logq: torch.Tensor | None) -> torch.Tensor:
    """In-batch logits with the popularity term: ``sim_weight * sim + pop_weight * pop_j - logq_j``
    (column j: the batch's j-th item; ``item_logq`` None or zeros: no logQ correction)."""
    logits = sim_weight * sim + pop_weight * item_pop.to(sim.dtype)[None, :]
    if item_logq is not None:
        logits = logits - item_logq.to(sim.dtype)[None, :]
    return logits


def in_batch_loss(logits: torch.Tensor, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a (users x items) logit matrix whose diagonal holds the positives;
    pairs that are not true negatives (the same user or item elsewhere in the batch) are masked."""
    n = user_idx.shape[0]
    same = (user_idx[:, None] == user_idx[None, :]) | (item_idx[:, None] == item_idx[None, :])
    false_negative = same & ~torch.eye(n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(false_negative, torch.finfo(logits.dtype).min)
    target = torch.arange(n, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


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
