"""Part (d) of the serving benchmark: recompute top-10 for every user, retriever alone and with a
ranker reranking the top 50. Quality does not change the cost, so the adapters are freshly
initialised LoRAs (random B) registered in a throw-away catalog; the data is MovieLens-100K when it
can be fetched (943 users, 1,682 items), else the synthetic stream (said in the result)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any


def _random_adapter(base: Any, task_type: str, seed: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type=task_type,
                     init_lora_weights=False)
    return get_peft_model(base, cfg)


def recompute_timing(quick: bool, two_stage_users: int | None = 100) -> dict[str, Any]:
    """Retriever-only for every user; retriever + ranker on ``two_stage_users`` users (None: all), with
    the per-user rate extrapolated to all users (the cross-encoder costs ~50 pair scores per user)."""
    from adapters_mgr import AdapterManager
    from adapters_mgr.lora.base_model import HeadSpec, load_base_model

    with tempfile.TemporaryDirectory() as tmp:
        mgr = AdapterManager(Path(tmp) / "root")
        mgr.init()
        source = "synthetic stream"
        if not quick:
            try:
                from adapters_mgr.data import movielens

                movielens.register_movielens(mgr.data, movielens.fetch())
                source = "MovieLens-100K"
            except Exception:  # noqa: BLE001 - fall back, and say so in the result
                source = "synthetic stream (MovieLens unavailable)"
        if source.startswith("synthetic"):
            from adapters_mgr.data import synthetic

            synthetic.generate(Path(tmp) / "stream", rows=5000, users=100, items=80, seed=0).register(mgr.data)
        mgr.data.sync(window="7d" if source == "MovieLens-100K" else "30m")
        if quick:
            from adapters_mgr.lora.testing import tiny_base_folder

            base_id = mgr.register_base(str(tiny_base_folder(Path(tmp) / "tiny")), name="tiny")
        else:
            base_id = mgr.default_base()
        source_dir = mgr.base(base_id)["source"]
        ret = mgr.register(_random_adapter(load_base_model(source_dir, HeadSpec("encoder")), "FEATURE_EXTRACTION", 1),
                           name="bench-retriever", base=base_id, task="retriever")
        rank = mgr.register(_random_adapter(load_base_model(source_dir, HeadSpec("seq_cls", 2)), "SEQ_CLS", 2),
                            name="bench-ranker", base=base_id, task="ranker")
        mgr.promote(ret, "production")
        started = time.perf_counter()
        one = mgr.recompute("production", users="all", k=10, progress=False)
        retriever_s = time.perf_counter() - started
        subset: Any = "all"
        if two_stage_users is not None and two_stage_users < one["users"]:
            subset = sorted({str(r["user_id"]) for r in mgr.data.interactions()})[:two_stage_users]
        started = time.perf_counter()
        two = mgr.recompute("production", users=subset, k=10, ranker=rank, top_m=50, progress=False)
        two_stage_s = time.perf_counter() - started
        per_user = two_stage_s / max(two["users"], 1)
        batching = rerank_batching(mgr, ret, rank, subset if subset != "all" else None)
        return {
            "data": source, "users": one["users"], "items": len(mgr.data.item_texts()),
            "retriever_only_s": retriever_s, "users_per_s_retriever": one["users"] / retriever_s,
            "two_stage_users_measured": two["users"], "retriever_plus_ranker_top50_s": two_stage_s,
            "two_stage_s_per_user": per_user, "two_stage_all_users_s_extrapolated": per_user * one["users"],
            "rows_written": one["rows"] + two["rows"], "model": "tiny random BERT" if quick else "MiniLM-L6",
            **batching,
        }


def rerank_batching(mgr: Any, retriever: int, ranker: int, users: list[str] | None,
                    rounds: int = 2) -> dict[str, Any]:
    """Two-stage top-10 for the same users, one user per request (how recompute reranked before)
    against many users per request (how it does now), alternated ``rounds`` times on one scorer."""
    from adapters_mgr.serving.recommend import PAIRS_PER_REQUEST

    users = users or sorted({str(r["user_id"]) for r in mgr.data.interactions()})
    chunk = max(1, PAIRS_PER_REQUEST // 50)
    scorer = mgr.scorer(retriever, ranker=ranker)
    per_user: list[float] = []
    batched: list[float] = []
    try:
        scorer.item_embeddings()
        for _ in range(rounds):
            started = time.perf_counter()
            one_by_one = {u: scorer.recommend_many([u], 10, top_m=50)[u] for u in users}
            per_user.append(time.perf_counter() - started)
            started = time.perf_counter()
            together: dict[str, Any] = {}
            for start in range(0, len(users), chunk):
                together.update(scorer.recommend_many(users[start:start + chunk], 10, top_m=50))
            batched.append(time.perf_counter() - started)
    finally:
        scorer.close()
    same = all([r["item_id"] for r in one_by_one[u]] == [r["item_id"] for r in together[u]] for u in users)
    return {
        "rerank_users": len(users), "rerank_users_per_request": chunk,
        "users_per_s_one_per_request": [len(users) / t for t in per_user],
        "users_per_s_batched": [len(users) / t for t in batched],
        "batched_speedup": [a / b for a, b in zip(per_user, batched, strict=True)],
        "same_lists": same,
    }
