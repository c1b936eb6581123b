"""A seeded synthetic interaction stream with drift, two schemas, duplicates and bad rows.

Why: tests and the benchmark need data whose truth is known (how many duplicates of each kind
and bad rows of each rule were injected) and which exercises every path of a sync, at any size.
Everything is generated with numpy and formatted/written by DuckDB, so 10M rows take seconds.

Source A (``events_a.parquet``): user_id / item_id integers, rating float, ts epoch milliseconds,
event_id string. Source B (``events_b.csv``): uid / mid strings, stars, liked (0/1 label), time as
ISO strings (a third each with 'Z', with '+02:00' and without a zone), event_ref.
Drift: each user prefers one item group, and with probability ``drift * t`` (t = fraction of the
time span elapsed) has moved on to the next group; ratings are high inside the current group.
Noise (``bursts``, off by default like the rule it tests): bot users, known to the user table but
with no other events, each firing ``BURST_SIZE`` events one second apart into source A, which is
then registered with ``max_events_per_minute=BURST_LIMIT`` so the noise rule must catch them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Documentary")
OCCUPATIONS = ("student", "engineer", "artist", "doctor", "writer", "retired")
# bad-row kinds and the rule each must trigger; the last two need the entity sources registered
BAD_KINDS = ("missing_user", "missing_item", "bad_timestamp", "future_timestamp", "rating_out_of_range",
             "label_out_of_range", "unknown_user", "unknown_item")
RULE_OF = {"missing_user": "missing_key", "missing_item": "missing_key"}
STEP_MS = 2000  # events are >= 1.5 s apart, so only injected duplicates fall within a 1 s tolerance
BURST_SIZE = 8  # events per injected bot burst, one second apart ...
BURST_LIMIT = 5  # ... against a noise rule allowing 5 events a minute


@dataclass
class SyntheticData:
    """Paths of the written files, the add_source arguments that read them, and the injected truth."""

    folder: Path
    files: dict[str, Path]
    sources: dict[str, dict[str, Any]]
    truth: dict[str, Any] = field(default_factory=dict)

    def register(self, data: Any, *, entities: bool = True) -> None:
        """Register the sources on a DataAPI (entities first so unknown users/items are checked)."""
        for name, kwargs in self.sources.items():
            if entities or kwargs.get("kind", "interactions") == "interactions":
                data.add_source(name, **kwargs)


def generate(
    folder: str | Path,
    *,
    rows: int = 10_000,
    users: int = 200,
    items: int = 100,
    groups: int = 5,
    drift: float = 0.8,
    dup_rate: float = 0.01,
    bad_rate: float = 0.01,
    share_a: float = 0.6,
    seed: int = 0,
    start: datetime = datetime(2024, 1, 1, tzinfo=UTC),
    b_format: str = "csv",
    bursts: int = 0,
) -> SyntheticData:
    """Write a two-source stream of ``rows`` rows (clean + duplicates + bad + bot bursts) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_dup = int(round(rows * dup_rate))
    n_bad = int(round(rows * bad_rate))
    n_noise = bursts * BURST_SIZE
    n = rows - n_dup - n_bad - n_noise
    if n < 1:
        raise ValueError(f"rows={rows} leaves no clean rows after duplicates, bad rows and {bursts} bursts")
    start_ms = int(start.timestamp() * 1000)

    # clean events, evenly spaced in time with jitter, user tastes drifting between groups
    ts = start_ms + np.arange(n, dtype=np.int64) * STEP_MS + rng.integers(0, STEP_MS // 4, n)
    frac = np.arange(n) / max(n - 1, 1)
    user = rng.integers(0, users, n)
    pref = (user + (rng.random(n) < drift * frac)) % groups
    in_group = rng.random(n) < 0.8
    item = np.where(in_group, pref + groups * rng.integers(0, max(items // groups, 1), n), rng.integers(0, items, n))
    item = np.minimum(item, items - 1)
    liked = (item % groups) == pref
    rating = np.where(liked, rng.integers(4, 6, n), rng.integers(1, 4, n)).astype(np.float64)
    in_a = rng.random(n) < share_a
    event = np.arange(n, dtype=np.int64)

    # duplicates: half exact copies within a source, half copies into the other source (cross-source;
    # half of those carry the original event id, half only match on user/item/time within 400 ms)
    src_idx = rng.choice(n, size=n_dup, replace=n_dup > n)
    n_exact = n_dup // 2
    dup_kind = np.where(np.arange(n_dup) < n_exact, 0, 1)
    dup_in_a = np.where(dup_kind == 0, in_a[src_idx], ~in_a[src_idx])
    dup_jitter = np.where(dup_kind == 0, 0, rng.integers(-400, 401, n_dup))
    dup_same_id = (dup_kind == 0) | (rng.random(n_dup) < 0.5)

    # bad rows of every kind, spread over the span
    bad_kind = np.arange(n_bad) % len(BAD_KINDS)
    bad_idx = rng.integers(0, n, n_bad)
    b_only = np.isin(bad_kind, [BAD_KINDS.index("label_out_of_range"), BAD_KINDS.index("bad_timestamp")])
    bad_in_a = np.where(b_only, False, rng.random(n_bad) < share_a)  # only B has labels and free-text times

    # bot bursts: users `users`, `users + 1`, ... (in the user table, no other events), BURST_SIZE
    # events one second apart from a random moment of the span
    bot_user = users + np.repeat(np.arange(bursts), BURST_SIZE)
    bot_ts = (np.repeat(ts[rng.integers(0, n, bursts)], BURST_SIZE)
              + np.tile(np.arange(BURST_SIZE, dtype=np.int64) * 1000, bursts))
    cols = {
        "user": np.concatenate([user, user[src_idx], user[bad_idx], bot_user]),
        "item": np.concatenate([item, item[src_idx], item[bad_idx], rng.integers(0, items, n_noise)]),
        "rating": np.concatenate([rating, rating[src_idx], rating[bad_idx],
                                  rng.integers(1, 6, n_noise).astype(np.float64)]),
        "ts": np.concatenate([ts, ts[src_idx] + dup_jitter, ts[bad_idx] + STEP_MS // 2, bot_ts]),
        "event": np.concatenate([event, np.where(dup_same_id, event[src_idx], n + np.arange(n_dup)),
                                 n + n_dup + np.arange(n_bad), n + n_dup + n_bad + np.arange(n_noise)]),
        "in_a": np.concatenate([in_a, dup_in_a, bad_in_a, np.ones(n_noise, dtype=bool)]),
        "bad": np.concatenate([np.full(n + n_dup, -1), bad_kind, np.full(n_noise, -1)]).astype(np.int64),
        "tz": rng.integers(0, 3, n + n_dup + n_bad + n_noise),
    }
    order = rng.permutation(len(cols["user"]))
    cols = {k: v[order] for k, v in cols.items()}
    files = _write(folder, cols, users + bursts, items, groups, b_format)

    # truth (what a correct sync must find): cross copies of a row whose original landed in the
    # same source cannot happen (they go to the other source by construction)
    per_bad = {k: int((bad_kind == i).sum()) for i, k in enumerate(BAD_KINDS)}
    by_rule: dict[str, int] = {}
    for k, v in per_bad.items():
        by_rule[RULE_OF.get(k, k)] = by_rule.get(RULE_OF.get(k, k), 0) + v
    if n_noise:
        by_rule["noise_burst"] = int(n_noise)
    truth = {
        "rows": int(len(order)), "clean": int(n), "duplicates": int(n_dup), "bad": int(n_bad),
        "noise": int(n_noise),
        "duplicates_by_kind": {"exact": int(n_exact), "cross_source": int(n_dup - n_exact)},
        "bad_by_rule": by_rule, "users": users, "items": items, "groups": groups, "seed": seed,
        "rows_a": int(cols["in_a"].sum()), "rows_b": int((~cols["in_a"]).sum()),
    }
    (folder / "truth.json").write_text(json.dumps(truth, indent=2))
    sources = {
        "syn_users": {"uri": str(files["users"]), "kind": "users"},
        "syn_items": {"uri": str(files["items"]), "kind": "items", "list_attrs": {"genres": "|"}},
        "events_a": {"uri": str(files["a"]), "mapping": {"user_id": "user_id", "item_id": "item_id",
                     "rating": "rating", "ts": "ts", "source_event_id": "event_id"}, "ts_format": "epoch_ms",
                     **({"max_events_per_minute": BURST_LIMIT} if bursts else {})},
        "events_b": {"uri": str(files["b"]), "mapping": {"user_id": "uid", "item_id": "mid", "rating": "stars",
                     "label": "liked", "ts": "time", "source_event_id": "event_ref"}, "ts_format": "iso"},
    }
    return SyntheticData(folder, files, sources, truth)


def _write(folder: Path, cols: dict[str, np.ndarray], users: int, items: int, groups: int, b_format: str
           ) -> dict[str, Path]:
    bk = {k: i for i, k in enumerate(BAD_KINDS)}
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    t = cols  # noqa: F841  (scanned by name by DuckDB)
    con.execute(
        f"""
        CREATE TABLE ev AS SELECT
            CASE WHEN bad = {bk['missing_user']} THEN NULL
                 WHEN bad = {bk['unknown_user']} THEN CAST(user + {users} + 1000 AS VARCHAR)
                 ELSE CAST(user AS VARCHAR) END AS u,
            CASE WHEN bad = {bk['missing_item']} THEN NULL
                 WHEN bad = {bk['unknown_item']} THEN CAST(item + {items} + 1000 AS VARCHAR)
                 ELSE CAST(item AS VARCHAR) END AS i,
            CASE WHEN bad = {bk['rating_out_of_range']} THEN 9.0 ELSE rating END AS r,
            CASE WHEN bad = {bk['future_timestamp']} THEN ts + 200 * 365 * 86400000::BIGINT ELSE ts END AS ms,
            bad, tz, in_a, 'e' || CAST(event AS VARCHAR) AS eid
        FROM t
        """
    )
    paths = {"a": folder / "events_a.parquet", "b": folder / f"events_b.{'csv' if b_format == 'csv' else 'jsonl'}",
             "users": folder / "users.csv", "items": folder / "items.parquet"}
    con.execute(
        f"""
        COPY (SELECT TRY_CAST(u AS BIGINT) AS user_id, TRY_CAST(i AS BIGINT) AS item_id, r AS rating,
                     ms AS ts, eid AS event_id
              FROM ev WHERE in_a) TO '{paths['a']}' (FORMAT parquet)
        """
    )
    iso = ("CASE tz WHEN 0 THEN strftime(make_timestamp(ms * 1000), '%Y-%m-%dT%H:%M:%S.%gZ') "
           "WHEN 1 THEN strftime(make_timestamp((ms + 7200000) * 1000), '%Y-%m-%dT%H:%M:%S.%g+02:00') "
           "ELSE strftime(make_timestamp(ms * 1000), '%Y-%m-%d %H:%M:%S.%g') END")
    b_sql = f"""
        SELECT u AS uid, i AS mid, CAST(CAST(r AS INTEGER) AS VARCHAR) AS stars,
               CASE WHEN bad = {bk['label_out_of_range']} THEN 'maybe' ELSE CAST((r >= 4)::INTEGER AS VARCHAR) END
                   AS liked,
               CASE WHEN bad = {bk['bad_timestamp']} THEN 'not-a-time' ELSE {iso} END AS time,
               eid AS event_ref
        FROM ev WHERE NOT in_a
    """
    fmt = "(FORMAT csv, HEADER)" if b_format == "csv" else "(FORMAT json)"
    con.execute(f"COPY ({b_sql}) TO '{paths['b']}' {fmt}")
    genres = "[" + ", ".join(f"'{g}'" for g in GENRES) + "]"
    occ = "[" + ", ".join(f"'{o}'" for o in OCCUPATIONS) + "]"
    con.execute(
        f"""
        COPY (SELECT u AS user_id, 18 + (u * 7) % 50 AS age, CASE WHEN u % 2 = 0 THEN 'F' ELSE 'M' END AS gender,
                     {occ}[1 + u % {len(OCCUPATIONS)}] AS occupation
              FROM range({users}) r(u)) TO '{paths['users']}' (FORMAT csv, HEADER)
        """
    )
    con.execute(
        f"""
        COPY (SELECT i AS item_id, 'Item ' || i AS title, 1950 + (i * 13) % 70 AS year,
                     {genres}[1 + i % {groups} % {len(GENRES)}] || CASE WHEN i % 3 = 0
                         THEN '|' || {genres}[1 + (i + 1) % {len(GENRES)}] ELSE '' END AS genres
              FROM range({items}) r(i)) TO '{paths['items']}' (FORMAT parquet)
        """
    )
    con.close()
    return paths
