"""Small, fast check of the retriever's popularity term on MovieLens-100K (issue 14, part 3).

Train weeks 0..19 (a seeded subsample of rows; the retriever keeps the liked ones), evaluate NDCG@10
on week 20 (every user with a like that week, full catalog, earlier items excluded) against
popularity counted the same way (as-of interactions before week 20), several seeds, paired
differences. Usage::

    .venv/bin/python scripts/measure_retriever_popularity.py --rows 5000 --seeds 0 1 2 [--cosine-seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from adapters_mgr import AdapterManager
from adapters_mgr.data import movielens
from adapters_mgr.data.popularity import PopularityRecipe
from adapters_mgr.lora import metrics
from adapters_mgr.lora.base_model import embedded_model_path
from adapters_mgr.workflows.config import UpdateConfig
from adapters_mgr.workflows.evaluation import retriever_task, with_eval_popularity
from adapters_mgr.workflows.update import load_rows, plan_update


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-weeks", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--cosine-seed", type=int, default=None, help="also train the cosine-only retriever once")
    ap.add_argument("--no-logq-seed", type=int, default=None, help="also train without logQ once")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="retr-pop-"))
    mgr = AdapterManager(root)
    mgr.init()
    mgr.register_base(str(embedded_model_path()), name="minilm")
    movielens.register_movielens(mgr.data, movielens.fetch())
    mgr.data.sync(window="7d")
    ids = [b["id"] for b in mgr.data.batches()]
    train, week = ids[: a.train_weeks], ids[a.train_weeks]
    common = dict(task="retriever", max_train_rows=a.rows, batch_size=a.batch_size, lr=a.lr,
                  max_length=a.max_length, progress=False)
    ws = mgr.workspace

    # popularity on exactly the evaluation's examples (all interactions, and likes only)
    plan = plan_update(ws, train, UpdateConfig(**{k: v for k, v in common.items() if k != "progress"}),
                       eval_batches=[week])
    examples = load_rows(ws, plan).examples
    figures: dict[str, object] = {"setup": {**vars(a), "out": None, "train_batches": len(train)}}
    for events in ("all", "likes"):
        ex = with_eval_popularity(ws, examples, PopularityRecipe(events=events))
        task = retriever_task(PopularityRecipe())
        parsed = task.parse_eval(ex)
        items = list(parsed.catalog)
        users, relevant, exclude = metrics.ranking_targets(parsed.rows.user_ids.tolist(),
                                                          parsed.rows.item_ids.tolist(), items, parsed.seen)
        counts = np.array([parsed.popularity.get(i, 0) for i in items], dtype=np.float64)
        m = metrics.ranking_metrics(np.tile(counts, (len(users), 1)), relevant, exclude, k=10)
        figures[f"popularity_{events}"] = float(m["ndcg@10"])
        print(f"popularity ({events}) ndcg@10 {m['ndcg@10']:.4f}  users {len(users)}  items {len(items)}", flush=True)

    runs = []
    for seed in a.seeds:
        t0 = time.perf_counter()
        res = mgr.train_update(train, eval_batches=[week], seed=seed, name=f"pop-{seed}", popularity="log", **common)
        m = mgr.get(res.adapter_id).metrics
        runs.append({"seed": seed, "ndcg@10": m["ndcg@10"], "sim_weight": m["sim_weight"],
                     "pop_weight": m["pop_weight"], "train_rows": mgr.get(res.adapter_id).hyperparams["train_rows"],
                     "wall_s": time.perf_counter() - t0})
        print(json.dumps(runs[-1]), flush=True)
    figures["popularity_term"] = runs
    diffs = np.array([r["ndcg@10"] - figures["popularity_all"] for r in runs])
    figures["paired_diff_vs_popularity"] = {"per_seed": diffs.tolist(), "mean": float(diffs.mean()),
                                            "std": float(diffs.std(ddof=1)) if len(diffs) > 1 else None}
    for key, seed, kwargs in (("cosine_only", a.cosine_seed, {"popularity": "none"}),
                              ("no_logq", a.no_logq_seed, {"popularity": "log", "popularity_logq": False})):
        if seed is None:
            continue
        res = mgr.train_update(train, eval_batches=[week], seed=seed, name=key.replace("_", "-"), **kwargs, **common)
        m = mgr.get(res.adapter_id).metrics
        figures[key] = {"seed": seed, "ndcg@10": m["ndcg@10"],
                        **({"sim_weight": m["sim_weight"], "pop_weight": m["pop_weight"]} if "sim_weight" in m else {})}
        print(key, json.dumps(figures[key]), flush=True)
    figures["wall_s"] = time.perf_counter() - started
    print(json.dumps(figures, indent=1))
    if a.out:
        a.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
