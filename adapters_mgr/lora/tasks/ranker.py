"""The ``ranker`` recipe: a BERT cross-encoder scoring P(like | user text, item text).

Input is the tokenizer text pair ``(user_text, item_text)``, i.e. ``[CLS] user [SEP] item [SEP]``
with segment ids, so attention crosses user and item tokens. The classification head belongs to the
adapter (peft ``modules_to_save``): every adapter carries its own trained head copy, and the base's
head is never trained.

Two ways to score (``RankerTask(prior=...)``):

- ``prior='none'``: P(like) = softmax(logits)[1]; loss: the 2-class cross-entropy that
  ``BertForSequenceClassification`` computes itself (every adapter registered before the prior).
- ``prior='bias'``: the model is a *residual* on top of the as-of prior
  (:mod:`adapters_mgr.data.prior`). With ``residual = logits[1] - logits[0]`` (what plain peft gives
  for the stored folder), P(like) = sigmoid(prior_logit + residual) and the loss is the binary
  cross-entropy of that sum, i.e. the 2-class cross-entropy of ``[logits[0], logits[1] + prior_logit]``.
  A fresh adapter's head starts at zero (weights and bias), so its residual is exactly 0 and it
  scores exactly the prior: training can only move it from there. The offset comes with the rows
  (column ``prior_logit``), never from the model, so the folder stays a standard PEFT folder.

Two model shapes (``RankerTask(shape=...)``, recorded as :mod:`ranker_shape`): the cross-encoder
above (``cross``), or two towers (``tower``): user and item texts encoded apart by the same
LoRA-adapted encoder, mean-pooled and unit-normed as the retriever's, with
``residual = scale * cos + bias`` (``scale`` and ``bias`` learned scalars outside the folder,
starting at 0: a fresh tower scores exactly the prior). The loss is the same binary cross-entropy of
``prior_logit + residual``.

The ``history`` shape is that tower with the user side replaced by the user's history: the user text
is the items they liked and disliked before (:mod:`adapters_mgr.lora.history_text`), the user vector
the mean of those items' tower vectors, liked minus disliked. Training backpropagates through the
candidates' item tower; the history items' vectors come from a no-grad table of every item text in
the training set, re-encoded with the current weights every ``HISTORY_REFRESH_STEPS`` steps (one
forward per item instead of one per history entry: a week of ML-100K rows reaches ~50 items per
row). Scoring encodes each distinct item text once and uses exact vectors. With the trend term
(``RankerShape.trend``), a second profile, the crowd's newest likes minus dislikes read from the same
user text and the same table, adds ``trend_scale * cos(trend, item)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters_mgr.errors import InvalidInput
from adapters_mgr.lora import metrics
from adapters_mgr.lora.base_model import HeadSpec
from adapters_mgr.lora.examples import Interactions, as_interactions
from adapters_mgr.lora.history_text import parse_history
from adapters_mgr.lora.pretokenise import Pretokenised
from adapters_mgr.lora.ranker_shape import RECORD_KEY as SHAPE_KEY
from adapters_mgr.lora.ranker_shape import RankerShape
from adapters_mgr.lora.tasks.base import Task, register_task
from adapters_mgr.lora.tasks.retriever import embed_batch, encode_texts, encoder_of

PRIORS = ("none", "bias")
SCALE_UNIT = 10.0
"""The tower trains ``scale / SCALE_UNIT``: Adam moves a parameter by about its lr per step, and a
useful ``scale`` is ~1..10 while ``bias`` is ~0.1 (explore_drift_ranker: 10 * s with lr 0.02)."""
TOWER_SCALAR_LR = 0.02
HISTORY_SIDES = (("liked", 1.0), ("disliked", -1.0), ("trend_liked", 1.0), ("trend_disliked", -1.0))
"""A history user text's sides (``history_text.History`` fields) and their signs in a profile: the
user's pair, then the trend's."""


def history_sides(trend: bool) -> tuple[tuple[str, float], ...]:
    """The sides a history ranker reads: the user's pair, and the trend's when it has the term."""
    return HISTORY_SIDES if trend else HISTORY_SIDES[:2]

HISTORY_REFRESH_STEPS = 50
"""Steps between re-encodings of the history items' vectors while a history ranker trains (the
exploration that chose the shape used 50; ML-100K's 1,682 items take ~5 s on 2 CPU cores)."""


class RankerTask(Task):
    name = "ranker"
    primary_metric = "auc"

    def __init__(self, prior: str = "none", shape: str | Mapping[str, Any] | RankerShape = "cross",
                 scalar_lr: float = TOWER_SCALAR_LR) -> None:
        if prior not in PRIORS:
            raise InvalidInput(f"ranker prior {prior!r} is unknown; use one of {', '.join(PRIORS)}")
        self.prior = prior
        if isinstance(shape, str):
            shape = RankerShape(shape=shape)
        elif not isinstance(shape, RankerShape):
            shape = RankerShape.from_dict(shape)
        self._shape = shape
        self.scalar_lr = float(scalar_lr)
        self._scalars: nn.Parameter | None = None
        self._history_table: HistoryTable | None = None
        if shape.tower:
            start = [shape.scale / SCALE_UNIT, shape.bias] + ([shape.trend_scale / SCALE_UNIT] if shape.trend else [])
            self._scalars = nn.Parameter(torch.tensor(start, dtype=torch.float64))
            self._start = self._scalars.detach().clone()

    # -- the shape and the tower's scalars ------------------------------------------------------------
    @property
    def tower(self) -> bool:
        """Whether this ranker is two towers (``residual = scale * cos + bias``), not a cross-encoder."""
        return self._shape.tower

    @property
    def shape(self) -> RankerShape:
        """The shape with the tower's current numbers (exactly as given until training moves them:
        evaluation then scores exactly as the scorer does, with no round trip through SCALE_UNIT)."""
        if self._scalars is None or torch.equal(self._scalars.detach(), self._start):
            return self._shape
        value = self._scalars.detach()
        trend = float(value[2]) * SCALE_UNIT if self._shape.trend else 0.0
        return self._shape.learned(float(value[0]) * SCALE_UNIT, float(value[1]), trend)

    def scalars(self) -> list[nn.Parameter]:
        return [self._scalars] if self._scalars is not None else []

    def learned(self) -> dict[str, Any]:
        return {SHAPE_KEY: self.shape.to_dict()}

    @property
    def peft_task_type(self) -> str:
        return "FEATURE_EXTRACTION" if self.tower else super().peft_task_type

    @property
    def residual(self) -> bool:
        """Whether the model scores a residual on top of the rows' ``prior_logit`` (prior 'bias')."""
        return self.prior == "bias"

    def _offsets(self, data: Interactions, what: str) -> np.ndarray | None:
        if not self.residual:
            return None
        if data.offsets is None:
            raise InvalidInput(f"{what} lack the column 'prior_logit': a ranker with prior 'bias' scores the "
                               "as-of prior plus its residual (DataAPI.prior_logits computes the column)")
        return data.offsets

    @property
    def head(self) -> HeadSpec:
        """A 2-label sequence classifier: cross-encoder adapters carry their own trained copy of its
        head; the towers use its encoder only. One base for both shapes: a node of either shape is
        evaluated, gated and merged on the same loaded base."""
        return HeadSpec("seq_cls", 2)

    def task_model(self, base: nn.Module) -> nn.Module:
        if self.tower:
            return encoder_of(base, "the two-tower ranker")
        from peft import PeftModel

        model = base.get_base_model() if isinstance(base, PeftModel) else base
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if not type(model).__name__.endswith("ForSequenceClassification") or num_labels != 2:
            raise InvalidInput(
                f"the ranker needs a sequence-classification base with 2 labels, got {type(model).__name__}"
                f" (num_labels={num_labels}); load it with AutoModelForSequenceClassification(num_labels=2)"
            )
        return model

    def parse_train(self, examples: Any) -> Interactions:
        return as_interactions(examples, need_labels=True, what="ranker training examples")

    def parse_eval(self, examples: Any) -> Interactions:
        return as_interactions(examples, need_labels=True, what="ranker eval examples")

    def collate(self, data: Interactions, tokenizer: Any, max_length: int) -> Callable[[list[int]], dict[str, Any]]:
        offsets = self._offsets(data, "ranker training examples")
        n = len(data)
        if self._shape.history:
            table = self._history_table = HistoryTable(data, tokenizer, max_length, trend=self._shape.trend)

            def history_fn(index: list[int]) -> dict[str, Any]:
                batch = table.batch(index)
                batch["labels"] = torch.as_tensor(data.labels[index], dtype=torch.long)
                if offsets is not None:
                    batch["offsets"] = torch.as_tensor(offsets[index], dtype=torch.float32)
                return batch

            return history_fn
        if self.tower:  # users then items, each alone; row i's item is row n + i
            encoded = Pretokenised(tokenizer, [*data.user_texts, *data.item_texts], None, max_length)
        else:
            encoded = Pretokenised(tokenizer, data.user_texts, data.item_texts, max_length)  # once, every epoch reuses

        def collate_fn(index: list[int]) -> dict[str, Any]:
            # towers: one forward over users + items (keeps DDP happy: each parameter used once per step)
            batch: dict[str, Any] = encoded.batch([*index, *(n + i for i in index)] if self.tower else index)
            batch["labels"] = torch.as_tensor(data.labels[index], dtype=torch.long)
            if offsets is not None:
                batch["offsets"] = torch.as_tensor(offsets[index], dtype=torch.float32)
            return batch

        return collate_fn

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        if "offsets" not in batch and not self.tower:
            return model(**batch).loss
        inputs = {k: v for k, v in batch.items() if k not in ("offsets", "labels")}
        if self._shape.history:
            cos, trend = self._history_table.cosines(model, batch)
            weights = self._scalars.to(device=cos.device, dtype=cos.dtype)
            logit = SCALE_UNIT * weights[0] * cos + weights[1]
            if trend is not None:
                logit = logit + SCALE_UNIT * weights[2] * trend
        elif self.tower:
            emb = embed_batch(model, inputs)
            n = batch["labels"].shape[0]
            cos = (emb[:n] * emb[n:]).sum(dim=-1)
            weights = self._scalars.to(device=cos.device, dtype=cos.dtype)
            logit = SCALE_UNIT * weights[0] * cos + weights[1]
        else:
            logit = residual_logits(model(**inputs).logits).float()
        if "offsets" in batch:
            logit = logit + batch["offsets"].to(logit.dtype)
        return F.binary_cross_entropy_with_logits(logit, batch["labels"].to(logit.dtype))

    def pass_scores(self, model: nn.Module, tokenizer: Any, user_texts: Sequence[str], item_texts: Sequence[str], *,
                    max_length: int, batch_size: int, device: torch.device, offsets: np.ndarray | None = None,
                    shape: RankerShape | None = None) -> np.ndarray:
        """P(like) per pair under the currently active adapter(s) (one forward configuration), float64.
        ``shape``: the tower's numbers to score with (default: this task's; a served node passes its own)."""
        if not self.tower:
            return pair_probabilities(model, tokenizer, list(user_texts), list(item_texts), max_length=max_length,
                                      batch_size=batch_size, device=device, offsets=offsets)
        shape = shape or self.shape
        kw = {"max_length": max_length, "batch_size": batch_size, "device": device}
        if shape.history:
            cos, trend = history_cosines(model, tokenizer, user_texts, item_texts, trend=shape.trend, **kw)
            return tower_probabilities(cos, shape, offsets, trend)
        return tower_probabilities(pair_cosines(model, tokenizer, user_texts, item_texts, **kw), shape, offsets)

    def evaluate(self, scorer: Any, eval_set: Interactions) -> dict[str, float]:
        offsets = self._offsets(eval_set, "ranker eval examples")
        if offsets is None:  # scorers without an offsets argument (e.g. a benchmark's own) still work
            probs = scorer.score_pairs(eval_set.user_texts, eval_set.item_texts)
        else:
            probs = scorer.score_pairs(eval_set.user_texts, eval_set.item_texts, offsets=offsets)
        labels = eval_set.labels
        scored = {
            "auc": metrics.auc(labels, probs),
            "gauc": metrics.gauc(eval_set.user_ids, labels, probs),
            "logloss": metrics.log_loss(labels, probs),
            "n_eval": len(eval_set),
        }
        if offsets is not None:  # the prior alone on the same rows: what the residual must beat to be worth serving
            scored.update(prior_figures(eval_set.user_ids, labels, offsets))
        return scored

    def init_head(self, model: nn.Module, adapter_name: str, seed: int, copy_from: str | None = None) -> None:
        """Fresh adapters get a seeded head (the base's head is random per process, so copying it
        would break reproducibility), or with prior 'bias' a zero head (residual 0: the fresh adapter
        scores exactly the prior); stacked adapters start from the newest parent's head, which
        already reads the representation the parents' deltas produce."""
        from peft.utils.other import ModulesToSaveWrapper

        if self.tower:  # no head: the fresh tower's scale and bias start as the task was given them
            return
        generator = torch.Generator().manual_seed(seed + 7919)
        std = float(getattr(model.config, "initializer_range", 0.02))
        for module in model.modules():
            if not isinstance(module, ModulesToSaveWrapper) or adapter_name not in module.modules_to_save:
                continue
            head = module.modules_to_save[adapter_name]
            with torch.no_grad():
                if copy_from is not None and copy_from in module.modules_to_save:
                    head.load_state_dict(module.modules_to_save[copy_from].state_dict())
                    continue
                for sub in head.modules():
                    if isinstance(sub, nn.Linear):
                        if self.residual:
                            sub.weight.zero_()
                        else:
                            sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) * std)
                        if sub.bias is not None:
                            sub.bias.zero_()


class HistoryTable:
    """A history ranker's training set as item texts: every distinct item text (candidates and
    history entries) pretokenised once, each row's history as indices into them, and the no-grad
    table of their vectors that the users' profiles (and with ``trend`` the trend profiles) are
    averaged from."""

    def __init__(self, data: Interactions, tokenizer: Any, max_length: int, trend: bool = False) -> None:
        vocab: dict[str, int] = {}
        self.sides = history_sides(trend)
        self.lists: dict[str, list[np.ndarray]] = {name: [] for name, _ in self.sides}
        for text in data.user_texts:
            parsed = parse_history(text)._asdict()
            for name, _ in self.sides:
                self.lists[name].append(np.array([vocab.setdefault(t, len(vocab)) for t in parsed[name]],
                                                 dtype=np.int64))
        self.items = np.array([vocab.setdefault(t, len(vocab)) for t in data.item_texts], dtype=np.int64)
        self.encoded = Pretokenised(tokenizer, list(vocab), None, max_length)
        self.vectors: torch.Tensor | None = None
        self.since_refresh = 0

    def batch(self, index: list[int]) -> dict[str, Any]:
        """The distinct candidates' tokens (with where each row's candidate is among them) and the
        rows' history entries as (row in batch, item, weight 1/count) triples, per side."""
        unique, inverse = np.unique(self.items[index], return_inverse=True)
        batch: dict[str, Any] = self.encoded.batch(unique.tolist())
        batch["candidates"] = torch.as_tensor(inverse.reshape(-1), dtype=torch.long)
        for name, _ in self.sides:
            parts = [self.lists[name][i] for i in index]
            batch[f"{name}_row"] = torch.as_tensor(np.repeat(np.arange(len(index)), [len(p) for p in parts]),
                                                   dtype=torch.long)
            batch[f"{name}_item"] = torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0, np.int64),
                                                    dtype=torch.long)
            batch[f"{name}_weight"] = torch.as_tensor(
                np.concatenate([np.full(len(p), 1.0 / len(p)) for p in parts if len(p)] or [np.zeros(0)]),
                dtype=torch.float32)
        return batch

    def cosines(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """cos(profile, candidate) and (with the trend) cos(trend profile, candidate) per row:
        gradients through the candidates' encodings."""
        if self.vectors is None or self.since_refresh >= HISTORY_REFRESH_STEPS:
            self.vectors = self._encode_all(model, batch["candidates"].device)
            self.since_refresh = 0
        self.since_refresh += 1
        tokens = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        candidates = embed_batch(model, tokens)[batch["candidates"]]
        n = batch["candidates"].shape[0]
        profiles = torch.zeros(len(self.sides) // 2, n, self.vectors.shape[1], device=candidates.device,
                               dtype=self.vectors.dtype)
        for k, (name, sign) in enumerate(self.sides):
            entries = self.vectors[batch[f"{name}_item"]] * (sign * batch[f"{name}_weight"])[:, None]
            profiles[k // 2].index_add_(0, batch[f"{name}_row"], entries)
        cos = (F.normalize(profiles, dim=-1).to(candidates.dtype) * candidates).sum(dim=-1)
        return cos[0], (cos[1] if len(cos) > 1 else None)

    @torch.no_grad()
    def _encode_all(self, model: nn.Module, device: torch.device, batch_size: int = 128) -> torch.Tensor:
        """Every item text's vector under the current weights, without dropout (each module's
        train/eval flag restored after: the trainer keeps frozen members' dropout off)."""
        flags = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            parts = []
            for start in range(0, len(self.encoded), batch_size):
                tokens = self.encoded.batch(list(range(start, min(start + batch_size, len(self.encoded)))))
                parts.append(embed_batch(model, {k: v.to(device) for k, v in tokens.items()}).detach())
            return torch.cat(parts)
        finally:
            for module, flag in flags:
                module.training = flag


def prior_figures(user_ids: Sequence[object], labels: np.ndarray, offsets: np.ndarray) -> dict[str, float]:
    """AUC, GAUC and log loss of the as-of prior alone (``sigmoid(prior_logit)``) on the eval rows.

    Why beside the ranker's own figures: a residual ranker's AUC is mostly the prior's (0.78 on
    ML-100K where the prior alone is 0.777), so only the difference says whether the adapter learned
    anything worth serving; a run that collapsed to the prior looks fine by its AUC alone."""
    probs = 1.0 / (1.0 + np.exp(-np.asarray(offsets, dtype=np.float64)))
    return {"prior_auc": metrics.auc(labels, probs), "prior_gauc": metrics.gauc(user_ids, labels, probs),
            "prior_logloss": metrics.log_loss(labels, probs)}


def tokenize_pairs(tokenizer: Any, user_texts: list[str], item_texts: list[str], max_length: int) -> dict[str, Any]:
    """Text pairs, dynamically padded; truncation trims the longer side first."""
    return dict(
        tokenizer(user_texts, item_texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    )


def residual_logits(logits: torch.Tensor) -> torch.Tensor:
    """The model's logit of "like" against "not": ``logits[:, 1] - logits[:, 0]`` (the part a ranker
    with the prior adds to the prior's logit)."""
    return logits[:, 1] - logits[:, 0]


@torch.no_grad()
def pair_probabilities(
    model: nn.Module, tokenizer: Any, user_texts: list[str], item_texts: list[str], *, max_length: int,
    batch_size: int, device: torch.device, offsets: np.ndarray | None = None,
) -> np.ndarray:
    """P(like) under the currently active adapter(s), float64: softmax(logits)[:, 1], or with
    ``offsets`` (the prior's logits) sigmoid(offset + residual), the sum taken in float64."""
    out = np.empty(len(user_texts), dtype=np.float64)
    if offsets is not None and len(offsets) != len(user_texts):
        raise InvalidInput(f"{len(offsets)} prior logits for {len(user_texts)} pairs")
    for start in range(0, len(user_texts), batch_size):
        stop = start + batch_size
        batch = tokenize_pairs(tokenizer, list(user_texts[start:stop]), list(item_texts[start:stop]), max_length)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        if offsets is None:
            out[start:stop] = torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy()
        else:
            z = residual_logits(logits).double().cpu() + torch.as_tensor(offsets[start:stop], dtype=torch.float64)
            out[start:stop] = torch.sigmoid(z).numpy()
    return out


@torch.no_grad()
def pair_cosines(model: nn.Module, tokenizer: Any, user_texts: Sequence[str], item_texts: Sequence[str], *,
                 max_length: int, batch_size: int, device: torch.device) -> np.ndarray:
    """The towers' cosine per pair, float64. Each distinct text is encoded once: a user's candidates
    (a rerank, a user's eval rows) share one user encoding."""
    if len(user_texts) != len(item_texts):
        raise InvalidInput(f"{len(user_texts)} user texts but {len(item_texts)} item texts")
    if not len(user_texts):
        return np.zeros(0, dtype=np.float64)
    users, user_idx = np.unique(np.asarray(list(user_texts), dtype=object), return_inverse=True)
    items, item_idx = np.unique(np.asarray(list(item_texts), dtype=object), return_inverse=True)
    kw = {"max_length": max_length, "batch_size": batch_size, "device": device}
    u = encode_texts(model, tokenizer, [str(t) for t in users], **kw).astype(np.float64)
    i = encode_texts(model, tokenizer, [str(t) for t in items], **kw).astype(np.float64)
    return np.einsum("nd,nd->n", u[user_idx.reshape(-1)], i[item_idx.reshape(-1)])


@torch.no_grad()
def history_cosines(model: nn.Module, tokenizer: Any, user_texts: Sequence[str], item_texts: Sequence[str], *,
                    max_length: int, batch_size: int, device: torch.device, trend: bool = False
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """A history ranker's cosines per pair, float64: cos(unit(mean liked - mean disliked item
    vector), item vector) and, with ``trend``, the same for the trend's liked and disliked (else
    None); every distinct item text encoded once; an empty profile: 0."""
    if len(user_texts) != len(item_texts):
        raise InvalidInput(f"{len(user_texts)} user texts but {len(item_texts)} item texts")
    if not len(user_texts):
        return np.zeros(0, dtype=np.float64), (np.zeros(0, dtype=np.float64) if trend else None)
    users, user_idx = np.unique(np.asarray(list(user_texts), dtype=object), return_inverse=True)
    names = [name for name, _ in history_sides(trend)]
    vocab: dict[str, int] = {}
    sides = [[[vocab.setdefault(t, len(vocab)) for t in parsed[name]] for name in names]
             for parsed in (parse_history(str(u))._asdict() for u in users)]
    items = [vocab.setdefault(str(t), len(vocab)) for t in item_texts]
    vectors = encode_texts(model, tokenizer, list(vocab), max_length=max_length, batch_size=batch_size,
                           device=device).astype(np.float64)
    cosines = []
    for pair in range(len(names) // 2):
        profiles = np.zeros((len(users), vectors.shape[1]))
        for k, lists in enumerate(sides):
            liked, disliked = lists[2 * pair], lists[2 * pair + 1]
            if liked:
                profiles[k] += vectors[liked].mean(axis=0)
            if disliked:
                profiles[k] -= vectors[disliked].mean(axis=0)
        norms = np.linalg.norm(profiles, axis=1, keepdims=True)
        profiles = np.divide(profiles, norms, out=np.zeros_like(profiles), where=norms > 0)
        cosines.append(np.einsum("nd,nd->n", profiles[user_idx.reshape(-1)], vectors[np.asarray(items)]))
    return cosines[0], (cosines[1] if trend else None)


def tower_probabilities(cos: np.ndarray, shape: RankerShape, offsets: np.ndarray | None = None,
                        trend_cos: np.ndarray | None = None) -> np.ndarray:
    """sigmoid(offset + scale * cos + bias [+ trend_scale * trend_cos]), float64: the documented way
    to score a tower folder loaded with plain peft (``offset``: the pairs' prior logits; none for a
    ranker without the prior; ``trend_cos``: a history ranker with the trend term)."""
    z = shape.scale * np.asarray(cos, dtype=np.float64) + shape.bias
    if shape.trend:
        if trend_cos is None:
            raise InvalidInput("this history ranker has a trend term: pass the trend cosines")
        z = z + shape.trend_scale * np.asarray(trend_cos, dtype=np.float64)
    if offsets is not None:
        if len(offsets) != len(z):
            raise InvalidInput(f"{len(offsets)} prior logits for {len(z)} pairs")
        z = z + np.asarray(offsets, dtype=np.float64)
    return torch.sigmoid(torch.as_tensor(z, dtype=torch.float64)).numpy()


register_task("ranker", RankerTask)
