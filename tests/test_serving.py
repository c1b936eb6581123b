"""Hot-swap engine: equality with fresh peft loads / ScoringModel, bit-exact restore, atomic switches."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters_mgr.errors import Conflict, InvalidInput, NotFound
from adapters_mgr.lora.adapters import InMemoryAdapter
from adapters_mgr.lora.merge import merge_adapters
from adapters_mgr.lora.peft_scoring import ScoringModel
from adapters_mgr.lora.testing import tiny_base, tiny_tokenizer
from adapters_mgr.serving.engine import HotSwapModel, NodeSpec

USERS = ["user 1 age 20", "user 2 age 21 likes jazz", "user 3 group a", "user 4 likes rock film"] * 2
ITEMS = ["item 3 genre rock", "item 4 genre jazz", "item 5 genre pop song", "item 6 genre folk"][::-1] * 2


def make_adapter(folder: Path, seed: int, r: int = 4, kind: str = "seq_cls") -> Path:
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import ModulesToSaveWrapper

    torch.manual_seed(seed)
    task_type = "SEQ_CLS" if kind == "seq_cls" else "FEATURE_EXTRACTION"
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"], task_type=task_type,
                        init_lora_weights=False)
    model = get_peft_model(tiny_base(kind), config)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            for p in module.modules_to_save["default"].parameters():
                p.data.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    return folder


def scoring_model(kind, tok, pairs, mode="weights"):
    task = "ranker" if kind == "seq_cls" else "retriever"
    return ScoringModel(tiny_base(kind), tok, task, pairs, mode)


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
        "ret": make_adapter(root / "ret", seed=5, r=4, kind="encoder"),
        "ret2": make_adapter(root / "ret2", seed=6, r=2, kind="encoder"),
    }


@pytest.fixture(scope="module")
def merged(ads, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "cat"
    return merge_adapters([(ads["a"], 0.7), (ads["b"], 1.3)], "cat", base_model=tiny_base("seq_cls"),
                          out_dir=out).out_dir


@pytest.fixture
def engine(tok):
    return HotSwapModel(tiny_base("seq_cls"), tok, "ranker", batch_size=2)


def fresh_peft_probs(folder, tok):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_base("seq_cls"), str(folder)).eval()
    batch = tok(USERS, ITEMS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**batch).logits.float(), -1)[:, 1].numpy()


def test_each_ranker_node_kind_equals_a_fresh_load(engine, ads, merged, tok):
    pairs = [(ads["a"], 0.7), (ads["b"], 1.3)]
    expected = {
        "single": fresh_peft_probs(ads["b"], tok),
        "merged": fresh_peft_probs(merged, tok),
    }
    for mode in ("weights", "ensemble"):
        scorer = scoring_model("seq_cls", tok, pairs, mode)
        expected[mode] = scorer.score_pairs(USERS, ITEMS)
        scorer.release()
    nodes = {
        "single": NodeSpec(((ads["b"], 1.0),), "weights", "single"),
        "weights": NodeSpec(tuple(pairs), "weights", "weights"),
        "ensemble": NodeSpec(tuple(pairs), "ensemble", "ensemble"),
        "merged": NodeSpec(((merged, 1.0),), "weights", "merged"),
    }
    for _ in range(2):  # twice: switching back must give the same outputs
        for name, spec in nodes.items():
            assert engine.activate(spec) == name and engine.active == name
            scores, label = engine.score_pairs(USERS, ITEMS, with_node=True)
            assert label == name
            np.testing.assert_allclose(scores, expected[name], atol=1e-5, err_msg=name)
    np.testing.assert_allclose(expected["merged"], expected["weights"], atol=1e-5)
    engine.activate(None)
    assert engine.active is None and engine.is_pristine()


def test_retriever_nodes_equal_scoring_model(ads, tok):
    engine = HotSwapModel(tiny_base("encoder"), tok, "retriever")
    texts = USERS + ITEMS
    for pairs, mode in [([(ads["ret"], 1.0)], "weights"), ([(ads["ret"], 0.6), (ads["ret2"], 1.0)], "weights"),
                        ([(ads["ret"], 0.6), (ads["ret2"], 1.0)], "ensemble")]:
        scorer = scoring_model("encoder", tok, pairs, mode)
        want = scorer.encode_users(texts)
        want_pairs = scorer.score_pairs(USERS, ITEMS)
        scorer.release()
        engine.activate(pairs, mode, label=mode)
        np.testing.assert_allclose(engine.encode(texts), want, atol=1e-5)
        np.testing.assert_allclose(engine.score_texts(USERS, ITEMS), want_pairs, atol=1e-5)
    with pytest.raises(InvalidInput, match="retriever"):
        HotSwapModel(tiny_base("seq_cls"), tok, "ranker").encode(["x"])


def test_in_memory_adapter_node(engine, ads, tok):
    from peft import LoraConfig
    from safetensors.torch import load_file

    state = load_file(str(ads["b"] / "adapter_model.safetensors"))
    adapter = InMemoryAdapter(LoraConfig.from_pretrained(str(ads["b"])), state)
    engine.activate([(adapter, 1.0)], label="mem")
    np.testing.assert_allclose(engine.score_pairs(USERS, ITEMS), fresh_peft_probs(ads["b"], tok), atol=1e-5)


def test_thousand_switches_restore_the_base_bit_exactly(ads, tok):
    base = tiny_base("seq_cls")
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    engine = HotSwapModel(base, tok, "ranker")
    nodes = [
        engine.prepare([(ads["a"], 0.7)], label="a"),
        engine.prepare([(ads["a"], 0.7), (ads["b"], 1.3), (ads["c"], -0.4)], label="stack"),
        engine.prepare([(ads["b"], 1.0), (ads["c"], 2.0)], "ensemble", label="ens"),
        engine.prepare([(ads["c"], 1.0)], label="c"),
        None,
    ]
    engine.activate(nodes[1])
    engine.score_pairs(USERS[:2], ITEMS[:2])
    engine.activate(nodes[2])
    engine.score_pairs(USERS[:2], ITEMS[:2])  # ensemble passes fold each member in turn
    for i in range(1000):
        engine.activate(nodes[i % len(nodes)])
    engine.activate(None)
    assert engine.switches == 1003
    for key, tensor in base.state_dict().items():
        assert torch.equal(tensor, snapshot[key]), key
    assert engine.is_pristine()


def test_no_request_ever_sees_a_mixed_node(ads, tok):
    engine = HotSwapModel(tiny_base("seq_cls"), tok, "ranker", batch_size=1)  # 8 forward passes per request
    specs = {
        "A": engine.prepare([(ads["a"], 1.0)], label="A"),
        "B": engine.prepare([(ads["b"], 1.0), (ads["c"], 1.0)], label="B"),
        "E": engine.prepare([(ads["a"], 1.0), (ads["c"], 3.0)], "ensemble", label="E"),
        None: engine.prepare(None),
    }
    expected = {}
    for label, node in specs.items():
        engine.activate(node)
        expected[label] = engine.score_pairs(USERS, ITEMS)
    labels = list(expected)
    for i, x in enumerate(labels):  # nodes are distinguishable on every row
        for y in labels[i + 1:]:
            assert np.abs(expected[x] - expected[y]).min() > 1e-4
    stop = threading.Event()
    errors: list[str] = []
    seen: dict[object, int] = {}

    def reader():
        while not stop.is_set():
            scores, label = engine.score_pairs(USERS, ITEMS, with_node=True)
            seen[label] = seen.get(label, 0) + 1
            if not np.allclose(scores, expected[label], atol=1e-6, rtol=0):
                errors.append(f"node {label}: {scores} != {expected[label]}")

    def writer():
        k = 0
        while not stop.is_set():
            engine.activate(specs[labels[k % len(labels)]])
            k += 1
            time.sleep(0.001)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(seen) >= 3, seen  # requests really ran under several nodes
    engine.activate(None)
    assert engine.is_pristine()


def test_pinned_holds_the_node_and_forbids_switching_inside(engine, ads):
    engine.activate([(ads["a"], 1.0)], label="A")
    switched = threading.Event()

    def switch():
        engine.activate([(ads["b"], 1.0)], label="B")
        switched.set()

    with engine.pinned() as label:
        assert label == "A"
        thread = threading.Thread(target=switch)
        thread.start()
        time.sleep(0.2)
        assert not switched.is_set() and engine.active == "A"
        with pytest.raises(Conflict, match="pinned"):
            engine.activate(None)
    thread.join()
    assert switched.is_set() and engine.active == "B"


def test_bad_nodes_fail_before_the_switch(engine, ads, tok, tmp_path):
    engine.activate([(ads["a"], 1.0)], label="A")
    before = engine.score_pairs(USERS, ITEMS)
    with pytest.raises(Conflict, match="retriever"):
        engine.activate([(ads["ret"], 1.0)], label="X")
    with pytest.raises(InvalidInput, match="unknown combination mode"):
        engine.activate([(ads["b"], 1.0)], "average", label="X")
    with pytest.raises(InvalidInput, match="ensemble weights"):
        engine.activate([(ads["b"], -1.0)], "ensemble", label="X")
    with pytest.raises(NotFound, match="not a PEFT adapter folder"):
        engine.activate([(tmp_path, 1.0)], label="X")
    assert engine.active == "A"
    np.testing.assert_array_equal(engine.score_pairs(USERS, ITEMS), before)
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_base("seq_cls"), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(InvalidInput, match="peft layers"):
        HotSwapModel(wrapped.get_base_model(), tok, "ranker")


def test_tensor_cache_is_keyed_by_path_and_content(engine, ads, tmp_path):
    import shutil

    folder = shutil.copytree(ads["a"], tmp_path / "x")
    engine.activate([(folder, 1.0)], label=1)
    engine.activate([(ads["b"], 1.0)], label=2)
    reads = engine.cache.reads
    engine.activate([(folder, 1.0)], label=1)
    engine.activate([(ads["b"], 1.0)], label=2)
    assert engine.cache.reads == reads  # unchanged files: no read, no hash
    shutil.copyfile(ads["c"] / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    engine.activate([(folder, 1.0)], label=3)
    assert engine.cache.reads == reads + 1
    assert engine.active_node.shas[0] == engine.cache.get(ads["c"]).sha256
