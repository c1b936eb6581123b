"""Replay: mix a seeded sample of earlier rows into a new batch's training set.

Why: an adapter trained on the newest batch alone forgets what older batches taught (the stale /
fresh trade-off of incremental recommenders). Replaying a small, *selected* sample of history is the
cheap remedy. The knobs are the ones the catalog records: ``ratio`` (size relative to the new batch),
``half_life`` (recency: a row ``age`` batches old is drawn with weight 0.5 ** (age / half_life)),
``window`` (only the last ``window`` batches) and ``relevance_boost`` (rows whose user or item also
appears in the new batch are ``1 + boost`` times as likely). Same inputs and seed -> same sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adapters_mgr.errors import InvalidInput


def replay_mix(
    new_rows: Sequence[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]],
    *,
    ratio: float,
    seed: int = 0,
    age_key: str = "batch_age",
    half_life: float | None = None,
    window: int | None = None,
    relevance_boost: float = 0.0,
) -> list[Mapping[str, Any]]:
    """``new_rows`` followed by a weighted sample (without replacement) of ``history``.

    ``history`` rows may carry ``age_key`` (0 = the batch just before the new one, 1 = the one before
    that...); rows without it count as age 0. The sample keeps history order, so the result is a
    deterministic function of the inputs and ``seed``.
    """
    if ratio < 0 or not np.isfinite(ratio):
        raise InvalidInput(f"replay ratio must be >= 0, got {ratio!r}")
    if half_life is not None and not half_life > 0:
        raise InvalidInput(f"replay half_life must be positive, got {half_life!r}")
    if window is not None and window < 1:
        raise InvalidInput(f"replay window must be >= 1 batch, got {window!r}")
    if relevance_boost < 0:
        raise InvalidInput(f"relevance_boost must be >= 0, got {relevance_boost!r}")
    result = list(new_rows)
    want = int(round(ratio * len(result)))
    if want == 0 or not history:
        return result
    ages = np.array([float(row.get(age_key, 0)) for row in history])
    weights = np.ones(len(history))
    if window is not None:
        weights[ages >= window] = 0.0
    if half_life is not None:
        weights *= 0.5 ** (ages / half_life)
    if relevance_boost:
        users = {row["user_id"] for row in new_rows}
        items = {row["item_id"] for row in new_rows}
        related = np.array([row.get("user_id") in users or row.get("item_id") in items for row in history])
        weights *= np.where(related, 1.0 + relevance_boost, 1.0)
    candidates = np.flatnonzero(weights > 0)
    if candidates.size == 0:
        return result
    take = min(want, candidates.size)
    p = weights[candidates] / weights[candidates].sum()
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, size=take, replace=False, p=p))
    return result + [history[i] for i in chosen]


__all__ = ["replay_mix"]
