"""AdapterManager.train: policies, lineage, gate, replay, reproducibility, crash safety, bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters_mgr import Conflict, InvalidInput, NotFound
from adapters_mgr.lora.base_model import HeadSpec, weights_sha256
from tests.stream_fixtures import synced_manager

REPO = Path(__file__).resolve().parents[1]
FAST = dict(max_length=32, max_train_rows=160, max_eval_rows=200, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    work = tmp_path_factory.mktemp("stream")
    mgr = synced_manager(work / "root", work)
    return mgr, [b["id"] for b in mgr.data.batches()]


def _edges(mgr, node_id):
    lin = mgr.lineage(node_id, depth=1)
    return sorted((e.parent_id, e.relation, e.weight) for e in lin.parents_of(node_id))


def _links(mgr, node_id):
    return sorted((b["batch_id"], b["role"]) for b in mgr.lineage(node_id, depth=0).batches.get(node_id, []))


def test_policies_record_their_lineage(stream):
    mgr, b = stream
    base_id = mgr.bases()[0]["id"]
    base_model = mgr.base_model(base_id, HeadSpec("seq_cls", 2))
    before = weights_sha256(base_model)

    fresh = mgr.train_update([b[0]], task="ranker", policy="fresh", name="pol", **FAST)
    assert fresh.node_id == fresh.adapter_id and _edges(mgr, fresh.node_id) == []
    assert _links(mgr, fresh.node_id) == [(b[0], "train"), (b[1], "eval")]  # prequential: the next batch
    node = mgr.get(fresh.node_id)
    assert node.metrics["primary_metric"] == "auc" and 0 <= node.metrics["auc"] <= 1
    hp = node.hyperparams
    assert hp["policy"] == "fresh" and hp["rank"] == 8 and hp["seed"] == 0 and "torch" in hp["versions"]
    assert hp["samples_per_s"] > 0 and hp["train_rows"] == 160

    warm = mgr.train_update([b[1]], task="ranker", policy="warm_start", parent=fresh.node_id, name="pol", **FAST)
    assert _edges(mgr, warm.node_id) == [(fresh.node_id, "warm_start", 1.0)]
    assert mgr.get(warm.node_id).version == 2

    parent_sha = mgr.get(fresh.node_id).weights_sha256
    st = mgr.train_update([b[1]], task="ranker", policy="stack", parent=fresh.node_id, name="pol", **FAST)
    assert st.node_id != st.adapter_id
    snode = mgr.get(st.node_id)
    assert snode.kind == "stack" and snode.stack_mode == "weights"
    assert _edges(mgr, st.node_id) == [(fresh.node_id, "stacked_on", 1.0), (st.adapter_id, "stacked_on", 1.0)]
    assert _edges(mgr, st.adapter_id)[0][:2] == (fresh.node_id, "stacked_on")
    # stacking again on the stack node keeps every member and adds the new one
    st2 = mgr.train_update([b[2]], task="ranker", policy="stack", parent=st.node_id, name="pol", **FAST)
    assert [e[0] for e in _edges(mgr, st2.node_id)] == sorted([fresh.node_id, st.adapter_id, st2.adapter_id])

    ls = mgr.train_update([b[2]], task="ranker", policy="long_short", parent=fresh.node_id, mode="ensemble",
                          name="pol", **FAST)
    lnode = mgr.get(ls.node_id)
    assert lnode.kind == "stack" and lnode.stack_mode == "ensemble"
    assert {e[0] for e in _edges(mgr, ls.node_id)} == {fresh.node_id, ls.adapter_id}
    assert _edges(mgr, ls.adapter_id) == []  # the short-term adapter is fresh

    # the shared base never changed, parents' bytes never changed, and everything verifies
    assert weights_sha256(base_model) == before
    assert mgr.get(fresh.node_id).weights_sha256 == parent_sha
    assert mgr.verify()["ok"]


def test_if_better_gate_both_branches(stream, monkeypatch):
    mgr, b = stream
    import adapters_mgr.workflows.evaluation as training  # where the gate looks evaluate_adapters up

    first = mgr.train_update([b[0]], task="ranker", name="gate", promote="always", alias="gate-prod", **FAST)
    assert first.promoted and mgr.alias_target("gate-prod") == first.node_id

    real = training.evaluate_adapters

    def fake_current(score):
        def evaluate(*args, **kwargs):
            metrics = real(*args, **kwargs)
            return {**metrics, "auc": score}
        return evaluate

    monkeypatch.setattr(training, "evaluate_adapters", fake_current(0.999))  # current looks far better
    kept = mgr.train_update([b[1]], task="ranker", name="gate", promote="if_better", alias="gate-prod", **FAST)
    assert kept.decision == "keep" and not kept.promoted
    assert mgr.alias_target("gate-prod") == first.node_id
    assert kept.baseline["auc"] == 0.999 and mgr.get(kept.node_id).metrics["baseline"]["node_id"] == first.node_id

    monkeypatch.setattr(training, "evaluate_adapters", fake_current(0.0))  # current looks far worse
    better = mgr.train_update([b[1]], task="ranker", name="gate", promote="if_better", alias="gate-prod",
                              seed=1, **FAST)
    assert better.decision == "promote" and mgr.alias_target("gate-prod") == better.node_id
    gates = [json.loads(e["detail"]) for e in mgr.events(limit=50, operation="promotion_gate")]
    assert {g["decision"] for g in gates} >= {"keep", "promote"}
    assert all("new_metric" in g and "current_metric" in g for g in gates)


def test_replay_is_recorded_and_reproducible(stream):
    mgr, b = stream
    r = mgr.train_update([b[2]], task="ranker", name="replay", replay_ratio=0.5, **FAST)
    assert r.extra["replay_batches"] and set(r.extra["replay_batches"]) <= {b[0], b[1]}
    assert {(x, "replay") for x in r.extra["replay_batches"]} <= set(_links(mgr, r.node_id))
    again = mgr.reproduce(r.adapter_id)
    assert again["identical"], again


def test_retriever_and_holdout_eval(stream):
    mgr, b = stream
    r = mgr.train_update([b[-1]], task="retriever", name="ret", **FAST)  # no later batch: held-out tail
    node = mgr.get(r.node_id)
    assert node.task == "retriever" and node.hyperparams["eval"] == "holdout_tail"
    assert node.metrics["primary_metric"] == "ndcg@10" and 0 <= node.metrics["recall@10"] <= 1
    assert _links(mgr, r.node_id) == [(b[-1], "train")]


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        ({"batches": ["nope"]}, NotFound, "no data batch 'nope'"),
        ({"rank": 0}, InvalidInput, "rank"),
        ({"policy": "warm_start"}, InvalidInput, "needs a parent"),
        ({"policy": "fresh", "parent": 1}, InvalidInput, "takes no parent"),
        ({"policy": "sideways"}, InvalidInput, "unknown policy"),
        ({"task": "classifier"}, InvalidInput, "unknown task"),
        ({"promote": "sometimes"}, InvalidInput, "invalid promote"),
        ({"epochs": 0}, InvalidInput, "epochs"),
        ({"warmup_ratio": 1.0}, InvalidInput, "warmup_ratio"),
        ({"eval_batches": ["b000001"], "batches": ["b000001"]}, InvalidInput, "both training and evaluation"),
        ({"bogus_knob": 1}, InvalidInput, "unknown training option"),
    ],
)
def test_bad_arguments_fail_before_any_work(stream, kwargs, error, needle):
    mgr, b = stream
    before = {a.id for a in mgr.list(status="all")}
    kwargs = dict(kwargs)
    batches = kwargs.pop("batches", [b[0]])
    with pytest.raises(error, match=needle):
        mgr.train_update(batches, name="bad", **{"progress": False, **kwargs})
    assert {a.id for a in mgr.list(status="all")} == before


def test_parent_of_another_task_is_refused(stream):
    mgr, b = stream
    ret_id = mgr.train_update([b[0]], task="retriever", name="ret2", **FAST).node_id
    with pytest.raises(Conflict, match="retriever adapter, not ranker"):
        mgr.train_update([b[1]], task="ranker", policy="warm_start", parent=ret_id, **FAST)


@pytest.mark.parametrize("point", ["train:trained", "train:in_txn"])
def test_crash_mid_training_leaves_no_visible_adapter(stream, point, tmp_path):
    mgr, b = stream
    before = {a.id for a in mgr.list(status="all")}
    code = (
        "import sys; from adapters_mgr import AdapterManager; "
        "m = AdapterManager(sys.argv[1]); "
        "m.train([sys.argv[2]], name='crash', max_length=32, max_train_rows=64, max_eval_rows=64, progress=False)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(mgr.root), b[0]], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "ADAPTERS_MGR_FAULT": point}, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert {a.id for a in mgr.list(status="all")} == before
    mgr.gc(grace=0)  # right after: no other writer
    assert mgr.verify()["ok"]


def test_warmup_ratio_is_used_recorded_and_reproduced(stream):
    mgr, b = stream
    plain = mgr.train_update([b[0]], task="ranker", name="warm0", lr=5e-3, **FAST)
    warm = mgr.train_update([b[0]], task="ranker", name="warm5", lr=5e-3, warmup_ratio=0.5, **FAST)
    assert mgr.get(warm.adapter_id).hyperparams["warmup_ratio"] == 0.5
    assert mgr.get(plain.adapter_id).hyperparams["warmup_ratio"] == 0.0
    assert mgr.get(warm.adapter_id).weights_sha256 != mgr.get(plain.adapter_id).weights_sha256
    assert mgr.reproduce(warm.adapter_id)["identical"]


def test_text_templates_are_recorded_and_reused_by_reproduce(stream):
    """The texts are part of the recipe: a later template change must not break reproduction."""
    from adapters_mgr.data.texts import load_templates, set_template

    mgr, b = stream
    before = load_templates(mgr.data.catalog)
    custom = "{item_stats} Item {item_id}: {title}."
    set_template(mgr.data.catalog, "item", custom)
    try:
        r = mgr.train_update([b[1]], task="ranker", name="tpl", lr=5e-3, replay_ratio=0.5, **FAST)
        assert r.extra["replay_batches"]  # the replayed rows' texts come from the recorded templates too
        assert mgr.get(r.adapter_id).hyperparams["templates"] == {**before, "item": custom}
        set_template(mgr.data.catalog, "item", before["item"])  # the catalog moves on
        assert mgr.reproduce(r.adapter_id)["identical"]
        other = mgr.train_update([b[1]], task="ranker", name="tpl", lr=5e-3, replay_ratio=0.5, **FAST)
        assert mgr.get(other.adapter_id).weights_sha256 != mgr.get(r.adapter_id).weights_sha256  # texts matter
    finally:
        set_template(mgr.data.catalog, "item", before["item"])


def test_serving_renders_texts_with_the_templates_the_node_was_trained_on(stream):
    from adapters_mgr.data.texts import load_templates, set_template

    mgr, b = stream
    before = load_templates(mgr.data.catalog)
    trained_on = {**before, "item": "{item_stats} Item {item_id}: {title}."}
    set_template(mgr.data.catalog, "item", trained_on["item"])
    try:
        r = mgr.train_update([b[0]], task="ranker", name="tplserve", ranker_shape="cross", **FAST)  # rendered texts
        set_template(mgr.data.catalog, "item", before["item"])  # the catalog moves on
        scorer = mgr.scorer(r.node_id)
        assert scorer.recorded_templates(mgr.get(r.node_id)) == trained_on
        pair = mgr.data.training_rows([b[1]])[0]
        u, i = pair["user_id"], pair["item_id"]

        def by_texts(templates):
            return scorer.score_texts([mgr.data.user_texts([u], templates=templates)[u]],
                                      [mgr.data.item_texts(templates=templates)[i]],
                                      prior_logits=scorer.prior_logits([u], [i]))[0]

        served = scorer.score([u], [i])[0]
        assert served == by_texts(trained_on) and served != by_texts(before)
        # a merge keeps its source's templates (svd: a cat merge of one adapter is refused as a copy)
        merged = mgr.merge([r.node_id], "svd", target_rank=2, name="tplserve-merged")
        assert scorer.recorded_templates(mgr.get(merged)) == trained_on
    finally:
        set_template(mgr.data.catalog, "item", before["item"])
