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
from adapters_mgr.lora.examples import Interactions, as_interactions
from adapters_mgr.lora.pretokenise import Pretokenised
from adapters_mgr.lora.tasks.base import Task, register_task

PRIORS = ("none", "bias")


class RankerTask(Task):
    name = "ranker"
    primary_metric = "auc"

    def __init__(self, prior: str = "none") -> None:
        if prior not in PRIORS:
            raise InvalidInput(f"ranker prior {prior!r} is unknown; use one of {', '.join(PRIORS)}")
        self.prior = prior

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
        """A 2-label sequence classifier: the adapters carry their own trained copy of its head."""
        return HeadSpec("seq_cls", 2)

    def task_model(self, base: nn.Module) -> nn.Module:
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
        encoded = Pretokenised(tokenizer, data.user_texts, data.item_texts, max_length)  # once, every epoch reuses

        def collate_fn(index: list[int]) -> dict[str, Any]:
            batch: dict[str, Any] = encoded.batch(index)
            batch["labels"] = torch.as_tensor(data.labels[index], dtype=torch.long)
            if offsets is not None:
                batch["offsets"] = torch.as_tensor(offsets[index], dtype=torch.float32)
            return batch

        return collate_fn

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        if "offsets" not in batch:
            return model(**batch).loss
        inputs = {k: v for k, v in batch.items() if k not in ("offsets", "labels")}
        logit = residual_logits(model(**inputs).logits).float() + batch["offsets"].float()
        return F.binary_cross_entropy_with_logits(logit, batch["labels"].float())

    def evaluate(self, scorer: Any, eval_set: Interactions) -> dict[str, float]:
        offsets = self._offsets(eval_set, "ranker eval examples")
        if offsets is None:  # scorers without an offsets argument (e.g. a benchmark's own) still work
            probs = scorer.score_pairs(eval_set.user_texts, eval_set.item_texts)
        else:
            probs = scorer.score_pairs(eval_set.user_texts, eval_set.item_texts, offsets=offsets)
        labels = eval_set.labels
        return {
            "auc": metrics.auc(labels, probs),
            "gauc": metrics.gauc(eval_set.user_ids, labels, probs),
            "logloss": metrics.log_loss(labels, probs),
            "n_eval": len(eval_set),
        }

    def init_head(self, model: nn.Module, adapter_name: str, seed: int, copy_from: str | None = None) -> None:
        """Fresh adapters get a seeded head (the base's head is random per process, so copying it
        would break reproducibility), or with prior 'bias' a zero head (residual 0: the fresh adapter
        scores exactly the prior); stacked adapters start from the newest parent's head, which
        already reads the representation the parents' deltas produce."""
        from peft.utils.other import ModulesToSaveWrapper

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


register_task("ranker", RankerTask)
