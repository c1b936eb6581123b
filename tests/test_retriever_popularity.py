"""The retriever's as-of popularity term: hand-computed counts without look-ahead, a fresh retriever
that ranks exactly like popularity, the logQ correction of the in-batch softmax by hand, the learned
weights recorded with the adapter (the folder stays plain PEFT), the scorer's recommendations equal
to evaluation's ranking, and old retriever adapters (no recipe) unchanged."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters_mgr import InvalidInput
from adapters_mgr.catalog.db import Catalog
from adapters_mgr.data import popularity
from adapters_mgr.data.api import DataAPI
from adapters_mgr.data.popularity import NO_POPULARITY, PopularityRecipe, recipe_of, start_recipe_of
from adapters_mgr.lora import metrics
from adapters_mgr.lora.examples import as_interactions
from adapters_mgr.lora.peft_scoring import ScoringModel
from adapters_mgr.lora.policies import build, plan
from adapters_mgr.lora.tasks import get_task
from adapters_mgr.lora.tasks import retriever as retriever_mod
from adapters_mgr.lora.tasks.retriever import embed_batch
from adapters_mgr.lora.testing import item_catalog, synthetic_rows, tiny_base, tiny_tokenizer
from adapters_mgr.workflows.evaluation import retriever_task, with_eval_popularity
from tests.stream_fixtures import synced_manager

FAST = dict(max_length=32, max_train_rows=160, max_eval_rows=120, batch_size=32, lr=5e-3, progress=False)
EVENTS = (
    "u1,i1,5,1000\n"
    "u2,i1,1,2000\n"
    "u1,i2,4,3000\n"  # at the same second as the next event: neither counts the other
    "u2,i2,2,3000\n"
    "u1,i3,1,4000\n"
    "u3,i1,5,4000\n"
)


# -- the counts ----------------------------------------------------------------------------------------
def test_popularity_counts_are_as_of_and_hand_computable(tmp_path: Path):
    api = DataAPI(Catalog(tmp_path / "root" / "catalog.duckdb"), tmp_path / "root")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ev.csv").write_text("user_id,item_id,rating,ts\n" + EVENTS)
    api.add_source("ev", tmp_path / "src" / "ev.csv", ts_format="epoch_s")
    api.sync(window="1d")
    rows = sorted(api.interactions(), key=lambda r: (r["ts"], r["user_id"]))
    keys = [(r["user_id"], r["item_id"]) for r in rows]
    counts = dict(zip(keys, api.row_popularity(rows).tolist(), strict=True))
    # each row counts its item's events strictly before its own time (never itself, never a tie)
    assert counts == {("u1", "i1"): 0, ("u2", "i1"): 1, ("u1", "i2"): 0, ("u2", "i2"): 0,
                      ("u1", "i3"): 0, ("u3", "i1"): 2}
    likes = dict(zip(keys, api.row_popularity(rows, PopularityRecipe(events="likes")).tolist(), strict=True))
    assert likes[("u3", "i1")] == 1  # u2's rating 1 is no like
    items = ["i1", "i2", "i3", "unknown"]
    assert api.item_popularity(items).tolist() == [3, 2, 1, 0]  # serving: everything synced so far
    at = datetime.fromtimestamp(3000, UTC)
    assert api.item_popularity(items, at).tolist() == [2, 0, 0, 0]  # strictly before 3000
    assert api.item_popularity(items, "1970-01-01T00:50:00.000001Z").tolist() == [2, 2, 0, 0]
    recipe = PopularityRecipe(smoothing=2.0)
    assert np.allclose(recipe.term([0, 3]), np.log([2.0, 5.0]))
    # the recipe round-trips through the catalog's record; adapters without one have none
    assert recipe_of({popularity.RECORD_KEY: recipe.to_dict()}) == recipe
    assert recipe_of({}) == NO_POPULARITY and not NO_POPULARITY.used
    assert retriever_mod.RECORD_KEY == popularity.RECORD_KEY
    with pytest.raises(InvalidInput, match="smoothing"):
        PopularityRecipe(smoothing=0)


def test_decayed_counts_halve_every_half_life_and_stay_as_of(tmp_path: Path):
    day = 86_400
    api = DataAPI(Catalog(tmp_path / "root" / "catalog.duckdb"), tmp_path / "root")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ev.csv").write_text(
        "user_id,item_id,rating,ts\n"
        f"u1,i1,5,{10 * day}\n"  # day 10
        f"u2,i1,5,{24 * day}\n"  # day 24
        f"u3,i1,1,{24 * day}\n"  # day 24, no like
        f"u3,i2,4,{31 * day}\n"  # day 31
        f"u4,i1,4,{38 * day}\n"  # day 38
    )
    api.add_source("ev", tmp_path / "src" / "ev.csv", ts_format="epoch_s")
    api.sync(window="7d")
    recipe = PopularityRecipe(events="likes", half_life_days=14.0)
    rows = sorted(api.interactions(), key=lambda r: (r["ts"], r["user_id"]))
    got = dict(zip([(r["user_id"], r["item_id"]) for r in rows], api.row_popularity(rows, recipe).tolist(),
                   strict=True))
    # u4 on day 38 sees i1's likes of day 10 (28 days = 2 half-lives: 0.25) and day 24 (14 days: 0.5)
    assert got[("u4", "i1")] == pytest.approx(0.75)
    assert got[("u2", "i1")] == pytest.approx(0.5) and got[("u3", "i1")] == pytest.approx(0.5)  # ties: not yet
    assert got[("u1", "i1")] == 0.0 and got[("u3", "i2")] == 0.0
    at = datetime.fromtimestamp(38 * day, UTC)
    assert api.item_popularity(["i1", "i2", "x"], at, recipe=recipe) == pytest.approx([0.75, 0.5 ** 0.5, 0.0])
    # serving: aged at the newest synced event (day 38, plus the one microsecond that makes it count)
    served = api.item_popularity(["i1", "i2"], recipe=recipe)
    assert served == pytest.approx([1.75, 0.5 ** 0.5], rel=1e-6)
    # all events, decayed: the rating-1 event of day 24 counts too
    every = PopularityRecipe(half_life_days=14.0)
    assert api.item_popularity(["i1"], at, recipe=every) == pytest.approx([1.25])
    # recipes recorded before the half-life existed read back without decay
    old = {k: v for k, v in PopularityRecipe().to_dict().items() if k != "half_life_days"}
    assert recipe_of({popularity.RECORD_KEY: old}).half_life_days is None
    assert recipe_of({popularity.RECORD_KEY: recipe.to_dict()}) == recipe
    # a half-life too short for an item's span is refused in one line, not answered with overflow
    with pytest.raises(InvalidInput, match="half-life .* too short"):
        api.row_popularity(rows, PopularityRecipe(half_life_days=0.01))
    with pytest.raises(InvalidInput, match="half_life_days"):
        PopularityRecipe(half_life_days=0)


# -- the task ------------------------------------------------------------------------------------------
def _fresh(task, seed: int = 0):
    return build(task.task_model(tiny_base("encoder")), task, plan(task, "fresh", [], None, 1.0, "weights", "default"),
                 seed=seed)


def test_a_fresh_retriever_with_the_popularity_term_ranks_exactly_like_popularity(tmp_path):
    task = get_task("retriever", popularity=PopularityRecipe().to_dict())
    scorer = ScoringModel.from_peft(_fresh(task), tiny_tokenizer(tmp_path / "tok"), task, ["default"], [1.0],
                                    max_length=32)
    rows = synthetic_rows(120, seed=3)
    catalog = item_catalog()
    items = list(catalog)
    counts = {i: float(n) for n, i in enumerate(items)}  # distinct counts: no ties
    eval_set = {"rows": rows, "catalog": catalog, "seen": {}, "popularity": counts}
    got = task.evaluate(scorer, task.parse_eval(eval_set))
    parsed = task.parse_eval(eval_set)
    users, relevant, exclude = metrics.ranking_targets(parsed.rows.user_ids.tolist(), parsed.rows.item_ids.tolist(),
                                                      items, {})
    pop_scores = np.tile(np.array([counts[i] for i in items]), (len(users), 1))
    expected = metrics.ranking_metrics(pop_scores, relevant, exclude, k=10)
    assert got["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-12)
    assert (got["sim_weight"], got["pop_weight"]) == (0.0, 1.0)
    # the whole score matrix orders each user's items by popularity
    emb = scorer.encode_items([catalog[i] for i in items])
    s = task.scores(scorer.encode_users(["someone"]), emb, [counts[i] for i in items])
    assert np.array_equal(np.argsort(-s[0], kind="stable"), np.argsort(-pop_scores[0], kind="stable"))
    with pytest.raises(InvalidInput, match="popularity"):
        task.evaluate(scorer, task.parse_eval({**eval_set, "popularity": None}))
    # the cosine-only recipe ignores counts, as every retriever before
    plain = get_task("retriever")
    assert plain.learned() == {} and plain.scalars() == []


@pytest.mark.parametrize("logq", [True, False])
def test_logq_correction_changes_the_loss_as_computed_by_hand(logq, tmp_path):
    task = get_task("retriever", popularity={**PopularityRecipe(logq=logq).to_dict(), "sim_weight": 8.0,
                                             "pop_weight": 0.7})
    tok = tiny_tokenizer(tmp_path / "tok")
    model = _fresh(task)
    cols = {"user_id": ["a", "b", "c", "d", "a"], "item_id": ["x", "x", "y", "z", "w"],
            "user_text": ["ua", "ub", "uc", "ud", "ua"], "item_text": ["ix", "ix", "iy", "iz", "iw"],
            "item_pop_count": [9, 12, 3, 0, 1]}
    data = task.parse_train(cols)
    batch = task.collate(data, tok, 32)([0, 1, 2, 3])  # rows 0..3: users a b c d, items x x y z
    with torch.no_grad():
        loss = float(task.loss(model, dict(batch)))
        emb = embed_batch(model, {k: v for k, v in batch.items() if k.startswith(("input", "attention", "token"))})
    u, i = emb[:4].double().numpy(), emb[4:].double().numpy()
    pop = np.log(np.array([9, 12, 3, 0]) + 1.0)
    q = np.array([2, 2, 1, 1]) / 5  # each row's item's share of the 5 training rows (x twice)
    logits = 8.0 * (u @ i.T) + 0.7 * pop[None, :] - (np.log(q)[None, :] if logq else 0.0)
    mask = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)  # rows 0 and 1 share item x
    logits[mask] = -np.inf

    def ce(z):
        return float(np.mean([np.log(np.exp(r - r.max()).sum()) + r.max() - r[j] for j, r in enumerate(z)]))

    assert loss == pytest.approx((ce(logits) + ce(logits.T)) / 2, rel=1e-5)
    # the correction matters: the same batch without it gives another loss
    other = get_task("retriever", popularity={**PopularityRecipe(logq=not logq).to_dict(), "sim_weight": 8.0,
                                              "pop_weight": 0.7})
    with torch.no_grad():
        assert float(other.loss(model, dict(other.collate(data, tok, 32)([0, 1, 2, 3])))) != pytest.approx(loss)
    with pytest.raises(InvalidInput, match="item_pop_count"):
        task.collate(as_interactions({k: v for k, v in cols.items() if k != "item_pop_count"},
                                     need_labels=False), tok, 32)


# -- the workflow, the catalog and serving -------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("popularity")
    mgr = synced_manager(work / "root", work)
    b = [x["id"] for x in mgr.data.batches()]
    fresh = mgr.train_update([b[0]], eval_batches=[b[1]], task="retriever", name="rp", **FAST)
    return mgr, b, fresh


def test_training_learns_and_records_the_weights_outside_a_plain_peft_folder(trained):
    mgr, b, fresh = trained
    hp = mgr.get(fresh.adapter_id).hyperparams
    recipe = recipe_of(hp)
    assert recipe.used and hp["popularity"] == "log"
    assert (recipe.events, recipe.half_life_days) == ("likes", 14.0)  # a fresh retriever's term
    assert (recipe.sim_weight, recipe.pop_weight) != (0.0, 1.0)  # training moved them
    assert (start_recipe_of(hp).sim_weight, start_recipe_of(hp).pop_weight) == (0.0, 1.0)
    metrics_ = mgr.get(fresh.adapter_id).metrics
    assert metrics_["sim_weight"] == pytest.approx(recipe.sim_weight)
    # plain peft loads the folder (no extra keys: the weights live in the catalog)
    from peft import PeftModel
    from transformers import BertModel

    source = mgr.base(mgr.get(fresh.node_id).base_id)["source"]
    PeftModel.from_pretrained(BertModel.from_pretrained(source), str(mgr.adapter_folder(fresh.adapter_id)))
    assert mgr.reproduce(fresh.adapter_id)["identical"]  # trains again from the recorded starting weights
    # a warm start continues from the learned weights
    warm = mgr.train_update([b[1]], task="retriever", policy="warm_start", parent=fresh.node_id, name="rp", **FAST)
    start = start_recipe_of(mgr.get(warm.adapter_id).hyperparams)
    assert (start.sim_weight, start.pop_weight) == (recipe.sim_weight, recipe.pop_weight)
    assert (start.events, start.half_life_days) == ("likes", 14.0)  # the parent's term, continued
    # another term under the parent's learned weights is refused before any training
    from adapters_mgr.errors import Conflict

    before = len(mgr.list())
    with pytest.raises(Conflict, match="half-life"):
        mgr.train_update([b[1]], task="retriever", policy="warm_start", parent=fresh.node_id, name="rp",
                         popularity_half_life=0, **FAST)
    assert len(mgr.list()) == before


def test_scorer_recommendations_equal_the_evaluation_ranking(trained):
    mgr, b, fresh = trained
    ws = mgr.workspace
    node = mgr.get(fresh.node_id)
    recipe = ws.popularity_recipe([node])
    batch = next(x for x in mgr.data.batches() if x["id"] == b[2])
    as_of = batch["ts_min"]
    users = sorted({str(r["user_id"]) for r in mgr.data.interactions([b[2]])})[:8]
    scorer = mgr.scorer(fresh.node_id)
    try:
        served = scorer.recommend_many(users, k=5, exclude_seen=False, as_of=as_of)
        # evaluation's scores for the same node, texts and time
        task = retriever_task(recipe)
        catalog = mgr.data.item_texts(as_of, templates=node.hyperparams["templates"])
        ids = sorted(catalog)
        examples = with_eval_popularity(ws, {"catalog": catalog, "as_of": as_of}, recipe)
        user_text = mgr.data.user_texts(users, as_of, templates=node.hyperparams["templates"])
        model = ScoringModel(ws.base_model(node.base_id, task.head), ws.tokenizer(node.base_id), task,
                             [(mgr.adapter_folder(fresh.adapter_id), 1.0)], max_length=scorer.max_length)
        try:
            scores = task.scores(model.encode_users([user_text[u] for u in users]),
                                 model.encode_items([catalog[i] for i in ids]),
                                 [examples["popularity"][i] for i in ids])
        finally:
            model.release()
        for n, user in enumerate(users):
            expected = [ids[j] for j in np.argsort(-scores[n], kind="stable")[:5]]
            assert [r["item_id"] for r in served[user]] == expected
            assert [r["score"] for r in served[user]] == pytest.approx(sorted(scores[n], reverse=True)[:5], abs=1e-5)
    finally:
        scorer.close()


def test_old_retrievers_without_a_recipe_score_the_cosine_as_before(trained):
    mgr, b, _ = trained
    ws = mgr.workspace
    old = mgr.train_update([b[2]], task="retriever", name="old", popularity="none", **FAST)
    node = mgr.get(old.adapter_id)
    hp = node.hyperparams
    assert recipe_of(hp) == NO_POPULARITY and "sim_weight" not in node.metrics
    users = sorted({str(r["user_id"]) for r in mgr.data.interactions([b[3]])})[:4]
    task = retriever_task(NO_POPULARITY)
    model = ScoringModel(ws.base_model(node.base_id, task.head), ws.tokenizer(node.base_id), task,
                         [(mgr.adapter_folder(old.adapter_id), 1.0)], max_length=64)  # the Scorer's default
    try:
        user_text = mgr.data.user_texts(users, templates=hp["templates"])
        user_emb = model.encode_users([user_text[u] for u in users])
    finally:
        model.release()
    scorer = mgr.scorer(old.node_id)
    try:
        ids, item_emb = scorer.item_embeddings()
        served = scorer.recommend_many(users, k=5, exclude_seen=False)
        for n, user in enumerate(users):
            cos = user_emb[n] @ item_emb.T
            assert [r["score"] for r in served[user]] == pytest.approx(sorted(cos, reverse=True)[:5], abs=1e-6)
    finally:
        scorer.close()
    # and popularity 'log' is the retriever's alone
    with pytest.raises(InvalidInput, match="retriever"):
        mgr.train_update([b[2]], task="ranker", popularity="log", **FAST)
