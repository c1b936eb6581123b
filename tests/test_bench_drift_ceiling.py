"""The drift stream's reference learners: handed the true genres, they must beat the as-of prior
(else the stream's gap would not be learnable at all and the benchmark's 'share closed' meaningless)."""

from __future__ import annotations

import numpy as np

from benchmarks import bench_drift_ceiling


def test_genre_learners_close_part_of_the_gap_and_stay_below_the_oracle():
    payload = bench_drift_ceiling.main(["--quick", "--seeds", "0"])
    rows = payload["per_period"]
    assert len(rows) == 5 and all(r["rows"] == 300 for r in rows)
    assert all(r["oracle"] > r["prior"] for r in rows)
    assert np.mean([r["share genre MF"] for r in rows]) > 0.1
    assert np.mean([r["share genre features"] for r in rows]) > 0.0
    assert all(r["genre MF"] < r["oracle"] + 0.02 for r in rows)
    # each beside its stale twin (fitted once on the initial periods): refitting on the drifting
    # stream pays on average, which is what the twin is there to measure
    assert np.mean([r["genre MF"] - r["genre MF, stale"] for r in rows]) > 0
    assert {"above its stale twin"} <= set(next(e for e in payload["summary"] if e["model"] == "genre MF"))


def test_user_profile_feature_uses_only_the_history_given():
    genres = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])}
    history = [{"user_id": 1, "item_id": "a", "label": 1, "prior_logit": 0.0},
               {"user_id": 1, "item_id": "b", "label": 0, "prior_logit": 0.0}]
    rows = [{"user_id": 1, "item_id": "a", "prior_logit": 0.3}, {"user_id": 2, "item_id": "a", "prior_logit": -0.1}]
    x = bench_drift_ceiling.genre_features(rows, history, history, genres)
    # user 1: (1 - 0.5) * g_a / (2 + 3) = [0.1, 0] -> . g_a = 0.1; unseen user 2: 0
    assert np.allclose(x[:, 0], [0.3, -0.1]) and np.allclose(x[:, 1], [0.1, 0.0])
    # trend: (0.5 * g_a - 0.5 * g_b) / (1 + 5) per genre -> . g_a = 0.5 / 6
    assert np.allclose(x[:, 2], [0.5 / 6, 0.5 / 6])
