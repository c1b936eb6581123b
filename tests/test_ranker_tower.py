"""The two-tower ranker (``ranker_shape='tower'``): residual = scale * cos(user, item) + bias on top of
the as-of prior, scale and bias learned outside the standard PEFT folder and recorded with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters_mgr import Conflict, InvalidInput
from adapters_mgr.data.prior import PriorRecipe
from adapters_mgr.lora import adapters as peft_wiring
from adapters_mgr.lora.examples import as_interactions
from adapters_mgr.lora.peft_scoring import ScoringModel
from adapters_mgr.lora.policies import build, plan
from adapters_mgr.lora.ranker_shape import RankerShape, shape_of
from adapters_mgr.lora.tasks import get_task
from adapters_mgr.lora.testing import synthetic_rows, tiny_base, tiny_tokenizer
from adapters_mgr.lora.trainer import train_adapter
from tests.helpers import assert_reranks_with_its_own_scores, pairs_of, served_scores, sigmoid
from tests.stream_fixtures import synced_manager

FAST = dict(max_length=32, max_train_rows=160, max_eval_rows=120, batch_size=32, lr=5e-3, progress=False,
            ranker_shape="tower")


def _rows_with_offsets(n: int, seed: int) -> list[dict]:
    rows = synthetic_rows(n, seed=seed)
    offsets = np.random.default_rng(seed).normal(size=n) * 2
    return [{**r, "prior_logit": float(o)} for r, o in zip(rows, offsets, strict=True)]


def test_a_fresh_tower_scores_exactly_the_prior_and_its_loss_sees_the_sum(tmp_path):
    task = get_task("ranker", prior="bias", shape="tower")
    assert task.peft_task_type == "FEATURE_EXTRACTION" and task.scalars()
    tok = tiny_tokenizer(tmp_path / "tok")
    model = build(task.task_model(tiny_base()), task, plan(task, "fresh", [], None, 1.0, "weights", "default"), seed=3)
    try:
        assert not any("classifier" in n for n, _ in model.named_parameters())  # no head: the encoder alone
        data = as_interactions(_rows_with_offsets(24, 1), need_labels=True)
        scorer = ScoringModel.from_peft(model, tok, task, ["default"], [1.0], max_length=32)
        scores = scorer.score_pairs(data.user_texts, data.item_texts, offsets=data.offsets)
        assert np.array_equal(scores, torch.sigmoid(torch.as_tensor(data.offsets, dtype=torch.float64)).numpy())
        batch = task.collate(data, tok, 32)(list(range(len(data))))
        loss = task.loss(model, batch)
        want = F.binary_cross_entropy_with_logits(torch.as_tensor(data.offsets), torch.as_tensor(data.labels).double())
        assert torch.allclose(loss.double(), want, atol=1e-5)
        loss.backward()  # scale gets a gradient from the frozen encoder's cosine at once: no saddle at 0
        assert float(task.scalars()[0].grad[0].abs()) > 0
    finally:
        peft_wiring.release(model)


def test_training_moves_scale_and_bias_and_records_them_with_the_start(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    rows = _rows_with_offsets(64, 2)
    result = train_adapter(tiny_base(), tok, get_task("ranker", prior="bias", shape="tower"), rows, epochs=1,
                           lr=1e-3, batch_size=16, max_length=32, seed=0, progress=False, eval_examples=rows)
    try:
        recorded = shape_of(result.hyperparameters)
        assert recorded.tower and recorded.scale != 0.0 and recorded.bias != 0.0
        assert (recorded.start_scale, recorded.start_bias) == (0.0, 0.0)
        assert recorded.restart() == RankerShape(shape="tower")
        assert result.task.learned()["ranker_recipe"] == recorded.to_dict()
        assert 0.0 <= result.metrics["auc"] <= 1.0
    finally:
        result.release()


def test_a_bad_shape_is_refused_in_one_line():
    with pytest.raises(InvalidInput, match="ranker shape 'towers' is unknown"):
        get_task("ranker", shape="towers")
    with pytest.raises(InvalidInput, match="finite"):
        RankerShape(shape="tower", scale=float("nan"))


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    work = tmp_path_factory.mktemp("tower")
    mgr = synced_manager(work / "root", work)
    b = [x["id"] for x in mgr.data.batches()]
    fresh = mgr.train_update([b[0]], task="ranker", name="tw", **FAST)
    stacked = mgr.train_update([b[1]], task="ranker", policy="stack", parent=fresh.node_id, name="tw",
                               **{**FAST, "ranker_shape": "auto"})
    return mgr, b, fresh, stacked




def _cosines(mgr, node_id, folders_weights, users, items, mode="weights"):
    """The towers' cosine per pair with plain peft: AutoModel + the folder(s), mean-pooled, unit norm."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    source = mgr.base(mgr.get(node_id).base_id)["source"]
    tok = AutoTokenizer.from_pretrained(source)
    ut = mgr.data.user_texts(sorted(set(users)))
    it = mgr.data.item_texts()

    def encode(model, texts):
        enc = tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).double().numpy()

    model = AutoModel.from_pretrained(source)
    for k, (folder, _) in enumerate(folders_weights):
        if k == 0:
            model = PeftModel.from_pretrained(model, folder, adapter_name=f"a{k}")
        else:
            model.load_adapter(folder, adapter_name=f"a{k}")
    names = [f"a{k}" for k in range(len(folders_weights))]
    if len(names) > 1:
        model.base_model.set_adapter(names)
    model.eval()
    return np.sum(encode(model, [ut[u] for u in users]) * encode(model, [it[i] for i in items]), axis=1)



def test_updates_record_the_tower_and_reproduce_bit_identically(towers):
    mgr, _, fresh, stacked = towers
    f_shape = shape_of(mgr.get(fresh.adapter_id).hyperparams)
    s_shape = shape_of(mgr.get(stacked.adapter_id).hyperparams)
    assert f_shape.tower and s_shape.tower and f_shape.scale != 0.0
    # the stacked adapter continued its parent's numbers: it started where the parent ended
    assert (s_shape.start_scale, s_shape.start_bias) == (f_shape.scale, f_shape.bias)
    assert mgr.get(stacked.adapter_id).hyperparams["ranker_shape"] == "tower"  # 'auto' resolved before recording
    config = json.loads((mgr.adapter_folder(fresh.adapter_id) / "adapter_config.json").read_text())
    assert config["task_type"] == "FEATURE_EXTRACTION"
    assert mgr.reproduce(fresh.adapter_id)["identical"]
    assert mgr.reproduce(stacked.adapter_id)["identical"]


def test_plain_peft_plus_the_documented_offset_equals_the_scorer(towers):
    mgr, b, fresh, _ = towers
    users, items = pairs_of(mgr, b[3])
    shape = shape_of(mgr.get(fresh.adapter_id).hyperparams)
    cos = _cosines(mgr, fresh.node_id, [(str(mgr.adapter_folder(fresh.adapter_id)), 1.0)], users, items)
    offset = mgr.data.pair_prior_logits(users, items, recipe=PriorRecipe())
    served = served_scores(mgr, fresh.node_id, users, items)
    assert np.allclose(served, sigmoid(offset + shape.scale * cos + shape.bias), atol=1e-6)
    assert np.ptp(served - sigmoid(offset)) > 0  # the towers add something: the test can tell


def test_the_prior_is_added_once_under_stack_ensemble_and_merge(towers):
    mgr, b, fresh, stacked = towers
    users, items = pairs_of(mgr, b[2])
    prior = mgr.data.pair_prior_logits(users, items, recipe=PriorRecipe())
    folder = {r.adapter_id: str(mgr.adapter_folder(r.adapter_id)) for r in (fresh, stacked)}
    newest = shape_of(mgr.get(stacked.adapter_id).hyperparams)

    # weights: the summed deltas' cosine, the NEWEST member's scale and bias, the prior once
    cos = _cosines(mgr, fresh.node_id, [(folder[fresh.adapter_id], 1.0), (folder[stacked.adapter_id], 1.0)],
                   users, items)
    served_stack = served_scores(mgr, stacked.node_id, users, items)
    assert np.allclose(served_stack, sigmoid(prior + newest.scale * cos + newest.bias), atol=1e-6)

    # ensemble: each member alone (the node's newest numbers), the prior once per member, P(like) averaged
    ens = mgr.stack([fresh.adapter_id, stacked.adapter_id], weights=[1.0, 3.0], mode="ensemble", name="tw-ens")
    c1 = _cosines(mgr, fresh.node_id, [(folder[fresh.adapter_id], 1.0)], users, items)
    c2 = _cosines(mgr, fresh.node_id, [(folder[stacked.adapter_id], 1.0)], users, items)
    want = 0.25 * sigmoid(prior + newest.scale * c1 + newest.bias) + 0.75 * sigmoid(prior + newest.scale * c2
                                                                                         + newest.bias)
    assert np.allclose(served_scores(mgr, ens, users, items), want, atol=1e-6)

    # an exact (cat) merge of the stack is one tower with the stack's numbers: it scores as the stack
    merged = mgr.merge([stacked.node_id], "cat", name="tw-merged")
    assert shape_of(mgr.get(merged).hyperparams) == newest
    assert np.allclose(served_scores(mgr, merged, users, items), served_stack, atol=1e-5)


def test_shapes_do_not_mix_and_the_shape_travels_with_an_export(towers):
    mgr, b, fresh, _ = towers
    cross = mgr.train_update([b[2]], task="ranker", name="cx", **{**FAST, "ranker_shape": "cross"})
    assert not shape_of(mgr.get(cross.adapter_id).hyperparams).tower
    with pytest.raises(Conflict, match="different shapes"):
        mgr.stack([cross.adapter_id, fresh.adapter_id], name="mixed")
    with pytest.raises(Conflict, match="tower rankers"):
        mgr.train_update([b[3]], task="ranker", policy="stack", parent=fresh.node_id, name="tw",
                         **{**FAST, "ranker_shape": "cross"})
    with pytest.raises(InvalidInput, match="ranker_shape is for the ranker"):
        mgr.train_update([b[3]], task="retriever", name="rt", **FAST)
    # the scale and bias are not in the folder: an export's provenance carries them to an import
    exported = mgr.export(fresh.adapter_id, Path(mgr.root) / "exported-tower")
    imported = mgr.import_peft(exported, name="tw-imported")
    assert shape_of(mgr.get(imported).hyperparams) == shape_of(mgr.get(fresh.adapter_id).hyperparams)
    users, items = pairs_of(mgr, b[3])
    assert np.array_equal(served_scores(mgr, imported, users, items), served_scores(mgr, fresh.node_id, users, items))
    # a bare-encoder folder registered as a ranker without its numbers is refused before anything is stored
    count = len(mgr.list())
    with pytest.raises(InvalidInput, match="scale and bias must be given"):
        mgr.register(mgr.adapter_folder(fresh.adapter_id), name="tw-bare", task="ranker")
    assert len(mgr.list()) == count


def test_one_scorer_switches_between_a_cross_and_a_tower_ranker(towers):
    mgr, b, fresh, _ = towers
    cross = mgr.train_update([b[1]], task="ranker", name="cx2", **{**FAST, "ranker_shape": "cross"})
    users, items = pairs_of(mgr, b[3])
    want_tower = served_scores(mgr, fresh.node_id, users, items)
    want_cross = served_scores(mgr, cross.node_id, users, items)
    scorer = mgr.scorer(fresh.node_id)
    try:
        assert np.array_equal(scorer.score(users, items), want_tower)
        scorer.activate(cross.node_id)
        assert np.array_equal(scorer.score(users, items), want_cross)
        scorer.activate(fresh.node_id)
        assert np.array_equal(scorer.score(users, items), want_tower)
    finally:
        scorer.close()


def test_a_folded_tower_is_a_plain_encoder_and_records_its_numbers(towers):
    from transformers import AutoModel

    mgr, b, _, stacked = towers
    out = mgr.fold(stacked.node_id, Path(mgr.root) / "folded-tower")
    record = json.loads((out / "adapters_mgr_fold.json").read_text())
    newest = shape_of(mgr.get(stacked.adapter_id).hyperparams)
    assert RankerShape.from_dict(record["ranker_recipe"]) == newest
    users, items = pairs_of(mgr, b[2])
    ut = mgr.data.user_texts(sorted(set(users)))
    it = mgr.data.item_texts()
    tok = mgr.tokenizer(mgr.get(stacked.node_id).base_id)
    model = AutoModel.from_pretrained(out).eval()  # no peft: the deltas are in the weights

    def encode(texts):
        enc = tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).double().numpy()

    cos = np.sum(encode([ut[u] for u in users]) * encode([it[i] for i in items]), axis=1)
    prior = mgr.data.pair_prior_logits(users, items, recipe=PriorRecipe())
    want = sigmoid(prior + newest.scale * cos + newest.bias)
    assert np.allclose(served_scores(mgr, stacked.node_id, users, items), want, atol=1e-5)


def test_a_tower_reranks_the_retrievers_candidates_with_its_own_scores(towers):
    mgr, b, fresh, _ = towers
    retriever = mgr.train_update([b[0]], task="retriever", name="tw-ret",
                                 **{k: v for k, v in FAST.items() if k != "ranker_shape"})
    users = sorted({str(r["user_id"]) for r in mgr.data.interactions()})[:4]
    assert_reranks_with_its_own_scores(mgr, retriever.node_id, fresh.node_id, users)
