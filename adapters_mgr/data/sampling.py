"""Seeded sampling: replay rows from earlier batches, and negatives for implicit feedback.

Why seeds derive from (seed, batch ids): batches are immutable, so the same seed over the same
batches must give the same rows on any machine and on any later day, whatever was synced since.
Rows are numbered in a canonical order in SQL and only the chosen numbers are fetched, so a replay
pool of millions of rows never passes through Python.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from adapters_mgr.catalog.db import Catalog
from adapters_mgr.data.timeparse import parse_duration
from adapters_mgr.errors import InvalidInput

if TYPE_CHECKING:
    from adapters_mgr.data.api import DataAPI

ROW_COLUMNS = ("batch_id", "user_id", "item_id", "ts", "rating", "label", "source")
CANONICAL_ORDER = "batch_id, ts, user_id, item_id, source, rating, label"


def subsample_rows(rows: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """A seeded subsample that keeps time order (so training stays reproducible and honest)."""
    if limit is None or len(rows) <= limit:
        return rows
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(rows), size=limit, replace=False))
    return [rows[i] for i in keep]


def rng_for(seed: int, *parts: Any) -> np.random.Generator:
    """A generator determined by the seed and the given parts (batch ids, options)."""
    digest = hashlib.sha256(json.dumps([int(seed), *parts], sort_keys=True, default=str).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def to_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    if not rows:
        return {c: np.array([]) for c in ROW_COLUMNS}
    return {c: np.array([r[c] for r in rows], dtype=object if c not in ("rating", "label") else None)
            for c in rows[0]}


def to_rows(rows: Any) -> list[dict[str, Any]]:
    """Rows as a list of dicts, from either shape the data API hands out (rows, or ``to_columns``'s)."""
    if isinstance(rows, dict):
        return [dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)]
    return list(rows)


def fetch_rows(catalog: Catalog, where: str, params: list[Any], *, columns: bool = False) -> Any:
    sql = f"SELECT {', '.join(ROW_COLUMNS)} FROM interactions WHERE {where} ORDER BY ts, user_id, item_id, source"
    with catalog.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        cur = con.execute(sql, params)
        if columns:
            return cur.fetchnumpy()
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def replay_pool(api: DataAPI, spec: str | list[str], recency: str | int | None) -> tuple[list[str], Any]:
    """(batch ids of the pool, earliest event time kept or None) for a replay request."""
    batches = api.batches()
    seq = {b["id"]: b["seq"] for b in batches}
    if isinstance(spec, str):
        if spec not in seq:
            api.batch(spec)  # raises NotFound with the standard message
        ids = [b["id"] for b in batches if b["seq"] < seq[spec]]
    else:
        ids = sorted(api.resolve_batches(list(spec)), key=lambda b: seq[b])
    cutoff = None
    if isinstance(recency, int) and not isinstance(recency, bool):
        if recency < 1:
            raise InvalidInput(f"recency {recency!r} must be >= 1 batch, or a duration like '28d'")
        ids = ids[-recency:]
    elif recency is not None:
        span: timedelta = parse_duration(recency, what="recency")
        newest = max((b["ts_max"] for b in batches if b["id"] in set(ids) and b["ts_max"] is not None), default=None)
        cutoff = newest - span if newest is not None else None
    return ids, cutoff


def replay_sample(
    catalog: Catalog,
    pool: tuple[list[str], Any],
    *,
    ratio: float,
    seed: int,
    max_rows: int | None = None,
    columns: bool = False,
) -> Any:
    ids, cutoff = pool
    if not 0 < ratio <= 1:
        raise InvalidInput(f"ratio {ratio!r} must be in (0, 1]: the fraction of the replay pool to draw")
    where = "batch_id IN (SELECT unnest(?))" + (" AND ts >= ?" if cutoff is not None else "")
    params: list[Any] = [ids] + ([cutoff] if cutoff is not None else [])
    with catalog.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        total = con.execute(f"SELECT count(*) FROM interactions WHERE {where}", params).fetchone()[0]
        n = min(int(round(ratio * total)), total if max_rows is None else int(max_rows))
        rng = rng_for(seed, sorted(ids), str(cutoff))
        chosen = np.sort(rng.choice(total, size=n, replace=False)) if n else np.array([], dtype=np.int64)
        con.execute("CREATE OR REPLACE TEMP TABLE _pick AS SELECT unnest(?::BIGINT[]) AS rn", [chosen.tolist()])
        cur = con.execute(
            f"""
            SELECT {', '.join(ROW_COLUMNS)} FROM (
                SELECT *, row_number() OVER (ORDER BY {CANONICAL_ORDER}) - 1 AS rn
                FROM interactions WHERE {where}) JOIN _pick USING (rn)
            ORDER BY ts, user_id, item_id, source
            """,
            params,
        )
        if columns:
            return cur.fetchnumpy()
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def negative_samples(
    catalog: Catalog, batch_ids: list[str], *, per_positive: int, seed: int, columns: bool = False
) -> Any:
    """Per positive in the batches, ``per_positive`` items the user never interacted with (any batch).

    Candidates are drawn uniformly from the item catalog (the items table, or every item seen) and
    rejected while they hit one of the user's items; vectorised, no per-row Python.
    """
    if per_positive < 1:
        raise InvalidInput(f"per_positive {per_positive!r} must be >= 1")
    with catalog.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        universe = [r[0] for r in con.execute(
            "SELECT DISTINCT item_id FROM (SELECT item_id FROM items UNION ALL SELECT item_id FROM interactions) "
            "ORDER BY 1").fetchall()]
        pos = con.execute(
            "SELECT batch_id, user_id, item_id, ts FROM interactions "
            f"WHERE label = 1 AND batch_id IN (SELECT unnest(?)) "
            f"ORDER BY {CANONICAL_ORDER}", [batch_ids]).fetchall()
        seen = con.execute(
            "SELECT DISTINCT user_id, item_id FROM interactions WHERE user_id IN "
            "(SELECT user_id FROM interactions WHERE batch_id IN (SELECT unnest(?)))", [batch_ids]).fetchall()
    if not pos or not universe:
        return to_columns([]) if columns else []
    item_code = {it: i for i, it in enumerate(universe)}
    users = sorted({p[1] for p in pos})
    user_code = {u: i for i, u in enumerate(users)}
    n_items = len(universe)
    forbidden = np.unique(np.array([user_code[u] * n_items + item_code[i] for u, i in seen if u in user_code],
                                   dtype=np.int64))
    owner = np.repeat(np.array([user_code[p[1]] for p in pos], dtype=np.int64), per_positive)
    rng = rng_for(seed, sorted(batch_ids), per_positive)
    cand = rng.integers(0, n_items, size=len(owner))
    for _ in range(100):
        keys = owner * n_items + cand
        idx = np.searchsorted(forbidden, keys)
        bad = (idx < len(forbidden)) & (forbidden[np.minimum(idx, len(forbidden) - 1)] == keys)
        if not bad.any():
            break
        cand[bad] = rng.integers(0, n_items, size=int(bad.sum()))
    else:  # users who have interacted with (almost) every item: drop what is still a positive
        keep = ~bad
        owner, cand = owner[keep], cand[keep]
    src_idx = np.repeat(np.arange(len(pos)), per_positive)[: len(owner)] if len(owner) == len(pos) * per_positive \
        else np.repeat(np.arange(len(pos)), per_positive)[~bad]
    rows = [
        {"batch_id": pos[j][0], "user_id": pos[j][1], "item_id": universe[int(c)], "ts": pos[j][3],
         "rating": None, "label": 0, "source": "negative_sample"}
        for j, c in zip(src_idx.tolist(), cand.tolist(), strict=True)
    ]
    return to_columns(rows) if columns else rows
