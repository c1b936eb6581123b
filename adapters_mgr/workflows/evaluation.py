"""Evaluation in the catalog's terms: eval examples from batches, a node's metrics, and the ONE
promotion rule that both ``train --promote if_better`` and ``compact`` apply.
"""

from __future__ import annotations

from typing import Any

from adapters_mgr.catalog.records import Adapter
from adapters_mgr.lora.peft_scoring import evaluate_adapters
from adapters_mgr.lora.tasks import Task
from adapters_mgr.workflows.workspace import Workspace

PROMOTE_CHOICES = (None, "always", "if_better")


def within_tolerance(new: float, current: float | None, tolerance: float) -> bool:
    """The promotion rule: the new figure is not worse than the current one by more than ``tolerance``
    (higher is better for every primary metric); with nothing to compare against, it passes."""
    return current is None or new >= current - tolerance


def gate_decision(promote: str | None, new: float, current: float | None, tolerance: float) -> str | None:
    """None (no gate asked), 'promote' or 'keep', for ``promote`` in :data:`PROMOTE_CHOICES`."""
    if promote is None:
        return None
    if promote == "always":
        return "promote"
    return "promote" if within_tolerance(new, current, tolerance) else "keep"


def eval_examples(ws: Workspace, task: str, rows: list[dict[str, Any]], history_before: list[str], cutoff: Any,
                  extra_seen: list[dict[str, Any]] = (), templates: dict[str, str] | None = None) -> Any:
    """Ranker: the rows. Retriever: positives, the item catalog's text as of ``cutoff``, and what each
    user interacted with before it (excluded from ranking, as in full-catalog evaluation)."""
    if task == "ranker":
        return rows
    catalog = ws.data.item_texts(as_of=cutoff, templates=templates)
    seen: dict[str, set[str]] = {}
    history = ws.data.interactions(history_before) if history_before else []
    for r in [*history, *extra_seen]:
        seen.setdefault(str(r["user_id"]), set()).add(str(r["item_id"]))
    return {"rows": rows, "catalog": catalog, "seen": seen}


def evaluate_node(ws: Workspace, base_model: Any, tokenizer: Any, task: Task, node: Adapter, examples: Any, *,
                  max_length: int = 64) -> dict[str, float]:
    """Metrics of a catalog node (an adapter, or a stack in its own mode) on ``examples``."""
    members, mode = ws.members(node)
    return evaluate_adapters(base_model, tokenizer, task, ws.member_folders(members), examples, mode,
                             max_length=max_length)


def with_primary(metrics: dict[str, Any], task: Task, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics as recorded in the catalog: plus the task's primary figure and what it was compared to."""
    primary = task.primary_metric
    record = {**metrics, "primary": metrics.get(primary), "primary_metric": primary}
    if baseline is not None:
        record["baseline"] = baseline
    return record
