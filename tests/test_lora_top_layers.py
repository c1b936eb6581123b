"""LoRA on the top encoder layers only (``top_layers``): the folder holds those layers alone, loads
with plain peft, serves the same scores, stacks with an all-layer adapter, and a bad value is
refused before any training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from adapters_mgr import InvalidInput
from adapters_mgr.lora.settings import LoraSettings
from tests.stream_fixtures import synced_manager

FAST = dict(max_length=32, max_train_rows=120, max_eval_rows=120, progress=False, prior="none", base="tiny",
            ranker_shape="cross")


def test_top_layer_indices_and_checks():
    assert LoraSettings.top(2, 6) == (4, 5) and LoraSettings.top(None, 6) is None and LoraSettings.top(6, 6) is None
    with pytest.raises(InvalidInput, match="more than the base's 6"):
        LoraSettings.top(7, 6)
    with pytest.raises(InvalidInput, match="layer indices"):
        LoraSettings(layers=(-1,))
    assert LoraSettings(layers=(3, 1, 3)).layers == (1, 3)
    assert not LoraSettings(layers=(1,)).same_shape(LoraSettings())
    config = LoraSettings(layers=(1,)).to_peft_config("ranker")
    assert LoraSettings.from_peft_config(config).layers == (1,)


def test_top_layer_adapter_trains_serves_and_stacks(tmp_path):
    from peft import PeftModel

    from adapters_mgr.lora.base_model import HeadSpec, load_base_model

    mgr = synced_manager(tmp_path / "root", tmp_path)
    batches = [b["id"] for b in mgr.data.batches()]
    with pytest.raises(InvalidInput, match="top_layers 3 is more than the base's 2"):
        mgr.train_update([batches[0]], name="rk", top_layers=3, **FAST)
    assert mgr.list(status="all") == []
    top = mgr.train_update([batches[0]], name="rk", top_layers=1, promote="always", **FAST)
    folder = mgr.workspace.adapter_folder(top.adapter_id)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        lora_keys = [k for k in f.keys() if "lora_" in k]  # noqa: SIM118 - safe_open is not a dict
    assert lora_keys and all(".layer.1." in k for k in lora_keys)
    assert mgr.get(top.adapter_id).hyperparams["lora"]["layers"] == [1]

    rows = mgr.data.training_rows([batches[1]])[:12]
    users, items = [r["user_text"] for r in rows], [r["item_text"] for r in rows]
    scorer = mgr.scorer(top.node_id, max_length=32)
    served = scorer.score_texts(users, items)
    base = load_base_model(mgr.base(mgr.get(top.node_id).base_id)["source"], HeadSpec("seq_cls", 2))
    plain = PeftModel.from_pretrained(base, str(folder)).eval()
    import torch

    tok = mgr.tokenizer(mgr.get(top.node_id).base_id)
    with torch.no_grad():
        batch = tok(users, items, padding=True, truncation=True, max_length=32, return_tensors="pt")
        probs = torch.softmax(plain(**batch).logits, dim=-1)[:, 1].numpy()
    np.testing.assert_allclose(served, probs, atol=1e-5)

    # a stack folds its members together: an all-layer adapter on a top-layer one is refused before
    # training (nothing registered); with the parent's layers it stacks, and the scores move
    count = len(mgr.list(status="all"))
    with pytest.raises(InvalidInput, match=r"same LoRA modules and layers.*layers \[1\].*every layer"):
        mgr.train_update([batches[1]], name="rk", policy="stack", parent="production", **FAST)
    assert len(mgr.list(status="all")) == count
    stacked = mgr.train_update([batches[1]], name="rk", policy="stack", parent="production", top_layers=1, **FAST)
    scorer.activate(stacked.node_id)
    assert not np.allclose(scorer.score_texts(users, items), served)
    scorer.close()
