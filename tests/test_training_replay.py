"""Replay sampling: size, determinism, recency window and relevance."""

from __future__ import annotations

import pytest

from adapters_mgr.errors import InvalidInput
from adapters_mgr.lora.replay import replay_mix


def rows(n, age, prefix):
    return [{"user_id": f"{prefix}{i % 5}", "item_id": f"i{i}", "batch_age": age, "n": i} for i in range(n)]


def test_replay_size_determinism_and_window():
    new = rows(10, 0, "new")
    history = rows(50, 0, "h") + rows(50, 3, "old")
    a = replay_mix(new, history, ratio=0.5, seed=1, half_life=1.0)
    assert a[:10] == new and len(a) == 15
    assert a == replay_mix(new, history, ratio=0.5, seed=1, half_life=1.0)
    assert a != replay_mix(new, history, ratio=0.5, seed=2, half_life=1.0)
    windowed = replay_mix(new, history, ratio=2.0, seed=1, window=2)
    assert all(r["batch_age"] == 0 for r in windowed[10:])
    assert replay_mix(new, history, ratio=0.0) == new


def test_replay_relevance_prefers_rows_of_the_new_users():
    new = [{"user_id": "u1", "item_id": "x"}]
    history = [{"user_id": "u1", "item_id": f"a{i}"} for i in range(5)] + [
        {"user_id": f"z{i}", "item_id": f"b{i}"} for i in range(95)
    ]
    picked = replay_mix(new * 10, history, ratio=0.5, seed=0, relevance_boost=1000.0)
    assert sum(r["user_id"] == "u1" for r in picked[10:]) == 5


def test_replay_bad_arguments():
    with pytest.raises(InvalidInput):
        replay_mix([], [], ratio=-1)
    with pytest.raises(InvalidInput):
        replay_mix([], [], ratio=1, half_life=0)
