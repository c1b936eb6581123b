"""Trainer, policies and scoring on a tiny random BERT (fast; no hub)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adapters_mgr.errors import InvalidInput
from adapters_mgr.lora.adapters import has_injected_adapters, release
from adapters_mgr.lora.peft_scoring import ScoringModel, evaluate_adapters
from adapters_mgr.lora.policies import build, plan
from adapters_mgr.lora.settings import LoraSettings
from adapters_mgr.lora.tasks import get_task
from adapters_mgr.lora.testing import item_catalog, synthetic_rows, tiny_base, tiny_tokenizer
from adapters_mgr.lora.trainer import train_adapter

FAST = dict(epochs=1, lr=5e-3, batch_size=16, max_length=32, progress=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def rows():
    return synthetic_rows(96, seed=0)


@pytest.fixture(scope="module")
def eval_rows():
    return synthetic_rows(48, seed=1)


def state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def folder_bytes(folder: Path) -> bytes:
    return (Path(folder) / "adapter_model.safetensors").read_bytes()


def plain_ranker_probs(model, tok, rows):
    batch = tok([r["user_text"] for r in rows], [r["item_text"] for r in rows], padding=True,
                truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**batch).logits, -1)[:, 1].numpy()


def plain_embeddings(model, tok, texts):
    batch = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def trained_folder(tmp_path, tok, rows, name, seed, kind="seq_cls", task="ranker"):
    base = tiny_base(kind)
    result = train_adapter(base, tok, task, rows, seed=seed, **FAST)
    folder = result.save(tmp_path / name)
    result.release()
    return folder


def test_fresh_ranker_saves_plain_peft_folder_and_leaves_base_unchanged(tmp_path, tok, rows, eval_rows):
    from peft import PeftModel

    base = tiny_base()
    before = state_hash(base)
    result = train_adapter(base, tok, "ranker", rows, eval_examples=eval_rows, **FAST)
    assert {"auc", "gauc", "logloss", "train_loss"} <= set(result.metrics)
    assert result.trainable_params > 0 and result.samples_per_s > 0 and result.steps == 6
    served = result.scorer().score_pairs([r["user_text"] for r in eval_rows], [r["item_text"] for r in eval_rows])
    folder = result.save(tmp_path / "a")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert any("classifier" in k for k in load_file(folder / "adapter_model.safetensors"))  # head saved
    bare = result.release()
    assert bare is base and not has_injected_adapters(base)
    assert state_hash(base) == before

    plain = PeftModel.from_pretrained(tiny_base(head_seed=123), str(folder)).eval()
    np.testing.assert_allclose(plain_ranker_probs(plain, tok, eval_rows), served, rtol=0, atol=1e-6)
    scorer = ScoringModel(base, tok, "ranker", [(folder, 1.0)], max_length=32)
    np.testing.assert_allclose(scorer.score_pairs([r["user_text"] for r in eval_rows],
                                                  [r["item_text"] for r in eval_rows]), served, atol=1e-6)
    scorer.release()
    assert state_hash(base) == before


def test_fresh_retriever_one_lora_for_both_towers(tmp_path, tok, rows):
    from peft import PeftModel

    base = tiny_base("encoder")
    before = state_hash(base)
    eval_set = {"rows": synthetic_rows(40, seed=3), "catalog": item_catalog(), "seen": {"u1": {"i0", "i1"}}}
    result = train_adapter(base, tok, "retriever", rows, eval_examples=eval_set, **FAST)
    assert {"recall@10", "ndcg@10", "hr@10"} <= set(result.metrics)
    texts = list(item_catalog().values())[:5]
    served = result.scorer().encode_items(texts)
    folder = result.save(tmp_path / "r")
    result.release()
    assert state_hash(base) == before
    plain = PeftModel.from_pretrained(tiny_base("encoder"), str(folder)).eval()
    np.testing.assert_allclose(plain_embeddings(plain, tok, texts), served, atol=1e-6)
    # the retriever shares a seq-cls base too: its backbone is used, the head ignored
    shared = tiny_base("seq_cls")
    shared.bert.load_state_dict(tiny_base("encoder").state_dict(), strict=False)  # same backbone, + pooler
    scorer = ScoringModel(shared, tok, "retriever", [(folder, 1.0)], max_length=32)
    np.testing.assert_allclose(scorer.encode_users(texts), served, atol=1e-6)
    users = scorer.encode_users(texts[:2])
    np.testing.assert_allclose(scorer.score_pairs(texts[:2], texts[1:3]),
                               np.sum(users * scorer.encode_items(texts[1:3]), 1), atol=1e-6)
    scorer.release()
    assert not has_injected_adapters(shared)


def test_reproducible_same_seed_same_bytes(tmp_path, tok, rows):
    base = tiny_base()
    first = train_adapter(base, tok, "ranker", rows, seed=7, **FAST)
    a = first.save(tmp_path / "a")
    first.release()
    second = train_adapter(tiny_base(head_seed=99), tok, "ranker", rows, seed=7, **FAST)  # other random head
    b = second.save(tmp_path / "b")
    second.release()
    assert folder_bytes(a) == folder_bytes(b)
    third = train_adapter(base, tok, "ranker", rows, seed=8, **FAST)
    assert folder_bytes(third.save(tmp_path / "c")) != folder_bytes(a)


def test_warm_start_starts_from_parent_and_leaves_it_untouched(tmp_path, tok, rows):
    from peft import get_peft_model_state_dict

    parent = trained_folder(tmp_path, tok, rows, "parent", seed=1)
    parent_bytes = folder_bytes(parent)
    task = get_task("ranker")
    base = tiny_base()
    model = build(task.task_model(base), task, plan(task, "warm_start", [parent], None, 1.0, "weights", "v2"), 0)
    initial = get_peft_model_state_dict(model, adapter_name="v2")
    saved = load_file(parent / "adapter_model.safetensors")
    assert set(initial) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(initial[key], tensor), key
    release(model)

    result = train_adapter(base, tok, "ranker", rows, policy="warm_start", parents=[parent], seed=2, **FAST)
    assert result.settings == LoraSettings()
    trained = get_peft_model_state_dict(result.model, adapter_name="default")
    assert any(not torch.equal(trained[k], saved[k]) for k in saved)
    result.release()
    assert folder_bytes(parent) == parent_bytes
    with pytest.raises(InvalidInput, match="warm_start keeps the parent's LoRA shape"):
        train_adapter(base, tok, "ranker", rows, policy="warm_start", parents=[parent],
                      settings=LoraSettings(r=4), **FAST)


def test_stack_parents_frozen_bit_identical_and_served_as_weights(tmp_path, tok, rows, eval_rows):
    from peft import get_peft_model_state_dict

    p0 = trained_folder(tmp_path, tok, rows, "p0", seed=1)
    p1 = trained_folder(tmp_path, tok, rows, "p1", seed=2)
    before = {p: folder_bytes(p) for p in (p0, p1)}
    base = tiny_base()
    result = train_adapter(base, tok, "ranker", rows, policy="stack", parents=[(p0, 0.5), (p1, 0.8)],
                           new_weight=1.0, adapter_name="v3", seed=3, **FAST)
    assert result.node_names == ["parent_0", "parent_1", "v3"] and result.node_weights == [0.5, 0.8, 1.0]
    for name, folder in (("parent_0", p0), ("parent_1", p1)):
        in_model = get_peft_model_state_dict(result.model, adapter_name=name)
        for key, tensor in load_file(folder / "adapter_model.safetensors").items():
            assert torch.equal(in_model[key], tensor), (name, key)
        assert folder_bytes(folder) == before[folder]
    users, items = [r["user_text"] for r in eval_rows], [r["item_text"] for r in eval_rows]
    served = result.scorer().score_pairs(users, items)
    new = result.save(tmp_path / "v3")
    result.release()
    scorer = ScoringModel(base, tok, "ranker", [(p0, 0.5), (p1, 0.8), (new, 1.0)], "weights", max_length=32)
    np.testing.assert_allclose(scorer.score_pairs(users, items), served, atol=1e-6)
    scorer.release()
    with pytest.raises(InvalidInput, match="mode must be 'weights'"):
        train_adapter(base, tok, "ranker", rows, policy="stack", parents=[p0], mode="ensemble", **FAST)


def test_long_short_ensemble_is_weighted_mean_of_separate_outputs(tmp_path, tok, rows, eval_rows):
    long_term = trained_folder(tmp_path, tok, rows, "long", seed=1)
    base = tiny_base()
    newest = synthetic_rows(64, seed=5, flip=True)
    result = train_adapter(base, tok, "ranker", newest, policy="long_short", parents=[(long_term, 3.0)],
                           new_weight=1.0, mode="ensemble", eval_examples=eval_rows, seed=4, **FAST)
    users, items = [r["user_text"] for r in eval_rows], [r["item_text"] for r in eval_rows]
    combined = result.scorer().score_pairs(users, items)
    short = result.save(tmp_path / "short")
    result.release()
    separate = []
    for folder in (long_term, short):
        scorer = ScoringModel(base, tok, "ranker", [(folder, 1.0)], max_length=32)
        separate.append(scorer.score_pairs(users, items))
        scorer.release()
    np.testing.assert_allclose(combined, 0.75 * separate[0] + 0.25 * separate[1], atol=1e-6)
    metrics = evaluate_adapters(base, tok, "ranker", [(long_term, 3.0), (short, 1.0)], eval_rows, "ensemble",
                                max_length=32)
    assert metrics["auc"] == pytest.approx(result.metrics["auc"])
    assert not has_injected_adapters(base)


def test_retriever_weights_mode_equals_plain_peft_scaled_sum_and_ensemble_concat(tmp_path, tok, rows):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    a = trained_folder(tmp_path, tok, rows, "ra", seed=1, kind="encoder", task="retriever")
    b = trained_folder(tmp_path, tok, rows, "rb", seed=2, kind="encoder", task="retriever")
    texts = list(item_catalog().values())[:6]
    base = tiny_base("encoder")
    scorer = ScoringModel(base, tok, "retriever", [(a, 0.5), (b, 2.0)], "weights", max_length=32)
    ours = scorer.encode_items(texts)
    scorer.release()
    plain = PeftModel.from_pretrained(tiny_base("encoder"), str(a), adapter_name="a")
    plain.load_adapter(str(b), adapter_name="b")
    plain.base_model.set_adapter(["a", "b"])
    for module in plain.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("a", 0.5)
            module.set_scale("b", 2.0)
    np.testing.assert_allclose(plain_embeddings(plain.eval(), tok, texts), ours, atol=1e-6)

    ens = ScoringModel(base, tok, "retriever", [(a, 1.0), (b, 3.0)], "ensemble", max_length=32)
    sims = ens.score_pairs(texts, texts[::-1])
    ens.release()
    single = []
    for folder in (a, b):
        s = ScoringModel(base, tok, "retriever", [(folder, 1.0)], max_length=32)
        single.append(s.score_pairs(texts, texts[::-1]))
        s.release()
    np.testing.assert_allclose(sims, 0.25 * single[0] + 0.75 * single[1], atol=1e-6)


def test_in_memory_adapter_scores_like_its_folder(tmp_path, tok, rows, eval_rows):
    base = tiny_base()
    result = train_adapter(base, tok, "ranker", rows, **FAST)
    memory, folder = result.adapter(), result.save(tmp_path / "m")
    result.release()
    users, items = [r["user_text"] for r in eval_rows], [r["item_text"] for r in eval_rows]
    outs = []
    for source in (memory, folder):
        scorer = ScoringModel(base, tok, "ranker", [(source, 1.0)], max_length=32)
        outs.append(scorer.score_pairs(users, items))
        scorer.release()
    np.testing.assert_array_equal(outs[0], outs[1])
    stacked = train_adapter(base, tok, "ranker", rows, policy="stack", parents=[(memory, 1.0)], **FAST)
    stacked.release()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(settings="r=8"), "settings must be a LoraSettings"),
        (dict(task="classifier"), "unknown task"),
        (dict(policy="rewind"), "unknown policy"),
        (dict(train_examples=[]), "empty"),
        (dict(train_examples=[{"user_id": 1}]), "lack the column"),
        (dict(epochs=0), "epochs must be a positive integer"),
        (dict(lr=-1.0), "lr must be a positive"),
        (dict(policy="warm_start"), "needs exactly one parent"),
        (dict(policy="fresh", parents=["/nonexistent/adapter"]), "needs no parent"),
        (dict(policy="stack", parents=["/nonexistent/adapter"]), "not a PEFT adapter folder"),
        (dict(train_examples=[{"user_id": 1, "item_id": 2, "user_text": "a", "item_text": "b", "label": 3}]),
         "labels must be 0 or 1"),
    ],
)
def test_bad_arguments_fail_before_any_work(tok, rows, kwargs, message):
    from adapters_mgr.errors import AdaptersMgrError

    base = tiny_base()
    args = dict(task="ranker", train_examples=rows) | kwargs
    with pytest.raises(AdaptersMgrError, match=message):
        train_adapter(base, tok, args.pop("task"), args.pop("train_examples"), **(FAST | args))
    assert not has_injected_adapters(base)


def test_rank_must_be_positive():
    for r in (0, -2):
        with pytest.raises(InvalidInput, match="rank r must be a positive integer"):
            LoraSettings(r=r)
    assert LoraSettings(r=4).to_peft_config("ranker").task_type == "SEQ_CLS"
    assert LoraSettings().to_peft_config("retriever").task_type == "FEATURE_EXTRACTION"


def test_retriever_needs_positives_and_ranker_needs_seq_cls_base(tok, rows):
    with pytest.raises(InvalidInput, match="no positive"):
        train_adapter(tiny_base("encoder"), tok, "retriever", [r | {"label": 0} for r in rows], **FAST)
    with pytest.raises(InvalidInput, match="sequence-classification base"):
        train_adapter(tiny_base("encoder"), tok, "ranker", rows, **FAST)


def test_crash_mid_training_leaves_base_bare(tok, rows, monkeypatch):
    from adapters_mgr.lora.tasks.ranker import RankerTask

    calls = []

    def exploding_loss(self, model, batch):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return model(**batch).loss

    monkeypatch.setattr(RankerTask, "loss", exploding_loss)
    base = tiny_base()
    before = state_hash(base)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(base, tok, "ranker", rows, **FAST)
    assert not has_injected_adapters(base) and state_hash(base) == before


def test_scorer_with_a_bad_adapter_leaves_base_bare(tmp_path, tok, rows):
    from adapters_mgr.errors import NotFound

    good = trained_folder(tmp_path, tok, rows, "good", seed=1)
    base = tiny_base()
    with pytest.raises(NotFound):
        ScoringModel(base, tok, "ranker", [(good, 1.0), (tmp_path / "missing", 1.0)])
    assert not has_injected_adapters(base)
    with pytest.raises(InvalidInput, match="unknown combination mode"):
        ScoringModel(base, tok, "ranker", [(good, 1.0)], mode="average")
    retriever_folder = trained_folder(tmp_path, tok, rows, "rv", seed=1, kind="encoder", task="retriever")
    with pytest.raises(InvalidInput, match="FEATURE_EXTRACTION adapter"):
        train_adapter(base, tok, "ranker", rows, policy="stack", parents=[retriever_folder], **FAST)


def test_retriever_reproducible_and_only_new_adapter_trains(tmp_path, tok, rows):
    base = tiny_base("encoder")
    folders = []
    for name in ("x", "y"):
        result = train_adapter(base, tok, "retriever", rows, seed=3, **FAST)
        folders.append(result.save(tmp_path / name))
        result.release()
    assert folder_bytes(folders[0]) == folder_bytes(folders[1])
    # an adapter named like a module ('query') must not unfreeze the parents' query LoRA
    result = train_adapter(base, tok, "retriever", rows, policy="stack", parents=[folders[0]],
                           adapter_name="query", seed=3, **FAST)
    stacked = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert stacked == set()  # frozen again after training
    from adapters_mgr.lora.adapters import freeze

    freeze(result.model, "query")
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all(".query.weight" in n or n.split(".")[-2] == "query" for n in trainable)
    assert not any("parent_0" in n for n in trainable)
    result.release()
