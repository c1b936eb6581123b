"""Registering sources: validate once at registration so a sync never meets a surprise mapping."""

from __future__ import annotations

from typing import Any

import duckdb

from adapters_mgr.catalog.sql import fetch_dicts, from_json, log_event, to_json, utcnow
from adapters_mgr.data.sources import (
    DEFAULT_OPTIONS,
    Source,
    check_kind,
    check_mapping,
    check_name,
    check_uri,
    describe,
    infer_format,
    is_empty,
    is_glob,
    list_files,
    resolve_mapping,
)
from adapters_mgr.data.timeparse import check_ts_format, parse_duration
from adapters_mgr.errors import Conflict, InvalidInput, NotFound


def load_sources(con: duckdb.DuckDBPyConnection) -> dict[str, Source]:
    rows = fetch_dicts(con, "SELECT * FROM data_sources ORDER BY priority, name")
    return {
        r["name"]: Source(
            name=r["name"], kind=r["kind"], uri=r["uri"], format=r["format"], mapping=from_json(r["mapping"]),
            ts_format=r["ts_format"], ts_detected=r["ts_detected"], options=from_json(r["options"]) or {},
            priority=r["priority"],
        )
        for r in rows
    }


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise InvalidInput(f"option {unknown[0]!r} is unknown; known options: {', '.join(sorted(DEFAULT_OPTIONS))}")
    rr = options.get("rating_range")
    if rr is not None:
        if len(rr) != 2 or float(rr[0]) > float(rr[1]):
            raise InvalidInput(f"rating_range {rr!r} must be [low, high] with low <= high")
        options["rating_range"] = [float(rr[0]), float(rr[1])]
    n = options.get("max_events_per_minute")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise InvalidInput(f"max_events_per_minute {n!r} must be a positive integer (or None to turn the rule off)")
    if options.get("future_skew") is not None:
        parse_duration(options["future_skew"], what="future_skew")
    if not isinstance(options.get("read", {}), dict):
        raise InvalidInput("read= must be a dict of DuckDB reader options, e.g. {'delim': '\\t', 'header': False}")
    la = options.get("list_attrs", {})
    if not isinstance(la, dict) or not all(isinstance(v, str) and v for v in la.values()):
        raise InvalidInput(f"list_attrs {la!r} must map attribute names to a separator, e.g. {{'genres': '|'}}")
    return options


def add_source(
    con: duckdb.DuckDBPyConnection,
    name: str,
    uri: str,
    *,
    format: str | None,
    mapping: dict[str, str] | None,
    ts_format: str | None,
    kind: str,
    priority: int | None,
    replace: bool,
    options: dict[str, Any],
) -> Source:
    """Insert (or, with ``replace``, update) a source row inside the caller's transaction."""
    check_name(name)
    check_kind(kind)
    check_ts_format(ts_format)
    check_mapping(kind, mapping)
    fmt = infer_format(uri, format)
    options = _check_options({k: v for k, v in options.items() if v is not None})
    files = list_files(uri)
    # the columns come from the first file with something in it; a plain path to an empty file is
    # refused by describe ("empty file"), a glob's empty files are read once they are filled
    sample = files[:1] if not is_glob(uri) or fmt == "parquet" else [f for f in files if not is_empty(f)][:1]
    columns = list(describe(con, fmt, sample, options.get("read", {}))) if sample else None
    full = resolve_mapping(kind, mapping, columns)
    existing = con.execute("SELECT mapping, uri, kind, priority FROM data_sources WHERE name = ?", [name]).fetchone()
    now = utcnow()
    if priority is None:
        priority = existing[3] if existing else con.execute(
            "SELECT coalesce(max(priority), -1) + 1 FROM data_sources").fetchone()[0]
    src = Source(name=name, kind=kind, uri=uri, format=fmt, mapping=full, ts_format=ts_format, options=options,
                 priority=int(priority))
    if existing:
        same = (from_json(existing[0]) == full and existing[1] == uri and existing[2] == kind)
        if not replace and not same:
            raise Conflict(
                f"source {name!r} already exists with uri {existing[1]!r}; pick another name or pass replace=True"
            )
    check_uri(uri, files)  # after the name check: a taken name is the first thing to report
    if existing:
        con.execute(
            "UPDATE data_sources SET kind=?, uri=?, format=?, mapping=?, ts_format=?, ts_detected=NULL, options=?, "
            "priority=?, updated_at=? WHERE name=?",
            [kind, uri, fmt, to_json(full), ts_format, to_json(options), src.priority, now, name],
        )
    else:
        con.execute(
            "INSERT INTO data_sources VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
            [name, kind, uri, fmt, to_json(full), ts_format, to_json(options), src.priority, now, now],
        )
    log_event(con, "data.add_source", {"name": name, "uri": uri, "kind": kind, "format": fmt},
              "ok", {"mapping": full, "files": len(files), "replaced": bool(existing)})
    return src


def remove_source(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """Forget a source and its watermark; its batches stay (they are immutable history)."""
    if not con.execute("SELECT 1 FROM data_sources WHERE name = ?", [name]).fetchone():
        raise NotFound(f"source {name!r} is not registered; see `adapters-mgr data sources`")
    con.execute("DELETE FROM data_sources WHERE name = ?", [name])
    con.execute("DELETE FROM data_source_files WHERE source = ?", [name])
    con.execute("DELETE FROM data_watermarks WHERE source = ?", [name])
    log_event(con, "data.remove_source", {"name": name})
