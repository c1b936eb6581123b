"""Classical recommender baselines a BERT adapter has to beat: a bias model, popularity, item-kNN.

Why in the package: the incremental benchmark retrains them every period, and anyone judging an
adapter should be able to ask "does it beat the bias model on the same rows?" with the same
metrics (``training.metrics``) and the same full-catalog protocol as the ``retriever`` recipe.
numpy only (MovieLens-sized user x item matrices are dense and small).

- :class:`BiasModel` (ranker side): ``P(like) ~ mu + b_user + b_item``, the global mean plus
  regularised user and item offsets fitted by alternating ridge updates on the 0/1 label
  (Koren's baseline predictor). Unknown users/items get offset 0.
- :func:`popularity` (retriever side): items ranked by how often they were liked in the history.
- :class:`ItemKNN` (retriever side): cosine item-item similarity over the binary user x item
  matrix of likes (with shrinkage, top-k neighbours per item); a user's score for an item is the
  sum of its similarities to the items the user liked. Users without history fall back to popularity.
- :func:`evaluate_retrieval`: Recall/NDCG/HR@K of any score function on a
  :class:`~adapters_mgr.lora.examples.RetrievalEvalSet`, exactly as ``RetrieverTask.evaluate``
  builds users, relevant items and seen-item exclusion.

Example:
    >>> m = BiasModel().fit(["u1", "u1", "u2"], ["i1", "i2", "i1"], [1, 0, 1])
    >>> m.predict(["u2"], ["i1"]).shape
    (1,)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from adapters_mgr.lora import metrics


def _index(values: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out.setdefault(str(v), len(out))
    return out


class BiasModel:
    """Global mean + regularised user and item offsets on a 0/1 label."""

    def __init__(self, reg_user: float = 5.0, reg_item: float = 5.0, iterations: int = 10) -> None:
        self.reg_user = float(reg_user)
        self.reg_item = float(reg_item)
        self.iterations = int(iterations)
        self.mu = 0.0
        self.user_bias: dict[str, float] = {}
        self.item_bias: dict[str, float] = {}

    def fit(self, user_ids: Sequence[Any], item_ids: Sequence[Any], labels: Sequence[float]) -> BiasModel:
        users, items = _index(user_ids), _index(item_ids)
        u = np.fromiter((users[str(x)] for x in user_ids), dtype=np.int64, count=len(user_ids))
        i = np.fromiter((items[str(x)] for x in item_ids), dtype=np.int64, count=len(item_ids))
        y = np.asarray(labels, dtype=np.float64)
        self.mu = float(y.mean()) if y.size else 0.0
        n_u = np.bincount(u, minlength=len(users)).astype(np.float64)
        n_i = np.bincount(i, minlength=len(items)).astype(np.float64)
        bu = np.zeros(len(users))
        bi = np.zeros(len(items))
        for _ in range(self.iterations):
            bi = np.bincount(i, weights=y - self.mu - bu[u], minlength=len(items)) / (self.reg_item + n_i)
            bu = np.bincount(u, weights=y - self.mu - bi[i], minlength=len(users)) / (self.reg_user + n_u)
        self.user_bias = dict(zip(users, bu.tolist(), strict=True))
        self.item_bias = dict(zip(items, bi.tolist(), strict=True))
        return self

    def predict(self, user_ids: Sequence[Any], item_ids: Sequence[Any]) -> np.ndarray:
        """Estimated P(like), clipped to [0.001, 0.999] so a log-loss stays finite."""
        bu = np.array([self.user_bias.get(str(x), 0.0) for x in user_ids])
        bi = np.array([self.item_bias.get(str(x), 0.0) for x in item_ids])
        return np.clip(self.mu + bu + bi, 1e-3, 1 - 1e-3)

    def evaluate(self, user_ids: Sequence[Any], item_ids: Sequence[Any], labels: Sequence[float]) -> dict[str, float]:
        """AUC, GAUC and log-loss, as the ranker recipe reports them."""
        p = self.predict(user_ids, item_ids)
        return {"auc": metrics.auc(labels, p), "gauc": metrics.gauc(np.asarray(user_ids, dtype=object), labels, p),
                "logloss": metrics.log_loss(labels, p), "n_eval": len(p)}


def popularity(item_ids: Sequence[Any], catalog: Sequence[Any]) -> np.ndarray:
    """Like counts per catalog item (``item_ids``: the liked items of the history, one per like)."""
    column = {str(c): j for j, c in enumerate(catalog)}
    counts = np.zeros(len(catalog))
    for item in item_ids:
        j = column.get(str(item))
        if j is not None:
            counts[j] += 1.0
    return counts


class ItemKNN:
    """Item-item cosine kNN on binary likes, with shrinkage and top-``k`` neighbours per item."""

    def __init__(self, k: int = 100, shrink: float = 10.0) -> None:
        self.k = int(k)
        self.shrink = float(shrink)
        self.catalog: list[str] = []
        self.history: dict[str, np.ndarray] = {}
        self.sim = np.zeros((0, 0))
        self.pop = np.zeros(0)

    def fit(self, user_ids: Sequence[Any], item_ids: Sequence[Any], catalog: Sequence[Any]) -> ItemKNN:
        """``user_ids`` / ``item_ids``: the liked (user, item) pairs of the history."""
        self.catalog = [str(c) for c in catalog]
        column = {c: j for j, c in enumerate(self.catalog)}
        users = _index(user_ids)
        x = np.zeros((len(users), len(self.catalog)), dtype=np.float32)
        for u, i in zip(user_ids, item_ids, strict=True):
            j = column.get(str(i))
            if j is not None:
                x[users[str(u)], j] = 1.0
        co = x.T @ x
        norms = np.sqrt(np.diag(co))
        sim = co / (np.outer(norms, norms) + self.shrink + 1e-12)
        np.fill_diagonal(sim, 0.0)
        if self.k < sim.shape[0]:  # keep each item's k nearest neighbours (columns)
            cut = np.partition(sim, -self.k, axis=0)[-self.k]
            sim = np.where(sim >= cut[None, :], sim, 0.0)
        self.sim = sim.astype(np.float32)
        self.history = {u: x[row] for u, row in users.items()}
        self.pop = x.sum(axis=0)
        return self

    def scores(self, user_ids: Sequence[Any]) -> np.ndarray:
        """(users, catalog) scores; a popularity term 1e-6 * share breaks ties (and serves cold users)."""
        empty = np.zeros(len(self.catalog), dtype=np.float32)
        hist = np.stack([self.history.get(str(u), empty) for u in user_ids]) if len(user_ids) else \
            np.zeros((0, len(self.catalog)), dtype=np.float32)
        tie = 1e-6 * self.pop / max(float(self.pop.max()), 1.0)
        return hist @ self.sim + tie[None, :]


def evaluate_retrieval(score: Callable[[list[Any], list[Any]], np.ndarray], eval_set: Any, k: int = 10
                       ) -> dict[str, float]:
    """Ranking metrics of ``score(user_ids, item_ids) -> (users, items)`` on a retrieval eval set
    (users = those with held-out positives, items = the catalog, seen items excluded)."""
    item_ids = list(eval_set.catalog)
    rows = eval_set.rows
    users, relevant, exclude = metrics.ranking_targets(rows.user_ids.tolist(), rows.item_ids.tolist(), item_ids,
                                                       eval_set.seen)
    result: dict[str, float] = dict(metrics.ranking_metrics(score(list(users), item_ids), relevant, exclude, k=k))
    result["n_items"] = len(item_ids)
    return result


__all__ = ["BiasModel", "ItemKNN", "evaluate_retrieval", "popularity"]
