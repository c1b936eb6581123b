"""Score with one adapter or a weighted combination of adapters on one shared base.

Two combination modes (the stack node's ``mode`` in the catalog):

- ``weights``: task arithmetic. All adapters are active at once and each LoRA delta is scaled by its
  weight, so ``W = W0 + sum_i w_i * (alpha_i / r_i) * B_i A_i`` in ONE forward pass. Weights are used
  as given (not normalised). Ranker head: the **last (newest) adapter's head** is used, because under
  ``stack`` that head was trained on top of the parents' summed deltas; the parents' heads are unused.
  A ``cat`` merge of the same adapters must therefore also take the newest source's head to equal
  this mode (and any lossy merge keeps that head too).
- ``ensemble``: each adapter runs alone (weight 1, with its **own head**) and the outputs are averaged
  with weights normalised to sum to 1. Ranker: the weighted mean of P(like). Retriever: the weighted
  mean of per-adapter cosine similarities, realised by concatenating ``sqrt(w_i) * e_i`` per adapter
  so that a dot product of ``encode_users`` and ``encode_items`` outputs is exactly that mean and
  full-catalog ranking is still one matrix product (weights must then be >= 0).

The as-of prior (ranker adapters trained with ``prior='bias'``) is not part of any folder: the
caller passes its logits as ``offsets`` and every forward pass adds them to its residual logit
before the sigmoid, so a weights-mode stack or a merge adds the prior once (one residual: the summed
deltas read by the newest head) and an ensemble averages members that each added it once.
A two-tower ranker (``RankerTask(shape='tower')``) scores each pass as
``sigmoid(offset + scale * cos + bias)`` with the task's ``scale`` and ``bias`` (a node's: its
newest member's), so the same holds for it.

Retriever scores are always the dot product of ``encode_users`` and ``encode_items`` outputs (the
cosine similarity in ``weights`` mode). ``ScoringModel`` attaches adapters to the base in place;
call ``release()`` to get the bare base back. Serving (hot swap, folding) builds on this contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from adapters_mgr.errors import InvalidInput
from adapters_mgr.lora import adapters as peft_wiring
from adapters_mgr.lora.adapters import AdapterSource
from adapters_mgr.lora.tasks import Task, get_task
from adapters_mgr.lora.tasks.retriever import encode_texts

MODES = ("weights", "ensemble")


def check_combination(weights: Sequence[float], mode: str) -> None:
    """Validate a combination before any model work."""
    if mode not in MODES:
        raise InvalidInput(f"unknown combination mode {mode!r}; choose one of {list(MODES)}")
    if not weights:
        raise InvalidInput("need at least one adapter to score with")
    if any(not np.isfinite(w) for w in weights):
        raise InvalidInput(f"adapter weights must be finite, got {list(weights)}")
    if mode == "ensemble" and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise InvalidInput(f"ensemble weights must be >= 0 with a positive sum, got {list(weights)}")


class ScoringModel:
    """A base plus adapters combined in ``weights`` or ``ensemble`` mode, in eval mode.

    Example:
        >>> scorer = ScoringModel(base, tokenizer, "ranker", [("adapters/a1", 0.5), ("adapters/a2", 1.0)])
        >>> scorer.score_pairs(["user: likes jazz"], ["item: a jazz record"])   # doctest: +SKIP
    """

    def __init__(
        self,
        base: nn.Module,
        tokenizer: Any,
        task: str | Task,
        adapters: Sequence[tuple[AdapterSource, float]],
        mode: str = "weights",
        *,
        max_length: int = 64,
        batch_size: int = 128,
    ) -> None:
        self.task = get_task(task)
        weights = [float(w) for _, w in adapters]
        check_combination(weights, mode)
        task_model = self.task.task_model(base)
        if peft_wiring.has_injected_adapters(task_model):
            raise InvalidInput("the base already has adapters attached; release() the previous model first")
        model: Any = task_model
        names = []
        try:
            for i, (source, _) in enumerate(adapters):
                name = f"a{i}"
                model = peft_wiring.attach(model, source, name, trainable=False)
                names.append(name)
        except BaseException:
            if model is not task_model:
                peft_wiring.release(model)  # a half-built scorer must not leave layers on the shared base
            raise
        self._init(model, tokenizer, names, weights, mode, max_length, batch_size, owned=True)
        peft_wiring.activate(model, names, weights if mode == "weights" else None)
        model.eval()

    @classmethod
    def from_peft(
        cls,
        model: nn.Module,
        tokenizer: Any,
        task: str | Task,
        names: Sequence[str],
        weights: Sequence[float],
        mode: str = "weights",
        *,
        max_length: int = 64,
        batch_size: int = 128,
    ) -> ScoringModel:
        """Wrap adapters already attached to a PeftModel (e.g. right after training) without loading."""
        weights = [float(w) for w in weights]
        check_combination(weights, mode)
        self = cls.__new__(cls)
        self.task = get_task(task)
        self._init(model, tokenizer, list(names), weights, mode, max_length, batch_size, owned=False)
        return self

    def _init(self, model: Any, tokenizer: Any, names: list[str], weights: list[float], mode: str,
              max_length: int, batch_size: int, owned: bool) -> None:
        if len(names) != len(weights):
            raise InvalidInput(f"need one weight per adapter, got {len(weights)} for {len(names)}")
        self.model = model
        self.tokenizer = tokenizer
        self.names = names
        self.weights = weights
        self.mode = mode
        self.max_length = max_length
        self.batch_size = batch_size
        self._owned = owned
        self.device = next(model.parameters()).device

    # -- activation -----------------------------------------------------------------------------
    def _passes(self) -> list[tuple[float, list[str], list[float]]]:
        """(output weight, active names, delta weights) for each forward pass the mode needs."""
        if self.mode == "weights":
            return [(1.0, self.names, self.weights)]
        total = sum(self.weights)
        return [(w / total, [n], [1.0]) for n, w in zip(self.names, self.weights, strict=True) if w > 0]

    def _run(self, fn: Any) -> list[tuple[float, Any]]:
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = []
            for out_w, names, delta_w in self._passes():
                peft_wiring.activate(self.model, names, delta_w)
                outputs.append((out_w, fn()))
            return outputs
        finally:
            if len(self.names) > 1 or self.mode == "ensemble":
                peft_wiring.activate(self.model, self.names, self.weights if self.mode == "weights" else None)
            if was_training:
                self.model.train()

    # -- ranker -----------------------------------------------------------------------------------
    def score_pairs(self, user_texts: Sequence[str], item_texts: Sequence[str], *,
                    offsets: np.ndarray | None = None) -> np.ndarray:
        """Ranker: P(like) per pair. Retriever: similarity (dot of the encodings) per pair.

        ``offsets``: the as-of prior's logit per pair, for a ranker trained with the prior: each
        forward pass scores sigmoid(offset + its residual), so the prior is added ONCE per output
        (weights mode: one pass; ensemble: each member's P(like), then the weighted mean)."""
        if len(user_texts) != len(item_texts):
            raise InvalidInput(f"{len(user_texts)} user texts but {len(item_texts)} item texts")
        if self.task.name == "retriever":
            if offsets is not None:
                raise InvalidInput("prior offsets apply to the ranker only")
            return np.sum(self.encode_users(user_texts) * self.encode_items(item_texts), axis=1).astype(np.float64)
        outputs = self._run(lambda: self.task.pass_scores(
            self.model, self.tokenizer, list(user_texts), list(item_texts),
            max_length=self.max_length, batch_size=self.batch_size, device=self.device, offsets=offsets,
        ))
        return sum(w * out for w, out in outputs)

    # -- retriever --------------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.task.name != "retriever":
            raise InvalidInput(f"encode_* needs a retriever, this scorer is a {self.task.name}")
        outputs = self._run(lambda: encode_texts(
            self.model, self.tokenizer, list(texts),
            max_length=self.max_length, batch_size=self.batch_size, device=self.device,
        ))
        if self.mode == "weights":
            return outputs[0][1]
        return np.concatenate([np.sqrt(w) * emb for w, emb in outputs], axis=1).astype(np.float32)

    def encode_users(self, texts: Sequence[str]) -> np.ndarray:
        """User-tower embeddings; rank items by ``encode_users(u) @ encode_items(i).T``."""
        return self._encode(texts)

    def encode_items(self, texts: Sequence[str]) -> np.ndarray:
        """Item-tower embeddings (the same adapted encoder as the user tower)."""
        return self._encode(texts)

    def evaluate(self, eval_examples: Any) -> dict[str, float]:
        """The task's metrics on held-out examples (ranker rows; retriever rows + catalog + seen)."""
        return self.task.evaluate(self, self.task.parse_eval(eval_examples))

    @torch.no_grad()
    def release(self) -> nn.Module:
        """Detach every adapter and return the bare task model (only for scorers that loaded them)."""
        if not self._owned:
            raise InvalidInput("this scorer wraps a model it did not build; release that model instead")
        return peft_wiring.release(self.model)


def evaluate_adapters(
    base: nn.Module,
    tokenizer: Any,
    task: str | Task,
    adapters: Sequence[tuple[AdapterSource, float]],
    eval_examples: Any,
    mode: str = "weights",
    *,
    max_length: int = 64,
    batch_size: int = 128,
) -> dict[str, float]:
    """Load, evaluate, detach: metrics of an adapter or a stack node; the base is left bare again."""
    task_obj = get_task(task)
    parsed = task_obj.parse_eval(eval_examples)  # fail before loading anything
    scorer = ScoringModel(base, tokenizer, task_obj, adapters, mode, max_length=max_length, batch_size=batch_size)
    try:
        return task_obj.evaluate(scorer, parsed)
    finally:
        scorer.release()


__all__ = ["MODES", "ScoringModel", "check_combination", "evaluate_adapters"]
