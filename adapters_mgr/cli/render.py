"""Output for people and scripts: rich tables, one-line messages, JSON, metric labels, the lineage tree.

Shared by the main app, the ``data`` group and the demo; imports no command module, so any of
them can use it without a cycle.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from adapters_mgr.catalog.lineage import batch_summary

# emoji off: user text such as a task ":fire:" prints as typed (markup is escaped where it is on)
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for what the catalog returns: dates, paths, records with ``to_dict``."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, default=json_default, indent=2, sort_keys=False) + "\n")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def _escaped(value: Any) -> str:
    """A table cell: :func:`fmt` with rich markup escaped (names, aliases, batch ids, metric keys
    and reasons are user text; rich would read ``[production]`` as a tag and drop it)."""
    return escape(fmt(value))


# A column that may shrink keeps at least this many cells (or its header's width, or its widest cell).
SHRINK_MIN = 8


def print_table(
    rows: Sequence[dict[str, Any]],
    columns: Iterable[str],
    *,
    title: str | None = None,
    formatters: dict[str, Callable[[Any], str]] | None = None,
    keep: Iterable[str] | None = None,
    drop: Sequence[str] = (),
    headers: dict[str, str] | None = None,
    fold: Iterable[str] = (),
    wide: bool = False,
) -> None:
    """A rich table with the given columns that fits the console; missing keys print as '-'.

    Why not let rich wrap: at 80 columns every cell folded mid-token (``b00000`` / ``1``,
    ``productio`` / ``n``). Instead, ``keep`` columns (default: the first) are never cut; the
    columns in ``drop`` are left out, first ones first, while the table cannot fit; any other
    column shrinks to fit, ending in "…", or wraps between words if it is in ``fold`` (free text
    such as a reason, or a detail view's values). A line below names what was left out. ``wide``: every
    column at full width, lines as long as they need (``--wide``). ``headers`` renames columns.
    """
    cols = list(columns)
    formatters = formatters or {}
    headers = headers or {}
    cells = [[console.render_str(formatters.get(c, fmt)(row.get(c))) for c in cols] for row in rows]
    header = {c: headers.get(c, c) for c in cols}
    natural = {c: max([len(header[c])] + [line[i].cell_len for line in cells]) for i, c in enumerate(cols)}
    shown = list(cols)

    def total(widths: dict[str, int]) -> int:  # cells + one space each side + borders
        return sum(widths[c] for c in shown) + 3 * len(shown) + 1

    if wide:  # every column at its natural width: long lines, never a cut or folded cell
        table = Table(title=title, show_lines=False)
        for col in cols:
            table.add_column(header[col], no_wrap=True, min_width=natural[col])
        for line in cells:
            table.add_row(*line)
        narrow = console.width  # print(width=) cannot exceed the console's width: widen it for this table
        console.width = max(narrow, total(natural))
        try:
            console.print(table, crop=False)
        finally:
            console.width = narrow
        return
    kept = set(cols[:1] if keep is None else keep)

    def narrowest() -> dict[str, int]:
        return {c: natural[c] if c in kept else min(natural[c], max(len(header[c]), SHRINK_MIN)) for c in cols}

    least = narrowest()
    for col in drop:
        if total(least) <= console.width:
            break
        if col in shown and len(shown) > 1:
            shown.remove(col)
    if total(least) > console.width:  # the kept columns alone do not fit: only the first stays whole
        kept = {shown[0]}
        least = narrowest()
    width = _fit_widths(shown, natural, least, kept, console.width - 3 * len(shown) - 1)
    table = Table(title=title, show_lines=False)
    wrap = set(fold)
    for col in shown:
        cut = col not in kept
        table.add_column(header[col], no_wrap=col not in wrap or not cut,
                         overflow="ellipsis" if cut and col not in wrap else "fold",
                         min_width=width[col], max_width=width[col])
    index = [cols.index(c) for c in shown]
    for line in cells:
        table.add_row(*[line[i] for i in index])
    console.print(table)
    hidden = [header[c] for c in cols if c not in shown]
    if hidden:
        console.print(f"hidden at this width: {', '.join(hidden)} (--wide shows all)", markup=False,
                      highlight=False, style="dim")


def _fit_widths(shown: list[str], natural: dict[str, int], least: dict[str, int], kept: set[str],
                room: int) -> dict[str, int]:
    """Each column's width: kept columns their widest cell; the others share what is left, each up
    to its widest cell and at least ``least`` (the narrowest first, so the room goes to long ones)."""
    width = {c: natural[c] for c in shown}
    flexible = sorted((c for c in shown if c not in kept), key=lambda c: natural[c])
    left = room - sum(natural[c] for c in shown if c in kept)
    for i, col in enumerate(flexible):
        share = left // (len(flexible) - i) if left > 0 else 0
        width[col] = max(least[col], min(natural[col], share))
        left -= width[col]
    return width


def print_literal_table(rows: list[dict[str, Any]], columns: list[str], *, title: str | None = None,
                        **fit: Any) -> None:
    """:func:`print_table` with every cell and the title printed literally, never as markup
    (``fit``: its ``keep``, ``drop``, ``headers``, ``fold`` and ``wide``)."""
    print_table(rows, columns, title=escape(title) if title else title, formatters=dict.fromkeys(columns, _escaped),
                **fit)


def say(text: str) -> None:
    """A one-line message for people; what it quotes (names, paths, aliases) is printed literally."""
    console.print(text, markup=False)


def warn(text: str) -> None:
    """A one-line warning on stderr: stdout stays what scripts parse."""
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


# Human tables stop here unless asked for more: rendering 100k rows with rich took 2.5 minutes.
TABLE_ROWS = 50


def table_fetch_limit(limit: int | None, show_all: bool) -> int | None:
    """Rows to fetch for a human table: the user's --limit, else everything with --all, else one
    more than :data:`TABLE_ROWS` (the extra row only says that more exist)."""
    if limit is not None:
        return limit
    return None if show_all else TABLE_ROWS + 1


def cap_rows(rows: list[Any], limit: int | None, show_all: bool) -> tuple[list[Any], str]:
    """The rows to print and a note for the title when the default cap cut some off."""
    if limit is None and not show_all and len(rows) > TABLE_ROWS:
        return rows[:TABLE_ROWS], f"first {TABLE_ROWS} shown; more exist: --all, --limit N or --json"
    return rows, ""


def primary_metric_text(metrics: dict[str, Any] | None) -> str:
    """The one or two figures worth a column: the task's primary metric (and its baseline)."""
    if not metrics:
        return "-"
    if "node_metrics" in metrics:  # an adapter trained as part of a stack: the node's figures
        return primary_metric_text(metrics["node_metrics"]) + " (as stack)"
    name = metrics.get("primary_metric")
    if name and name in metrics:
        text = f"{name}={fmt(metrics[name])}"
        base = metrics.get("baseline")
        if isinstance(base, dict) and name in base:
            text += f" (was {fmt(base[name])})"
        return text + prior_lift_text(metrics)
    keys = [k for k in ("auc", "ndcg@10", "gauc", "recall@10") if k in metrics] or list(metrics)[:2]
    return ", ".join(f"{k}={fmt(metrics[k])}" for k in keys[:2] if not isinstance(metrics[k], dict | list))


def prior_lift(metrics: dict[str, Any] | None) -> float | None:
    """The residual ranker's AUC minus its prior's alone on the same eval rows (None where not recorded)."""
    if not metrics or not isinstance(metrics.get("auc"), float) or not isinstance(metrics.get("prior_auc"), float):
        return None
    return metrics["auc"] - metrics["prior_auc"]


def prior_lift_text(metrics: dict[str, Any] | None) -> str:
    """' (prior alone 0.7773, +0.0089)' for a residual ranker's AUC, '' for anything else."""
    lift = prior_lift(metrics)
    if lift is None or metrics is None or metrics.get("primary_metric", "auc") != "auc":
        return ""
    return f" (prior alone {fmt(metrics['prior_auc'])}, {lift:+.4f})"


def item_titles(mgr: Any, item_ids: list[str]) -> dict[str, str]:
    """Item titles where the catalog has them (MovieLens), with the year where it has one: ML-100K
    holds different films of the same title ("That Darn Cat!" (1965) and (1997))."""
    try:
        rows = mgr.catalog.query(
            "SELECT item_id::VARCHAR AS item_id, arg_max(attrs->>'title', valid_from) AS title, "
            "arg_max(attrs->>'year', valid_from) AS year FROM items "
            "WHERE item_id::VARCHAR IN (SELECT unnest(?::VARCHAR[])) GROUP BY 1", [item_ids])
    except Exception:  # noqa: BLE001 - titles are decoration; a catalog without them still lists ids
        return {}
    return {r["item_id"]: r["title"] + (f" ({r['year']})" if r["year"] not in (None, "") else "")
            for r in rows if r["title"] is not None}


# -- the lineage tree ---------------------------------------------------------------------------------

# A linear run longer than this is shown as its first and last few lines around a count.
RUN_HEAD, RUN_TAIL = 8, 4


def lineage_tree(lin: Any, *, full: bool = False) -> Tree:
    """Rich tree: the node, its ancestors (what it came from) and descendants (what came from it).

    Why not one nesting level per generation: a 1,000-deep warm-start chain would indent past any
    terminal width (and recurse past Python's limit). A *linear run* (each node with exactly one
    parent, or one child, in that direction) is listed at one level, one line per generation,
    and only branch points (merges, stacks, forks) nest. Runs longer than
    ``RUN_HEAD + RUN_TAIL`` lines show their ends around a count unless ``full``. A node reached
    twice in a DAG is expanded once and marked "shown above" after that. Built without recursion.

    Unless ``full``, a node's batches read as runs (``train b000001–b000020 (20)``), and a stack
    met on the way up lists its members once, in order, with their weights, without expanding the
    members' own ancestry (each member's stack history would repeat the stack's); ``full`` gives
    every batch and every member's ancestry.
    """
    tree = Tree(_node_label(lin.root, lin.batches.get(lin.root.id), full))
    for up, title, count in ((True, "ancestors", len(lin.ancestors)), (False, "descendants", len(lin.descendants))):
        if not count:
            continue
        order = "each line is a parent of the line above" if up else "each line is a child of the line above"
        section = tree.add(f"[bold]{title}[/] [dim]({count}; {order})[/]")
        expanded: set[int] = set()  # pre-order, the order lines are printed: a repeat is always below
        todo = [(section, lin.root.id)]  # (where to add lines, node whose edges to follow)
        while todo:
            branch, node_id = todo.pop()
            if node_id in expanded:
                branch.label = f"{branch.label} [dim](shown above)[/]"
                continue
            expanded.add(node_id)
            run: list[str] = []  # the linear run starting below node_id
            current = node_id
            while True:
                edges = _lineage_edges(lin, current, up)
                if len(edges) != 1 or _other_end(edges[0], up) in expanded or _is_stack(lin, current, up, full):
                    break
                current = _other_end(edges[0], up)
                expanded.add(current)
                run.append(_edge_line(lin, edges[0], up, full))
            branch = _add_run(branch, run, full)
            if _is_stack(lin, current, up, full):
                _add_members(branch, lin, edges, full)
                continue
            subtrees = [(branch.add(_edge_line(lin, edge, up, full)), _other_end(edge, up)) for edge in edges]
            todo.extend(reversed(subtrees))  # the first edge is expanded (and printed) first
    return tree


def _is_stack(lin: Any, node_id: int, up: bool, full: bool) -> bool:
    """Whether the walk up lists this node's parents as stack members instead of expanding them."""
    return up and not full and lin.nodes[node_id].kind == "stack"


def _add_members(branch: Tree, lin: Any, edges: list[Any], full: bool) -> None:
    """A stack's members, once, in order, with weights; a hint where their own ancestry is."""
    members = [e for e in edges if e.relation == "stacked_on"]
    for i, edge in enumerate(members, start=1):
        weight = f" w={edge.weight:g}" if edge.weight is not None else ""
        label = _node_label(lin.nodes[edge.parent_id], lin.batches.get(edge.parent_id), full)
        branch.add(f"[magenta]{escape(f'member {i}/{len(members)}{weight}')}[/] ← {label}")
    for edge in edges:  # anything else a stack came from (not written by this tool today)
        if edge.relation != "stacked_on":
            branch.add(_edge_line(lin, edge, True, full))
    if any(_lineage_edges(lin, e.parent_id, True) for e in edges):
        branch.add("[dim]… members' own ancestry: --full, or lineage <member id>[/]")


def _node_label(node: Any, batches: list[dict[str, Any]] | None = None, full: bool = True) -> str:
    """One tree line in rich markup; every piece of catalog text in it is escaped. Batches read as
    runs (``train b000001–b000020 (20) · eval b000021``), or one by one when ``full``."""
    label = f"[bold]{escape(f'{node.name}@{node.version}')}[/] #{node.id} {escape(str(node.kind))}"
    if node.task:
        label += f" {escape(str(node.task))}"
    if node.aliases:
        label += " [green]" + escape("[" + ", ".join(node.aliases) + "]") + "[/]"
    if node.status != "active":
        label += f" [red]{escape(f'({node.status})')}[/]"
    metric = primary_metric_text(node.metrics)
    if metric != "-":
        label += f" [cyan]{escape(metric)}[/]"
    if batches and full:
        label += " [dim]batches: " + escape(", ".join(f"{b['batch_id']}({b['role']})" for b in batches)) + "[/]"
    elif batches:
        label += " [dim]" + escape(batch_summary(batches)) + "[/]"
    return label


def _lineage_edges(lin: Any, node_id: int, up: bool) -> list[Any]:
    edges = lin.parents_of(node_id) if up else lin.children_of(node_id)
    return [e for e in edges if _other_end(e, up) in lin.nodes]


def _other_end(edge: Any, up: bool) -> int:
    return edge.parent_id if up else edge.child_id


def _edge_line(lin: Any, edge: Any, up: bool, full: bool) -> str:
    other = _other_end(edge, up)
    weight = f" w={edge.weight:g}" if edge.weight is not None else ""
    arrow = "←" if up else "→"
    relation = escape(f"{edge.relation}{weight}")
    return f"[magenta]{relation}[/] {arrow} " + _node_label(lin.nodes[other], lin.batches.get(other), full)


def _add_run(branch: Tree, lines: list[str], full: bool) -> Tree:
    """Add a linear run's lines as siblings; return where the run's end continues (its last line)."""
    if not lines:
        return branch
    if not full and len(lines) > RUN_HEAD + RUN_TAIL + 1:
        hidden = len(lines) - RUN_HEAD - RUN_TAIL
        lines = [*lines[:RUN_HEAD], f"[dim]… {hidden} more generations in this run (--full shows them)[/]",
                 *lines[-RUN_TAIL:]]
    last = branch
    for text in lines:
        last = branch.add(text)
    return last
