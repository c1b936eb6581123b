from __future__ import annotations

import torch
from peft import PeftModel

from tests.conftest import lora_model, sample_inputs, tiny_bert


def test_round_trip_through_plain_peft(mgr, base_id, tmp_path):
    model = lora_model(tiny_bert(0), seed=3)
    aid = mgr.register(model, name="ranker", metrics={"auc": 0.7})
    x = sample_inputs()
    with torch.no_grad():
        expected = model(**x).logits
        ours = mgr.load(aid)(**x).logits
    folder = mgr.adapter_folder(aid)
    plain = PeftModel.from_pretrained(tiny_bert(0), str(folder)).eval()
    with torch.no_grad():
        theirs = plain(**x).logits
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(theirs, ours)
    info = mgr.get(aid)
    assert info.version == 1 and info.kind == "trained" and info.task == "ranker"
    assert info.lora_rank == 4 and info.target_modules == ["query", "value"]
    assert info.trainable_params > 0 and info.bytes > 0 and len(info.weights_sha256) == 64
