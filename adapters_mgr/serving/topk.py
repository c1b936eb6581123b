"""Top-K selection: the items a user already saw are never recommended back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from adapters_mgr.catalog.db import Catalog


def seen_items(catalog: Catalog, users: Sequence[str] | None = None) -> dict[str, set[str]]:
    """Items each user already interacted with (never recommended back)."""
    sql = "SELECT user_id::VARCHAR, item_id::VARCHAR FROM interactions"
    params: list[Any] = []
    if users is not None:
        sql += " WHERE user_id::VARCHAR IN (SELECT unnest(?::VARCHAR[]))"
        params.append(list(users))
    seen: dict[str, set[str]] = {}
    with catalog.connect() as con:
        for user, item in con.execute(sql, params).fetchall():
            seen.setdefault(user, set()).add(item)
    return seen


def top_k(scores: np.ndarray, item_ids: Sequence[str], users: Sequence[str], seen: dict[str, set[str]],
          k: int) -> dict[str, list[dict[str, Any]]]:
    """Per user (row of ``scores``), the ``k`` best unseen items, best first."""
    index = {item: j for j, item in enumerate(item_ids)}
    scores = np.array(scores, dtype=np.float64, copy=True)
    out: dict[str, list[dict[str, Any]]] = {}
    for row, user in enumerate(users):
        for item in seen.get(user, ()):
            j = index.get(item)
            if j is not None:
                scores[row, j] = -np.inf
        valid = int(np.isfinite(scores[row]).sum())
        n = min(k, valid)
        if n == 0:
            out[user] = []
            continue
        part = np.argpartition(-scores[row], n - 1)[:n]
        order = part[np.argsort(-scores[row, part], kind="stable")]
        out[user] = [{"item_id": item_ids[j], "score": float(scores[row, j])} for j in order]
    return out
