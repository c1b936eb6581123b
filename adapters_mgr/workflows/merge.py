"""Catalog side of merging: which adapters, checked how, recorded how; compaction of deep stacks.

The maths lives in :mod:`adapters_mgr.lora.merge` (peft's ``add_weighted_adapter`` plus what it does not
do: heads, recipes, reconstruction error). Here: resolving nodes, compatibility checks before any
work, registering the result as a ``merged`` node with ``merged_from`` edges, and the compaction
gate that moves an alias only when the merged adapter evaluates within tolerance of the stack.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_mgr.catalog.records import check_name
from adapters_mgr.catalog.sql import log_event, to_json
from adapters_mgr.errors import Conflict, InvalidInput
from adapters_mgr.lora.base_model import HeadSpec

if TYPE_CHECKING:
    from adapters_mgr.catalog.records import Adapter
    from adapters_mgr.manager import AdapterManager


@dataclass
class MergePlan:
    members: list[tuple[Adapter, float]]
    task: str
    base_id: str
    source_mode: str


def plan_merge(mgr: AdapterManager, refs: Sequence[Any], weights: Sequence[float] | None) -> MergePlan:
    """Expand stack nodes into their members and check everything merge needs, before any work."""
    from adapters_mgr.workflows.update import node_members

    if not refs:
        raise InvalidInput("merge needs at least one adapter")
    members: list[tuple[Adapter, float]] = []
    modes = set()
    for ref in refs:
        node = mgr.get(ref)
        if node.status != "active":
            raise Conflict(f"adapter {node.id} is {node.status}; only active adapters can be merged")
        expanded, mode = node_members(mgr, node)
        modes.add(mode)
        members.extend(expanded)
    if weights is not None:
        if len(weights) != len(members):
            raise InvalidInput(f"{len(weights)} weights for {len(members)} adapters; give one weight per adapter")
        members = [(m, float(w)) for (m, _), w in zip(members, weights, strict=True)]
    tasks = {m.task for m, _ in members}
    bases = {m.base_id for m, _ in members}
    if len(bases) > 1:
        raise Conflict(f"adapters {[m.id for m, _ in members]} are on different bases {sorted(bases)}; cannot merge")
    if len(tasks) > 1:
        raise Conflict(f"adapters {[m.id for m, _ in members]} are for different tasks {sorted(map(str, tasks))}")
    targets = {tuple(sorted(m.target_modules or [])) for m, _ in members}
    if len(targets) > 1:
        raise Conflict(f"adapters {[m.id for m, _ in members]} adapt different modules {sorted(targets)}")
    return MergePlan(members, next(iter(tasks)) or "ranker", next(iter(bases)),
                     "ensemble" if "ensemble" in modes else "weights")


def _base_for(mgr: AdapterManager, plan: MergePlan) -> Any:
    head = HeadSpec("seq_cls", 2) if plan.task == "ranker" else HeadSpec("encoder")
    return mgr.base_model(plan.base_id, head)


def merge_to_folder(mgr: AdapterManager, plan: MergePlan, method: str, out_dir: Path, *,
                    target_rank: int | None, density: float | None, seed: int) -> Any:
    from adapters_mgr.lora.merge import merge_adapters

    pairs = [(str(mgr.adapter_folder(m.id)), w) for m, w in plan.members]
    return merge_adapters(pairs, method, target_rank=target_rank, density=density, base_model=_base_for(mgr, plan),
                          out_dir=out_dir, task=plan.task, seed=seed)


def register_merged(mgr: AdapterManager, plan: MergePlan, result: Any, folder: Path, *, name: str,
                    metrics: dict[str, Any] | None = None) -> int:
    from adapters_mgr.manager import ParentSpec
    from adapters_mgr.workflows.update import newest_templates

    prepared = mgr._store_adapter(folder, base=plan.base_id)
    recipe = dict(result.recipe)
    recipe["source_nodes"] = [m.id for m, _ in plan.members]
    recipe["source_mode"] = plan.source_mode
    params = {k: recipe.get(k) for k in ("method", "target_rank", "density", "seed")}
    parents = [ParentSpec(m.id, "merged_from", w, params) for m, w in plan.members]
    record = {"reconstruction_error": result.reconstruction_error, **(metrics or {})}
    with mgr.catalog.transaction() as con:
        node_id = mgr._insert_node_in(
            con, name=name, kind="merged", task=plan.task, base_id=plan.base_id, parents=parents, links=[],
            columns={**prepared.columns, "metrics": to_json(record),
                     # the merged adapter reads texts as its newest source was trained to (see Scorer)
                     "hyperparams": to_json({"merge": recipe, "templates": newest_templates(
                         mgr, [m for m, _ in plan.members])})},
        )
        log_event(con, "merge", {"sources": recipe["source_nodes"], "method": recipe["method"]},
                  detail={"id": node_id, "reconstruction_error": result.reconstruction_error})
    return node_id


def merge_nodes(mgr: AdapterManager, refs: Sequence[Any], method: str, weights: Sequence[float] | None, *,
                target_rank: int | None, density: float | None, name: str | None, seed: int) -> int:
    plan = plan_merge(mgr, refs, weights)
    name = check_name(name or f"{plan.task}-merged")
    with tempfile.TemporaryDirectory(dir=_tmp_root(mgr)) as tmp:
        out = Path(tmp) / "merged"
        result = merge_to_folder(mgr, plan, method, out, target_rank=target_rank, density=density, seed=seed)
        return register_merged(mgr, plan, result, out, name=name)


def _tmp_root(mgr: AdapterManager) -> str:
    mgr.store.ensure()
    return str(mgr.store.tmp)


def fold_node(mgr: AdapterManager, ref: Any, folder: Path) -> Path:
    from adapters_mgr.lora.merge import fold

    plan = plan_merge(mgr, [ref], None)
    if plan.source_mode == "ensemble":
        raise InvalidInput(f"{ref!r} averages outputs (ensemble); only summed deltas can be folded into weights")
    pairs = [(str(mgr.adapter_folder(m.id)), w) for m, w in plan.members]
    out = fold(_base_for(mgr, plan), pairs, folder, tokenizer=mgr.tokenizer(plan.base_id), task=plan.task)
    with mgr.catalog.transaction() as con:
        log_event(con, "fold", {"ref": ref, "folder": str(out)}, detail={"members": [m.id for m, _ in plan.members]})
    return out


def _eval_examples(mgr: AdapterManager, node: Adapter, task: str, eval_batches: Any) -> tuple[Any, list[str]]:
    from adapters_mgr.workflows.update import EvalData

    if eval_batches is None:
        links = mgr.lineage(node.id, depth=0).batches.get(node.id, [])
        eval_batches = [b["batch_id"] for b in links if b["role"] == "eval"]
        if not eval_batches:
            batches = mgr.data.batches()
            if not batches:
                raise InvalidInput("no data batches to evaluate the compaction on; pass eval_batches")
            eval_batches = [batches[-1]["id"]]
    ids = [eval_batches] if isinstance(eval_batches, str) else list(eval_batches)
    rows = mgr.data.training_rows(ids)
    if task == "ranker":
        return rows, ids
    seqs = {b["id"]: b["seq"] for b in mgr.data.batches()}
    before = [b for b, s in seqs.items() if s < min(seqs[i] for i in ids)]
    first = min(r["ts"] for r in rows)
    return EvalData.build(mgr, task, rows, before, first), ids


def compact_alias(mgr: AdapterManager, alias: str, *, max_depth: int, method: str, target_rank: int | None,
                  tolerance: float, eval_batches: Any) -> dict[str, Any]:
    """Merge a deep stack behind ``alias`` into one adapter; move the alias only if it evaluates within
    ``tolerance`` of the stack on the same rows (both figures and the decision go to the event log)."""
    from adapters_mgr.lora import evaluate_adapters, get_task

    if max_depth < 1:
        raise InvalidInput(f"max_depth must be >= 1, got {max_depth}")
    node = mgr.get(alias)
    plan = plan_merge(mgr, [node.id], None)
    if node.kind != "stack" or len(plan.members) <= max_depth:
        return {"compacted": False, "reason": f"{alias} is a {node.kind} of {len(plan.members)} adapter(s), "
                f"not deeper than {max_depth}", "node_id": node.id}
    task = get_task(plan.task)
    examples, eval_ids = _eval_examples(mgr, node, plan.task, eval_batches)
    base_model = _base_for(mgr, plan)
    tok = mgr.tokenizer(plan.base_id)
    stack_pairs = [(str(mgr.adapter_folder(m.id)), w) for m, w in plan.members]
    stack_metrics = evaluate_adapters(base_model, tok, task, stack_pairs, examples, plan.source_mode)
    with tempfile.TemporaryDirectory(dir=_tmp_root(mgr)) as tmp:
        out = Path(tmp) / "merged"
        result = merge_to_folder(mgr, plan, method, out, target_rank=target_rank, density=None, seed=0)
        merged_metrics = evaluate_adapters(base_model, tok, task, [(str(out), 1.0)], examples, "weights")
        primary = task.primary_metric
        metrics = {**merged_metrics, "primary": merged_metrics.get(primary), "primary_metric": primary,
                   "baseline": {"node_id": node.id, **stack_metrics}}
        merged_id = register_merged(mgr, plan, result, out, name=f"{node.name}-compact", metrics=metrics)
        shutil.rmtree(out, ignore_errors=True)
    within = merged_metrics[primary] >= stack_metrics[primary] - tolerance
    if within:
        mgr.promote(merged_id, alias, reason=f"compact: {primary} {merged_metrics[primary]:.4f} vs stack "
                    f"{stack_metrics[primary]:.4f} (tolerance {tolerance})")
    decision = {"stack": node.id, "merged": merged_id, "metric": primary, "stack_metric": stack_metrics[primary],
                "merged_metric": merged_metrics[primary], "tolerance": tolerance, "moved": within,
                "method": method, "eval_batches": eval_ids, "reconstruction_error": result.reconstruction_error}
    with mgr.catalog.transaction() as con:
        log_event(con, "compact", {"alias": alias, "max_depth": max_depth, "method": method}, detail=decision)
    return {"compacted": True, **decision}
