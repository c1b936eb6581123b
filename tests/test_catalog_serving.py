"""Catalog-level merge / compact / Scorer / recompute on a synced synthetic stream (tiny BERT)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from adapters_mgr import Conflict, InvalidInput
from tests.stream_fixtures import synced_manager

FAST = dict(max_length=32, max_train_rows=120, max_eval_rows=120, progress=False)


def _model_only(scorer, users, items):
    """Raw texts carry no ids to compute the as-of prior from: these nodes (trained with prior 'bias')
    are compared by their model's part alone, sigmoid(0 + residual)."""
    return scorer.score_texts(users, items, prior_logits=np.zeros(len(users)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    mgr = synced_manager(work / "root", work)
    b = [x["id"] for x in mgr.data.batches()]
    first = mgr.train_update([b[0]], name="rk", promote="always", ranker_shape="cross", **FAST)  # heads, folds
    s1 = mgr.train_update([b[1]], name="rk", policy="stack", parent="production", promote="always", **FAST)
    s2 = mgr.train_update([b[2]], name="rk", policy="stack", parent="production", promote="always", **FAST)
    ret = mgr.train_update([b[0], b[1]], task="retriever", name="ret", promote="always", alias="retrieval", **FAST)
    return mgr, b, {"first": first.node_id, "s1": s1.node_id, "s2": s2.node_id, "ret": ret.node_id}


def test_cat_merge_equals_the_weights_stack_and_is_recorded(trained):
    mgr, _, ids = trained
    users = ["user a", "user b", "user c"]
    items = ["item x", "item y", "item z"]
    scorer = mgr.scorer(ids["s2"])
    stack_scores = _model_only(scorer, users, items)
    merged = mgr.merge([ids["s2"]], "cat", name="rk-merged")
    node = mgr.get(merged)
    assert node.kind == "merged" and node.metrics["reconstruction_error"] == pytest.approx(0.0, abs=1e-6)
    lin = mgr.lineage(merged, depth=1)
    edges = lin.parents_of(merged)
    assert len(edges) == 3 and {e.relation for e in edges} == {"merged_from"}
    assert edges[0].params["method"] == "cat"
    assert node.hyperparams["merge"]["source_nodes"] == [e.parent_id for e in edges]
    scorer.activate(merged)
    np.testing.assert_allclose(_model_only(scorer, users, items), stack_scores, atol=1e-5)
    svd = mgr.merge([ids["s2"]], "svd", target_rank=2, name="rk-svd")
    assert mgr.get(svd).metrics["reconstruction_error"] > 0
    scorer.close()


def test_merge_refuses_mixed_tasks_before_any_work(trained):
    mgr, _, ids = trained
    before = len(mgr.list())
    with pytest.raises(Conflict, match="different tasks"):
        mgr.merge([ids["first"], ids["ret"]], "cat")
    with pytest.raises(InvalidInput, match="weights"):
        mgr.merge([ids["first"]], "cat", weights=[1.0, 2.0])
    assert len(mgr.list()) == before


def test_fold_export_loads_with_plain_transformers(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    mgr, _, ids = trained
    out = mgr.fold(ids["s1"], tmp_path / "folded")
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    import torch

    enc = tok(["user a"], ["item x"], return_tensors="pt", truncation=True, max_length=32)
    with torch.no_grad():
        plain = torch.softmax(model(**enc).logits, -1)[0, 1].item()
    scorer = mgr.scorer(ids["s1"], max_length=32)
    ours = float(_model_only(scorer, ["user a"], ["item x"])[0])
    scorer.close()
    assert ours == pytest.approx(plain, abs=1e-5)


def test_scorer_follows_rollback_and_returns_the_old_outputs(trained):
    mgr, _, ids = trained
    mgr.promote(ids["s2"], "serve")
    scorer = mgr.scorer("serve")
    users, items = ["user q"] * 3, ["item 1", "item 2", "item 3"]
    new_scores = _model_only(scorer, users, items)
    old = mgr.scorer(ids["s1"])
    old_scores = _model_only(old, users, items)
    old.close()
    mgr.promote(ids["s1"], "serve")
    mgr.promote(ids["s2"], "serve")
    mgr.rollback("serve")  # back to s1, made "by another process"
    assert scorer.active == ids["s2"]
    assert scorer.refresh() is True and scorer.active == ids["s1"]
    np.testing.assert_array_equal(_model_only(scorer, users, items), old_scores)  # exactly the old outputs
    assert not np.allclose(new_scores, old_scores)
    assert scorer.refresh() is False
    scorer.close()


def test_compact_moves_alias_only_within_tolerance(trained):
    mgr, b, ids = trained
    mgr.promote(ids["s2"], "compact-me")
    shallow = mgr.compact("compact-me", max_depth=5)
    assert shallow["compacted"] is False
    report = mgr.compact("compact-me", max_depth=2, method="cat", eval_batches=[b[3]])
    assert report["compacted"] and report["moved"]
    assert mgr.alias_target("compact-me") == report["merged"]
    assert report["merged_metric"] == pytest.approx(report["stack_metric"], abs=1e-4)


def test_recompute_writes_complete_runs_with_lineage(trained):
    mgr, _, ids = trained
    first = mgr.recompute("retrieval", users="all", k=5, progress=False)
    assert first["node_id"] == ids["ret"] and first["users"] > 0 and first["rows"] <= 5 * first["users"]
    recs = mgr.recommendations(alias="retrieval")
    assert {r["node_id"] for r in recs} == {ids["ret"]}
    users = {r["user_id"] for r in recs}
    assert len(users) == first["users"]
    seen = {}
    with mgr.catalog.connect() as con:
        for u, i in con.execute("SELECT user_id::VARCHAR, item_id::VARCHAR FROM interactions").fetchall():
            seen.setdefault(u, set()).add(i)
    assert all(r["item_id"] not in seen.get(r["user_id"], set()) for r in recs)
    # nothing new since: 'changed' recomputes nobody, and the previous lists stay visible
    again = mgr.recompute("retrieval", users="changed", k=5, progress=False)
    assert again["users"] == 0
    assert len(mgr.recommendations(alias="retrieval")) == len(recs)
    # two-stage: rerank with the ranker
    two = mgr.recompute("retrieval", users=sorted(users)[:3], k=3, ranker=ids["first"], top_m=6, progress=False)
    rows = [r for r in mgr.recommendations(alias="retrieval") if r["run_id"] == two["run_id"]]
    assert two["ranker_node_id"] == ids["first"] and len(rows) == 9


def test_concurrent_switching_never_mixes_nodes(trained):
    mgr, _, ids = trained
    scorer = mgr.scorer(ids["s1"])
    users, items = ["user q"] * 4, ["item 1", "item 2", "item 3", "item 4"]
    expected = {ids["s1"]: _model_only(scorer, users, items)}
    scorer.activate(ids["s2"])
    expected[ids["s2"]] = _model_only(scorer, users, items)
    engine = scorer._engine_for("ranker")
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            scores, label = engine.score_pairs(users, items, with_node=True, offsets=np.zeros(len(users)))
            if not np.array_equal(scores, expected[label]):
                errors.append(f"mixed scores under node {label}")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for n in range(40):
        scorer.activate(ids["s1"] if n % 2 else ids["s2"])
    stop.set()
    for t in threads:
        t.join()
    scorer.close()
    assert not errors


def test_recompute_changed_users_only_and_crash_keeps_previous_lists(trained, tmp_path):
    import os
    import subprocess
    import sys
    from datetime import timedelta

    mgr, _, ids = trained
    mgr.recompute("retrieval", users="all", k=5, progress=False)
    before = mgr.recommendations(alias="retrieval")
    # new events for two users arrive, later than everything so far
    last = max(b["ts_max"] for b in mgr.data.batches())
    users = sorted({r["user_id"] for r in before})[:2]
    items = sorted({str(r["item_id"]) for r in mgr.data.interactions()})[:2]
    path = tmp_path / "late.csv"
    lines = ["user_id,item_id,rating,ts"]
    for n, (u, i) in enumerate(zip(users, items, strict=True)):
        ts = int((last + timedelta(minutes=5 + n)).timestamp() * 1000)
        lines.append(f"{u},{i},5,{ts}")
    path.write_text("\n".join(lines) + "\n")
    mgr.data.add_source("late", str(path), mapping={"user_id": "user_id", "item_id": "item_id", "rating": "rating",
                                                    "ts": "ts"}, ts_format="epoch_ms")
    assert mgr.data.sync()
    changed = mgr.recompute("retrieval", users="changed", k=5, progress=False)
    assert changed["users"] == 2
    now = mgr.recommendations(alias="retrieval")
    fresh = {r["user_id"] for r in now if r["run_id"] == changed["run_id"]}
    assert fresh == set(users)
    untouched = [r for r in now if r["user_id"] not in users]
    assert untouched == [r for r in before if r["user_id"] not in users]

    # a crash inside the write transaction: readers keep the previous complete lists
    code = ("import sys; from adapters_mgr import AdapterManager; "
            "AdapterManager(sys.argv[1]).recompute('retrieval', users='all', k=5, progress=False)")
    proc = subprocess.run([sys.executable, "-c", code, str(mgr.root)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ADAPTERS_MGR_FAULT": "recompute:in_txn"})
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert mgr.recommendations(alias="retrieval") == now


def test_scorer_polling_follows_the_alias(trained):
    import time

    mgr, _, ids = trained
    mgr.promote(ids["s1"], "poll")
    scorer = mgr.scorer("poll")
    scorer.start_polling(0.05)
    try:
        mgr.promote(ids["s2"], "poll")
        deadline = time.monotonic() + 10
        while scorer.active != ids["s2"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scorer.active == ids["s2"]
    finally:
        scorer.close()
    with pytest.raises(InvalidInput):
        scorer.start_polling(0)


def _cli(capsys, mgr, *args):
    import json

    from adapters_mgr.cli.main import main

    capsys.readouterr()
    code = 0
    try:
        main(["--root", str(mgr.root), *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip().startswith(("{", "[")) else out), err


def test_cli_merge_score_recommend_recompute_compact(trained, capsys, tmp_path):
    mgr, b, ids = trained
    code, merged, err = _cli(capsys, mgr, "merge", str(ids["s1"]), "--method", "svd", "--target-rank", "4", "--json")
    assert code == 0, err
    assert merged["kind"] == "merged" and merged["metrics"]["reconstruction_error"] >= 0
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("user_text,item_text\nuser a,item x\nuser b,item y\n")
    code, _, err = _cli(capsys, mgr, "score", str(pairs), "--node", str(ids["s1"]), "--json")
    assert code == 2 and "prior" in err  # a ranker with the prior needs it beside raw texts
    pairs.write_text("user_text,item_text,prior_logit\nuser a,item x,0.3\nuser b,item y,-1.2\n")
    code, scored, err = _cli(capsys, mgr, "score", str(pairs), "--node", str(ids["s1"]), "--json")
    assert code == 0, err
    assert len(scored) == 2 and all(0 <= r["score"] <= 1 and r["node_id"] == ids["s1"] for r in scored)
    user = sorted({str(r["user_id"]) for r in mgr.data.interactions()})[0]
    code, recs, err = _cli(capsys, mgr, "recommend", user, "--alias", "retrieval", "--k", "3", "--json")
    assert code == 0, err
    assert len(recs["items"]) == 3 and recs["nodes"]["retriever"] == ids["ret"]
    code, run, err = _cli(capsys, mgr, "recompute", "--alias", "retrieval", "--users", "all", "--k", "2", "--json")
    assert code == 0, err
    assert run["rows"] == 2 * run["users"]
    mgr.promote(ids["s2"], "cli-compact")
    code, report, err = _cli(capsys, mgr, "compact", "cli-compact", "--max-depth", "2", "--eval-batch", b[3], "--json")
    assert code == 0, err
    assert report["compacted"] and report["moved"]
    code, _, err = _cli(capsys, mgr, "fold", str(ids["s1"]), str(tmp_path / "folded"), "--json")
    assert code == 0 and (tmp_path / "folded" / "config.json").exists(), err
    # bad input: one line, non-zero exit
    code, _, err = _cli(capsys, mgr, "merge", str(ids["s1"]), "--method", "magic")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    code, _, err = _cli(capsys, mgr, "recompute", "--alias", str(ids["s1"]), "--users", "all")
    assert code == 2 and "retriever" in err
    code, _, err = _cli(capsys, mgr, "score", str(tmp_path / "missing.csv"))
    assert code == 2 and "does not exist" in err


def test_cli_train_and_reproduce(trained, capsys):
    mgr, b, _ = trained
    code, result, err = _cli(capsys, mgr, "train", b[1], "--name", "cli-train", "--max-length", "32",
                             "--max-train-rows", "64", "--max-eval-rows", "64", "--json")
    assert code == 0, err
    assert result["train_batches"] == [b[1]] and result["eval_batches"] == [b[2]]
    code, rep, err = _cli(capsys, mgr, "reproduce", str(result["adapter_id"]), "--json")
    assert code == 0 and rep["identical"] is True, err
    code, _, err = _cli(capsys, mgr, "train", "nope")
    assert code == 3 and "no data batch 'nope'" in err
    code, _, err = _cli(capsys, mgr, "train", b[1], "--rank", "0")
    assert code == 2 and "rank" in err


def test_two_stage_reranks_many_users_per_request_with_the_same_lists(trained, capsys):
    """recommend_many sends every user's candidates in one ranker request (whole batches), and the
    lists equal one user at a time; recompute says its expected time before scoring anyone once a
    run of the same shape exists, and measures it on the first chunk otherwise."""
    mgr, _, ids = trained
    users = sorted({str(r["user_id"]) for r in mgr.data.interactions()})[:6]
    scorer = mgr.scorer("retrieval", ranker=ids["first"])
    engine = scorer._engine_for("ranker")
    requests: list[int] = []
    original = engine.score_pairs

    def counting(user_texts, item_texts, **kw):
        requests.append(len(user_texts))
        return original(user_texts, item_texts, **kw)

    engine.score_pairs = counting
    together = scorer.recommend_many(users, 3, top_m=5)
    assert len(requests) == 1 and requests[0] == 5 * len(users)
    one_by_one = {u: scorer.recommend(u, 3, top_m=5) for u in users}
    scorer.close()
    for u in users:
        assert [r["item_id"] for r in together[u]] == [r["item_id"] for r in one_by_one[u]]
        np.testing.assert_allclose([r["score"] for r in together[u]], [r["score"] for r in one_by_one[u]],
                                   rtol=1e-5, atol=1e-6)

    from adapters_mgr.serving import recommend as rec

    old = rec.PAIRS_PER_REQUEST, rec.RATE_MIN_USERS
    rec.PAIRS_PER_REQUEST, rec.RATE_MIN_USERS = 10, 1  # two users per request; any earlier run counts
    try:
        with mgr.workspace.catalog.transaction() as con:  # no earlier two-stage run to go by
            con.execute("DELETE FROM recommendations WHERE run_id IN "
                        "(SELECT id FROM recommendation_runs WHERE ranker_node_id IS NOT NULL)")
            con.execute("DELETE FROM recommendation_runs WHERE ranker_node_id IS NOT NULL")
        capsys.readouterr()
        first = mgr.recompute("retrieval", users=users, k=3, ranker=ids["first"], top_m=5, progress=True)
        err = capsys.readouterr().err
        assert f"recompute: {len(users)} user(s), two-stage" in err
        assert "measured on the first 2 user(s)" in err and first["expected_s"] > 0
        second = mgr.recompute("retrieval", users=users, k=3, ranker=ids["first"], top_m=5, progress=True)
        err = capsys.readouterr().err
        assert "expected ~" in err.splitlines()[0] and "the last run's" in err.splitlines()[0]
        assert second["expected_s"] == pytest.approx(first["wall_s"], rel=1e-6)
    finally:
        rec.PAIRS_PER_REQUEST, rec.RATE_MIN_USERS = old
    lists = {r["user_id"]: r["item_id"] for r in mgr.recommendations(alias="retrieval") if r["rank"] == 1}
    assert {u: lists[u] for u in users} == {u: one_by_one[u][0]["item_id"] for u in users}
