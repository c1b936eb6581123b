"""Pretokenised batches are exactly what the tokenizer returns per batch (so trained bytes do not
change), for text pairs and single texts, and an update's tokenizer runs once, not per batch."""

from __future__ import annotations

import torch

from adapters_mgr.lora.pretokenise import Pretokenised
from adapters_mgr.lora.testing import tiny_tokenizer


def test_padded_batches_equal_the_tokenizer_per_batch(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    users = [f"user {i} " + "likes jazz and rock " * (i % 5) for i in range(20)]
    items = [f"item {i} " + "a long title " * (i % 7) for i in range(20)]
    pairs = Pretokenised(tok, users, items, max_length=24)
    single = Pretokenised(tok, users + items, None, max_length=16)
    for index in ([0, 3, 5], [19, 1, 7, 4, 12], list(range(20))):
        want = tok([users[i] for i in index], [items[i] for i in index], truncation=True, max_length=24,
                   padding=True, return_tensors="pt")
        got = pairs.batch(index)
        assert set(got) == set(want.keys())
        for key in want:
            assert torch.equal(got[key], want[key]), key
        want = tok([(users + items)[i] for i in index], truncation=True, max_length=16, padding=True,
                   return_tensors="pt")
        got = single.batch(index)
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_training_tokenises_once(monkeypatch, tmp_path):
    from adapters_mgr.lora.testing import synthetic_rows, tiny_base
    from adapters_mgr.lora.trainer import train_adapter

    tok = tiny_tokenizer(tmp_path)
    calls: list[int] = []
    original = type(tok).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting)
    result = train_adapter(tiny_base(), tok, "ranker", synthetic_rows(96, seed=0), epochs=3, batch_size=16,
                           max_length=32, progress=False)
    result.release()
    assert len(calls) == 1  # 3 epochs x 6 batches used to call it 18 times
