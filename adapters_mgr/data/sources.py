"""Registered sources: what a source is, how its files are found, and the SQL that reads them.

A source is a file or glob of CSV, JSON(L) or Parquet plus a mapping from the canonical schema to
its column names. Reading is delegated to DuckDB's own readers so any layout they take works;
the reader options are passed through untouched (``read={'delim': '\\t', 'header': False, ...}``).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from adapters_mgr.errors import InvalidInput, NotFound, first_line

KINDS = ("interactions", "users", "items")
FORMATS = ("csv", "json", "parquet")
INTERACTION_FIELDS = ("user_id", "item_id", "rating", "label", "ts", "source_event_id")
KEY_FIELD = {"users": "user_id", "items": "item_id"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_EXT_FORMAT = {
    ".csv": "csv", ".tsv": "csv", ".txt": "csv", ".dat": "csv", ".data": "csv", ".inter": "csv",
    ".user": "csv", ".item": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json",
    ".parquet": "parquet", ".pq": "parquet",
}
# Fallback source column names tried, in order, for canonical fields the mapping leaves out.
_ALIASES = {
    "user_id": ("user_id", "user", "userid", "uid"),
    "item_id": ("item_id", "item", "itemid", "movie_id", "iid"),
    "rating": ("rating", "stars", "score"),
    "label": ("label",),
    "ts": ("ts", "timestamp", "time", "event_time"),
    "source_event_id": ("source_event_id", "event_id"),
    "valid_from": ("valid_from",),
}

DEFAULT_OPTIONS: dict[str, Any] = {
    "read": {},                    # passed to DuckDB's reader as keyword options
    "label_threshold": 4.0,        # label = rating >= threshold when no label column is mapped
    "rating_range": [1.0, 5.0],    # ratings outside are quarantined (rating_out_of_range)
    "max_events_per_minute": None,  # noise rule: off by default, it would hurt real bursty users
    "future_skew": "5m",           # events later than now + skew are quarantined (future_timestamp)
    "list_attrs": {},              # entity attributes split into lists: {'genres': '|'}
    "check_unknown": True,         # quarantine events of users/items absent from their entity tables
}


@dataclass
class Source:
    """One registered source, as stored in ``data_sources``."""

    name: str
    kind: str
    uri: str
    format: str
    mapping: dict[str, str]
    ts_format: str | None = None
    ts_detected: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    priority: int = 0

    @property
    def effective_ts_format(self) -> str | None:
        return self.ts_format or self.ts_detected

    def option(self, key: str) -> Any:
        return self.options.get(key, DEFAULT_OPTIONS.get(key))

    def files(self) -> list[Path]:
        """The files the uri names now (a glob may match more later), sorted for a stable order."""
        return list_files(self.uri)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "uri": self.uri, "format": self.format,
            "mapping": self.mapping, "ts_format": self.ts_format, "ts_detected": self.ts_detected,
            "options": self.options, "priority": self.priority,
        }


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(
            f"source name {name!r} is invalid; use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InvalidInput(f"source kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    return kind


def check_mapping(kind: str, mapping: Any) -> dict[str, str] | None:
    """A mapping must be an object of canonical field -> source column name (both non-empty strings).

    Interactions sources take only the canonical fields; users / items sources take their key,
    ``valid_from`` and any attribute name (the attributes are free-form).
    """
    if mapping is None:
        return None
    example = '{"user_id": "uid", "ts": "time"}' if kind == "interactions" else '{"title": "name"}'
    if not isinstance(mapping, dict):
        raise InvalidInput(
            f"mapping {mapping!r} must be an object of canonical field -> source column, e.g. {example}"
        )
    for canonical, column in mapping.items():
        if not isinstance(canonical, str) or not canonical.strip():
            raise InvalidInput(f"mapping key {canonical!r} must be a non-empty field name, e.g. {example}")
        if kind == "interactions" and canonical not in INTERACTION_FIELDS:
            raise InvalidInput(
                f"mapping key {canonical!r} is not a field of interactions sources; use "
                f"{', '.join(INTERACTION_FIELDS)}"
            )
        if not isinstance(column, str) or not column:
            raise InvalidInput(f"mapping for {canonical!r} must be a source column name, got {column!r}")
    return mapping


def is_glob(uri: str) -> bool:
    """Whether ``uri`` is a pattern (may match nothing yet) rather than the path of one file."""
    return glob.has_magic(os.path.expanduser(uri))


def check_uri(uri: str, files: list[Path]) -> None:
    """A plain path must name an existing file; a glob may match nothing yet (a landing folder)."""
    if files or is_glob(uri):
        return
    path = Path(os.path.expanduser(uri))
    if path.is_dir():
        raise InvalidInput(
            f"source uri {uri!r} is a folder; name its files with a glob, e.g. '{uri.rstrip('/')}/*.csv'"
        )
    raise NotFound(f"source file {uri!r} does not exist; check the path, or use a glob to watch a folder filled later")


def list_files(uri: str) -> list[Path]:
    expanded = os.path.expanduser(uri)
    if glob.has_magic(expanded):
        return [Path(p).resolve() for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
    path = Path(expanded)
    return [path.resolve()] if path.is_file() else []


def infer_format(uri: str, fmt: str | None) -> str:
    if fmt is not None:
        fmt = {"jsonl": "json", "ndjson": "json", "tsv": "csv"}.get(fmt.lower(), fmt.lower())
        if fmt not in FORMATS:
            raise InvalidInput(f"format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(uri.replace("*", "x")).suffix.lower()
    if suffix in _EXT_FORMAT:
        return _EXT_FORMAT[suffix]
    raise InvalidInput(f"cannot tell the format of {uri!r} from its extension; pass format='csv', 'json' or 'parquet'")


def sql_literal(value: Any) -> str:
    """A Python value as a DuckDB literal, for reader options."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(sql_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{sql_literal(str(k))}: {sql_literal(v)}" for k, v in value.items()) + "}"
    return "'" + str(value).replace("'", "''") + "'"


def reader_sql(fmt: str, files: list[Path], read_options: dict[str, Any]) -> str:
    """A DuckDB table function call reading ``files`` with a ``filename`` column added."""
    file_list = sql_literal([str(f) for f in files])
    opts = dict(read_options)
    if fmt == "csv":
        opts.setdefault("all_varchar", True)  # parse ourselves, so a bad value quarantines one row
        fn = "read_csv"
    elif fmt == "json":
        opts.setdefault("format", "auto")
        fn = "read_json"
    else:
        fn = "read_parquet"
    opts.setdefault("union_by_name", True)
    opts["filename"] = True
    rendered = ", ".join(f"{k} = {sql_literal(v)}" for k, v in opts.items())
    return f"{fn}({file_list}, {rendered})"


def describe(
    con: duckdb.DuckDBPyConnection, fmt: str, files: list[Path], read_options: dict[str, Any]
) -> dict[str, str]:
    """Column name -> DuckDB type of what the reader yields (without the added filename)."""
    try:
        rows = con.execute(f"DESCRIBE SELECT * FROM {reader_sql(fmt, files, read_options)}").fetchall()
    except duckdb.Error as exc:
        reason = re.sub(r"^[A-Za-z ]*Error: ", "", first_line(exc)).rstrip(". ")
        raise InvalidInput(f"cannot read {files[0]} as {fmt}: {reason}; check format= and the read= options") from exc
    return {r[0]: r[1] for r in rows if r[0] != "filename"}


def resolve_mapping(kind: str, mapping: dict[str, str] | None, columns: list[str] | None) -> dict[str, str]:
    """Complete a user mapping with same-named (or conventionally named) columns, and check it.

    For entity sources every source column that is not the key becomes an attribute unless a
    mapping is given, in which case only the mapped attributes are kept (explicit beats implicit).
    """
    mapping = dict(mapping or {})
    for canonical, column in mapping.items():
        if not isinstance(column, str) or not column:
            raise InvalidInput(f"mapping for {canonical!r} must be a source column name, got {column!r}")
        if columns is not None and column not in columns:
            raise InvalidInput(
                f"mapping {canonical!r} -> {column!r}: no such column; the source has {', '.join(columns)}"
            )
    lower = {c.lower(): c for c in columns or []}
    wanted = INTERACTION_FIELDS if kind == "interactions" else (KEY_FIELD[kind], "valid_from")
    for canonical in wanted:
        if canonical in mapping or columns is None:
            continue
        for alias in _ALIASES[canonical]:
            if alias in lower:
                mapping[canonical] = lower[alias]
                break
    if kind != "interactions" and columns is not None and not (set(mapping) - {KEY_FIELD[kind], "valid_from"}):
        for col in columns:
            if col not in mapping.values():
                mapping[col] = col
    if columns is not None:
        required = ("user_id", "item_id", "ts") if kind == "interactions" else (KEY_FIELD[kind],)
        missing = [f for f in required if f not in mapping]
        if missing:
            raise InvalidInput(
                f"source columns {', '.join(columns)} give no {', '.join(missing)}; "
                f"pass mapping={{'{missing[0]}': '<column>', ...}}"
            )
    return mapping
