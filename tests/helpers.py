"""Small helpers shared by catalog and ranker tests."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np


def add_batch(mgr, batch_id: str, rows: int = 10) -> str:
    """Insert a minimal data-batch row, standing in for a real `sync`."""
    with mgr.catalog.transaction() as con:
        con.execute(
            "INSERT INTO batches (id, sha256, num_rows, created_at) VALUES (?, ?, ?, ?)",
            [batch_id, f"sha-{batch_id}", rows, datetime.now(UTC)],
        )
    return batch_id


def chain(mgr, n: int, name: str = "ranker", seed0: int = 10) -> list[int]:
    """n adapters, each warm-started from the previous one."""
    from tests.conftest import lora_model, tiny_bert

    ids: list[int] = []
    for i in range(n):
        model = lora_model(tiny_bert(0), seed=seed0 + i)
        ids.append(mgr.register(model, name=name, parents=ids[-1:]))
    return ids


def pairs_of(mgr, batch_id: str, n: int = 8) -> tuple[list[str], list[str]]:
    """The (users, items) of a batch's first ``n`` rows."""
    rows = mgr.data.training_rows([batch_id])[:n]
    return [r["user_id"] for r in rows], [r["item_id"] for r in rows]


def served_scores(mgr, ref, users, items):
    """What a fresh scorer serving ``ref`` scores for the pairs (closed after)."""
    scorer = mgr.scorer(ref)
    try:
        return scorer.score(users, items)
    finally:
        scorer.close()


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def assert_reranks_with_its_own_scores(mgr, retriever_id: int, ranker_id: int, users: list[str]) -> None:
    """Two-stage recommend: each list is sorted and its scores are the ranker node's P(like)."""
    scorer = mgr.scorer(retriever_id, ranker=ranker_id)
    try:
        lists = scorer.recommend_many(users, 3, top_m=6)
        for user in users:
            items = [r["item_id"] for r in lists[user]]
            scores = [r["score"] for r in lists[user]]
            assert len(items) == 3 and scores == sorted(scores, reverse=True)
            np.testing.assert_allclose(scores, scorer.score([user] * len(items), items), atol=1e-9)
    finally:
        scorer.close()
