"""Output helpers shared by every CLI sub-command: rich tables for people, JSON for scripts.

Kept apart from ``cli.py`` so sub-apps (``adapters-mgr data ...``) can use the same conventions
without importing the main app (which would be circular).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from adapters_mgr.manager import AdapterManager

# emoji off: user text such as a task ":fire:" prints as typed (markup is escaped where it is on)
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, default=_default, indent=2, sort_keys=False) + "\n")


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


def print_table(
    rows: Sequence[dict[str, Any]],
    columns: Iterable[str],
    *,
    title: str | None = None,
    formatters: dict[str, Callable[[Any], str]] | None = None,
) -> None:
    """A rich table with the given columns; missing keys print as '-'."""
    cols = list(columns)
    table = Table(title=title, show_lines=False)
    for col in cols:
        table.add_column(col, overflow="fold")  # wrap, never elide: ids and names must stay readable
    formatters = formatters or {}
    for row in rows:
        table.add_row(*[formatters.get(c, fmt)(row.get(c)) for c in cols])
    console.print(table)


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


@dataclass
class CliState:
    """What the root callback parsed: where the catalog lives and how to report errors."""

    root: Path | None = None
    debug: bool = False
    _manager: AdapterManager | None = field(default=None, repr=False)

    def manager(self) -> AdapterManager:
        if self._manager is None:
            from adapters_mgr.manager import AdapterManager

            self._manager = AdapterManager(self.root)
        return self._manager

