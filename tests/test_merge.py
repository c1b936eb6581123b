"""Merge methods, reconstruction error, recipes, fold export and input checks (tiny random BERT)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters_mgr.errors import Conflict, InvalidInput
from adapters_mgr.lora.adapters import has_injected_adapters
from adapters_mgr.lora.merge import METHODS, fold, merge_adapters
from adapters_mgr.lora.peft_scoring import ScoringModel
from adapters_mgr.lora.testing import tiny_base, tiny_tokenizer
from adapters_mgr.serving.engine import HotSwapModel

USERS = ["user 1 age 20", "user 2 age 21 likes jazz", "user 3 group a", "user 4 likes rock film"]
ITEMS = ["item 3 genre rock", "item 4 genre jazz", "item 5 genre pop song", "item 6 genre folk"]


def make_adapter(folder: Path, seed: int, r: int = 4, kind: str = "seq_cls",
                 targets: tuple[str, ...] = ("query", "value")) -> Path:
    """A LoRA with random A and B (so it changes outputs) and, for the ranker, a random head."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import ModulesToSaveWrapper

    torch.manual_seed(seed)
    task_type = "SEQ_CLS" if kind == "seq_cls" else "FEATURE_EXTRACTION"
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type=task_type,
                        init_lora_weights=False)
    model = get_peft_model(tiny_base(kind), config)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            for p in module.modules_to_save["default"].parameters():
                p.data.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    return folder


def state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def plain_probs(model, tok) -> np.ndarray:
    batch = tok(USERS, ITEMS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**batch).logits.float(), -1)[:, 1].numpy()


def fresh_peft_probs(folder: Path, tok) -> np.ndarray:
    from peft import PeftModel

    return plain_probs(PeftModel.from_pretrained(tiny_base("seq_cls"), str(folder)).eval(), tok)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def ads(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(root / "a", seed=1, r=2),
        "b": make_adapter(root / "b", seed=2, r=4),
        "c": make_adapter(root / "c", seed=3, r=4),
        "q_only": make_adapter(root / "q_only", seed=4, r=4, targets=("query",)),
        "ret": make_adapter(root / "ret", seed=5, r=4, kind="encoder"),
        "ret2": make_adapter(root / "ret2", seed=6, r=2, kind="encoder"),
    }


@pytest.fixture(scope="module")
def stack_probs(ads, tok) -> np.ndarray:
    scorer = ScoringModel(tiny_base("seq_cls"), tok, "ranker", [(ads["a"], 0.7), (ads["b"], 1.3)])
    try:
        return scorer.score_pairs(USERS, ITEMS)
    finally:
        scorer.release()


def test_cat_equals_weights_stack_and_is_a_plain_peft_folder(ads, tok, stack_probs, tmp_path):
    base = tiny_base("seq_cls")
    before = state_hash(base)
    result = merge_adapters([(ads["a"], 0.7), (ads["b"], 1.3)], "cat", base_model=base, out_dir=tmp_path / "m")
    assert state_hash(base) == before and not has_injected_adapters(base)
    assert sorted(p.name for p in result.out_dir.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "merge_recipe.json"]
    np.testing.assert_allclose(fresh_peft_probs(result.out_dir, tok), stack_probs, atol=1e-5)
    assert result.reconstruction_error < 1e-6
    recipe = json.loads((result.out_dir / "merge_recipe.json").read_text())
    assert recipe["method"] == "cat" and recipe["rank"] == 6 and recipe["weights"] == [0.7, 1.3]
    assert recipe["head"]["source_index"] == 1 and "classifier.weight" in recipe["head"]["tensors"]
    assert [s["sha256"] for s in recipe["sources"]] == [
        hashlib.sha256((ads[k] / "adapter_model.safetensors").read_bytes()).hexdigest() for k in "ab"]
    config = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["r"] == config["lora_alpha"] == 6


def test_svd_at_full_rank_equals_stack(ads, tok, stack_probs, tmp_path):
    result = merge_adapters([(ads["a"], 0.7), (ads["b"], 1.3)], "svd", target_rank=6,
                            base_model=tiny_base("seq_cls"), out_dir=tmp_path / "m")
    np.testing.assert_allclose(fresh_peft_probs(result.out_dir, tok), stack_probs, atol=1e-5)
    assert result.reconstruction_error < 1e-5
    assert result.recipe["rank"] == 6


@pytest.mark.parametrize("method,kwargs,srcs", [
    ("svd", {"target_rank": 2}, "ab"),
    ("linear", {}, "bc"),
    ("ties", {"density": 0.5}, "bc"),
    ("dare_linear", {"density": 0.6}, "bc"),
    ("dare_ties", {"target_rank": 3}, "ab"),
])
def test_lossy_methods_report_error_and_recipe(ads, tok, tmp_path, method, kwargs, srcs):
    pairs = [(ads[k], w) for k, w in zip(srcs, (0.7, 1.3), strict=True)]
    result = merge_adapters(pairs, method, base_model=tiny_base("seq_cls"), out_dir=tmp_path / "m", seed=3, **kwargs)
    assert result.reconstruction_error is not None and result.reconstruction_error > 1e-3
    recipe = result.recipe
    assert recipe["method"] == method and recipe["seed"] == 3 and recipe["reconstruction_error"] > 1e-3
    if method in ("ties", "dare_linear", "dare_ties"):
        assert recipe["density"] == kwargs.get("density", 0.5)
    assert np.isfinite(fresh_peft_probs(result.out_dir, tok)).all()  # loads with plain peft


def test_dare_is_reproducible_by_seed(ads, tmp_path):
    def run(name, seed):
        return merge_adapters([(ads["b"], 1.0), (ads["c"], 1.0)], "dare_linear", density=0.5, seed=seed,
                              base_model=tiny_base("seq_cls"), out_dir=tmp_path / name).out_dir
    same = [(run(n, 7) / "adapter_model.safetensors").read_bytes() for n in ("x", "y")]
    other = (run("z", 8) / "adapter_model.safetensors").read_bytes()
    assert same[0] == same[1] and other != same[0]


def test_retriever_cat_merge_has_no_head(ads, tmp_path):
    result = merge_adapters([(ads["ret"], 1.0), (ads["ret2"], 0.5)], "cat", base_model=tiny_base("encoder"),
                            out_dir=tmp_path / "m")
    assert result.recipe["task"] == "retriever" and result.recipe["head"]["tensors"] == []
    assert result.reconstruction_error < 1e-6


def test_fold_export_loads_with_plain_transformers_and_equals_folded_engine(ads, tok, stack_probs, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    pairs = [(ads["a"], 0.7), (ads["b"], 1.3)]
    base = tiny_base("seq_cls")
    before = state_hash(base)
    out = fold(base, pairs, tmp_path / "folded", tokenizer=tok)
    assert state_hash(base) == before
    exported = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    engine = HotSwapModel(base, tok, "ranker")
    engine.activate(pairs, label="stack")
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    np.testing.assert_array_equal(plain_probs(exported, tok), engine.score_pairs(USERS, ITEMS).astype(np.float32))
    np.testing.assert_allclose(plain_probs(exported, tok), stack_probs, atol=1e-5)

    ret_out = fold(tiny_base("encoder"), [(ads["ret"], 1.0)], tmp_path / "folded_ret")
    encoder = AutoModel.from_pretrained(str(ret_out)).eval()
    ret_engine = HotSwapModel(tiny_base("encoder"), tok, "retriever")
    ret_engine.activate([(ads["ret"], 1.0)])
    for name, tensor in ret_engine.model.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor), name


@pytest.mark.parametrize("method,kwargs,match", [
    ("magic", {}, "unknown merge method"),
    ("svd", {"target_rank": 0}, "positive integer"),
    ("svd", {"target_rank": -3}, "positive integer"),
    ("svd", {"target_rank": 2.5}, "positive integer"),
    ("ties", {"density": 0.0}, r"\(0, 1\]"),
    ("dare_ties", {"density": 1.5}, r"\(0, 1\]"),
    ("cat", {"density": 0.5}, "density applies"),
    ("cat", {"target_rank": 4}, "does not apply"),
])
def test_bad_method_arguments_fail_before_any_work(ads, tmp_path, method, kwargs, match):
    base = tiny_base("seq_cls")
    with pytest.raises(InvalidInput, match=match):
        merge_adapters([(ads["a"], 1.0), (ads["b"], 1.0)], method, base_model=base, out_dir=tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists() and not has_injected_adapters(base)


def test_incompatible_adapters_conflict_before_any_work(ads, tmp_path):
    base = tiny_base("seq_cls")
    before = state_hash(base)
    cases = [
        ([(ads["a"], 1.0), (ads["ret"], 1.0)], "cat", "retriever adapter"),
        ([(ads["b"], 1.0), (ads["q_only"], 1.0)], "cat", "same target modules"),
        ([(ads["a"], 1.0), (ads["b"], 1.0)], "linear", "equal ranks"),
    ]
    for pairs, method, match in cases:
        with pytest.raises(Conflict, match=match):
            merge_adapters(pairs, method, base_model=base, out_dir=tmp_path / "m")
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32))
    with pytest.raises(Conflict, match="does not fit this base"):
        merge_adapters([(ads["a"], 1.0), (ads["b"], 1.0)], "cat", base_model=other, out_dir=tmp_path / "m")
    with pytest.raises(Conflict, match="does not fit this base"):
        fold(other, [(ads["a"], 1.0)], tmp_path / "m")
    assert state_hash(base) == before and not (tmp_path / "m").exists()
    with pytest.raises(InvalidInput, match="at least one"):
        merge_adapters([], "cat", base_model=base, out_dir=tmp_path / "m")
    with pytest.raises(InvalidInput, match="finite"):
        merge_adapters([(ads["a"], float("nan"))], "cat", base_model=base, out_dir=tmp_path / "m")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(Conflict, match="not empty"):
        merge_adapters([(ads["a"], 1.0)], "cat", base_model=base, out_dir=tmp_path / "full")
    assert set(METHODS) == {"cat", "svd", "linear", "ties", "dare_linear", "dare_ties"}
