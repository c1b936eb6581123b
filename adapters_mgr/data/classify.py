"""Set-based cleaning and dedup over the staged rows of one sync, in DuckDB temp tables.

Order matters and is fixed: row rules and unknown users/items (decided in the staging pass, see
``stage.interaction_sql``) -> noise rules -> exact duplicates and the same event from another source
within a tolerance (one window pass) -> the same source_event_id -> events already in earlier
batches. A row gets at most one outcome, so rows in = kept + quarantined + duplicates holds by
construction.

Why candidates first: almost every row is unique, and sorting all of them by (user, item, time)
to compare neighbours was most of a sync's time. Time is cut into buckets ``GRID`` tolerances
wide; two rows within a tolerance of each other either share a bucket or both lie within a
tolerance of the same bucket boundary (a few percent of rows are that close to one). So 64-bit
hashes of (user, item, bucket) and of (user, item, boundary) that occur more than once mark a
small superset of the rows that can be duplicates; the exact window logic then runs on those rows
only and gives the same answer as running it on all rows (a row's nearest earlier neighbour is a
candidate whenever it matters, and any superset of the candidates gives the same answer too).
Likewise shared event ids are found through their hashes first. The outcome of dedup is the
small table ``_dup (rid, kind)`` of ``_stage`` row ids; nothing large is rewritten.

Why numpy for the "occurs more than once" test: DuckDB's hash aggregate over ~10M distinct
64-bit keys took ~2 CPU s per key family (4.4 s of a 10M-row sync for the three), while sorting
the same keys with numpy (SIMD sort) and comparing neighbours takes ~0.2 s per family.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import duckdb
import numpy as np

from adapters_mgr.data import badlines
from adapters_mgr.data.digest import fetch_table_arrays
from adapters_mgr.data.sources import Source, sql_literal

RULES = (
    "missing_key", "bad_timestamp", "future_timestamp", "rating_out_of_range", "label_out_of_range",
    "unknown_user", "unknown_item", "noise_burst", *badlines.RULES,
)
DUP_KINDS = ("exact", "same_event_id", "cross_source", "earlier_batch")
# Candidate time buckets are GRID tolerances wide; a pair within a tolerance either shares a bucket
# or lies within a tolerance of the same bucket boundary (about 2/GRID of the rows are that close).
GRID = 32


def entity_checks(con: duckdb.DuckDBPyConnection) -> tuple[bool, bool]:
    """Whether users / items are checked: an empty entity table means "no entity source registered",
    so the rule stays silent rather than quarantining everything."""
    row = con.execute("SELECT EXISTS (SELECT 1 FROM users), EXISTS (SELECT 1 FROM items)").fetchone()
    return bool(row[0]), bool(row[1])


def apply_noise_rules(con: duckdb.DuckDBPyConnection, sources: list[Source]) -> None:
    """Noise rule: a user with more than N events within any 60 seconds (per source) is a bot or a replay.

    Any 60 seconds, not calendar minutes: a burst of N+1 events from 12:00:58 to 12:01:01 is one.
    ``c`` counts each event's trailing 60 s ((t - 60 s, t]); an event is in a burst when some event
    in the 60 s from it on ends a window with more than N, so every event of a burst is flagged.
    """
    window = "INTERVAL 59999999 MICROSECOND"  # a 60 s window holds t .. t + 59.999999 s
    for sidx, src in enumerate(sources):
        limit = src.option("max_events_per_minute")
        if not limit:
            continue
        con.execute(
            f"""
            UPDATE _stage SET rule = 'noise_burst',
                detail = 'more than ' || CAST($limit AS VARCHAR) || ' events of user ' || user_id || ' within 60 s'
            WHERE rowid IN (
                SELECT rid FROM (
                    SELECT rid, max(c) OVER (PARTITION BY user_id ORDER BY ts
                                             RANGE BETWEEN CURRENT ROW AND {window} FOLLOWING) AS burst
                    FROM (
                        SELECT rowid AS rid, user_id, ts,
                               count(*) OVER (PARTITION BY user_id ORDER BY ts
                                              RANGE BETWEEN {window} PRECEDING AND CURRENT ROW) AS c
                        FROM _stage WHERE rule IS NULL AND sidx = $sidx))
                WHERE burst > $limit)
            """,
            {"limit": int(limit), "sidx": sidx},
        )


def _zone(t: str, width: int, tol_us: int) -> str:
    """SQL: the index of the bucket boundary within a tolerance (+1 us) of ``t``, else NULL.

    ``//`` and ``%`` truncate toward zero, so buckets change between k*width - 1 and k*width for
    positive times and between -k*width and -k*width + 1 for negative ones: either way both rows
    of a pair straddling a boundary lie within tolerance + 1 of the same multiple of ``width``.
    """
    return (f"CASE WHEN abs({t} % {width}) <= {tol_us + 1} THEN {t} // {width} "
            f"WHEN abs({t} % {width}) >= {width - tol_us - 1} THEN {t} // {width} + sign({t}) END")


_FILTER_BITS = 24  # 16 MB of flags: a first, inexact membership test that leaves ~1% for the exact one


def _repeated(values: np.ndarray, none: int | None = None) -> np.ndarray:
    """Per element: does its value occur more than once among the non-NULL ``values``?

    NULLs (masked entries) and elements equal to ``none`` never match. Sorted neighbours give the
    repeated values (the first of each run of equal neighbours, so no second sort); membership is
    a flag table indexed by the top bits of the value (exact for absent values in all but ~1% of
    the cases) followed by an exact ``isin`` on the few elements the flags let through. The
    membership test runs over ``_CHUNK`` elements at a time: with many repeated values (a file of
    millions of identical rows) its temporaries would otherwise be as large as the input, twice.
    """
    mask = np.ma.getmaskarray(values) if isinstance(values, np.ma.MaskedArray) else None
    data = np.asarray(np.ma.getdata(values), dtype=np.uint64)
    if none is not None:
        mask = (data == np.uint64(none)) if mask is None else (mask | (data == np.uint64(none)))
    ordered = np.sort(data if mask is None else data[~mask])
    equal = ordered[1:] == ordered[:-1]
    equal[1:] &= ~equal[:-1]  # keep the first pair of each run of equal values
    repeated = ordered[1:][equal]
    del ordered, equal
    out = np.zeros(len(data), dtype=bool)
    if len(repeated) == 0:
        return out
    shift = np.uint64(64 - _FILTER_BITS)
    flags = np.zeros(1 << _FILTER_BITS, dtype=bool)
    flags[repeated >> shift] = True
    for lo in range(0, len(data), _CHUNK):
        part = data[lo:lo + _CHUNK]
        maybe = flags[part >> shift]
        if mask is not None:
            maybe &= ~mask[lo:lo + _CHUNK]
        idx = np.flatnonzero(maybe)
        out[lo + idx] = np.isin(part[idx], repeated)
    return out


_CHUNK = 1 << 21


def _source_columns(sources: list[Source]) -> tuple[str, str]:
    """SQL for the name and the priority of a staged row's source (rows carry only ``sidx``)."""
    names = sql_literal([s.name for s in sources])
    prios = "[" + ", ".join(str(int(s.priority)) for s in sources) + "]"
    return f"{names}[sidx + 1]", f"{prios}[sidx + 1]"


KEY_COLUMNS = ("_ha", "_hb", "_he")


def stage_keys(tolerance: timedelta, rows_sql: str) -> str:
    """SQL adding the dedup keys ``KEY_COLUMNS`` to every row of ``rows_sql`` (staged columns).

    ``_ha``: 64-bit hash of (user, item, time bucket); ``_hb``: of (user, item, boundary zone) for
    rows within a tolerance of a bucket boundary, else 0; ``_he``: of the event id, else 0. Nonzero
    hashes have their lowest bit set, so 0 stands for "none" without a NULL mask (two keys whose
    hashes differ only in that bit both become candidates: one more candidate, never one fewer).
    Why computed while staging: the strings are at hand there; hashing them later meant scanning
    the staged strings again (~2 CPU s of a 10M-row sync, with fetching).
    """
    tol_us = int(tolerance.total_seconds() * 1_000_000)
    width = GRID * max(tol_us, 1)
    return f"""
        SELECT * EXCLUDE (_t, _zone), hash(user_id, item_id, _t // {width}) AS _ha,
               CASE WHEN _zone IS NOT NULL THEN hash(user_id, item_id, _zone) | 1 ELSE 0 END AS _hb,
               CASE WHEN source_event_id IS NOT NULL THEN hash(source_event_id) | 1 ELSE 0 END AS _he
        FROM (SELECT *, {_zone('_t', width, tol_us)} AS _zone FROM (SELECT *, epoch_us(ts) AS _t FROM ({rows_sql})))
    """


def classify(
    con: duckdb.DuckDBPyConnection,
    *,
    tolerance: timedelta,
    multi_source: bool,
    sources: list[Source],
    also: dict[str, str] | None = None,
    lean: bool = False,
) -> dict[str, np.ndarray]:
    """Create ``_dup (rid, kind)``: the ``_stage`` rows (by rowid) that duplicate another row.

    ``lean``: keep numpy's memory low rather than use both cores (see its use below).

    Returns ``rid``, ``h`` (the row hash ``_h``, which the digests need too) and the ``also``
    columns (name -> SQL over ``_stage`` columns) of every clean row (rule IS NULL) as read by the
    one scan that computes the dedup keys, so a caller that needs a per-row value of the kept rows
    gets it without another scan.

    The window pass over (user_id, item_id) ordered by time finds both exact copies (the previous
    row is identical, same source) and the same event from another source (the previous row is
    from a different source within ``tolerance``); the earliest copy is kept, then the
    higher-priority source. Chains count: each copy is compared with its predecessor. Rows sharing
    a ``source_event_id`` keep the best-priority, earliest one.

    Identical candidates (same source, file and values) are collapsed first: all but one are
    ``exact`` copies whatever their neighbours, and the one left meets the same neighbours in the
    window. Why: a file of 13M identical rows made one window partition of 13M rows (most of a
    59 s, 6 GB sync); grouped, the window sees one row. Only candidates whose row hash (``_h``,
    fetched as ``h``) occurs more than once among the candidates can be identical to another, so
    only those are grouped (at 10M ordinary rows, a few thousand instead of every candidate).
    """
    tol_us = int(tolerance.total_seconds() * 1_000_000)
    width = GRID * max(tol_us, 1)
    source, prio = _source_columns(sources)
    cross = f"prev_source <> source AND t - prev_t <= {tol_us}" if multi_source else "false"
    # one scan of the clean rows' keys (see ``stage_keys``); keys seen more than once mark the
    # candidates (a hash collision only adds a candidate, never loses one). The keys go to numpy
    # and only the candidate row ids come back.
    extra = "".join(f", {sql} AS {name}" for name, sql in {"h": "_h", **(also or {})}.items())
    keys = fetch_table_arrays(con, "_stage", f"rowid AS rid, {', '.join(KEY_COLUMNS)}{extra}", "rule IS NULL")
    rid = np.asarray(keys["rid"], dtype=np.int64)
    # numpy sorts without the GIL: the three key columns on two threads take ~0.45 s instead of
    # ~0.9 s at 10M rows (measured), time in which DuckDB would leave a core idle; ``lean`` (the
    # caller found the rows mostly copies) sorts one at a time, holding one sort's copies at once
    with ThreadPoolExecutor(max_workers=1 if lean else 2) as pool:
        ha, hb, he = (pool.submit(_repeated, keys.pop(k), none) for k, none in (("_ha", None), ("_hb", 0), ("_he", 0)))
        near = ha.result() | hb.result()
        shared = he.result()
    pick = near | shared
    near_picked = near[pick]
    same = np.zeros(len(near_picked), dtype=bool)  # candidates that may be identical to another
    same[near_picked] = _repeated(keys["h"][near & pick])
    con.register("_cand_np", {"rid": rid[pick], "near": near_picked, "shared": shared[pick], "same": same})
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE _cand AS SELECT rid, near, shared, same FROM _cand_np")
    finally:
        con.unregister("_cand_np")
    del near, shared, pick, near_picked, same
    keys["rid"] = rid
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _dup AS
        WITH files AS (SELECT * FROM _files),
        near AS MATERIALIZED (
            SELECT s.rowid AS rid, c.same, sidx, fidx, user_id, item_id, ts, rating, label, source_event_id
            FROM _stage s JOIN (SELECT rid, same FROM _cand WHERE near) c ON s.rowid = c.rid),
        firsts AS MATERIALIZED (
            SELECT min(rid) AS rid FROM near WHERE same
            GROUP BY sidx, fidx, user_id, item_id, ts, rating, label, source_event_id),
        cand AS (
            SELECT n.*, {source} AS source, {prio} AS prio, epoch_us(ts) AS t
            FROM near n WHERE NOT same OR rid IN (SELECT rid FROM firsts)),
        w AS (
            SELECT c.*, f.path AS file,
                lag(source) OVER w AS prev_source, lag(t) OVER w AS prev_t,
                lag(rating) OVER w AS prev_rating, lag(label) OVER w AS prev_label,
                lag(source_event_id) OVER w AS prev_event
            FROM cand c LEFT JOIN files f USING (sidx, fidx)
            WINDOW w AS (PARTITION BY user_id, item_id ORDER BY ts, prio, rating, label, source_event_id, f.path))
        SELECT rid, CASE
                WHEN prev_source = source AND prev_t = t AND prev_rating IS NOT DISTINCT FROM rating
                     AND prev_label IS NOT DISTINCT FROM label AND prev_event IS NOT DISTINCT FROM source_event_id
                THEN 'exact'
                WHEN {cross} THEN 'cross_source'
            END AS kind
        FROM w WHERE kind IS NOT NULL
        UNION ALL
        SELECT rid, 'exact' FROM near WHERE same AND rid NOT IN (SELECT rid FROM firsts)
        """
    )
    # the same source_event_id on surviving rows: keep the best-priority, earliest one
    con.execute(
        f"""
        INSERT INTO _dup
        WITH ev AS (
            SELECT rowid AS rid, source_event_id, user_id, item_id, ts, rating, label,
                   {source} AS source, {prio} AS prio
            FROM _stage
            WHERE rowid IN (SELECT rid FROM _cand WHERE shared AND rid NOT IN (SELECT rid FROM _dup))),
        ranked AS (
            SELECT rid, CASE WHEN first_value(source) OVER e <> source THEN 'cross_source' ELSE 'same_event_id' END
                       AS kind,
                   row_number() OVER e AS rn
            FROM ev
            WINDOW e AS (PARTITION BY source_event_id ORDER BY prio, ts, user_id, item_id, rating, label, rid))
        SELECT rid, kind FROM ranked WHERE rn > 1
        """
    )
    has_earlier = con.execute("SELECT EXISTS (SELECT 1 FROM interaction_rows)").fetchone()[0]
    if not has_earlier:
        return keys
    lo, hi = con.execute(
        "SELECT min(ts), max(ts) FROM _stage WHERE rule IS NULL AND rowid NOT IN (SELECT rid FROM _dup)"
    ).fetchone()
    if lo is None:
        return keys
    # earlier batches: the same (user, item) within the tolerance, or the same event id. An earlier
    # row within a tolerance of a new row at time t lies in bucket((t - tol) // width) or
    # ((t + tol) // width) (buckets are monotonic in time and wider than two tolerances), so each
    # new row gets those one or two bucket keys and the earlier rows in the time range, read once,
    # are hash-joined on (user, item, bucket); then the exact test. Why this shape: the new rows
    # are few and build the hash tables while the earlier rows only probe them; materialising the
    # earlier rows and building on their event ids cost ~2 CPU s per sync on a 10M-row catalog.
    con.execute(
        f"""
        INSERT INTO _dup
        WITH n AS MATERIALIZED (
            SELECT rowid AS rid, user_id, item_id, epoch_us(ts) AS t, source_event_id FROM _stage
            WHERE rule IS NULL AND rowid NOT IN (SELECT rid FROM _dup)),
        nk AS (
            SELECT rid, user_id, item_id, t, (t - {tol_us}) // {width} AS k FROM n
            UNION ALL
            SELECT rid, user_id, item_id, t, (t + {tol_us}) // {width} FROM n
            WHERE (t + {tol_us}) // {width} <> (t - {tol_us}) // {width}),
        p AS (
            SELECT user_id, item_id, epoch_us(ts) AS t, epoch_us(ts) // {width} AS k FROM interaction_rows
            WHERE ts BETWEEN ?::TIMESTAMPTZ - INTERVAL ({tol_us}) MICROSECOND
                         AND ?::TIMESTAMPTZ + INTERVAL ({tol_us}) MICROSECOND),
        hit AS (
            SELECT nk.rid FROM nk JOIN p ON nk.user_id = p.user_id AND nk.item_id = p.item_id AND nk.k = p.k
            WHERE abs(nk.t - p.t) <= {tol_us}
            UNION
            SELECT n.rid FROM n SEMI JOIN interaction_rows e ON e.source_event_id = n.source_event_id)
        SELECT rid, 'earlier_batch' FROM hit
        """,
        [lo, hi],
    )
    return keys


def mark_seen_quarantined(con: duckdb.DuckDBPyConnection, sources: list[Source]) -> None:
    """Add to ``_dup`` (as ``earlier_batch``) the staged rule-breaking rows an earlier sync already
    quarantined: the same source row, from the same source, breaking the same rule.

    Why: rows without a usable time cannot be compared with the watermark, so a changed file's
    such rows are read again on every sync; without this they would be quarantined (and counted)
    once per re-read, and a merely touched file would make a new batch. A bad line is the same
    line when its number and text are (``badlines.line_json``).
    """
    if not con.execute("SELECT EXISTS (SELECT 1 FROM quarantine WHERE batch_id IS NOT NULL)").fetchone()[0]:
        return
    source, _ = _source_columns(sources)
    line = badlines.line_json("line_no", "line_text")
    con.execute(
        f"""
        INSERT INTO _dup
        SELECT s.rid, 'earlier_batch' FROM (
            SELECT rowid AS rid, {source} AS source, rule, raw_row FROM _stage
            WHERE rule IS NOT NULL AND raw_row IS NOT NULL) s
        SEMI JOIN (SELECT source, rule, coalesce(CAST("row" AS VARCHAR), {line}) AS raw_row FROM quarantine
                   WHERE batch_id IS NOT NULL) q
            ON q.source = s.source AND q.rule = s.rule AND q.raw_row = s.raw_row
        """
    )

