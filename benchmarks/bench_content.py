"""What the residual ranker should read: statistics in its texts, or content (liked and disliked
titles), and LoRA on every layer or the top two only -- measured on top of the as-of prior.

    python benchmarks/bench_content.py            # MiniLM + ML-100K, 3 seeds (~15 min on 2 CPUs)
    python benchmarks/bench_content.py --quick    # tiny random BERT + synthetic stream (CI; figures meaningless)

Why: with the prior carrying the like rates, the statistics in the texts (counts, mean ratings)
repeat what the model already adds; content -- what the user liked and disliked, what the item
is -- is what could move a cold item or user (issue 14, part 2). Every variant trains a fresh
residual ranker (prior 'bias', head at zero: it starts at the prior) on the same rows of weeks
0-19 with the same seed, and is scored on the same rows of week 20, whole and in the cold slices
(fewer than 10 earlier ratings of the item / of the user). Verdicts are paired differences per
seed with a 95% t-interval. Writes benchmarks/results/bench_content{_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from adapters_mgr.data.texts import DEFAULT_TEMPLATES  # noqa: E402
from adapters_mgr.lora import metrics  # noqa: E402
from adapters_mgr.lora.base_model import HeadSpec  # noqa: E402
from adapters_mgr.lora.examples import OFFSET_COLUMN  # noqa: E402
from adapters_mgr.lora.settings import LoraSettings  # noqa: E402
from adapters_mgr.lora.tasks import get_task  # noqa: E402
from adapters_mgr.lora.trainer import train_adapter  # noqa: E402
from benchmarks._common import machine, md_table, write_results  # noqa: E402
from benchmarks._stats import describe, fmt_paired, paired  # noqa: E402
from benchmarks.bench_incremental import week20_setup  # noqa: E402

CONTENT = {
    "item": "{title} ({year}). Genres: {genres}.",
    "user": "User {user_id}: age {age}, gender {gender}, occupation {occupation}. Liked: {recent_items}. "
            "Disliked: {recent_disliked}. Favourite genres: {genre_affinity}.",
}
VARIANTS: dict[str, tuple[dict[str, str], int | None]] = {
    "stats texts, all layers": (DEFAULT_TEMPLATES, None),
    "content texts, all layers": (CONTENT, None),
    "content texts, top 2 layers": (CONTENT, 2),
}
COLD = 10  # fewer earlier ratings than this: a cold item / user


def slices(features: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    item_n = np.array([f["item_n"] for f in features])
    user_n = np.array([f["user_n"] for f in features])
    return {"all": np.ones(len(features), bool), "cold items": item_n < COLD, "cold users": user_n < COLD}


def scores(labels: np.ndarray, probs: np.ndarray, users: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    out = {f"auc {name}": metrics.auc(labels[m], probs[m]) for name, m in masks.items()
           if m.sum() > 1 and len(set(labels[m].tolist())) == 2}
    out["gauc"] = metrics.gauc(users, labels, probs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random BERT + synthetic stream (CI)")
    ap.add_argument("--rows", type=int, default=3000, help="training rows drawn from weeks 0-19")
    ap.add_argument("--eval-rows", type=int, default=1200, help="rows of week 20")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    if args.quick:
        args.rows, args.eval_rows, args.seeds = 200, 200, "0,1"
    import torch

    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    per_seed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        mgr, base_id, model_name, data_name, train_ids, eval_id = week20_setup(args.quick, Path(tmp))
        tokenizer = mgr.tokenizer(base_id)
        base = mgr.base_model(base_id, HeadSpec("seq_cls", 2))
        layers = base.config.num_hidden_layers
        task = get_task("ranker", prior="bias")
        # the same rows for every variant: sampled by key, rendered per template
        keys_all = [(r["user_id"], r["item_id"], r["ts"]) for r in mgr.data.training_rows(train_ids, with_text=False)]
        eval_feats = mgr.data.prior_features([eval_id])
        eval_pick = sorted(random.Random(99).sample(range(len(eval_feats)), min(args.eval_rows, len(eval_feats))))
        eval_feats = [eval_feats[i] for i in eval_pick]
        eval_keys = {(f["user_id"], f["item_id"], f["ts"]): i for i, f in enumerate(eval_feats)}
        labels = np.array([int(f["label"]) for f in eval_feats])
        users = np.array([str(f["user_id"]) for f in eval_feats])
        prior_logit = np.array([f["prior_logit"] for f in eval_feats])
        masks = slices(eval_feats)
        prior_scores = scores(labels, 1 / (1 + np.exp(-prior_logit)), users, masks)
        for seed in seeds:
            per_seed.append({"variant": "as-of prior alone", "seed": seed, **prior_scores, "seconds": 0.0})
        rendered: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
        for templates, _ in VARIANTS.values():
            key = templates["user"] + templates["item"]
            if key not in rendered:
                train_all = mgr.data.training_rows(train_ids, templates=templates)
                ev = [None] * len(eval_feats)
                for r in mgr.data.training_rows([eval_id], templates=templates):
                    i = eval_keys.get((r["user_id"], r["item_id"], r["ts"]))
                    if i is not None:
                        ev[i] = {**r, OFFSET_COLUMN: float(prior_logit[i])}
                assert all(e is not None for e in ev), "eval rows must match the prior features"
                rendered[key] = (train_all, ev)
        for seed in seeds:
            pick = sorted(random.Random(seed).sample(range(len(keys_all)), min(args.rows, len(keys_all))))
            for name, (templates, top) in VARIANTS.items():
                train_all, ev = rendered[templates["user"] + templates["item"]]
                rows = [train_all[i] for i in pick]
                logits = mgr.data.prior_logits(rows)
                rows = [{**r, OFFSET_COLUMN: float(v)} for r, v in zip(rows, logits, strict=True)]
                t0 = time.perf_counter()
                result = train_adapter(base, tokenizer, task, rows, settings=LoraSettings(
                    r=8, layers=LoraSettings.top(top, layers)), lr=args.lr, epochs=args.epochs, batch_size=32,
                    max_length=args.max_length, seed=seed, progress=False)
                train_s = time.perf_counter() - t0
                probs = result.scorer().score_pairs([e["user_text"] for e in ev], [e["item_text"] for e in ev],
                                                    offsets=prior_logit)
                result.release()
                clipped = np.clip(probs, 1e-12, 1 - 1e-12)
                residual = np.log(clipped / (1 - clipped)) - prior_logit  # what the model adds to the prior
                per_seed.append({"variant": name, "seed": seed, **scores(labels, probs, users, masks),
                                 "residual_std": float(f"{residual.std():.3g}"),
                                 "seconds": round(train_s, 1), "samples_per_s": round(result.samples_per_s, 1)})
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in per_seed[-1].items()}, flush=True)
    metric_names = [k for k in per_seed[0] if k.startswith("auc") or k == "gauc"]
    names = ["as-of prior alone", *VARIANTS]
    by = {n: [r for r in per_seed if r["variant"] == n] for n in names}
    summary = []
    for n in names:
        row: dict[str, Any] = {"variant": n}
        for m in metric_names:
            d = describe([r[m] for r in by[n]])
            row[m] = f"{d['mean']:.4f} ± {d['std']:.4f}"
        summary.append(row)
    comparisons = []
    for n in VARIANTS:
        for ref in ("as-of prior alone", "stats texts, all layers"):
            if n == ref:
                continue
            comparisons.append({"variant": n, "minus": ref, **{
                m: fmt_paired(paired([r[m] for r in by[n]], [r[m] for r in by[ref]])) for m in metric_names}})
    payload = {"machine": machine(), "model": model_name, "data": data_name, "args": vars(args),
               "variants": {n: {"templates": t, "top_layers": top} for n, (t, top) in VARIANTS.items()},
               "slice_sizes": {k: int(v.sum()) for k, v in masks.items()}, "per_seed": per_seed,
               "summary": summary, "paired": comparisons, "wall_s": round(time.perf_counter() - started, 1)}
    md = "# Residual ranker: what it reads, where its LoRA sits\n\n"
    md += (f"{model_name}; {data_name}. A fresh residual ranker (prior 'bias', shrinkage 10) per variant and seed, "
           f"{args.rows} rows drawn from weeks 0-19 (same rows for every variant of a seed), {args.epochs} epoch(s), "
           f"lr {args.lr}, LoRA r=8 on query/value, max_length {args.max_length}; scored on the same "
           f"{len(eval_feats)} rows of week 20 (slices: {payload['slice_sizes']}; cold = fewer than {COLD} "
           f"earlier ratings). {payload['machine']['cpus']} CPUs.\n\n")
    md += md_table(summary, list(summary[0])) + "\n"
    md += "Paired differences per seed, mean [95% t-interval] (seeds where the first is higher):\n\n"
    md += md_table(comparisons, list(comparisons[0])) + "\n"
    md += md_table(per_seed, ["variant", "seed", *metric_names, "residual_std", "seconds", "samples_per_s"])
    md += "\nTexts:\n\n" + "\n".join(f"- {n}: user `{t['user']}` / item `{t['item']}`; LoRA layers: "
                                     f"{'top ' + str(top) if top else 'all'}" for n, (t, top) in VARIANTS.items())
    name = "bench_content_quick" if args.quick else "bench_content"
    json_path, md_path = write_results(name, payload, md + "\n")
    print(md)
    print(f"wrote {json_path} and {md_path} in {payload['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
