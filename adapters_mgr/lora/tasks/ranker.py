"""The ``ranker`` recipe: a BERT cross-encoder scoring P(like | user text, item text).

Input is the tokenizer text pair ``(user_text, item_text)``, i.e. ``[CLS] user [SEP] item [SEP]``
with segment ids, so attention crosses user and item tokens; loss is the 2-class cross-entropy that
``BertForSequenceClassification`` computes itself. The classification head belongs to the adapter
(peft ``modules_to_save``): every adapter carries its own trained head copy, and the base's head is
never trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from adapters_mgr.errors import InvalidInput
from adapters_mgr.lora import metrics
from adapters_mgr.lora.base_model import HeadSpec
from adapters_mgr.lora.examples import Interactions, as_interactions
from adapters_mgr.lora.tasks.base import Task, register_task


class RankerTask(Task):
    name = "ranker"
    primary_metric = "auc"

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
        def collate_fn(index: list[int]) -> dict[str, Any]:
            batch = tokenize_pairs(
                tokenizer, [data.user_texts[i] for i in index], [data.item_texts[i] for i in index], max_length
            )
            batch["labels"] = torch.as_tensor(data.labels[index], dtype=torch.long)
            return batch

        return collate_fn

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return model(**batch).loss

    def evaluate(self, scorer: Any, eval_set: Interactions) -> dict[str, float]:
        probs = scorer.score_pairs(eval_set.user_texts, eval_set.item_texts)
        labels = eval_set.labels
        return {
            "auc": metrics.auc(labels, probs),
            "gauc": metrics.gauc(eval_set.user_ids, labels, probs),
            "logloss": metrics.log_loss(labels, probs),
            "n_eval": len(eval_set),
        }

    def init_head(self, model: nn.Module, adapter_name: str, seed: int, copy_from: str | None = None) -> None:
        """Fresh adapters get a seeded head (the base's head is random per process, so copying it
        would break reproducibility); stacked adapters start from the newest parent's head, which
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
                        sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) * std)
                        if sub.bias is not None:
                            sub.bias.zero_()


def tokenize_pairs(tokenizer: Any, user_texts: list[str], item_texts: list[str], max_length: int) -> dict[str, Any]:
    """Text pairs, dynamically padded; truncation trims the longer side first."""
    return dict(
        tokenizer(user_texts, item_texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    )


@torch.no_grad()
def pair_probabilities(
    model: nn.Module, tokenizer: Any, user_texts: list[str], item_texts: list[str], *, max_length: int,
    batch_size: int, device: torch.device,
) -> np.ndarray:
    """P(like) = softmax(logits)[:, 1] under the currently active adapter(s), float64."""
    out = np.empty(len(user_texts), dtype=np.float64)
    for start in range(0, len(user_texts), batch_size):
        stop = start + batch_size
        batch = tokenize_pairs(tokenizer, list(user_texts[start:stop]), list(item_texts[start:stop]), max_length)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        out[start:stop] = torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy()
    return out


register_task("ranker", RankerTask)
