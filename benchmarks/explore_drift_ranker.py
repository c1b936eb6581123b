"""Exploration, one seed: which residual ranker shape learns on the drift stream (issue 14).

    python benchmarks/explore_drift_ranker.py cross         # the built-in shape: cross-encoder + head
    python benchmarks/explore_drift_ranker.py cross_pool    # the same with LoRA on the pooler too
    python benchmarks/explore_drift_ranker.py tower         # two mean-pooled LoRA towers: s * cos + b

Every shape is a residual on the as-of prior (the loss sees prior_logit + residual; it starts at the
prior) fitted on periods 0..T-1 of the drift stream and scored on period T beside the prior and the
oracle. Plain peft and torch on purpose: it tries shapes before one becomes a recipe. Prints one
RESULT line (AUC, share of the prior-to-oracle gap, the residual's std); ~2-7 min on 2 CPUs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

CONTENT = {"item": "{title} ({year}). Genres: {genres}.",
           "user": "Liked: {recent_items}. Disliked: {recent_disliked}. Favourite genres: {genre_affinity}."}


def main(argv: list[str] | None = None) -> None:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from adapters_mgr import AdapterManager
    from adapters_mgr.data.drift_stream import generate_drift, true_probabilities
    from adapters_mgr.lora.base_model import HeadSpec
    from adapters_mgr.lora.metrics import auc

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=("cross", "cross_pool", "tower"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--T", type=int, default=4, help="score period T after fitting on 0..T-1")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rows", type=int, default=0, help="subsample the training rows (0: all)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--scalar-lr", type=float, default=0.02, help="the head's (cross) or the scalars' (tower) lr")
    ap.add_argument("--texts", choices=("content", "default"), default="content")
    ap.add_argument("--max-length", type=int, default=96)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(a.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mgr = AdapterManager(Path(tmp) / "mgr")
        mgr.init()
        stream = generate_drift(Path(tmp) / "drift", init_periods=4, periods=5, seed=a.seed)
        stream.register(mgr.data)
        mgr.data.sync(window=stream.truth["window"])
        ids = [b["id"] for b in mgr.data.batches()]
        templates = CONTENT if a.texts == "content" else None

        def rows_of(batch_ids: list[str]) -> list[dict[str, Any]]:
            rows = mgr.data.training_rows(batch_ids, templates=templates)
            for r, v in zip(rows, mgr.data.prior_logits(rows), strict=True):
                r["prior_logit"] = float(v)
            return rows

        train, ev = rows_of(ids[: a.T]), rows_of([ids[a.T]])
        p_like = true_probabilities(stream, ev)
        base_id = mgr.default_base()
        tok = mgr.tokenizer(base_id)
        head = HeadSpec("seq_cls", 2) if a.shape.startswith("cross") else HeadSpec("encoder")
        base = mgr.base_model(base_id, head)
    if a.rows:
        pick = np.random.default_rng(a.seed).choice(len(train), min(a.rows, len(train)), replace=False)
        train = [train[k] for k in sorted(pick)]
    y = torch.tensor([r["label"] for r in train], dtype=torch.float32)
    off = torch.tensor([r["prior_logit"] for r in train])

    def encode(*texts: list[str]) -> dict[str, Any]:
        return dict(tok(*texts, truncation=True, max_length=a.max_length, padding=True, return_tensors="pt"))

    if a.shape.startswith("cross"):
        targets = ["query", "value"] + (["pooler.dense"] if a.shape == "cross_pool" else [])
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                                                task_type="SEQ_CLS"))
        extra = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
        with torch.no_grad():  # the head starts at zero: the residual is 0, the model scores the prior
            for p in extra:
                p.zero_()

        def forward(idx: Any, enc: Any) -> Any:
            logits = model(**{k: v[idx] for k, v in enc.items()}).logits
            return logits[:, 1] - logits[:, 0]

        enc_train = encode([r["user_text"] for r in train], [r["item_text"] for r in train])
        enc_eval = encode([r["user_text"] for r in ev], [r["item_text"] for r in ev])
    else:
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                target_modules=["query", "value"], task_type="FEATURE_EXTRACTION"))
        scalars = torch.nn.Parameter(torch.zeros(2))  # residual = 10 * s * cos + b: starts at 0
        extra = [scalars]

        def pool(enc: dict[str, Any], idx: Any) -> Any:
            hidden = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx]).last_hidden_state
            mask = enc["attention_mask"][idx].unsqueeze(-1).float()
            return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

        def forward(idx: Any, enc: Any) -> Any:
            return scalars[0] * 10 * (pool(enc[0], idx) * pool(enc[1], idx)).sum(-1) + scalars[1]

        enc_train = (encode([r["user_text"] for r in train]), encode([r["item_text"] for r in train]))
        enc_eval = (encode([r["user_text"] for r in ev]), encode([r["item_text"] for r in ev]))
    lora = [p for n, p in model.named_parameters() if p.requires_grad and not any(p is e for e in extra)]
    opt = torch.optim.AdamW([{"params": lora}, {"params": extra, "lr": a.scalar_lr}], lr=a.lr, weight_decay=0.0)
    steps = a.epochs * ((len(train) + 31) // 32)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    gen = torch.Generator().manual_seed(a.seed)
    for epoch in range(a.epochs):
        model.train()
        order, losses = torch.randperm(len(train), generator=gen), []
        for k in range(0, len(train), 32):
            idx = order[k:k + 32]
            loss = F.binary_cross_entropy_with_logits(forward(idx, enc_train) + off[idx], y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora + extra, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        residual = torch.cat([forward(torch.arange(k, min(k + 128, len(ev))), enc_eval)
                              for k in range(0, len(ev), 128)]).numpy()
    labels = np.array([r["label"] for r in ev])
    prior_logit = np.array([r["prior_logit"] for r in ev])
    prior = auc(labels, prior_logit)
    oracle = auc(labels, p_like)
    got = auc(labels, prior_logit + residual)
    print(f"RESULT {a.shape} texts={a.texts} seed={a.seed} T={a.T} epochs={a.epochs} rows={len(train)}: "
          f"prior {prior:.4f} oracle {oracle:.4f} model {got:.4f} share {(got - prior) / (oracle - prior):.1%} "
          f"residual std {residual.std():.3f} ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
