"""Metrics against brute force and known values (sklearn only as a cross-check)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adapters_mgr.lora.metrics import auc, gauc, log_loss, ranking_metrics


def brute_auc(y, s):
    pos = [b for a, b in zip(y, s, strict=True) if a]
    neg = [b for a, b in zip(y, s, strict=True) if not a]
    if not pos or not neg:
        return float("nan")
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def test_auc_known_values():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert auc([0, 1, 1], [0.0, 1.0, 2.0]) == 1.0
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 7, 200).astype(float)  # many ties
    assert auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    from sklearn.metrics import roc_auc_score

    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_gauc_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    users = rng.choice(["u1", "u2", "u3", "u4", "u5"], 300)
    y = rng.integers(0, 2, 300)
    y[users == "u5"] = 1  # one-class user: skipped
    s = rng.integers(0, 5, 300).astype(float)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        a = brute_auc(y[m], s[m])
        if not math.isnan(a):
            num += a * m.sum()
            den += m.sum()
    assert gauc(users, y, s) == pytest.approx(num / den, abs=1e-12)
    assert math.isnan(gauc(["a", "a"], [1, 1], [0.1, 0.2]))


def test_log_loss():
    assert log_loss([1, 0], [0.8, 0.3]) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert np.isfinite(log_loss([1, 0], [0.0, 1.0]))  # clipped, not inf


def brute_ranking(scores, relevant, exclude, k):
    rec, ndcg, hr = [], [], []
    for u in range(scores.shape[0]):
        rel = {i for i in range(scores.shape[1]) if relevant[u, i] and not exclude[u, i]}
        if not rel:
            continue
        cands = [i for i in range(scores.shape[1]) if not exclude[u, i]]
        ranked = sorted(cands, key=lambda i: -scores[u, i])[:k]
        hits = [1.0 if i in rel else 0.0 for i in ranked]
        rec.append(sum(hits) / len(rel))
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
        ndcg.append(dcg / idcg)
        hr.append(1.0 if sum(hits) else 0.0)
    return np.mean(rec), np.mean(ndcg), np.mean(hr), len(rec)


@pytest.mark.parametrize("seed", range(4))
def test_ranking_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(30, 50))
    relevant = rng.random((30, 50)) < 0.08
    exclude = rng.random((30, 50)) < 0.3
    got = ranking_metrics(scores, relevant, exclude, k=10)
    rec, ndcg, hr, users = brute_ranking(scores, relevant, exclude, 10)
    assert got["recall@10"] == pytest.approx(rec)
    assert got["ndcg@10"] == pytest.approx(ndcg)
    assert got["hr@10"] == pytest.approx(hr)
    assert got["users"] == users


def test_ranking_metrics_known_value_and_exclusion():
    scores = np.array([[0.9, 0.8, 0.1, 0.0]])
    relevant = np.array([[False, False, True, False]])
    exclude = np.array([[True, True, False, False]])
    got = ranking_metrics(scores, relevant, exclude, k=1)
    assert got == {"recall@1": 1.0, "ndcg@1": 1.0, "hr@1": 1.0, "users": 1}
    got = ranking_metrics(scores, relevant, None, k=2)
    assert got["hr@2"] == 0.0
