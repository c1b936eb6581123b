"""`adapters-mgr data ...`: a thin shell over DataAPI; tables for people, --json for scripts.

Errors are raised as adapters_mgr.errors exceptions; the main CLI prints them as one line with
an exit code. The API comes from ``ctx.obj.manager().data`` (``ctx.obj`` is the main app's CliState).
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from adapters_mgr.cli.options import JsonOpt, WideOpt, parse_json_option
from adapters_mgr.cli.render import (
    TABLE_ROWS,
    cap_rows,
    console,
    fmt,
    print_json,
    print_table,
    table_fetch_limit,
)
from adapters_mgr.data import movielens
from adapters_mgr.data.api import NoFilesMatched, check_limit
from adapters_mgr.data.texts import DEFAULT_TEMPLATES
from adapters_mgr.errors import InvalidInput

# Examples shown in the help of the JSON-valued options and in their error messages.
MAPPING_EXAMPLE = '{"user_id": "uid", "ts": "time"}'
READ_EXAMPLE = '{"delim": "\\t"}'
LIST_ATTRS_EXAMPLE = '{"genres": "|"}'

data_app = typer.Typer(help="Data sources, sync into immutable batches, quarantine, MovieLens.", no_args_is_help=True)
fetch_app = typer.Typer(help="Fetch real data sets into the cache folder.", no_args_is_help=True)
data_app.add_typer(fetch_app, name="fetch")


def _api(ctx: typer.Context) -> Any:
    return ctx.obj.manager().data


@data_app.command("sources")
def sources_cmd(ctx: typer.Context, wide: WideOpt = False, as_json: JsonOpt = False) -> None:
    """List registered sources with their watermark."""
    rows = _api(ctx).sources()
    if as_json:
        print_json(rows)
    else:
        print_table(rows, ["name", "kind", "format", "uri", "ts_format", "ts_detected", "priority", "watermark",
                           "files_read"], title="sources", keep=("name", "kind", "watermark", "files_read"),
                    drop=("ts_detected", "priority", "ts_format", "format", "watermark"),
                    formatters={"watermark": _minutes}, headers={"files_read": "files"}, wide=wide)


@data_app.command("add-source")
def add_source_cmd(
    ctx: typer.Context,
    name: str,
    uri: str,
    kind: Annotated[str, typer.Option(help="interactions | users | items")] = "interactions",
    format: Annotated[str | None, typer.Option(help="csv | json | parquet (default: from the extension)")] = None,
    mapping: Annotated[str | None, typer.Option(help=f"JSON canonical->column, e.g. '{MAPPING_EXAMPLE}'")] = None,
    ts_format: Annotated[
        str | None, typer.Option(help="epoch_s | epoch_ms | epoch_us | iso | strptime (default: detect)")
    ] = None,
    read: Annotated[str | None, typer.Option(help=f"JSON DuckDB reader options, e.g. '{READ_EXAMPLE}'")] = None,
    label_threshold: Annotated[float | None, typer.Option(help="label = rating >= this (default 4)")] = None,
    rating_min: Annotated[float | None, typer.Option(help="lowest valid rating (default 1)")] = None,
    rating_max: Annotated[float | None, typer.Option(help="highest valid rating (default 5)")] = None,
    max_events_per_minute: Annotated[
        int | None, typer.Option(min=1, help="noise rule: quarantine bursts above this (default off)")
    ] = None,
    list_attrs: Annotated[
        str | None, typer.Option(help=f"JSON attribute->separator, e.g. '{LIST_ATTRS_EXAMPLE}'")
    ] = None,
    replace: Annotated[bool, typer.Option(help="replace an existing source of that name", metavar="")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Register a file or glob (CSV, JSON lines, Parquet) as a source."""
    rr = None
    if rating_min is not None or rating_max is not None:
        rr = (1.0 if rating_min is None else rating_min, 5.0 if rating_max is None else rating_max)
    with warnings.catch_warnings():  # said below, in the CLI's words
        warnings.simplefilter("ignore", NoFilesMatched)
        src = _api(ctx).add_source(
            name, uri, kind=kind, format=format, mapping=parse_json_option(mapping, "--mapping", MAPPING_EXAMPLE),
            ts_format=ts_format, read=parse_json_option(read, "--read", READ_EXAMPLE),
            label_threshold=label_threshold, rating_range=rr, max_events_per_minute=max_events_per_minute,
            list_attrs=parse_json_option(list_attrs, "--list-attrs", LIST_ATTRS_EXAMPLE), replace=replace,
        )
    matched = src["files_matched"]
    if as_json:
        print_json(src)
        return
    console.print(f"source [bold]{src['name']}[/bold] ({src['kind']}, {src['format']}) -> {src['mapping']}")
    if not matched:
        console.print(f"no file matches {src['uri']!r} yet; a sync reads the files that appear there later",
                      markup=False, highlight=False, soft_wrap=True)


@data_app.command("sync")
def sync_cmd(
    ctx: typer.Context,
    window: Annotated[str | None, typer.Option(help="cut the new rows into consecutive time windows, e.g. 7d")] = None,
    source: Annotated[list[str] | None, typer.Option(help="only these sources (repeatable)")] = None,
    dedup_tolerance: Annotated[
        str, typer.Option(help="same event from two sources when times differ by at most this")
    ] = "1s",
    wide: WideOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Take in what is new in each source as immutable batches (nothing new: no batch)."""
    api = _api(ctx)
    with console.status("syncing") as status, warnings.catch_warnings():
        warnings.simplefilter("ignore", NoFilesMatched)  # said below, in the CLI's words
        ids = api.sync(sources=source or None, window=window, dedup_tolerance=dedup_tolerance,
                       progress=lambda m: status.update(m))
    rows = [api.batch(i) for i in ids]
    report = (api.last_sync() or {}).get("detail") or {}
    notes = _sync_notes(report)
    unmatched = api.sources_without_files(source or None)
    notes += [f"source {src['name']}: 0 files matched {src['uri']!r}" for src in unmatched]
    if as_json:
        print_json({"batches": ids, "details": rows, "late_rows": report.get("late_rows", 0),
                    **{k: report[k] for k in ("late_rows_by_file", "late_rows_unmeasured_files", "empty_files")
                       if k in report},
                    **({"sources_without_files": [src["name"] for src in unmatched]} if unmatched else {})})
        return
    if not ids:
        console.print("nothing new: no batch created")
    else:
        _batch_table(rows, f"{len(ids)} new batches", wide)
    for note in notes:
        console.print(note, markup=False, highlight=False, soft_wrap=True)


def _sync_notes(report: dict[str, Any]) -> list[str]:
    """One line per thing a sync left out on purpose: late rows, unmeasured files, empty files."""
    notes = []
    if report.get("late_rows"):
        files = ", ".join(f"{f} ({n})" for f, n in report.get("late_rows_by_file", {}).items())
        notes.append(f"late rows: {report['late_rows']} appended to already-read files lie before their file's "
                     f"watermark and were not taken in: {files}; put late data in a new file to take it in")
    if report.get("late_rows_unmeasured_files"):
        notes.append("late rows not counted (files read before this version): "
                     + ", ".join(report["late_rows_unmeasured_files"]))
    if report.get("empty_files"):
        notes.append("empty files, left unread until they are filled: " + ", ".join(report["empty_files"]))
    return notes


BATCH_COLUMNS = ["id", "window_start", "ts_min", "ts_max", "rows_in", "rows_kept", "rows_quarantined",
                 "rows_duplicate", "sources"]
# the batch table at 80 columns: short headers, never a cut id or count; the window and sources go first
BATCH_HEADERS = {"window_start": "window", "ts_min": "first event", "ts_max": "last event", "rows_in": "in",
                 "rows_kept": "kept", "rows_quarantined": "quar.", "rows_duplicate": "dup"}
BATCH_KEEP = ("id", "window_start", "ts_min", "ts_max", "rows_in", "rows_kept", "rows_quarantined", "rows_duplicate")
BATCH_DROP = ("window_start", "sources", "ts_max")


def _minutes(value: Any) -> str:
    """A time to the minute (``1997-09-20 05:00``): seconds add width, not meaning, at weekly batches."""
    return value.strftime("%Y-%m-%d %H:%M") if isinstance(value, datetime) else fmt(value)


def _batch_table(rows: list[dict[str, Any]], title: str, wide: bool = False) -> None:
    times = dict.fromkeys(("window_start", "ts_min", "ts_max"), _minutes)
    print_table(rows, BATCH_COLUMNS, title=title, formatters={"sources": lambda v: ", ".join(v or []), **times},
                headers=BATCH_HEADERS, keep=BATCH_KEEP, drop=BATCH_DROP, wide=wide)


@data_app.command("batches")
def batches_cmd(ctx: typer.Context, wide: WideOpt = False, as_json: JsonOpt = False) -> None:
    """List batches, oldest first."""
    rows = _api(ctx).batches()
    if as_json:
        print_json(rows)
    else:
        _batch_table(rows, "batches", wide)


@data_app.command("show")
def show_cmd(ctx: typer.Context, batch: str, as_json: JsonOpt = False) -> None:
    """One batch in full: counts per rule and duplicate kind, time range, sha256."""
    info = _api(ctx).batch(batch)
    if as_json:
        print_json(info)
        return
    for key, value in info.items():
        console.print(f"[bold]{key:20}[/bold] {value}")


@data_app.command("quarantine")
def quarantine_cmd(
    ctx: typer.Context,
    batch: Annotated[str | None, typer.Option(help="only this batch")] = None,
    rule: Annotated[str | None, typer.Option(help="only this rule, e.g. bad_timestamp")] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many rows")] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help=f"table: every row (default: the first {TABLE_ROWS})", metavar="")
    ] = False,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rows a cleaning rule rejected, with the rule and the source row, or for a line that could not be
    read its number and text (--json lists every row unless --limit)."""
    check_limit(limit, "--limit")
    if as_json:
        print_json(_api(ctx).quarantine(batch=batch, rule=rule, limit=limit))
        return
    rows = _api(ctx).quarantine(batch=batch, rule=rule, limit=table_fetch_limit(limit, show_all))
    rows, note = cap_rows(rows, limit, show_all)
    for r in rows:  # a line that could not be read has no columns: show its number and text
        r["row"] = json.dumps(r["row"]) if r["row"] is not None or r.get("line_text") is None else (
            f"line {r['line_no']}: {r['line_text']}" if r.get("line_no") is not None else r["line_text"])
    print_table(rows, ["batch_id", "source", "rule", "detail", "row"],
                title=f"quarantine ({len(rows)} rows{'; ' + note if note else ''})",
                keep=("batch_id", "rule"), drop=("source",), wide=wide)


@data_app.command("templates")
def templates_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The user and item text templates in use (stored, else the defaults)."""
    current = _api(ctx).templates()
    rows = [{"kind": kind, "template": tpl, "default": tpl == DEFAULT_TEMPLATES.get(kind)}
            for kind, tpl in sorted(current.items())]
    if as_json:
        print_json(rows)
    else:
        print_table(rows, ["kind", "default", "template"], title="text templates")


@data_app.command("set-template")
def set_template_cmd(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="user or item")],
    template: Annotated[
        str | None, typer.Argument(help="Python format string, e.g. '{item_stats} {title} ({year}).'")
    ] = None,
    reset: Annotated[bool, typer.Option("--reset", help="go back to the default template", metavar="")] = False,
) -> None:
    """Store the template new trainings render KIND texts with (trained adapters keep theirs)."""
    api = _api(ctx)
    if reset == (template is not None):
        raise InvalidInput("give either a TEMPLATE or --reset")
    if reset:
        api.reset_template(kind)
    else:
        api.set_template(kind, template)
    console.print(f"{kind} template: {api.templates()[kind]}")


@fetch_app.command("movielens")
def fetch_movielens_cmd(
    ctx: typer.Context,
    cache: Annotated[
        Path | None, typer.Option(help="cache folder (default $ADAPTERS_MGR_CACHE or ~/.cache/adapters-mgr)")
    ] = None,
    register: Annotated[bool, typer.Option(help="also register the three ML-100K sources", metavar="")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Put MovieLens-100K in the cache (GroupLens, else the copy in RecBole's wheel); never committed."""
    folder = movielens.fetch(cache, progress=lambda m: console.print(m) if not as_json else None)
    names = movielens.register_movielens(_api(ctx), folder) if register else []
    if as_json:
        print_json({"folder": str(folder), "sources": names})
    else:
        console.print(f"ML-100K ready in {folder}" + (f"; registered {', '.join(names)}" if names else ""))
