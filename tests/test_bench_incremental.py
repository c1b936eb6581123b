"""The incremental benchmark's --quick mode runs end to end (tiny BERT, synthetic stream), so it cannot rot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_bias_knn_popularity_baselines() -> None:
    from adapters_mgr.baselines import BiasModel, ItemKNN, evaluate_retrieval, popularity
    from adapters_mgr.lora.examples import RetrievalEvalSet, as_interactions

    users = ["u1", "u1", "u2", "u2", "u3", "u3"]
    items = ["good", "bad", "good", "bad", "good", "bad"]
    labels = [1, 0, 1, 0, 1, 1]
    model = BiasModel(1.0, 1.0).fit(users, items, labels)
    p = model.predict(["u1", "u9"], ["good", "bad"])
    assert p[0] > p[1] and model.evaluate(users, items, labels)["auc"] > 0.5
    assert model.predict(["new"], ["new"])[0] == np.clip(model.mu, 1e-3, 1 - 1e-3)

    catalog = ["a", "b", "c", "d"]
    assert popularity(["a", "a", "c", "zz"], catalog).tolist() == [2, 0, 1, 0]
    knn = ItemKNN(k=2, shrink=0.0).fit(["x", "x", "y", "y", "z"], ["a", "b", "a", "b", "a"], catalog)
    scores = knn.scores(["z", "cold"])
    assert scores[0, 1] > scores[0, 2] and scores.shape == (2, 4)  # z liked a -> b (co-liked with a) first
    rows = as_interactions({"user_id": ["z"], "item_id": ["b"], "user_text": ["z"], "item_text": ["b"]},
                           need_labels=False)
    eval_set = RetrievalEvalSet(rows, {c: c for c in catalog}, {"z": {"a"}})
    out = evaluate_retrieval(lambda u, i: knn.scores(u), eval_set, k=1)
    assert out["hr@1"] == 1.0 and out["users"] == 1


def test_quick_runs_end_to_end(tmp_path: Path) -> None:
    from benchmarks import bench_incremental as bench

    out = tmp_path / "results"
    payload = bench.main(["--quick", "--periods", "2", "--out", str(out), "--workdir", str(tmp_path / "work")])
    data = json.loads((out / "bench_incremental_quick.json").read_text())
    assert (out / "bench_incremental_quick.md").read_text().startswith("# Incremental-learning benchmark")
    assert (out / "bench_incremental_quick.png").stat().st_size > 1000
    periods = [p["t"] for p in data["periods"]]
    assert len(periods) == 2 and payload["config"]["quick"]
    assert "o_oracle" not in data["results"]["ranker"]  # the drift stream's only
    for key in (k for k in bench.RANKER if k != "o_oracle" and k not in bench.OPT_IN):
        entries = data["results"]["ranker"][key]
        # (e) and (f), the costliest, run in the last period only (unless --retrain-every-period)
        want = periods[-1:] if key in ("e_lora_retrain", "f_full_ft") else periods
        assert [e["period"] for e in entries] == want, key
        for e in entries:
            for metric in ("auc", "gauc"):
                assert e["metrics"][metric] is not None and math.isfinite(e["metrics"][metric]), (key, metric)
            assert e["metrics"]["n_eval"] == data["periods"][0]["ranker_eval_rows"] or e["period"] != periods[0]
            assert math.isfinite(e["wall_s"]) and e["bytes"] >= 0
    for key in bench.RETRIEVER:
        entries = data["results"]["retriever"][key]
        assert [e["period"] for e in entries] == periods, key
        for e in entries:
            for metric in ("ndcg@10", "recall@10"):
                assert e["metrics"][metric] is not None and math.isfinite(e["metrics"][metric]), (key, metric)
    # every ranker strategy scored the same eval rows
    for t in periods:
        assert len({e["metrics"]["n_eval"] for k, es in data["results"]["ranker"].items() for e in es
                    if e["period"] == t}) == 1
    names = {v["target"] for v in data["summary"]["targets"]}
    assert any("bias model" in n for n in names) and any("(e)" in n for n in names)
    assert not any(k in data["results"]["ranker"] for k in bench.OPT_IN)  # asked for only
    for key in (k for k in bench.INCREMENTAL if k not in bench.OPT_IN):
        assert 0 < data["summary"]["ranker"][key]["mean_bytes"] < data["base_bytes"]


def test_quick_drift_stream_reports_the_oracle_and_the_gap_closed(tmp_path: Path) -> None:
    from benchmarks import bench_incremental as bench

    out = tmp_path / "results"
    bench.main(["--quick", "--stream", "drift", "--periods", "2", "--skip-full-ft", "--out", str(out),
                "--workdir", str(tmp_path / "work")])
    data = json.loads((out / "bench_incremental_quick.json").read_text())
    res, summary = data["results"]["ranker"], data["summary"]["ranker"]
    assert "60 users, 300 events per 7d period, 10 new items per period" in data["data"]
    assert [e["period"] for e in res["o_oracle"]] == [p["t"] for p in data["periods"]] == [4, 5]
    prior, oracle = summary["p_prior"]["mean_auc"], summary["o_oracle"]["mean_auc"]
    assert oracle > prior + 0.03  # the true probabilities rank far better than any prior
    for key in (k for k in bench.INCREMENTAL if k not in bench.OPT_IN):
        want = (summary[key]["mean_auc"] - prior) / (oracle - prior)
        assert math.isclose(summary[key]["gap_share"], want, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(summary["o_oracle"]["gap_share"], 1.0)
    names = [v["target"] for v in data["summary"]["targets"]]
    assert any(n.startswith("floor (drift stream)") for n in names)
    assert any(n.startswith("goal (drift stream)") for n in names)
    assert "gap closed" in (out / "bench_incremental_quick.md").read_text()


def test_paired_interval() -> None:
    from benchmarks._stats import paired, t975

    p = paired([0.71, 0.72, 0.73, 0.74], [0.70, 0.70, 0.70, 0.70])
    assert math.isclose(p["mean"], 0.025) and p["wins"] == 4 and p["n"] == 4
    half = t975(3) * p["std"] / 2
    assert math.isclose(p["low"], 0.025 - half) and math.isclose(p["high"], 0.025 + half) and p["low"] > 0
    assert t975(3) == 3.182 and t975(11) == 2.228 and t975(1000) == 1.96
    noisy = paired([0.70, 0.72, 0.69], [0.71, 0.70, 0.70])
    assert noisy["low"] < 0 < noisy["high"]


def test_baselines_only_mode(tmp_path: Path) -> None:
    from benchmarks import bench_incremental as bench

    out = tmp_path / "results"
    bench.main(["--quick", "--periods", "1", "--baselines-only", "--out", str(out), "--workdir", str(tmp_path / "w")])
    data = json.loads((out / "bench_incremental_quick_baselines.json").read_text())
    assert set(data["results"]["ranker"]) == {"g_bias", "p_prior", "p_prior_content", "g_als"}
    assert set(data["results"]["retriever"]) == {"g_popularity", "g_popularity_recent", "g_item_knn", "g_als"}
    content = data["results"]["ranker"]["p_prior_content"][0]
    assert len(content["weights"]) == 3 and math.isfinite(content["metrics"]["auc"])
