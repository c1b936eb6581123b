"""Implicit-feedback matrix factorisation (ALS, the ``implicit`` package) as a benchmark baseline.

Why here and not in the package: it is what a practitioner would try next after item-kNN, so the
BERT strategies are judged against it, but the tool itself does not need it (``pip install
implicit``; the strategy is skipped, and said to be, when it is not installed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def available() -> bool:
    try:
        import implicit  # noqa: F401
    except ImportError:
        return False
    return True


class ImplicitALS:
    """ALS on the binary user x item matrix of likes; a user's score for an item is the dot product
    of their factors, plus 1e-6 x the item's share of likes, which breaks ties and ranks by
    popularity for a user with no like in the history (all-zero factors; as ``ItemKNN`` does)."""

    # Defaults picked on ML-100K (first 80% of ratings by time -> Recall@10 of the last 20%, seen items
    # excluded): 64 factors 0.118, 32 -> 0.155, 16 -> 0.183, 16 with alpha 5 -> 0.189, 8 -> 0.185;
    # popularity 0.169. Small data overfits many factors. The split overlaps the benchmark's weeks:
    # a mild selection bias in ALS's favour.
    def __init__(self, factors: int = 16, regularization: float = 0.1, iterations: int = 30, alpha: float = 5.0,
                 seed: int = 0) -> None:
        self.params = dict(factors=factors, regularization=regularization, iterations=iterations, alpha=alpha,
                           random_state=seed, num_threads=1)
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.user_factors = np.zeros((0, factors), dtype=np.float32)
        self.item_factors = np.zeros((0, factors), dtype=np.float32)
        self.pop: dict[str, float] = {}

    def fit(self, user_ids: Sequence[Any], item_ids: Sequence[Any]) -> ImplicitALS:
        """``user_ids`` / ``item_ids``: the liked (user, item) pairs of the history."""
        from implicit.cpu.als import AlternatingLeastSquares
        from scipy.sparse import csr_matrix

        self.users = {u: k for k, u in enumerate(dict.fromkeys(str(u) for u in user_ids))}
        self.items = {i: k for k, i in enumerate(dict.fromkeys(str(i) for i in item_ids))}
        rows = [self.users[str(u)] for u in user_ids]
        cols = [self.items[str(i)] for i in item_ids]
        matrix = csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                            shape=(len(self.users), len(self.items)))
        matrix.sum_duplicates()
        likes = np.asarray((matrix > 0).sum(axis=0)).ravel()
        self.pop = {i: float(likes[k]) / max(float(likes.max()), 1.0) for i, k in self.items.items()}
        matrix.data[:] = 1.0
        from threadpoolctl import threadpool_limits

        model = AlternatingLeastSquares(**self.params)
        with threadpool_limits(1, "blas"):  # implicit parallelises itself; a BLAS pool inside it thrashes
            model.fit(matrix, show_progress=False)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)
        return self

    def _user_matrix(self, user_ids: Sequence[Any]) -> np.ndarray:
        zero = np.zeros(self.user_factors.shape[1], dtype=np.float32)
        return np.stack([self.user_factors[self.users[str(u)]] if str(u) in self.users else zero
                         for u in user_ids]) if len(user_ids) else np.zeros((0, len(zero)), dtype=np.float32)

    def _item_matrix(self, item_ids: Sequence[Any]) -> np.ndarray:
        zero = np.zeros(self.item_factors.shape[1], dtype=np.float32)
        return np.stack([self.item_factors[self.items[str(i)]] if str(i) in self.items else zero
                         for i in item_ids]) if len(item_ids) else np.zeros((0, len(zero)), dtype=np.float32)

    def scores(self, user_ids: Sequence[Any], catalog: Sequence[Any]) -> np.ndarray:
        """(users, catalog) scores for full-catalog retrieval."""
        tie = 1e-6 * np.array([self.pop.get(str(i), 0.0) for i in catalog], dtype=np.float64)
        return self._user_matrix(user_ids).astype(np.float64) @ self._item_matrix(catalog).T + tie[None, :]

    def pair_scores(self, user_ids: Sequence[Any], item_ids: Sequence[Any]) -> np.ndarray:
        """One score per (user, item) pair, for AUC on the ranker's rows."""
        tie = 1e-6 * np.array([self.pop.get(str(i), 0.0) for i in item_ids], dtype=np.float64)
        return np.sum(self._user_matrix(user_ids).astype(np.float64) * self._item_matrix(item_ids), axis=1) + tie
