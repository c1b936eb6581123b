"""Recomputing recommendations after an update or a rollback, with lineage.

Top-K lists are computed with a :class:`~adapters_mgr.serving.scorer.Scorer` (retriever over the whole item
catalog, optionally reranked by a ranker) and written as one *run* in one transaction: readers of
``current_recommendations`` keep seeing the previous list until the new run is committed whole.
``users='changed'`` recomputes only users with events in batches newer than the last run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from adapters_mgr.catalog.sql import fetch_dicts, log_event, utcnow
from adapters_mgr.errors import InvalidInput
from adapters_mgr.faults import maybe_crash
from adapters_mgr.progress import duration, progress_bar
from adapters_mgr.serving.scorer import Scorer, ServingSource

USER_MODES = ("all", "changed")
RATE_MIN_USERS = 20  # a smaller run's fixed costs (models, item encodings) would inflate its s/user
PAIRS_PER_REQUEST = 2048  # two-stage: users per ranker request ~ this / top_m (whole batches, frequent progress)


def _say(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def last_rate(ws: ServingSource, two_stage: bool) -> float | None:
    """Seconds per user of the newest run of the same shape (two-stage or not, ``RATE_MIN_USERS`` or more):
    the estimate a recompute can give before it has scored anyone."""
    with ws.catalog.connect() as con:
        row = con.execute(
            "SELECT wall_s / num_users FROM recommendation_runs WHERE (ranker_node_id IS NOT NULL) = ? "
            "AND num_users >= ? AND wall_s > 0 ORDER BY id DESC LIMIT 1", [two_stage, RATE_MIN_USERS]).fetchone()
    return float(row[0]) if row else None


def all_users(ws: ServingSource) -> tuple[list[str], int | None]:
    """Every user with an interaction, and the newest batch's seq."""
    with ws.catalog.connect() as con:
        newest = con.execute("SELECT max(seq) FROM batches WHERE kind = 'interactions'").fetchone()[0]
        users = [r[0] for r in con.execute("SELECT DISTINCT user_id::VARCHAR FROM interactions ORDER BY 1").fetchall()]
    return users, newest


def changed_users(ws: ServingSource, alias: str | None) -> tuple[list[str], int | None]:
    """Users with events in batches newer than the last run for ``alias`` (all users if none)."""
    with ws.catalog.connect() as con:
        row = con.execute(
            "SELECT max(max_batch_seq) FROM recommendation_runs WHERE coalesce(alias, '') = coalesce(?, '')", [alias]
        ).fetchone()
        last = row[0] if row else None
        newest = con.execute("SELECT max(seq) FROM batches WHERE kind = 'interactions'").fetchone()[0]
        if last is None:
            users = [r[0] for r in con.execute(
                "SELECT DISTINCT user_id::VARCHAR FROM interactions ORDER BY 1").fetchall()]
        else:
            users = [r[0] for r in con.execute(
                "SELECT DISTINCT i.user_id::VARCHAR FROM interactions i JOIN batches b ON b.id = i.batch_id "
                "WHERE b.seq > ? ORDER BY 1", [last]).fetchall()]
    return users, newest


def recompute(
    ws: ServingSource,
    alias: str = "production",
    *,
    users: str | Sequence[Any] = "changed",
    k: int = 10,
    ranker: Any = None,
    top_m: int = 50,
    progress: bool = True,
    batch_users: int = 256,
) -> dict[str, Any]:
    """Recompute top-``k`` lists for all / changed / given users and store them as one run."""
    if k <= 0:
        raise InvalidInput(f"k must be positive, got {k}")
    if isinstance(users, str) and users not in USER_MODES:
        raise InvalidInput(f"invalid users {users!r}: use 'all', 'changed' or a list of user ids")
    started = time.perf_counter()
    node = ws.get(alias)
    if node.task != "retriever":
        raise InvalidInput(
            f"{alias!r} points at a {node.task} node; recomputing for the whole catalog needs a retriever "
            "(pass the ranker as ranker= to rerank its top candidates)"
        )
    follows = alias if ws.alias_target(str(alias)) is not None else None
    if users == "changed":
        wanted, newest = changed_users(ws, follows)
        mode = "changed"
    elif users == "all":
        wanted, newest = all_users(ws)
        mode = "all"
    else:
        wanted, newest, mode = [str(u) for u in users], None, "list"
    two_stage = ranker is not None
    shape = f"two-stage, the ranker rescoring the top {top_m} of each" if two_stage else "retriever only"
    rate = last_rate(ws, two_stage)
    expected = rate * len(wanted) if rate else None
    _say(f"recompute: {len(wanted):,} user(s), {shape}"
         + (f"; expected ~{duration(expected)} (the last run's {rate:.3g} s/user)" if expected is not None else ""),
         progress and bool(wanted))
    chunk_users = max(1, min(batch_users, PAIRS_PER_REQUEST // max(k, top_m))) if two_stage else batch_users
    scorer = Scorer(ws, alias, ranker=ranker)
    try:
        if wanted:
            scorer.item_embeddings()  # the fixed cost, paid before the first chunk is timed
        lists: dict[str, list[dict[str, Any]]] = {}
        with progress_bar(total=len(wanted), desc="recompute", unit="user", enabled=progress) as bar:
            for start in range(0, len(wanted), chunk_users):
                chunk = wanted[start:start + chunk_users]
                chunk_started = time.perf_counter()
                lists.update(scorer.recommend_many(chunk, k, top_m=top_m))
                bar.update(len(chunk))
                if start == 0 and rate is None and len(wanted) > len(chunk):
                    # no earlier run to go by: the first chunk is the measure (models and items were ready before it)
                    now = time.perf_counter()
                    per_user = (now - chunk_started) / len(chunk)
                    expected = now - started + per_user * (len(wanted) - len(chunk))
                    _say(f"recompute: expected ~{duration(expected)} in all (measured on the first "
                         f"{len(chunk)} user(s), {per_user:.3g} s/user)", progress)
        ranker_id = scorer.active_nodes.get("ranker")
    finally:
        scorer.close()
    user_col, rank_col, item_col, score_col = [], [], [], []
    for user, recs in lists.items():
        for rank, rec in enumerate(recs, start=1):
            user_col.append(user)
            rank_col.append(rank)
            item_col.append(rec["item_id"])
            score_col.append(rec["score"])
    wall = time.perf_counter() - started
    with ws.catalog.transaction() as con:
        run_id = con.execute(
            "INSERT INTO recommendation_runs (alias, node_id, ranker_node_id, k, users_mode, num_users, "
            "max_batch_seq, wall_s, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            [follows, node.id, ranker_id, k, mode, len(lists), newest, wall, utcnow()],
        ).fetchone()[0]
        if user_col:
            con.execute(
                "INSERT INTO recommendations SELECT ?, unnest(?::VARCHAR[]), unnest(?::INTEGER[]), "
                "unnest(?::VARCHAR[]), unnest(?::DOUBLE[]), ?",
                [run_id, user_col, rank_col, item_col, score_col, node.id],
            )
        maybe_crash("recompute:in_txn")
        log_event(con, "recompute", {"alias": alias, "users": mode, "k": k, "ranker": ranker},
                  detail={"run_id": run_id, "node_id": node.id, "users": len(lists), "rows": len(user_col)})
    return {"run_id": int(run_id), "node_id": node.id, "ranker_node_id": ranker_id, "users": len(lists),
            "rows": len(user_col), "mode": mode, "wall_s": wall, "expected_s": expected}


def current(ws: ServingSource, user: Any | None = None, alias: str | None = "production") -> list[dict[str, Any]]:
    """The lists readers see now (newest complete run per user), with the node that produced them."""
    sql = "SELECT * FROM current_recommendations WHERE coalesce(alias, '') = coalesce(?, '')"
    params: list[Any] = [alias]
    if user is not None:
        sql += " AND user_id = ?"
        params.append(str(user))
    with ws.catalog.connect() as con:
        return fetch_dicts(con, sql + " ORDER BY user_id, rank", params)
