"""Strategy (f) of the incremental benchmark: full fine-tuning of ALL BERT weights (no LoRA).

Same recipe as the ranker adapters: the ranker task's collate and loss on ``[CLS] user [SEP] item
[SEP]``, AdamW, linear decay, gradient clipping at 1.0, seeded shuffling, the same batch size /
epochs / max length; only the learning rate differs (full fine-tuning of BERT needs ~10x less than
LoRA: ``lr`` defaults to 5e-5). With ``prior='bias'`` (as the adapters) the model is a residual on
the rows' ``prior_logit`` with its head started at zero, so it starts at the prior exactly as a
fresh adapter does, and ``head_lr`` lets the head grow as fast as the adapters' head. The model is
a private deep copy of the shared base (the base itself stays frozen and untouched) and is never
registered in the catalog: what it would cost to store per update is the whole model's bytes.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch


class _Scorer:
    """Just enough of ``ScoringModel`` for ``RankerTask.evaluate``: ``score_pairs``."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int, batch_size: int = 128) -> None:
        self.model, self.tokenizer, self.max_length, self.batch_size = model, tokenizer, max_length, batch_size

    def score_pairs(self, user_texts: Any, item_texts: Any, offsets: Any = None) -> np.ndarray:
        from adapters_mgr.lora.tasks.ranker import pair_probabilities

        self.model.eval()
        return pair_probabilities(self.model, self.tokenizer, list(user_texts), list(item_texts),
                                  max_length=self.max_length, batch_size=self.batch_size, device=torch.device("cpu"),
                                  offsets=None if offsets is None else np.asarray(offsets, dtype=np.float64))


def model_bytes(model: torch.nn.Module) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def full_finetune(base: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]],
                  *, epochs: int = 1, lr: float = 5e-5, batch_size: int = 32, max_length: int = 64, seed: int = 0,
                  max_grad_norm: float = 1.0, prior: str = "none", head_lr: float | None = None) -> dict[str, Any]:
    """Train a copy of ``base`` (a 2-label sequence classifier) with every weight trainable; evaluate it.

    Returns metrics (auc, gauc, logloss, n_eval), train_loop_s, samples_per_s, eval_s, bytes, train_rows.
    """
    from transformers import get_scheduler

    from adapters_mgr.lora.tasks import get_task

    task = get_task("ranker", prior=prior)
    data = task.parse_train(rows)
    eval_set = task.parse_eval(eval_rows)
    torch.manual_seed(seed)
    model = copy.deepcopy(task.task_model(base))
    for p in model.parameters():
        p.requires_grad_(True)
    head = getattr(model, "classifier", None)
    if head is not None:  # seeded head, as a fresh adapter's (the base's head is random per process)
        gen = torch.Generator().manual_seed(seed + 7919)
        std = float(getattr(model.config, "initializer_range", 0.02))
        with torch.no_grad():
            if task.residual:  # residual 0: starts at the prior
                head.weight.zero_()
            else:
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
            head.bias.zero_()
    params = [p for p in model.parameters() if p.requires_grad]
    head_params = list(head.parameters()) if head is not None and head_lr is not None else []
    body = [p for p in params if not any(p is h for h in head_params)]
    groups = [{"params": body}, *([{"params": head_params, "lr": head_lr}] if head_params else [])]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    loader = torch.utils.data.DataLoader(list(range(len(data))), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed),
                                         collate_fn=task.collate(data, tokenizer, max_length))
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=epochs * len(loader))
    started = time.perf_counter()
    model.train()
    losses = []
    for _ in range(epochs):
        for batch in loader:
            loss = task.loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    loop_s = time.perf_counter() - started
    started = time.perf_counter()
    metrics = task.evaluate(_Scorer(model, tokenizer, max_length), eval_set)
    eval_s = time.perf_counter() - started
    out = {"metrics": {**metrics, "train_loss": float(np.mean(losses)) if losses else float("nan")},
           "train_loop_s": loop_s, "samples_per_s": len(data) * epochs / loop_s if loop_s > 0 else float("nan"),
           "eval_s": eval_s, "bytes": model_bytes(model), "train_rows": len(data)}
    del model, optimizer
    return out
