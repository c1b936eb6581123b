"""The as-of prior: hand-computed values without look-ahead, and a ranker that scores on top of it
(fresh = exactly the prior; added once under stacks, ensembles and merges; plain peft + the
documented offset = the scorer; old adapters without a recipe unchanged; reproduce bit-identical)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters_mgr import Conflict, InvalidInput
from adapters_mgr.catalog.db import Catalog
from adapters_mgr.catalog.sql import from_json, to_json
from adapters_mgr.data.api import DataAPI
from adapters_mgr.data.prior import NO_PRIOR, PriorRecipe, recipe_of
from adapters_mgr.lora import metrics
from adapters_mgr.lora.base_model import HeadSpec
from adapters_mgr.lora.examples import as_interactions
from adapters_mgr.lora.peft_scoring import ScoringModel
from adapters_mgr.lora.policies import build, plan
from adapters_mgr.lora.tasks import get_task
from adapters_mgr.lora.testing import synthetic_rows, tiny_base, tiny_tokenizer
from tests.stream_fixtures import synced_manager

FAST = dict(max_length=32, max_train_rows=160, max_eval_rows=120, batch_size=32, lr=5e-3, progress=False,
            ranker_shape="cross")  # the cross-encoder's head with the prior (towers: test_ranker_tower/_history)


# -- the prior itself --------------------------------------------------------------------------------------
def _log(api: DataAPI, folder: Path, lines: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ev.csv").write_text("user_id,item_id,rating,ts\n" + lines)
    api.add_source("ev", folder / "ev.csv", ts_format="epoch_s")


EVENTS = (
    "u1,i1,5,1000\n"  # like (rating >= 4)
    "u2,i1,1,2000\n"
    "u1,i2,4,3000\n"  # like; at the same second as the next event: neither sees the other
    "u2,i2,2,3000\n"
    "u1,i3,1,4000\n"
)


def test_prior_features_are_hand_computable_and_never_look_ahead(tmp_path):
    api = DataAPI(Catalog(tmp_path / "root" / "catalog.duckdb"), tmp_path / "root")
    _log(api, tmp_path / "src", EVENTS)
    api.sync(window="1d")
    k2 = PriorRecipe(shrinkage=2.0)
    rows = {(r["user_id"], r["item_id"]): r for r in api.prior_features(recipe=k2)}
    # mu = (likes + 1) / (n + 2); offset = (likes_e - n_e * mu) / (n_e + k); p = mu + offsets; logit(p)
    expected = {
        ("u1", "i1"): dict(global_n=0, user_n=0, item_n=0, prior_prob=0.5),                  # nothing before
        ("u2", "i1"): dict(global_n=1, global_likes=1, item_n=1, item_likes=1,
                           prior_prob=2 / 3 + (1 - 2 / 3) / 3),                               # 7/9
        ("u1", "i2"): dict(global_n=2, user_n=1, user_likes=1, item_n=0, prior_prob=0.5 + 0.5 / 3),  # 2/3
        ("u2", "i2"): dict(global_n=2, user_n=1, user_likes=0, item_n=0, prior_prob=0.5 - 0.5 / 3),  # the tie: 1/3
        ("u1", "i3"): dict(global_n=4, global_likes=2, user_n=2, user_likes=2, item_n=0,
                           prior_prob=0.5 + (2 - 1) / 4),                                     # 3/4
    }
    for key, want in expected.items():
        got = rows[key]
        for name, value in want.items():
            assert got[name] == pytest.approx(value, abs=1e-12), (key, name)
        assert got["prior_logit"] == pytest.approx(math.log(want["prior_prob"] / (1 - want["prior_prob"])), abs=1e-12)
    assert rows[("u1", "i1")]["user_rate"] is None and rows[("u1", "i3")]["user_rate"] == 1.0
    assert rows[("u2", "i1")]["item_rate"] == 1.0 and rows[("u2", "i1")]["global_rate"] == pytest.approx(2 / 3)

    # the same numbers for rows (training, evaluation) and for a pair as of the event's time (serving)
    ordered = api.prior_features(recipe=k2)
    assert np.array_equal(api.prior_logits(api.interactions(), k2), [r["prior_logit"] for r in ordered])
    probe = rows[("u1", "i2")]
    assert api.pair_prior_logits(["u1"], ["i2"], probe["ts"], recipe=k2)[0] == probe["prior_logit"]
    # as of now: everything synced so far (u1 has 3 events, 2 liked; i2 has 2 events, 1 liked; 5 events, 2 liked)
    mu = 3 / 7
    now = mu + (2 - 3 * mu) / 5 + (1 - 2 * mu) / 4
    assert api.pair_prior_logits(["u1"], ["i2"], recipe=k2)[0] == pytest.approx(math.log(now / (1 - now)), abs=1e-12)

    # later events change nothing before them
    with open(tmp_path / "src" / "ev.csv", "a") as fh:
        fh.write("u1,i2,1,5000\nu3,i1,5,6000\n")
    api.sync(window="1d")
    again = {(r["user_id"], r["item_id"], r["ts"]): r for r in api.prior_features(recipe=k2)}
    for r in ordered:
        assert again[(r["user_id"], r["item_id"], r["ts"])] == r
    assert api.prior_logits(api.interactions(), NO_PRIOR) is None  # 'none' adds nothing at all


def test_recipe_is_checked_and_recorded_shape_round_trips():
    assert recipe_of({}) == NO_PRIOR and recipe_of(None) == NO_PRIOR  # adapters from before the prior
    recipe = PriorRecipe(shrinkage=5.0)
    assert recipe_of({"prior_recipe": recipe.to_dict()}) == recipe
    for bad in (dict(kind="mean"), dict(shrinkage=0.0), dict(clip=0.5), dict(as_of="ts_at_or_before"),
                dict(version=99)):
        with pytest.raises(InvalidInput):
            PriorRecipe(**bad)


# -- the ranker on top of it ------------------------------------------------------------------------------
def test_fresh_ranker_with_the_prior_scores_exactly_the_prior_and_trains_on_the_sum(tmp_path):
    task = get_task("ranker", prior="bias")
    tok = tiny_tokenizer(tmp_path / "tok")
    base = tiny_base()
    model = build(task.task_model(base), task, plan(task, "fresh", [], None, 1.0, "weights", "default"), seed=3)
    try:
        rows = synthetic_rows(24, seed=1)
        offsets = np.random.default_rng(0).normal(size=len(rows)) * 2
        data = as_interactions([{**r, "prior_logit": o} for r, o in zip(rows, offsets, strict=True)],
                               need_labels=True)
        scorer = ScoringModel.from_peft(model, tok, task, ["default"], [1.0], max_length=32)
        scores = scorer.score_pairs(data.user_texts, data.item_texts, offsets=offsets)
        assert np.array_equal(scores, torch.sigmoid(torch.as_tensor(offsets, dtype=torch.float64)).numpy())
        # evaluation reports the prior alone beside the ranker: equal for a fresh one, the prior's own otherwise
        fresh = task.evaluate(scorer, data)
        assert fresh["prior_auc"] == fresh["auc"] == metrics.auc(data.labels, offsets)
        assert fresh["prior_gauc"] == fresh["gauc"] and fresh["prior_logloss"] == fresh["logloss"]
        other = SimpleNamespace(score_pairs=lambda users, items, offsets: 1 - torch.sigmoid(
            torch.as_tensor(offsets, dtype=torch.float64)).numpy())  # ranks the rows the other way round
        flipped = task.evaluate(other, data)
        assert flipped["prior_auc"] == fresh["auc"] and flipped["auc"] == pytest.approx(1 - fresh["auc"])
        constant = SimpleNamespace(score_pairs=lambda users, items: np.full(len(users), 0.5))
        assert "prior_auc" not in get_task("ranker").evaluate(constant, data)  # prior 'none': no prior to report
        # the loss sees prior + residual (residual 0 here: exactly the prior's cross-entropy)
        batch = task.collate(data, tok, 32)(list(range(len(rows))))
        want = F.binary_cross_entropy_with_logits(torch.as_tensor(offsets, dtype=torch.float32),
                                                  torch.as_tensor(data.labels, dtype=torch.float32))
        assert torch.allclose(task.loss(model, batch), want, atol=1e-6)
        # the same rows without the column are refused, not silently scored by the residual alone
        with pytest.raises(InvalidInput, match="prior_logit"):
            task.collate(as_interactions(rows, need_labels=True), tok, 32)
        # prior 'none' ignores the column: the 2-class loss of the model itself, as before the prior
        plain = get_task("ranker")
        plain_batch = plain.collate(data, tok, 32)(list(range(len(rows))))
        assert "offsets" not in plain_batch
    finally:
        from adapters_mgr.lora import adapters as peft_wiring

        peft_wiring.release(model)


def test_head_lr_lets_a_residual_head_grow_and_only_the_head_sees_it(tmp_path):
    from adapters_mgr.lora.trainer import train_adapter

    tok = tiny_tokenizer(tmp_path / "tok")
    rows = synthetic_rows(64, seed=2)
    offsets = np.random.default_rng(1).normal(size=len(rows))
    rows = [{**r, "prior_logit": o} for r, o in zip(rows, offsets, strict=True)]
    common = dict(epochs=1, lr=1e-4, batch_size=16, max_length=32, seed=0, progress=False)

    def trained_parts(**kw):
        result = train_adapter(tiny_base(), tok, get_task("ranker", prior="bias"), rows, **common, **kw)
        try:
            state = result.adapter().state_dict
            head = sum(float(v.abs().sum()) for k, v in state.items() if "classifier" in k)
            lora_a = {k: v.clone() for k, v in state.items() if "lora_A" in k}
            return head, lora_a, result.hyperparameters
        finally:
            result.release()

    head_slow, a_slow, hp_slow = trained_parts()
    head_fast, a_fast, hp_fast = trained_parts(head_lr=1e-2)
    assert head_fast > 20 * head_slow > 0  # Adam moves each weight by ~lr a step
    # the LoRA matrices keep lr: A starts seeded alike and moves by ~lr (its gradient is B's, B starts at 0)
    assert max(float((a_fast[k] - a_slow[k]).abs().max()) for k in a_fast) < 1e-3
    assert hp_fast["head_lr"] == 1e-2 and "head_lr" not in hp_slow
    with pytest.raises(InvalidInput, match="head_lr"):
        train_adapter(tiny_base(), tok, get_task("ranker", prior="bias"), rows, **common, head_lr=0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("prior")
    mgr = synced_manager(work / "root", work)
    b = [x["id"] for x in mgr.data.batches()]
    fresh = mgr.train_update([b[0]], task="ranker", name="pr", **FAST)
    stacked = mgr.train_update([b[1]], task="ranker", policy="stack", parent=fresh.node_id, name="pr", **FAST)
    return mgr, b, fresh, stacked


def _pairs(mgr, batch_id, n=6):
    rows = mgr.data.training_rows([batch_id])[:n]
    return [r["user_id"] for r in rows], [r["item_id"] for r in rows]


def _texts(mgr, users, items):
    ut = mgr.data.user_texts(sorted(set(users)))
    it = mgr.data.item_texts()
    return [ut[u] for u in users], [it[i] for i in items]


def _base(mgr, node_id):
    base_id = mgr.get(node_id).base_id
    return mgr.base_model(base_id, HeadSpec("seq_cls", 2)), mgr.tokenizer(base_id)


def _residual_probs(mgr, folders_weights, mode, users, items, node_id):
    """sigmoid(residual) per pass from ScoringModel with zero offsets: the model's part alone."""
    ut, it = _texts(mgr, users, items)
    scorer = ScoringModel(*_base(mgr, node_id), "ranker", folders_weights, mode)
    try:
        return scorer.score_pairs(ut, it, offsets=np.zeros(len(ut)))
    finally:
        scorer.release()


def _logit(p):
    return np.log(p) - np.log1p(-p)


def test_new_updates_record_the_prior_and_reproduce_bit_identically(trained):
    mgr, _, fresh, stacked = trained
    for r in (fresh, stacked):
        hp = mgr.get(r.adapter_id).hyperparams
        assert hp["prior"] == "bias" and recipe_of(hp) == PriorRecipe(shrinkage=10.0)
    assert mgr.reproduce(stacked.adapter_id)["identical"]
    # the prior is not in the folder: an export's provenance carries the recipe to an import
    exported = mgr.export(fresh.adapter_id, Path(mgr.root) / "exported")
    imported = mgr.import_peft(exported, name="pr-imported")
    assert recipe_of(mgr.get(imported).hyperparams) == PriorRecipe()


def test_the_prior_is_added_once_under_stack_ensemble_and_merge(trained):
    mgr, b, fresh, stacked = trained
    users, items = _pairs(mgr, b[2])
    prior = mgr.data.pair_prior_logits(users, items, recipe=PriorRecipe())
    folder = {r.adapter_id: str(mgr.adapter_folder(r.adapter_id)) for r in (fresh, stacked)}

    # weights: the summed deltas and the newest head give ONE residual; the prior is added to it once
    residual = _logit(_residual_probs(mgr, [(folder[fresh.adapter_id], 1.0), (folder[stacked.adapter_id], 1.0)],
                                      "weights", users, items, fresh.node_id))
    scorer = mgr.scorer(stacked.node_id)
    try:
        served_stack = scorer.score(users, items)
    finally:
        scorer.close()
    assert np.allclose(served_stack, 1 / (1 + np.exp(-(prior + residual))), atol=1e-6)

    # ensemble: each member adds the prior once to its own residual, then P(like) is averaged
    ens = mgr.stack([fresh.adapter_id, stacked.adapter_id], weights=[1.0, 3.0], mode="ensemble", name="pr-ens")
    r1 = _logit(_residual_probs(mgr, [(folder[fresh.adapter_id], 1.0)], "weights", users, items, fresh.node_id))
    r2 = _logit(_residual_probs(mgr, [(folder[stacked.adapter_id], 1.0)], "weights", users, items, fresh.node_id))
    want = 0.25 / (1 + np.exp(-(prior + r1))) + 0.75 / (1 + np.exp(-(prior + r2)))
    scorer = mgr.scorer(ens)
    try:
        assert np.allclose(scorer.score(users, items), want, atol=1e-6)
    finally:
        scorer.close()

    # an exact (cat) merge of the stack is one adapter with the same prior: it scores as the stack
    merged = mgr.merge([stacked.node_id], "cat", name="pr-merged")
    assert recipe_of(mgr.get(merged).hyperparams) == PriorRecipe()
    scorer = mgr.scorer(merged)
    try:
        assert np.allclose(scorer.score(users, items), served_stack, atol=1e-5)
        # recommend reranks with the same scores
        assert scorer.uses_prior()
    finally:
        scorer.close()


def test_plain_peft_plus_the_documented_offset_equals_the_scorer(trained):
    from peft import PeftModel
    from transformers import AutoTokenizer, BertForSequenceClassification

    mgr, b, fresh, _ = trained
    users, items = _pairs(mgr, b[3])
    source = mgr.base(mgr.get(fresh.node_id).base_id)["source"]
    model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(source),
                                      str(mgr.adapter_folder(fresh.adapter_id))).eval()
    tok = AutoTokenizer.from_pretrained(source)
    ut, it = _texts(mgr, users, items)
    with torch.no_grad():
        logits = model(**tok(ut, it, truncation=True, max_length=64, padding=True, return_tensors="pt")).logits
    residual = (logits[:, 1] - logits[:, 0]).double().numpy()
    recipe = recipe_of(mgr.get(fresh.adapter_id).hyperparams)
    offset = mgr.data.pair_prior_logits(users, items, recipe=recipe)  # the documented offset
    scorer = mgr.scorer(fresh.node_id)
    try:
        served = scorer.score(users, items)
        assert np.allclose(served, 1 / (1 + np.exp(-(offset + residual))), atol=1e-6)
        with pytest.raises(InvalidInput, match="prior_logits"):
            scorer.score_texts(ut, it)  # texts carry no ids: the prior must be given
        assert np.array_equal(scorer.score_texts(ut, it, prior_logits=offset), served)
    finally:
        scorer.close()


def test_old_adapters_without_a_recipe_behave_as_before(trained):
    mgr, b, fresh, _ = trained
    old = mgr.train_update([b[2]], task="ranker", name="old", prior="none", **FAST)
    assert recipe_of(mgr.get(old.adapter_id).hyperparams) == NO_PRIOR
    with mgr.catalog.transaction() as con:  # as registered before the prior existed: no prior keys at all
        hp = from_json(con.execute("SELECT hyperparams FROM adapters WHERE id = ?", [old.adapter_id]).fetchone()[0])
        for key in ("prior", "prior_shrinkage", "prior_recipe"):
            hp.pop(key)
        con.execute("UPDATE adapters SET hyperparams = ? WHERE id = ?", [to_json(hp), old.adapter_id])
    assert mgr.reproduce(old.adapter_id)["identical"]
    users, items = _pairs(mgr, b[3])
    ut, it = _texts(mgr, users, items)
    reference = ScoringModel(*_base(mgr, old.node_id), "ranker", [(str(mgr.adapter_folder(old.adapter_id)), 1.0)])
    try:
        softmax_probs = reference.score_pairs(ut, it)  # the model alone, float32 softmax: today's scores
    finally:
        reference.release()
    scorer = mgr.scorer(old.node_id)
    try:
        assert not scorer.uses_prior()
        assert np.allclose(scorer.score(users, items), softmax_probs, atol=1e-6)
        assert np.array_equal(scorer.score_texts(ut, it), scorer.score(users, items))
    finally:
        scorer.close()

    # 'auto' continues an old chain without the prior; asking for it on top of one is refused
    warm = mgr.train_update([b[3]], task="ranker", policy="warm_start", parent=old.node_id, name="old", **FAST)
    assert mgr.get(warm.adapter_id).hyperparams["prior"] == "none"
    with pytest.raises(Conflict, match="prior"):
        mgr.train_update([b[3]], task="ranker", policy="stack", parent=old.node_id, prior="bias", **FAST)
    # one node adds one prior: mixing adapters trained with and without it is refused
    with pytest.raises(Conflict, match="different priors"):
        mgr.stack([old.adapter_id, fresh.adapter_id], name="mixed")
    with pytest.raises(Conflict, match="different priors"):
        mgr.merge([old.adapter_id, fresh.adapter_id], "linear", name="mixed")
