"""The history ranker (``ranker_shape='history'``): the user is the mean of the item-tower vectors of
what they liked minus what they disliked before; residual = scale * cos(user, item) + bias on top of
the as-of prior. Texts without look-ahead, a fresh one scores exactly the prior, plain peft plus the
documented formula equals the scorer, reproduce is bit-identical, a gate against a cross-encoder
scores each node on its own texts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters_mgr import Conflict, InvalidInput
from adapters_mgr.catalog.db import Catalog
from adapters_mgr.data.api import DataAPI
from adapters_mgr.data.prior import PriorRecipe
from adapters_mgr.lora import adapters as peft_wiring
from adapters_mgr.lora.examples import as_interactions
from adapters_mgr.lora.history_text import SEP, TREND_K, History, content_template, format_history, parse_history
from adapters_mgr.lora.peft_scoring import ScoringModel
from adapters_mgr.lora.policies import build, plan
from adapters_mgr.lora.ranker_shape import RankerShape, shape_of
from adapters_mgr.lora.tasks import get_task
from adapters_mgr.lora.tasks.ranker import tower_probabilities
from adapters_mgr.lora.testing import tiny_base, tiny_tokenizer
from tests.helpers import assert_reranks_with_its_own_scores, pairs_of, served_scores, sigmoid
from tests.stream_fixtures import synced_manager

FAST = dict(max_length=32, max_train_rows=160, max_eval_rows=120, batch_size=32, lr=5e-3, progress=False,
            ranker_shape="history")
ITEM = "{item_stats} {title} ({year}). Genres: {genres}."


# -- the texts ----------------------------------------------------------------------------------------------
def test_the_history_format_round_trips_and_drops_the_statistics():
    assert content_template(ITEM) == "{title} ({year}). Genres: {genres}."
    assert content_template("{title}, mean {item_mean:.2f} of {item_count}") == "{title}, mean of"
    text = format_history(["A (1990).", f"B{SEP}x"], ["C."])
    assert parse_history(text) == (["A (1990).", "B x"], ["C."], [], [])
    assert parse_history("") == ([], [], [], [])
    assert parse_history("Just a title") == (["Just a title"], [], [], [])  # hand-written: liked
    # the trend's segments are told apart from the user's, whatever the titles start with
    text = format_history(["*A"], ["-B"], ["C", "*A"], ["+D"])
    assert parse_history(text) == History(["*A"], ["-B"], ["C", "*A"], ["+D"])


def test_the_trend_term_is_new_history_rankers_own_and_old_records_score_without_it():
    assert RankerShape(shape="history").trend and not RankerShape(shape="tower").trend
    old = RankerShape.from_dict({"shape": "history", "scale": 2.0, "bias": 0.1, "version": 1})  # before the trend
    assert not old.trend
    cos, trend = np.array([0.5, -0.5]), np.array([1.0, -1.0])
    assert np.allclose(tower_probabilities(cos, old, None, trend), sigmoid(2.0 * cos + 0.1))
    new = RankerShape(shape="history").learned(2.0, 0.1, 3.0)
    assert np.allclose(tower_probabilities(cos, new, np.zeros(2), trend), sigmoid(2.0 * cos + 0.1 + 3.0 * trend))
    with pytest.raises(InvalidInput, match="trend cosines"):
        tower_probabilities(cos, new)
    with pytest.raises(InvalidInput, match="only history rankers"):
        RankerShape(shape="tower", trend=True)


def _api_with(tmp_path: Path, events: str) -> DataAPI:
    api = DataAPI(Catalog(tmp_path / "root" / "catalog.duckdb"), tmp_path / "root")
    (tmp_path / "src").mkdir(parents=True, exist_ok=True)
    (tmp_path / "src" / "ev.csv").write_text("user_id,item_id,rating,ts\n" + events)
    (tmp_path / "src" / "items.csv").write_text(
        "item_id,title,year,genres\ni1,One,1991,Drama\ni2,Two,1992,Comedy\ni3,Three,1993,Horror\n")
    api.add_source("ev", tmp_path / "src" / "ev.csv", ts_format="epoch_s")
    api.add_source("items", tmp_path / "src" / "items.csv", kind="items", list_attrs={"genres": "|"})
    api.sync(window="1d")
    return api


def test_history_texts_are_hand_computable_and_never_look_ahead(tmp_path):
    api = _api_with(tmp_path, "u1,i1,5,1000\nu1,i2,2,2000\nu1,i3,4,3000\nu2,i1,1,3000\nu1,i1,5,3000\n")
    one, two, three = "One (1991). Genres: Drama.", "Two (1992). Genres: Comedy.", "Three (1993). Genres: Horror."
    assert api.item_content_texts(item_template=ITEM) == {"i1": one, "i2": two, "i3": three}
    rows = [r for r in api.interactions() if r["user_id"] == "u1"]
    users, items = api.history_texts(rows, ITEM)
    by_item = {(r["item_id"], r["ts"].timestamp()): (u, i) for r, u, i in zip(rows, users, items, strict=True)}
    # the user's own likes and dislikes, then the trend: everyone's (here u1's alone until t=3000)
    assert by_item[("i1", 1000.0)] == ("", one)                                # nothing before
    assert by_item[("i2", 2000.0)] == (format_history([one], [], [one], []), two)  # i1 liked (5)
    # at t=3000: i1 and i2 before (newest first per side); i3, u2's i1 and u1's second i1 share the
    # instant: unseen, for the user and the trend alike
    assert by_item[("i3", 3000.0)] == (format_history([one], [two], [one], [two]), three)
    assert by_item[("i1", 3000.0)][0] == format_history([one], [two], [one], [two])
    # as of a time (serving): strictly before it; none: everything synced so far, newest first (time,
    # then item id, descending); a user without events still sees the trend
    assert api.user_history_texts(["u1"], rows[2]["ts"], item_template=ITEM)["u1"] == format_history(
        [one], [two], [one], [two])
    trend = ([three, one, one], [one, two])  # u2's dislike of i1 at t=3000 is the newest dislike
    assert api.user_history_texts(["u1", "u9"], item_template=ITEM) == {
        "u1": format_history([three, one, one], [two], *trend), "u9": format_history([], [], *trend)}


def test_the_trend_keeps_the_crowds_newest_events_per_side(tmp_path):
    likes = "".join(f"u{k % 7},i{1 + k % 3},5,{1000 + 10 * k}\n" for k in range(TREND_K + 20))
    api = _api_with(tmp_path, likes + "u1,i2,1,100000\n")
    contents = api.item_content_texts(item_template=ITEM)
    newest = [contents[f"i{1 + k % 3}"] for k in reversed(range(20, TREND_K + 20))]
    text = api.user_history_texts(["u9"], item_template=ITEM)["u9"]
    assert parse_history(text) == History([], [], newest, [contents["i2"]])
    # training rows at two times: each sees the K newest before ITS time (the read starts at the
    # K-th newest before the earliest row, so the later row still gets its own window)
    rows = sorted((r for r in api.interactions() if r["item_id"] in ("i1", "i2")), key=lambda r: r["ts"])
    early, late = rows[-3], rows[-1]  # a like near the end, and the dislike
    users, _ = api.history_texts([early, late], ITEM)
    k_early = int((early["ts"].timestamp() - 1000) // 10)
    want_early = [contents[f"i{1 + k % 3}"] for k in reversed(range(max(0, k_early - TREND_K), k_early))]
    assert parse_history(users[0]).trend_liked == want_early and parse_history(users[1]).trend_liked == newest
    # as of the dislike's instant: it is not seen yet; the likes before are
    assert parse_history(api.user_history_texts(["u9"], "1970-01-02T03:46:40Z", item_template=ITEM)["u9"]) == \
        History([], [], newest, [])


# -- the model ----------------------------------------------------------------------------------------------
def _history_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    titles = [f"movie {k} about {w}" for k, w in enumerate(["war", "love", "space", "ghosts", "money", "cats"])]
    rows = []
    for _ in range(n):
        liked = list(rng.choice(titles, size=rng.integers(0, 4), replace=False))
        disliked = list(rng.choice(titles, size=rng.integers(0, 3), replace=False))
        trend = [list(rng.choice(titles, size=rng.integers(0, 5))) for _ in range(2)]
        rows.append({"user_id": f"u{rng.integers(5)}", "item_id": "x",
                     "user_text": format_history(liked, disliked, *trend),
                     "item_text": str(rng.choice(titles)), "label": int(rng.integers(2)),
                     "prior_logit": float(rng.normal() * 2)})
    return rows


def test_a_fresh_history_ranker_scores_the_prior_and_trains_like_it_scores(tmp_path):
    task = get_task("ranker", prior="bias", shape="history")
    assert task.peft_task_type == "FEATURE_EXTRACTION" and task.scalars()
    tok = tiny_tokenizer(tmp_path / "tok")
    model = build(task.task_model(tiny_base()), task, plan(task, "fresh", [], None, 1.0, "weights", "default"), seed=3)
    try:
        data = as_interactions(_history_rows(24, 1), need_labels=True)
        scorer = ScoringModel.from_peft(model, tok, task, ["default"], [1.0], max_length=32)
        scores = scorer.score_pairs(data.user_texts, data.item_texts, offsets=data.offsets)
        assert np.array_equal(scores, torch.sigmoid(torch.as_tensor(data.offsets, dtype=torch.float64)).numpy())
        # the training loss sees prior + scale * cos(profile, candidate) + bias with the scoring cosine
        with torch.no_grad():
            task.scalars()[0].copy_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
        model.eval()
        batch = task.collate(data, tok, 32)(list(range(len(data))))
        loss = task.loss(model, batch)
        probs = task.pass_scores(model, tok, data.user_texts, data.item_texts, max_length=32, batch_size=8,
                                 device=torch.device("cpu"))  # no offsets: sigmoid(residual)
        z = torch.logit(torch.as_tensor(probs))  # the residual of each pair
        assert np.ptp(z.numpy()) > 0  # histories and items differ: the test can tell
        labels = torch.as_tensor(data.labels).double()
        want = F.binary_cross_entropy_with_logits(torch.as_tensor(data.offsets) + z, labels)
        assert torch.allclose(loss.double(), want, atol=1e-4)
        loss.backward()
        assert float(task.scalars()[0].grad[0].abs()) > 0 and float(task.scalars()[0].grad[2].abs()) > 0
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0
                   for n, p in model.named_parameters() if "lora_" in n)  # the item tower learns too
    finally:
        peft_wiring.release(model)


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    work = tmp_path_factory.mktemp("history")
    mgr = synced_manager(work / "root", work)
    b = [x["id"] for x in mgr.data.batches()]
    fresh = mgr.train_update([b[0], b[1]], task="ranker", name="hi", **FAST)
    stacked = mgr.train_update([b[2]], task="ranker", policy="stack", parent=fresh.node_id, name="hi",
                               **{**FAST, "ranker_shape": "auto"})
    return mgr, b, fresh, stacked





def _plain_peft_cosines(mgr, node_id, folders, users, items):
    """cos(unit(mean liked - mean disliked), item), for the user's and the trend's sides, with plain
    peft: AutoModel + the folder(s), mean-pooled."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    source = mgr.base(mgr.get(node_id).base_id)["source"]
    tok = AutoTokenizer.from_pretrained(source)
    template = mgr.data.templates()["item"]
    histories = mgr.data.user_history_texts(sorted(set(users)), item_template=template)
    contents = mgr.data.item_content_texts(item_template=template)
    model = AutoModel.from_pretrained(source)
    for k, folder in enumerate(folders):
        model = PeftModel.from_pretrained(model, folder, adapter_name=f"a{k}") if k == 0 else model
        if k:
            model.load_adapter(folder, adapter_name=f"a{k}")
    if len(folders) > 1:
        model.base_model.set_adapter([f"a{k}" for k in range(len(folders))])
    model.eval()

    def encode(texts):
        enc = tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).double().numpy()

    def cosine(liked, disliked, item):
        profile = (encode(liked).mean(0) if liked else 0) - (encode(disliked).mean(0) if disliked else 0)
        norm = np.linalg.norm(profile)
        return float(encode([contents[item]])[0] @ (profile / norm)) if norm > 0 else 0.0

    out = []
    for user, item in zip(users, items, strict=True):
        h = parse_history(histories[user])
        out.append((cosine(h.liked, h.disliked, item), cosine(h.trend_liked, h.trend_disliked, item)))
    return np.array(out).T


def test_updates_record_the_history_shape_and_reproduce_bit_identically(history):
    mgr, _, fresh, stacked = history
    f_shape = shape_of(mgr.get(fresh.adapter_id).hyperparams)
    s_shape = shape_of(mgr.get(stacked.adapter_id).hyperparams)
    assert f_shape.history and s_shape.history and f_shape.scale != 0.0
    assert f_shape.trend and f_shape.trend_scale != 0.0 and f_shape.start_trend_scale == 0.0
    assert (s_shape.start_scale, s_shape.start_bias, s_shape.start_trend_scale) == (
        f_shape.scale, f_shape.bias, f_shape.trend_scale)
    assert mgr.reproduce(fresh.adapter_id)["identical"]
    assert mgr.reproduce(stacked.adapter_id)["identical"]


def test_plain_peft_plus_the_documented_formula_equals_the_scorer(history):
    mgr, b, fresh, stacked = history
    users, items = pairs_of(mgr, b[3])
    prior = mgr.data.pair_prior_logits(users, items, recipe=PriorRecipe())
    shape = shape_of(mgr.get(fresh.adapter_id).hyperparams)
    cos, trend = _plain_peft_cosines(mgr, fresh.node_id, [str(mgr.adapter_folder(fresh.adapter_id))], users, items)
    served = served_scores(mgr, fresh.node_id, users, items)
    assert np.allclose(served, sigmoid(prior + shape.scale * cos + shape.bias + shape.trend_scale * trend), atol=1e-6)
    assert np.ptp(served - sigmoid(prior)) > 0 and np.ptp(trend) > 0
    # a stack: the summed deltas' vectors, the newest member's numbers, the prior once
    newest = shape_of(mgr.get(stacked.adapter_id).hyperparams)
    cos2, trend2 = _plain_peft_cosines(mgr, fresh.node_id,
                                       [str(mgr.adapter_folder(r.adapter_id)) for r in (fresh, stacked)], users, items)
    want = sigmoid(prior + newest.scale * cos2 + newest.bias + newest.trend_scale * trend2)
    assert np.allclose(served_scores(mgr, stacked.node_id, users, items), want, atol=1e-6)


def test_a_gate_scores_a_cross_encoder_baseline_on_its_own_texts(history):
    mgr, b, fresh, _ = history
    cross = mgr.train_update([b[1]], task="ranker", name="hx", **{**FAST, "ranker_shape": "cross"})
    mgr.set_alias("hx-prod", cross.node_id)
    gated = mgr.train_update([b[2]], task="ranker", name="hi-gated", alias="hx-prod", promote="if_better",
                             eval_batches=[b[3]], **FAST)
    assert gated.baseline["node_id"] == cross.node_id
    # the cross baseline read rendered texts, as when it was trained: the same figure as in a cross update
    mgr.set_alias("hx-prod", cross.node_id)  # the gate may have promoted the history ranker
    alone = mgr.train_update([b[2]], task="ranker", name="hx2", alias="hx-prod", promote="if_better",
                             eval_batches=[b[3]], **{**FAST, "ranker_shape": "cross"})
    assert gated.baseline["auc"] == pytest.approx(alone.baseline["auc"], abs=1e-12)
    with pytest.raises(Conflict, match="different shapes"):
        mgr.stack([cross.adapter_id, fresh.adapter_id], name="mixed-h")


def test_a_history_ranker_reranks_the_retrievers_candidates_with_its_own_scores(history):
    mgr, b, fresh, _ = history
    retriever = mgr.train_update([b[0]], task="retriever", name="hi-ret",
                                 **{k: v for k, v in FAST.items() if k != "ranker_shape"})
    users = sorted({str(r["user_id"]) for r in mgr.data.interactions()})[:4]
    assert_reranks_with_its_own_scores(mgr, retriever.node_id, fresh.node_id, users)
