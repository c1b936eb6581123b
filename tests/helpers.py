"""Small helpers shared by catalog tests."""

from __future__ import annotations

from datetime import UTC, datetime


def add_batch(mgr, batch_id: str, rows: int = 10) -> str:
    """Insert a minimal data-batch row, standing in for a real `sync`."""
    with mgr.catalog.transaction() as con:
        con.execute(
            "INSERT INTO batches (id, sha256, num_rows, created_at) VALUES (?, ?, ?, ?)",
            [batch_id, f"sha-{batch_id}", rows, datetime.now(UTC)],
        )
    return batch_id


def chain(mgr, n: int, name: str = "ranker", seed0: int = 10) -> list[int]:
    """n adapters, each warm-started from the previous one."""
    from tests.conftest import lora_model, tiny_bert

    ids: list[int] = []
    for i in range(n):
        model = lora_model(tiny_bert(0), seed=seed0 + i)
        ids.append(mgr.register(model, name=name, parents=ids[-1:]))
    return ids
