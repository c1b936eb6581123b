"""Compaction: a stack deeper than a limit becomes one merged adapter, and the alias moves to it only
when it evaluates within tolerance of the stack on the same rows (the promotion rule of
:mod:`adapters_mgr.workflows.evaluation`). Both figures and the decision go to the event log.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from adapters_mgr.catalog import aliases
from adapters_mgr.catalog.evaluations import examples_key
from adapters_mgr.catalog.records import Adapter
from adapters_mgr.catalog.sql import log_event
from adapters_mgr.data.sampling import subsample_rows
from adapters_mgr.errors import InvalidInput
from adapters_mgr.lora.peft_scoring import evaluate_adapters
from adapters_mgr.lora.tasks import get_task
from adapters_mgr.workflows.evaluation import (
    cached_metrics,
    eval_examples,
    node_examples,
    remember,
    rows_label,
    with_primary,
    within_tolerance,
)
from adapters_mgr.workflows.merge import merge_to_folder, plan_base, plan_merge, register_merged, staging_dir
from adapters_mgr.workflows.workspace import Workspace


def compaction_examples(ws: Workspace, node: Adapter, task: str, eval_batches: Any, *,
                        max_eval_rows: int | None = None, seed: int = 0) -> tuple[Any, list[str]]:
    """Eval examples for the stack-vs-merged comparison: the node's own eval batches by default, else
    the newest batch; subsampled as an update subsamples its eval rows (``seed + 1``), so the same
    settings give the same rows and the gate's recorded figure of the stack is reused."""
    if eval_batches is None:
        links = ws.lineage(node.id, depth=0).batches.get(node.id, [])
        eval_batches = [b["batch_id"] for b in links if b["role"] == "eval"]
        if not eval_batches:
            batches = ws.data.batches()
            if not batches:
                raise InvalidInput("no data batches to evaluate the compaction on; pass eval_batches")
            eval_batches = [batches[-1]["id"]]
    ids = [eval_batches] if isinstance(eval_batches, str) else list(eval_batches)
    rows = subsample_rows(ws.data.training_rows(ids, templates=ws.data.templates()), max_eval_rows, seed + 1)
    if not rows:
        raise InvalidInput(f"eval batches {ids} hold no rows")
    if task == "ranker":
        return rows, ids
    seqs = {b["id"]: b["seq"] for b in ws.data.batches()}
    before = [b for b, s in seqs.items() if s < min(seqs[i] for i in ids)]
    first = min(r["ts"] for r in rows)
    return eval_examples(ws, task, rows, before, first), ids


def compact_alias(ws: Workspace, alias: str, *, max_depth: int, method: str, target_rank: int | None,
                  tolerance: float, eval_batches: Any, max_eval_rows: int | None = None, seed: int = 0,
                  max_length: int = 64) -> dict[str, Any]:
    """Merge a deep stack behind ``alias`` into one adapter; move the alias only within ``tolerance``."""
    if max_depth < 1:
        raise InvalidInput(f"max_depth must be >= 1, got {max_depth}")
    node = ws.get(alias)
    plan = plan_merge(ws, [node.id], None)
    if node.kind != "stack" or len(plan.members) <= max_depth:
        return {"compacted": False, "reason": f"{alias} is a {node.kind} of {len(plan.members)} adapter(s), "
                f"not deeper than {max_depth}", "node_id": node.id}
    if max_length < 8:
        raise InvalidInput(f"max_length must be >= 8, got {max_length}")
    examples, eval_ids = compaction_examples(ws, node, plan.task, eval_batches, max_eval_rows=max_eval_rows,
                                             seed=seed)
    base_model = plan_base(ws, plan)
    tok = ws.tokenizer(plan.base_id)
    # the stack as the gate scored it (its own prior / popularity term); recorded figures are reused
    task, scored, folders, mode = node_examples(ws, get_task(plan.task), node, examples)
    key = examples_key(scored)
    stack_metrics = cached_metrics(ws, node.id, key, max_length, lambda: evaluate_adapters(
        base_model, tok, task, folders, scored, mode, max_length=max_length))
    with tempfile.TemporaryDirectory(dir=staging_dir(ws)) as tmp:
        out = Path(tmp) / "merged"
        result = merge_to_folder(ws, plan, method, out, target_rank=target_rank, density=None, seed=0)
        merged_metrics = evaluate_adapters(base_model, tok, task, [(str(out), 1.0)], scored, "weights",
                                           max_length=max_length)
        metrics = with_primary(merged_metrics, task, {"node_id": node.id, **stack_metrics})
        merged_id = register_merged(ws, plan, result, out, name=f"{node.name}-compact", metrics=metrics)
        shutil.rmtree(out, ignore_errors=True)
    remember(ws, merged_id, key, max_length, merged_metrics)
    primary = task.primary_metric
    within = within_tolerance(merged_metrics[primary], stack_metrics[primary], tolerance)
    decision = {"stack": node.id, "merged": merged_id, "metric": primary, "stack_metric": stack_metrics[primary],
                "merged_metric": merged_metrics[primary], "tolerance": tolerance, "moved": within,
                "method": method, "eval_batches": eval_ids, "eval_label": rows_label(examples),
                "reconstruction_error": result.reconstruction_error}
    with ws.catalog.transaction() as con:
        if within:
            aliases.point(con, alias, merged_id, action="promote",
                          reason=f"compact: {primary} {merged_metrics[primary]:.4f} vs stack "
                                 f"{stack_metrics[primary]:.4f} (tolerance {tolerance})")
        log_event(con, "compact", {"alias": alias, "max_depth": max_depth, "method": method}, detail=decision)
    return {"compacted": True, **decision}
