"""Registered sources: what a source is, how its files are found, and the SQL that reads them.

A source is a file or glob of CSV, JSON(L) or Parquet (CSV and JSON also gzip- or zstd-compressed)
plus a mapping from the canonical schema to its column names. Reading is delegated to DuckDB's own
readers so any layout they take works; the reader options are passed through untouched
(``read={'delim': '\\t', 'header': False, ...}``). A :class:`Reader` keeps the lines DuckDB cannot
read in its rejects tables instead of failing the whole file (see :mod:`adapters_mgr.data.badlines`).
"""

from __future__ import annotations

import glob
import gzip
import json
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
# Compressed files DuckDB's CSV and JSON readers take as they are (the format is the inner suffix).
COMPRESSED = (".gz", ".zst")
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
    path = Path(uri.replace("*", "x"))
    suffix = path.suffix.lower()
    if suffix in COMPRESSED:  # events.csv.gz: the format is the suffix before the compression's
        suffix = Path(path.stem).suffix.lower()
    if suffix in _EXT_FORMAT and (path.suffix.lower() not in COMPRESSED or _EXT_FORMAT[suffix] != "parquet"):
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


REJECTS_PROBE = "_rej_probe"
"""Rejects tables of reads made only to look at a file (its columns, a sample of times)."""
_LINES_READ_OPTIONS = {"format", "compression"}  # the read= options a line-by-line JSON read honours
_HEAD_BYTES = 65536
# the line-by-line JSON read splits on a byte that no valid JSON line holds raw (control characters
# must be escaped in JSON), so a line is one value; a line holding it is malformed anyway
_NO_DELIM = "\x01"
_SUFFIXED = re.compile(r"^(.+)_(\d+)$")


def rejects_tables(prefix: str) -> tuple[str, str]:
    """Names of the temp tables where DuckDB stores the lines a read rejected: (errors, scans)."""
    return f"{prefix}_errors", f"{prefix}_scans"


def head(path: Path, size: int = _HEAD_BYTES) -> bytes | None:
    """The first ``size`` bytes of a file, decompressed for .gz; None where Python cannot tell (.zst,
    an unreadable or broken file: DuckDB's own read then says what is wrong)."""
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read(size)
        if path.suffix.lower() in COMPRESSED:
            return None
        with open(path, "rb") as fh:
            return fh.read(size)
    except (OSError, EOFError):
        return None


def is_empty(path: Path) -> bool:
    """Whether a file holds nothing but blanks (no header, no rows): 0 bytes, or an empty .gz."""
    data = head(path)
    return data is not None and len(data) < _HEAD_BYTES and not data.strip()


def _json_object_line(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def json_by_line(files: list[Path], read_options: dict[str, Any]) -> bool:
    """Whether JSON ``files`` are read line by line (one object per line), so a malformed line is
    quarantined alone. A JSON array or a pretty-printed document (no line of the first ones is an
    object by itself), or read= options only DuckDB's read_json knows, keep the whole-file reader."""
    if set(read_options) - _LINES_READ_OPTIONS:
        return False
    if read_options.get("format", "auto") not in ("auto", "newline_delimited"):
        return False
    if read_options.get("format") == "newline_delimited":
        return True
    for path in files:
        data = head(path)
        if data is None or not data.strip():
            continue
        if data.lstrip()[:1] == b"[":
            return False
        lines = data.splitlines()[: -1 if len(data) == _HEAD_BYTES else None][:100]
        if not any(_json_object_line(line) for line in lines if line.strip()):
            return False
    return True


@dataclass
class Reader:
    """How a source's files are read: the columns the read yields and the SQL that reads them.

    CSV files and JSON read line by line keep the lines DuckDB cannot read (too few or too many
    fields, bytes that are not UTF-8, a line that is not JSON) in DuckDB's rejects tables instead
    of failing the read (``store_rejects``); :mod:`adapters_mgr.data.badlines` quarantines them.
    Why one read per CSV file (``UNION ALL BY NAME``): DuckDB 2.0.1 keeps no rejects when
    one read_csv call takes several files by name (``union_by_name``).
    """

    fmt: str
    files: list[Path]
    options: dict[str, Any]
    by_line: bool = False  # JSON read one line at a time (the line is the ``_json`` column)
    columns: dict[str, str] = field(default_factory=dict)  # name -> DuckDB type (filename left out)

    @property
    def keeps_rejects(self) -> bool:
        return self.fmt == "csv" or self.by_line

    def sql(self, rejects: str = REJECTS_PROBE) -> str:
        """A FROM item yielding the columns and ``filename`` (plus ``_json``, the line, when by line)."""
        errors, scans = rejects_tables(rejects)
        keep = {"store_rejects": True, "rejects_table": errors, "rejects_scan": scans, "filename": True}
        if self.fmt == "csv":
            opts = {k: v for k, v in self.options.items()
                    if k not in ("ignore_errors", "store_rejects", "rejects_table", "rejects_scan", "union_by_name")}
            opts.setdefault("all_varchar", True)  # parse ourselves, so a bad value quarantines one row
            opts.update(keep)
            rendered = _render(opts)
            reads = [f"SELECT * FROM read_csv({sql_literal(str(f))}, {rendered})" for f in self.files]
            return reads[0].removeprefix("SELECT * FROM ") if len(reads) == 1 else (
                "(" + " UNION ALL BY NAME ".join(reads) + ")")
        if self.by_line:
            opts = {"columns": {"_json": "JSON"}, "delim": _NO_DELIM, "quote": "", "escape": "", "header": False,
                    "auto_detect": False, **{k: v for k, v in self.options.items() if k == "compression"}, **keep}
            read = f"read_csv({sql_literal([str(f) for f in self.files])}, {_render(opts)})"
            names = list(self.columns)
            if not names:
                return f"(SELECT _json, filename FROM {read} WHERE _json IS NOT NULL)"
            pointers = sql_literal(["/" + n.replace("~", "~0").replace("/", "~1") for n in names])
            cols = ", ".join(f"_v[{i + 1}] AS {_quote_name(n)}" for i, n in enumerate(names))
            return (f"(SELECT {cols}, _json, filename FROM (SELECT json_extract_string(_json, {pointers}) AS _v, "
                    f"_json, filename FROM {read} WHERE _json IS NOT NULL))")
        opts = dict(self.options)
        fn = "read_parquet"
        if self.fmt == "json":
            opts.setdefault("format", "auto")
            fn = "read_json"
        opts.setdefault("union_by_name", True)
        opts["filename"] = True
        return f"{fn}({sql_literal([str(f) for f in self.files])}, {_render(opts)})"


def _render(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {sql_literal(v)}" for k, v in opts.items())


def _quote_name(col: str) -> str:
    return '"' + col.replace('"', '""') + '"'


def _read_error(exc: duckdb.Error, path: Path, fmt: str, read_options: dict[str, Any]) -> InvalidInput:
    """One line for a file DuckDB cannot read: its reason, and the read= option that likely fixes it."""
    reason = re.sub(r"^[A-Za-z ]*Error: ", "", first_line(exc)).rstrip(". ")
    low = str(exc).lower()
    if "utf-8" in low or "unicode" in low:
        hint = "the file is not UTF-8: re-encode it, or pass read={'encoding': 'latin-1'} (or 'utf-16')"
    elif fmt == "json" and "malformed json" in low and read_options.get("format") != "newline_delimited":
        hint = ("if it holds one JSON object per line, pass read={'format': 'newline_delimited'}, so that a "
                "malformed line is quarantined instead of failing the file")
    elif "could not allocate" in low or "out of memory" in low:
        hint = "DuckDB's memory cap is too small for this read: raise ADAPTERS_MGR_SYNC_MEMORY (default 1GB)"
    else:
        hint = "check format= and the read= options"
    return InvalidInput(f"cannot read {path} as {fmt}: {reason}; {hint}")


def open_reader(
    con: duckdb.DuckDBPyConnection, fmt: str, files: list[Path], read_options: dict[str, Any]
) -> Reader:
    """The reader of ``files`` with the columns its read yields; a file that cannot be read at all
    (empty, a header naming a column twice, not the format) is refused with one line naming it."""
    for path in files:
        if is_empty(path):
            raise InvalidInput(
                f"cannot read {path}: empty file (no header, no rows); add the source once the file holds its "
                "header and rows (a glob source skips its empty files until they are filled)"
            )
    reader = Reader(fmt, list(files), dict(read_options),
                    by_line=fmt == "json" and json_by_line(files, read_options))
    if reader.by_line:
        reader.columns = {name: "VARCHAR" for name in _json_keys(con, reader)}
        return reader
    try:
        rows = con.execute(f"DESCRIBE SELECT * FROM {reader.sql()}").fetchall()
    except duckdb.Error as exc:
        raise _read_error(exc, files[0], fmt, read_options) from exc
    reader.columns = {r[0]: r[1] for r in rows if r[0] != "filename"}
    if fmt == "csv" and "names" not in read_options:
        _refuse_repeated_header(con, reader)
    return reader


def _json_keys(con: duckdb.DuckDBPyConnection, reader: Reader) -> list[str]:
    """The keys of the first 20,480 objects of each file, in the order they first appear."""
    keys: dict[str, None] = {}
    for path in reader.files:
        one = Reader(reader.fmt, [path], reader.options, by_line=True)
        try:
            rows = con.execute(
                f"SELECT unnest(json_keys(_json)) FROM (SELECT _json FROM {one.sql()} "
                "WHERE json_type(_json) = 'OBJECT' LIMIT 20480)"
            ).fetchall()
        except duckdb.Error as exc:
            raise _read_error(exc, path, reader.fmt, reader.options) from exc
        keys.update((r[0], None) for r in rows)
    return list(keys)


def _refuse_repeated_header(con: duckdb.DuckDBPyConnection, reader: Reader) -> None:
    """DuckDB renames a header's repeated name (``user_id,user_id`` reads as user_id, user_id_1), so
    one of two columns would be taken silently; refuse the file instead. The raw header is read only
    when a column name looks renamed."""
    lower = {c.lower() for c in reader.columns}
    if not any((m := _SUFFIXED.match(c)) and m.group(1).lower() in lower for c in reader.columns):
        return
    opts = {k: v for k, v in reader.options.items() if k != "header"}
    for path in reader.files:
        raw = Reader("csv", [path], {**opts, "header": False})
        try:
            first = con.execute(f"SELECT * EXCLUDE (filename) FROM {raw.sql()} LIMIT 1").fetchone()
        except duckdb.Error:
            continue
        seen: dict[str, int] = {}
        for pos, name in enumerate(first or ()):
            key = str(name).strip().lower()
            if key in seen:
                raise InvalidInput(
                    f"cannot read {path}: its header names column {str(name).strip()!r} twice (columns "
                    f"{seen[key] + 1} and {pos + 1}), and only one of them would be read; rename one in the "
                    "file, or pass read={'names': [...]} with a distinct name for each column"
                )
            seen[key] = pos


def describe(
    con: duckdb.DuckDBPyConnection, fmt: str, files: list[Path], read_options: dict[str, Any]
) -> dict[str, str]:
    """Column name -> DuckDB type of what the reader yields (without the added filename)."""
    return open_reader(con, fmt, files, read_options).columns


def sniff_hint(columns: list[str]) -> str | None:
    """The likely reason a CSV file's columns came out wrong, with the read= option that fixes it."""
    if len(columns) == 1:  # the likely delimiter: the commonest character that is no part of a name
        counts = {c: columns[0].count(c) for c in set(columns[0]) if not (c.isalnum() or c in "_ -.")}
        if counts:
            delim = max(sorted(counts), key=lambda c: counts[c])
            return (f"the file was read as one column named {columns[0]!r}: its delimiter was not detected "
                    f"(an unusual delimiter, or junk or ragged lines near the top?); pass read={{'delim': {delim!r}}}")
    if columns and all(re.fullmatch(r"column\d+", c) for c in columns):
        return ("no header row was detected (columns column0, column1, ...); pass read={'header': true}, "
                "or map the columns by position, e.g. mapping={'user_id': 'column0', ...}")
    return None


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
            hint = sniff_hint(columns)
            raise InvalidInput(
                f"source columns {', '.join(columns)} give no {', '.join(missing)}; "
                + (f"{hint}" if hint else f"pass mapping={{'{missing[0]}': '<column>', ...}}")
            )
    return mapping
