"""One sync: read what is new per source, clean, dedup, cut into immutable batches, all or nothing.

Why one transaction for the whole sync: a crash anywhere (the ``ADAPTERS_MGR_FAULT=sync:<point>``
hook kills the process at named points to prove it) must leave either every batch of the sync
with its rows, quarantine, watermarks and event, or none of them.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from adapters_mgr.catalog.data_tables import source_ids
from adapters_mgr.catalog.db import Catalog
from adapters_mgr.catalog.sql import log_event, to_json, utcnow
from adapters_mgr.data import badlines, classify, digest
from adapters_mgr.data.entities import sync_entities
from adapters_mgr.data.registry import load_sources
from adapters_mgr.data.sources import Source, describe, is_empty, resolve_mapping, sql_literal
from adapters_mgr.data.stage import detect_source_ts, interaction_sql, rejects_prefix
from adapters_mgr.data.timeparse import parse_duration
from adapters_mgr.errors import InvalidInput, NotFound
from adapters_mgr.faults import maybe_crash

FAULT_POINTS = ("staged", "classified", "inserted", "before_commit")


@dataclass
class FilePlan:
    """Which files of a source to read this time, and the watermark for re-read ones.

    ``since``: per changed file, the time before which its rows are skipped (the source's watermark
    when the file was last read); ``before``: how many of its rows lay before that time then (None
    for a file read before migration d003: its late rows cannot be counted). ``empty``: files
    holding nothing yet, left unread and unrecorded so that they are read once they are filled.
    """

    source: Source
    new: list[Path]
    changed: list[Path]
    watermark: datetime | None
    stats: dict[Path, tuple[int, int]]
    since: dict[Path, datetime | None] = field(default_factory=dict)
    before: dict[Path, int | None] = field(default_factory=dict)
    empty: list[Path] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return self.new + self.changed


def _fault(point: str) -> None:
    maybe_crash(f"sync:{point}")


def plan_files(con: duckdb.DuckDBPyConnection, src: Source) -> FilePlan:
    seen = {r[0]: r[1:] for r in con.execute(
        "SELECT path, size, mtime_ns, before_ts, rows_before FROM data_source_files WHERE source = ?",
        [src.name]).fetchall()}
    wm = con.execute("SELECT ts_max FROM data_watermarks WHERE source = ?", [src.name]).fetchone()
    plan = FilePlan(src, [], [], wm[0] if wm else None, {})
    for path in src.files():
        st = os.stat(path)
        plan.stats[path] = (st.st_size, st.st_mtime_ns)
        old = seen.get(str(path))
        if old is not None and old[:2] == plan.stats[path]:
            continue
        if src.format != "parquet" and is_empty(path):
            plan.empty.append(path)
        elif old is None:
            plan.new.append(path)
        else:
            plan.changed.append(path)
            measured = old[3] is not None
            plan.since[path] = old[2] if measured else plan.watermark
            plan.before[path] = int(old[3]) if measured else None
    return plan


def _settle_mapping(con: duckdb.DuckDBPyConnection, plan: FilePlan, now: datetime) -> None:
    """Check the source's mapping against each file about to be read, completing it if need be.

    A source added while its glob matched nothing holds only the mapping the user gave; it is
    completed from the first files' columns here (and stored, in the sync's transaction). A file
    whose columns do not fit the mapping stops the sync with one line naming the file: read with
    the others, its rows would come in with empty keys (or DuckDB would fail to bind the query).
    """
    src = plan.source
    mapping = src.mapping
    for path in plan.files:
        columns = list(describe(con, src.format, [path], src.option("read")))
        try:
            mapping = resolve_mapping(src.kind, mapping, columns)
        except InvalidInput as exc:
            raise InvalidInput(
                f"source {src.name!r}, file {path}: {exc}; fix or move the file, re-add the source with "
                "a mapping that fits (add-source --replace), or sync the other sources with --source"
            ) from exc
    if mapping != src.mapping:
        src.mapping = mapping
        con.execute("UPDATE data_sources SET mapping = ?, updated_at = ? WHERE name = ?",
                    [to_json(mapping), now, src.name])


def _next_ids(con: duckdb.DuckDBPyConnection, count: int) -> tuple[list[str], int]:
    start = con.execute("SELECT coalesce(max(seq), 0) FROM batches").fetchone()[0] + 1
    return [f"b{start + i:06d}" for i in range(count)], start


def _window_origin(con: duckdb.DuckDBPyConnection, window_spec: str | None) -> datetime | None:
    """Reuse the first windowed sync's origin so later windows stay aligned with earlier ones."""
    if window_spec is None:
        return None
    row = con.execute(
        "SELECT detail->>'window_origin' FROM data_syncs WHERE detail->>'window_seconds' = ? "
        "AND detail->>'window_origin' IS NOT NULL ORDER BY started_at LIMIT 1",
        [str(int(parse_duration(window_spec).total_seconds()))],
    ).fetchone()
    return datetime.fromisoformat(row[0]) if row else None


def run_sync(
    catalog: Catalog,
    *,
    sources: list[str] | None = None,
    window: str | None = None,
    dedup_tolerance: str | float = "1s",
    progress: Any = None,
) -> list[str]:
    """Sync the named sources (all by default); return the ids of the new batches, oldest first."""
    win = parse_duration(window, what="window") if window is not None else None
    tol = timedelta(0) if dedup_tolerance in (0, "0", "0s") else parse_duration(dedup_tolerance, what="dedup_tolerance")
    started = utcnow()
    sync_id = f"s-{started:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    say = progress or (lambda _msg: None)
    restore: dict[str, Any] = {}  # global DuckDB settings this sync changes -> their values before
    try:
        cap = memory_cap()
        with catalog.connect() as con:  # outside the transaction: a refused SET would abort it
            restore.update(_bound_memory(con, catalog.path.parent, cap))
        with catalog.transaction() as con:
            con.execute("SET TimeZone = 'UTC'")
            registered = load_sources(con)
            if sources:
                unknown = [s for s in sources if s not in registered]
                if unknown:
                    raise NotFound(f"source {unknown[0]!r} is not registered; see `adapters-mgr data sources`")
                chosen = [registered[s] for s in sources]
            else:
                chosen = list(registered.values())
            if not chosen:
                raise InvalidInput("no sources are registered; add one with add_source(name, uri, ...) first")
            plans = [plan_files(con, s) for s in chosen]
            for plan in plans:
                if plan.files:
                    _settle_mapping(con, plan, started)
            entity_stats: dict[str, Any] = {}
            for plan in plans:
                if plan.source.kind != "interactions" and plan.files:
                    say(f"reading {plan.source.kind} from {plan.source.name} ({len(plan.files)} files)")
                    entity_stats[plan.source.name] = sync_entities(con, plan.source, plan.files, sync_id, started)
            inter = [p for p in plans if p.source.kind == "interactions" and p.files]
            for plan in inter:
                if plan.source.effective_ts_format is None:
                    plan.source.ts_detected = detect_source_ts(con, plan.source, plan.files)
                    con.execute("UPDATE data_sources SET ts_detected = ?, updated_at = ? WHERE name = ?",
                                [plan.source.ts_detected, started, plan.source.name])
            batch_rows: list[dict[str, Any]] = []
            detail: dict[str, Any] = {"entities": entity_stats}
            rows_read = sum(s["rows_in"] for s in entity_stats.values())
            if inter:
                say(f"reading interactions from {', '.join(p.source.name for p in inter)}")
                srcs = [p.source for p in inter]
                check_users, check_items = classify.entity_checks(con)
                stage_sql = [
                    interaction_sql(con, p.source, i, p.new, p.changed, [p.since[f] for f in p.changed], started,
                                    check_users=check_users, check_items=check_items)
                    for i, p in enumerate(inter)
                ]
                con.execute("CREATE OR REPLACE TEMP TABLE _files (sidx UTINYINT, fidx INTEGER, path VARCHAR)")
                con.executemany("INSERT INTO _files VALUES (?, ?, ?)",
                                [[i, k + 1, str(f)] for i, p in enumerate(inter) for k, f in enumerate(p.files)])
                for i in range(len(inter)):
                    badlines.drop(con, rejects_prefix(i))
                staged = " UNION ALL ".join(st.rows for st in stage_sql)
                con.execute(f"CREATE OR REPLACE TEMP TABLE _stage AS "
                            f"SELECT *, {digest.ROW_HASH} AS _h FROM ({classify.stage_keys(tol, staged)})")
                _stage_bad_lines(con, inter)
                lean = _mostly_copies(con)
                if lean:  # dedup sets as large as the input: half the cap for DuckDB, numpy on one thread
                    con.execute("SET memory_limit = ?", [f"{cap // 2}B"])
                skipped = _count_skipped(con, inter, stage_sql)
                detail.update(_late_rows(inter, skipped))
                _fault("staged")
                say("cleaning")
                classify.apply_noise_rules(con, srcs)
                multi = len({p.source.priority for p in inter}) > 1
                maxima, bno, valid = _windows(con, win, _window_origin(con, window))
                before = _rows_before(con, inter, maxima, valid, skipped)
                origin = bno.origin
                say("deduplicating")
                # the dedup scan also hands back each clean row's batch number and digest hash
                clean = classify.classify(con, tolerance=tol, multi_source=multi, sources=srcs,
                                          also={"bno": bno.sql} if win is not None else None, lean=lean)
                classify.mark_seen_quarantined(con, srcs)
                _fault("classified")
                say("writing batches")
                restore["disabled_compression_methods"] = _cheap_string_compression(con)
                restore["preserve_insertion_order"] = _setting(con, "preserve_insertion_order")
                if win is not None and origin is not None:
                    detail.update(window_origin=origin.isoformat(), window_seconds=str(int(win.total_seconds())))
                batch_rows, read = _write_batches(con, sync_id, started, srcs, win, bno, clean)
                rows_read += read
                _advance_watermarks(con, inter, maxima, before, sync_id, started)
                _drop_scratch(con, len(inter))
            for plan in plans:
                if plan.source.kind != "interactions":
                    _record_files(con, plan, sync_id, {})
            empty = [str(f) for p in plans for f in p.empty]
            if empty:
                detail["empty_files"] = empty
            _fault("before_commit")
            ids = [b["id"] for b in batch_rows]
            con.execute(
                "INSERT INTO data_syncs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [sync_id, started, utcnow(), to_json([p.source.name for p in plans if p.files]), window, rows_read,
                 to_json(ids), to_json(detail)],
            )
            log_event(
                con, "data.sync", {"sources": sources, "window": window, "dedup_tolerance": str(dedup_tolerance)},
                "ok", {"sync_id": sync_id, "batches": ids, "rows_read": rows_read, **detail,
                       "nothing_new": not any(p.files for p in plans)},
            )
    finally:
        if restore:  # on a fresh connection: the sync's own may be in a failed transaction
            with catalog.connect() as con:
                for name, value in restore.items():
                    con.execute(f"SET {name} = ?", [value])
    return ids


def _setting(con: duckdb.DuckDBPyConnection, name: str) -> Any:
    return con.execute("SELECT current_setting(?)", [name]).fetchall()[0][0]


SCRATCH_TABLES = ("_stage", "_files", "_cand", "_dup", "_dupb", "_bmap", "_bad")


def _drop_scratch(con: duckdb.DuckDBPyConnection, sources: int = 0) -> None:
    """Drop this sync's temp tables before the commit.

    Why: temp tables created and changed (the delete of duplicates from ``_stage``) inside the
    transaction are committed with it; for a 10M-row ``_stage`` that commit cost ~3 s, a drop ~0.
    """
    for table in SCRATCH_TABLES:
        con.execute(f"DROP TABLE IF EXISTS {table}")
    for sidx in range(sources):
        badlines.drop(con, rejects_prefix(sidx))


def _stage_bad_lines(con: duckdb.DuckDBPyConnection, plans: list[FilePlan]) -> None:
    """Add to ``_stage`` one row per line a source's read rejected (rule ``malformed_line`` or
    ``bad_encoding``, no columns, the line's number and text as its ``raw_row``), so a bad line is
    counted in and quarantined like any other rule-breaking row."""
    for sidx, plan in enumerate(plans):
        if badlines.collect(con, rejects_prefix(sidx), plan.files):
            con.execute(
                f"""
                INSERT INTO _stage BY NAME
                SELECT CAST({sidx} AS UTINYINT) AS sidx, fidx, rule, detail,
                       {badlines.line_json('line_no', 'text')} AS raw_row
                FROM _bad
                """
            )


def _count_skipped(con: duckdb.DuckDBPyConnection, plans: list[FilePlan], stage_sql: list[Any]) -> dict:
    """(sidx, fidx) -> rows of a changed file skipped as lying before its watermark."""
    out: dict[tuple[int, int], int] = {}
    for sidx, st in enumerate(stage_sql):
        if st.skipped is not None:
            out.update(((sidx, int(f)), int(n)) for f, n in con.execute(st.skipped).fetchall())
    return out


def _late_rows(plans: list[FilePlan], skipped: dict[tuple[int, int], int]) -> dict[str, Any]:
    """The sync report's late rows: rows appended to an already-read file before its watermark.

    A changed file's rows before its watermark are skipped (reading them would count every old row
    again as a duplicate); the file held ``before`` of them when last read, so the rest were
    appended since: late rows, not taken in, reported per file. Exact for files that only grow
    (a rewritten file that now holds fewer such rows reports none).
    """
    by_file: dict[str, int] = {}
    unmeasured: list[str] = []
    for sidx, plan in enumerate(plans):
        for k, path in enumerate(plan.files):
            if path not in plan.since:
                continue
            n = skipped.get((sidx, k + 1), 0)
            if plan.before.get(path) is None:
                if n:
                    unmeasured.append(str(path))
            elif n > plan.before[path]:
                by_file[str(path)] = n - plan.before[path]
    out: dict[str, Any] = {"late_rows": sum(by_file.values())}
    if by_file:
        out["late_rows_by_file"] = by_file
    if unmeasured:
        out["late_rows_unmeasured_files"] = unmeasured
    return out


def _rows_before(
    con: duckdb.DuckDBPyConnection, plans: list[FilePlan], maxima: dict[int, datetime],
    valid: dict[tuple[int, int], int], skipped: dict[tuple[int, int], int],
) -> dict[tuple[int, int], tuple[datetime | None, int]]:
    """(sidx, fidx) -> (the source's watermark after this sync, rows of the file before it): what
    the next read of the file, should it change, skips and subtracts (see ``_late_rows``).

    The rows before the new watermark are the rows with a usable time (``valid``: no usable time
    lies beyond the newest one) but those exactly at it, plus the rows skipped. Why not count
    ``ts < watermark`` directly: that is one more scan of every staged time (~0.1 CPU s at 10M
    rows), while rows equal to the newest time sit in a few row groups, which DuckDB finds by
    their min/max statistics.
    """
    out: dict[tuple[int, int], tuple[datetime | None, int]] = {}
    for sidx, plan in enumerate(plans):
        top = maxima.get(sidx)
        marks = [t for t in (plan.watermark, top) if t is not None]
        after = max(marks) if marks else None
        at_top: dict[int, int] = {}
        if top is not None and top == after:
            at_top = {int(f): int(n) for f, n in con.execute(
                f"SELECT fidx, count(*) FROM _stage WHERE sidx = {sidx} AND ts = ?::TIMESTAMPTZ "
                f"AND {_VALID_TS} GROUP BY 1", [top]).fetchall()}
        for k in range(len(plan.files)):
            n = valid.get((sidx, k + 1), 0) - at_top.get(k + 1, 0) + skipped.get((sidx, k + 1), 0)
            out[(sidx, k + 1)] = (after, n)
    return out


SYNC_MEMORY_ENV = "ADAPTERS_MGR_SYNC_MEMORY"
DEFAULT_SYNC_MEMORY = "2GB"
SPILL_FOLDER = ".duckdb_tmp"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_cap() -> int:
    """The sync's DuckDB memory cap in bytes: ``ADAPTERS_MGR_SYNC_MEMORY`` (e.g. 2GB, 1500MiB), default 2GB."""
    text = os.environ.get(SYNC_MEMORY_ENV) or DEFAULT_SYNC_MEMORY
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text, re.IGNORECASE)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) * _UNITS[m.group(2).lower()] < 2**24:
        raise InvalidInput(f"{SYNC_MEMORY_ENV}={text!r} is not a memory size of 16MiB or more; use e.g. 2GB or 1500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _bound_memory(con: duckdb.DuckDBPyConnection, folder: Path, cap: int) -> dict[str, Any]:
    """Cap DuckDB's memory for this sync at ``cap`` bytes; return the old cap.

    Why: DuckDB's default cap is 80% of the machine's memory, and a sync's scratch tables (the
    staged rows, the dedup candidates) grow with the input: a 400 KB gzip of 13.1M identical rows
    took 6 GB. Capped, DuckDB spills what does not fit to ``<catalog folder>/.duckdb_tmp`` instead
    of its default, a ``.tmp`` folder in the working directory. DuckDB keeps the first folder it
    spilled to for the life of the process (and does not create missing parents), so a later sync
    of another catalog spills there too, recreated if it was removed. The memory cap is global to
    the process's DuckDB instance, so the caller restores it. 2GB leaves a 10M-row sync unspilled
    (it holds ~1.5 GB in DuckDB; a 1GB cap cost it ~1 CPU s of spilling, ~7%).
    """
    old = _setting(con, "memory_limit")
    con.execute("SET memory_limit = ?", [f"{cap}B"])
    current = _setting(con, "temp_directory") or ""
    if current in ("", ".tmp") or current.endswith(SPILL_FOLDER):
        try:
            con.execute("SET temp_directory = ?", [str(folder / SPILL_FOLDER)])
        except duckdb.Error:  # DuckDB keeps the folder it spilled to once; it must still exist
            Path(current).mkdir(parents=True, exist_ok=True)
    return {"memory_limit": old}


def _mostly_copies(con: duckdb.DuckDBPyConnection, windows: int = 8, width: int = 4096) -> bool:
    """Whether the staged rows are mostly copies of each other, judged on ``windows`` runs of
    ``width`` rows spread evenly over ``_stage`` (by row id, so the same rows every time).

    Why: the dedup and write steps of such a sync work on sets as large as the input (every copy
    is a candidate, a ``_dup`` row, a ``duplicates`` row) while numpy holds the dedup keys beside
    DuckDB; a 13.1M-row file of one row repeated peaked at 2.1-2.5 GB under a 2GB cap. Reading the
    runs by row-id range skips the other row groups: ~2 ms at 10M rows. (A random sample was
    tried first: at 1M rows it held too few rows to judge, some times and not others.)
    """
    first, last = con.execute("SELECT min(rowid), max(rowid) FROM _stage").fetchone()
    if first is None or last - first + 1 < windows * width:
        return False
    step = (last - first + 1) // windows
    runs = " UNION ALL ".join(
        f"SELECT _ha FROM _stage WHERE rowid >= {first + k * step} AND rowid < {first + k * step + width}"
        for k in range(windows))
    n, distinct = con.execute(f"SELECT count(*), approx_count_distinct(_ha) FROM ({runs})").fetchone()
    return distinct < n // 2


def _cheap_string_compression(con: duckdb.DuckDBPyConnection) -> str:
    """Switch off DuckDB's DICT_FSST string compression for this sync's writes; return the old setting.

    Why: choosing and building DICT_FSST segments more than doubled the CPU time of writing 10M
    interactions (12-13 vs 6-7.5 CPU s, DuckDB 2.0.1). The price is space: DuckDB 2.0.1 then
    stores the strings uncompressed (a 10M-row catalog is ~600 MB instead of ~175 MB). The setting
    is global to the process's DuckDB instance, so the caller restores it.
    """
    old = _setting(con, "disabled_compression_methods") or ""
    methods = {m.strip().lower() for m in old.split(",") if m.strip()} | {"dict_fsst"}
    con.execute("SET disabled_compression_methods = ?", [",".join(sorted(methods))])
    return old


@contextlib.contextmanager
def _unordered_insert(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Let DuckDB insert without keeping the rows' scan order, for one statement.

    Why: with insertion order preserved, the parallel insert of 10M rows costs ~9 CPU s; without,
    ~6.5 (measured on this project's benchmark). Nothing reads ``interactions`` in storage order:
    every consumer orders by content, and the batch digest is order-independent. The setting is
    global to the process's DuckDB instance, so it is restored right after (and by ``run_sync``
    on a fresh connection should this one be in a failed transaction).
    """
    old = _setting(con, "preserve_insertion_order")
    con.execute("SET preserve_insertion_order = false")
    try:
        yield
    finally:
        with contextlib.suppress(duckdb.Error):
            con.execute("SET preserve_insertion_order = ?", [old])


@dataclass
class BatchNumber:
    """SQL for a staged row's batch number within this sync (the window it falls in), and its origin.

    Rows without a usable time (unparseable or future timestamps) go to the last window: they
    arrived now, and the batch that records them must exist.
    """

    sql: str
    origin: datetime | None


_VALID_TS = "ts IS NOT NULL AND coalesce(rule, '') NOT IN ('bad_timestamp', 'future_timestamp')"


def _windows(
    con: duckdb.DuckDBPyConnection, win: timedelta | None, origin: datetime | None
) -> tuple[dict[int, datetime], BatchNumber, dict[tuple[int, int], int]]:
    """Newest usable time per source (for the watermarks), the batch-number expression, and the
    number of rows with a usable time per (sidx, fidx) (for ``_rows_before``), in one scan."""
    per_file = con.execute(
        f"SELECT sidx, fidx, min(ts), max(ts), count(*) FROM _stage WHERE {_VALID_TS} GROUP BY 1, 2").fetchall()
    valid = {(int(r[0]), int(r[1])): int(r[4]) for r in per_file}
    maxima: dict[int, datetime] = {}
    for r in per_file:
        maxima[int(r[0])] = max(maxima.get(int(r[0]), r[3]), r[3])
    if win is None:
        return maxima, BatchNumber("0", None), valid
    first = min((r[2] for r in per_file), default=None)
    last_ts = max(maxima.values(), default=None)
    if origin is None and first is not None:
        origin = first.replace(hour=0, minute=0, second=0, microsecond=0)
    if origin is None:
        return maxima, BatchNumber("0", None), valid
    w_us = int(win.total_seconds() * 1_000_000)
    o_us = round((origin - datetime(1970, 1, 1, tzinfo=origin.tzinfo)).total_seconds() * 1_000_000)
    number = f"CAST(floor((epoch_us(ts) - {o_us}) / {w_us}) AS INTEGER)"
    last = con.execute(f"SELECT {number.replace('ts', '?::TIMESTAMPTZ')}", [last_ts]).fetchone()[0] if last_ts else 0
    return maxima, BatchNumber(f"CASE WHEN {_VALID_TS} THEN {number} ELSE {int(last)} END", origin), valid


def _write_batches(
    con: duckdb.DuckDBPyConnection,
    sync_id: str,
    now: datetime,
    sources: list[Source],
    win: timedelta | None,
    bno: BatchNumber,
    clean: dict[str, np.ndarray],
) -> tuple[list[dict[str, Any]], int]:
    """Insert kept rows, quarantine and duplicates straight from ``_stage`` and record the batches.

    Duplicates are recorded first and then deleted from ``_stage`` (a small delete), so the kept
    rows are just the clean staged rows and nothing of the size of the input is materialised a
    second time. ``clean`` holds ``rid``, ``bno`` and the digest hash ``h`` of every clean row;
    the digests are computed from it without scanning the rows again.
    """
    names = sql_literal([s.name for s in sources])
    # one pass over all staged rows: rows in / clean / quarantined per batch number, and the sources
    per_all = {
        r[0]: r for r in con.execute(
            f"""
            SELECT {bno.sql} AS bno, count(*) AS rows_in, list(DISTINCT sidx) AS sidx
            FROM _stage GROUP BY 1
            """
        ).fetchall()
    }
    read = int(sum(r[1] for r in per_all.values()))
    if not per_all:
        return [], 0
    con.execute(f"CREATE OR REPLACE TEMP TABLE _dupb AS SELECT d.rid, d.kind, {bno.sql} AS bno "
                "FROM _dup d JOIN (SELECT rowid AS rid, ts, rule FROM _stage) s USING (rid)")
    by_kind = _counts(con, "SELECT bno, kind, count(*) FROM _dupb GROUP BY ALL ORDER BY ALL")
    dups = {b: sum(k.values()) for b, k in by_kind.items()}
    total_new = sum(r[1] - dups.get(b, 0) for b, r in per_all.items())
    if total_new == 0:  # everything was already in earlier batches (a copied or touched file): no batch
        return [], read
    bnos = sorted(per_all)
    ids, start = _next_ids(con, len(bnos))
    con.execute("CREATE OR REPLACE TEMP TABLE _bmap (bno INTEGER, batch_id VARCHAR, seq INTEGER)")
    con.executemany("INSERT INTO _bmap VALUES (?, ?, ?)",
                    [[b, bid, start + i] for i, (b, bid) in enumerate(zip(bnos, ids, strict=True))])
    con.execute(
        f"""
        INSERT INTO duplicates
        SELECT ?, m.batch_id, {names}[sidx + 1], d.kind, s.user_id, s.item_id, s.ts, s.source_event_id, f.path
        FROM _dupb d JOIN (SELECT rowid AS rid, * FROM _stage) s USING (rid) JOIN _bmap m ON m.bno = d.bno
        LEFT JOIN _files f USING (sidx, fidx)
        """,
        [sync_id],
    )
    # The duplicates are recorded: drop them from the stage, so the kept rows are simply the clean
    # ones (a filter) instead of an anti-join against ``_dup`` in each of the three scans below.
    con.execute("DELETE FROM _stage WHERE rowid IN (SELECT rid FROM _dupb)")
    # after the delete: a rule-breaking row quarantined by an earlier sync is a duplicate now
    by_rule = _counts(con, f"SELECT {bno.sql} AS bno, rule, count(*) FROM _stage WHERE rule IS NOT NULL "
                           "GROUP BY ALL ORDER BY ALL")
    kept_rows = f"SELECT {bno.sql} AS bno, * FROM _stage WHERE rule IS NULL"
    kept = {
        r[0]: r for r in con.execute(
            f"""
            SELECT bno, count(*), min(ts), max(ts), count(DISTINCT user_id), count(DISTINCT item_id)
            FROM ({kept_rows}) GROUP BY 1
            """
        ).fetchall()
    }
    # one batch (no window): its number is a constant, no join with the batch map
    batch_of = (f"SELECT {int(start)} AS batch_seq, * FROM ({kept_rows})" if len(ids) == 1
                else f"SELECT m.seq AS batch_seq, k.* FROM ({kept_rows}) k JOIN _bmap m USING (bno)")
    codes = "[" + ", ".join(str(i) for i in source_ids(con, [s.name for s in sources])) + "]"
    with _unordered_insert(con):
        con.execute(
            f"""
            INSERT INTO interaction_rows
            SELECT batch_seq, user_id, item_id, ts, rating, label, {codes}[sidx + 1], source_event_id
            FROM ({batch_of})
            """
        )
    _fault("inserted")
    bad = sql_literal(list(badlines.RULES))
    con.execute(
        f"""
        INSERT INTO quarantine (sync_id, batch_id, source, rule, detail, file, row, line_no, line_text)
        SELECT ?, m.batch_id, {names}[sidx + 1], rule, detail, f.path,
               CASE WHEN NOT list_contains({bad}, rule) THEN raw_row END,
               CASE WHEN list_contains({bad}, rule) THEN CAST(raw_row->>'line' AS BIGINT) END,
               CASE WHEN list_contains({bad}, rule) THEN raw_row->>'text' END
        FROM (SELECT {bno.sql} AS bno, * FROM _stage WHERE rule IS NOT NULL) q
        JOIN _bmap m USING (bno) LEFT JOIN _files f USING (sidx, fidx)
        """,
        [sync_id],
    )
    _fault("side_tables")
    digests = _kept_digests(con, clean)
    out = []
    for i, (b, bid) in enumerate(zip(bnos, ids, strict=True)):
        r = per_all[b]
        k = kept.get(b, (b, 0, None, None, 0, 0))
        w_start = bno.origin + b * win if (win is not None and bno.origin is not None) else None
        row = {
            "id": bid, "sha256": digests.get(b, digest.EMPTY), "num_rows": int(k[1]), "created_at": now,
            "seq": start + i, "kind": "interactions", "sync_id": sync_id,
            "sources": to_json(sorted(sources[x].name for x in r[2])),
            "ts_min": k[2], "ts_max": k[3], "window_start": w_start,
            "window_end": w_start + win if w_start is not None else None,
            "rows_in": int(r[1]), "rows_kept": int(k[1]), "rows_quarantined": sum(by_rule.get(b, {}).values()),
            "rows_duplicate": int(dups.get(b, 0)),
            "quarantined_by_rule": to_json(by_rule.get(b, {})), "duplicates_by_kind": to_json(by_kind.get(b, {})),
            "num_users": int(k[4]), "num_items": int(k[5]), "digest_method": digest.METHOD,
        }
        out.append(row)
    cols = list(out[0])
    con.executemany(
        f"INSERT INTO batches ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
        [[row[c] for c in cols] for row in out],
    )
    return out, read


def _kept_digests(con: duckdb.DuckDBPyConnection, clean: dict[str, np.ndarray]) -> dict[int, str]:
    """Digest per batch number of the clean rows that are not duplicates (the rows just inserted)."""
    rid = clean["rid"]
    dup = np.asarray(digest.fetch_arrays(con, "SELECT rid FROM _dupb")["rid"], dtype=np.int64)
    keep = _not_in(rid, dup)
    bnos = clean["bno"][keep] if "bno" in clean else np.zeros(int(keep.sum()), dtype=np.int32)
    return digest.digests_of(bnos, clean["h"][keep])


def _not_in(ids: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """Per element of ``ids``: is it absent from ``drop``?"""
    if len(drop) == 0 or len(ids) == 0:
        return np.ones(len(ids), dtype=bool)
    # row ids of a table are dense (from an offset): a flag per id beats isin's sort of 10M ids
    lo, hi = int(min(ids.min(), drop.min())), int(max(ids.max(), drop.max()))
    if hi - lo > 4 * (len(ids) + len(drop)):
        return ~np.isin(ids, drop)
    flags = np.zeros(hi - lo + 1, dtype=bool)
    flags[drop - lo] = True
    return ~flags[ids - lo]


def _counts(con: duckdb.DuckDBPyConnection, sql: str) -> dict[int, dict[str, int]]:
    result: dict[int, dict[str, int]] = {}
    for b, key, n in con.execute(sql).fetchall():
        result.setdefault(b, {})[key] = int(n)
    return result


def _advance_watermarks(
    con: duckdb.DuckDBPyConnection, plans: list[FilePlan], maxima: dict[int, datetime],
    before: dict[tuple[int, int], tuple[datetime | None, int]], sync_id: str, now: datetime,
) -> None:
    """Watermark = newest usable event time read from the source (kept, quarantined or duplicate alike),
    so re-read files only contribute rows newer than anything already accounted for."""
    for sidx, plan in enumerate(plans):
        new_max = maxima.get(sidx)
        if new_max is not None and (plan.watermark is None or new_max > plan.watermark):
            con.execute(
                "INSERT OR REPLACE INTO data_watermarks VALUES (?, ?, ?, ?)", [plan.source.name, new_max, sync_id, now]
            )
        _record_files(con, plan, sync_id, {path: before[(sidx, k + 1)] for k, path in enumerate(plan.files)})


def _record_files(
    con: duckdb.DuckDBPyConnection, plan: FilePlan, sync_id: str,
    before: dict[Path, tuple[datetime | None, int]],
) -> None:
    for path in plan.files:
        size, mtime = plan.stats[path]
        since, rows = before.get(path, (None, None))
        con.execute(
            """
            INSERT INTO data_source_files (source, path, size, mtime_ns, first_sync, last_sync, before_ts, rows_before)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (source, path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns,
                last_sync = excluded.last_sync, before_ts = excluded.before_ts, rows_before = excluded.rows_before
            """,
            [plan.source.name, str(path), size, mtime, sync_id, sync_id, since, rows],
        )


__all__ = ["FAULT_POINTS", "run_sync"]
