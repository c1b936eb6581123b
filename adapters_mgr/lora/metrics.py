"""Evaluation metrics for the two recommender tasks, numpy-vectorised.

Why hand-written instead of scikit-learn: GAUC needs a per-user AUC over tens of thousands of users,
which a Python loop over ``roc_auc_score`` makes slow, and the ranking metrics need seen-item
exclusion that no library offers in one call. Every function is checked against a brute-force
version in ``tests/test_training_metrics.py``.

Conventions:
- AUC is the Mann-Whitney statistic with tied scores counted as half (average ranks), so it equals
  ``sklearn.metrics.roc_auc_score``. With only one class present it is undefined: ``nan``.
- GAUC is the impression-weighted mean of per-user AUCs; users whose labels are all one class are
  skipped (their AUC is undefined), as in the original GAUC definition (Zhou et al., DIN).
- Ranking metrics use binary relevance. Recall@K = hits / |relevant|; NDCG@K uses gain 1/log2(rank+2)
  and the ideal DCG of min(|relevant|, K) hits; HR@K = 1 if any relevant item is in the top K.
  Excluded (already seen) items can never be recommended and are removed from the relevant set too,
  and users left with no relevant item are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_EPS = 1e-7


def _as_1d(values: Sequence[float] | np.ndarray, dtype: type = np.float64) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1)


def _grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group AUC and impression counts; groups are dense ints 0..G-1.

    Ranks are computed within each group after a lexicographic sort by (group, score); ties in
    (group, score) get their average rank, which is what makes ties count as one half.
    """
    n_groups = int(groups.max()) + 1 if groups.size else 0
    order = np.lexsort((scores, groups))
    g, s = groups[order], scores[order]
    y = labels[order]
    n = g.size
    pos = np.arange(n, dtype=np.float64)
    group_start_flag = np.ones(n, dtype=bool)
    group_start_flag[1:] = g[1:] != g[:-1]
    group_start = np.maximum.accumulate(np.where(group_start_flag, pos, 0.0))
    raw_rank = pos - group_start + 1.0
    tie_start_flag = group_start_flag.copy()
    tie_start_flag[1:] |= s[1:] != s[:-1]
    tie_id = np.cumsum(tie_start_flag) - 1
    tie_sum = np.bincount(tie_id, weights=raw_rank)
    tie_cnt = np.bincount(tie_id)
    rank = (tie_sum / tie_cnt)[tie_id]
    n_total = np.bincount(g, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(g, weights=y, minlength=n_groups)
    n_neg = n_total - n_pos
    rank_sum_pos = np.bincount(g, weights=rank * y, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum_pos - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc, n_total


def auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC with ties counted as half; ``nan`` if only one class is present."""
    y = _as_1d(labels)
    s = _as_1d(scores)
    if y.size != s.size:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if y.size == 0:
        return float("nan")
    values, _ = _grouped_auc(np.zeros(y.size, dtype=np.int64), (y > 0).astype(np.float64), s)
    return float(values[0])


def gauc(
    user_ids: Sequence[object] | np.ndarray,
    labels: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
) -> float:
    """Impression-weighted mean of per-user AUC, skipping one-class users; ``nan`` if none remain."""
    y = _as_1d(labels)
    s = _as_1d(scores)
    users = np.asarray(user_ids).reshape(-1)
    if not (users.size == y.size == s.size):
        raise ValueError("user_ids, labels and scores must have the same length")
    if y.size == 0:
        return float("nan")
    _, groups = np.unique(users, return_inverse=True)
    per_user, counts = _grouped_auc(groups.reshape(-1), (y > 0).astype(np.float64), s)
    valid = ~np.isnan(per_user)
    if not valid.any():
        return float("nan")
    return float(np.sum(per_user[valid] * counts[valid]) / np.sum(counts[valid]))


def log_loss(labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray) -> float:
    """Mean binary cross-entropy of P(label=1); probabilities clipped to [1e-7, 1-1e-7]."""
    y = (_as_1d(labels) > 0).astype(np.float64)
    p = np.clip(_as_1d(probs), _EPS, 1.0 - _EPS)
    if y.size != p.size:
        raise ValueError(f"labels ({y.size}) and probs ({p.size}) differ in length")
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def ranking_metrics(
    scores: np.ndarray,
    relevant: np.ndarray,
    exclude: np.ndarray | None = None,
    k: int = 10,
) -> dict[str, float]:
    """Recall@K, NDCG@K and HR@K for full-catalog ranking, averaged over users.

    Args:
        scores: (users, items) float matrix, higher is better.
        relevant: (users, items) bool matrix of the held-out positives.
        exclude: (users, items) bool matrix of items the user already interacted with; they are
            ranked last and removed from ``relevant``.
        k: cut-off.

    Returns ``{"recall@k", "ndcg@k", "hr@k", "users"}``; metric values are ``nan`` with no user.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.shape != relevant.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must be equal 2-D shapes")
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude {exclude.shape} must have the shape of scores {scores.shape}")
        scores = np.where(exclude, -np.inf, scores)
        relevant = relevant & ~exclude
    n_rel = relevant.sum(axis=1)
    keep = n_rel > 0
    names = (f"recall@{k}", f"ndcg@{k}", f"hr@{k}")
    if not keep.any():
        return {**{name: float("nan") for name in names}, "users": 0}
    scores, relevant, n_rel = scores[keep], relevant[keep], n_rel[keep]
    kk = min(k, scores.shape[1])
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    top_scores = np.take_along_axis(scores, top, axis=1)
    top = np.take_along_axis(top, np.argsort(-top_scores, axis=1, kind="stable"), axis=1)
    hits = np.take_along_axis(relevant, top, axis=1).astype(np.float64)
    # an excluded item (score -inf) that slipped into the top K when the catalog is tiny is never a hit
    hits *= np.isfinite(np.take_along_axis(scores, top, axis=1))
    discounts = 1.0 / np.log2(np.arange(kk) + 2.0)
    dcg = hits @ discounts
    ideal = np.cumsum(discounts)[np.minimum(n_rel, kk) - 1]
    n_hits = hits.sum(axis=1)
    return {
        names[0]: float(np.mean(n_hits / n_rel)),
        names[1]: float(np.mean(dcg / ideal)),
        names[2]: float(np.mean(n_hits > 0)),
        "users": int(keep.sum()),
    }


__all__ = ["auc", "gauc", "log_loss", "ranking_metrics"]


def ranking_targets(user_ids: Sequence[object], item_ids: Sequence[object], catalog: Sequence[object],
                    seen: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    """Users (in first-seen order) -> row, and the (users, catalog) ``relevant`` / ``exclude`` masks
    for full-catalog ranking: held-out positives are relevant, items seen before are excluded."""
    column = {item: j for j, item in enumerate(catalog)}
    users: dict = {}
    for uid in user_ids:
        users.setdefault(uid, len(users))
    relevant = np.zeros((len(users), len(catalog)), dtype=bool)
    for uid, iid in zip(user_ids, item_ids, strict=True):
        if iid in column:
            relevant[users[uid], column[iid]] = True
    exclude = np.zeros_like(relevant)
    for uid, row in users.items():
        cols = [column[i] for i in seen.get(uid, ()) if i in column]
        exclude[row, cols] = True
    return users, relevant, exclude
