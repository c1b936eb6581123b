"""Evaluation figures keyed by node and examples: one figure per node per set of rows, reused.

A node never changes, so its metrics on the same examples at the same ``max_length`` are a fact to
record, not to recompute: the gate's baseline, compaction's stack figure and the demo's stale and
following-week figures read what an earlier evaluation wrote (see migration ``m004_evaluations``).
The key is a digest of the examples exactly as scored (texts, labels, prior offsets; for the
retriever the catalog, the seen items and the popularity counts), so a different subsample,
template or prior is a different key, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import duckdb

from adapters_mgr.catalog.sql import utcnow


@dataclass(frozen=True)
class ExamplesKey:
    """What identifies a set of eval examples: their digest, how many rows, from which batches."""

    sha: str
    rows: int
    batch_ids: tuple[str, ...]

    def label(self) -> str:
        """How a figure names its rows: ``500 rows of b000021``."""
        where = f" of {', '.join(self.batch_ids)}" if self.batch_ids else ""
        return f"{self.rows:,} rows{where}"


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        return repr(value)  # exact: two offsets that differ in the last bit are other examples
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _rows_and_batches(examples: Any) -> tuple[int, tuple[str, ...]]:
    rows = examples.get("rows", []) if isinstance(examples, dict) else examples
    batch_ids = {str(r["batch_id"]) for r in rows if isinstance(r, dict) and r.get("batch_id")}
    return len(rows), tuple(sorted(batch_ids))


def rows_label(examples: Any) -> str:
    """``500 rows of b000021``: what a figure on ``examples`` was computed on (no digest needed)."""
    return ExamplesKey("", *_rows_and_batches(examples)).label()


def examples_key(examples: Any) -> ExamplesKey:
    """The digest of ``examples`` (ranker: rows; retriever: the dict of rows, catalog, seen, as_of)."""
    text = json.dumps(_canonical(examples), sort_keys=True, separators=(",", ":"))
    return ExamplesKey(hashlib.sha256(text.encode()).hexdigest(), *_rows_and_batches(examples))


def lookup(con: duckdb.DuckDBPyConnection, node_id: int, key: ExamplesKey, max_length: int
           ) -> dict[str, Any] | None:
    """The recorded metrics of ``node_id`` on these examples, or None."""
    row = con.execute("SELECT metrics FROM evaluations WHERE node_id = ? AND examples_sha = ? AND max_length = ?",
                      [node_id, key.sha, max_length]).fetchone()
    return json.loads(row[0]) if row else None


def record(con: duckdb.DuckDBPyConnection, node_id: int, key: ExamplesKey, max_length: int,
           metrics: dict[str, Any]) -> None:
    """Record a node's figures on these examples (the first write wins: they cannot differ)."""
    figures = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    con.execute("INSERT OR IGNORE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?)",
                [node_id, key.sha, max_length, json.dumps(list(key.batch_ids)), key.rows, json.dumps(figures),
                 utcnow()])
