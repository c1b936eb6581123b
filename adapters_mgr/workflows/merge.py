"""Catalog side of merging: which adapters, checked how, recorded how; and fold.

The maths lives in :mod:`adapters_mgr.lora.merge` (peft's ``add_weighted_adapter`` plus what it does
not do: heads, recipes, reconstruction error). Here: resolving nodes, compatibility checks before
any work, and registering the result as a ``merged`` node with ``merged_from`` edges.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_mgr.catalog import nodes
from adapters_mgr.catalog.nodes import ParentSpec
from adapters_mgr.catalog.records import Adapter, check_name
from adapters_mgr.catalog.sql import log_event, to_json
from adapters_mgr.data import popularity, prior
from adapters_mgr.data.prior import PriorRecipe
from adapters_mgr.errors import Conflict, InvalidInput
from adapters_mgr.lora import merge as merge_maths
from adapters_mgr.lora.merge_methods import COPYING_METHODS
from adapters_mgr.lora.ranker_shape import CROSS, RankerShape
from adapters_mgr.lora.ranker_shape import RECORD_KEY as SHAPE_KEY
from adapters_mgr.lora.tasks import Task, get_task
from adapters_mgr.workflows.evaluation import task_with_prior
from adapters_mgr.workflows.register import store_adapter
from adapters_mgr.workflows.workspace import Workspace


@dataclass
class MergePlan:
    members: list[tuple[Adapter, float]]
    task: str
    base_id: str
    source_mode: str
    prior: PriorRecipe  # the sources' one prior; the merged adapter adds it once, as they did
    shape: RankerShape = CROSS  # rankers: the sources' one shape, with the newest source's scale and bias

    def task_obj(self) -> Task:
        """The recipe the merged adapter scores with (a two-tower ranker's folders are FEATURE_EXTRACTION)."""
        return task_with_prior(self.task, self.prior, self.shape)


def plan_merge(ws: Workspace, refs: Sequence[Any], weights: Sequence[float] | None) -> MergePlan:
    """Expand stack nodes into their members and check everything merge needs, before any work."""
    if not refs:
        raise InvalidInput("merge needs at least one adapter")
    members: list[tuple[Adapter, float]] = []
    modes = set()
    for ref in refs:
        node = ws.get(ref)
        if node.status != "active":
            raise Conflict(f"adapter {node.id} is {node.status}; only active adapters can be merged")
        expanded, mode = ws.members(node)
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
    recipe = ws.prior_recipe([m for m, _ in members])  # Conflict for sources trained with different priors
    task = next(iter(tasks)) or "ranker"
    shape = ws.ranker_shape([m for m, _ in members]) if task == "ranker" else CROSS  # Conflict: mixed shapes
    return MergePlan(members, task, next(iter(bases)), "ensemble" if "ensemble" in modes else "weights", recipe,
                     shape)


def plan_base(ws: Workspace, plan: MergePlan) -> Any:
    """The shared base with the head the plan's task needs."""
    return ws.base_model(plan.base_id, get_task(plan.task).head)


def merge_to_folder(ws: Workspace, plan: MergePlan, method: str, out_dir: Path, *,
                    target_rank: int | None, density: float | None, seed: int) -> merge_maths.MergeResult:
    return merge_maths.merge_adapters(ws.member_folders(plan.members), method, target_rank=target_rank,
                                      density=density, base_model=plan_base(ws, plan), out_dir=out_dir,
                                      task=plan.task_obj(), seed=seed)


def register_merged(ws: Workspace, plan: MergePlan, result: merge_maths.MergeResult, folder: Path, *, name: str,
                    metrics: dict[str, Any] | None = None) -> int:
    """The merged folder as a ``merged`` node: recipe and reconstruction error recorded, one transaction."""
    prepared = store_adapter(ws, folder, base=plan.base_id)
    recipe = dict(result.recipe)
    recipe["source_nodes"] = [m.id for m, _ in plan.members]
    recipe["source_mode"] = plan.source_mode
    params = {k: recipe.get(k) for k in ("method", "target_rank", "density", "seed")}
    parents = [ParentSpec(m.id, "merged_from", w, params) for m, w in plan.members]
    record = {"reconstruction_error": result.reconstruction_error, **(metrics or {})}
    # a merged retriever scores with its newest source's popularity term and weights, as a stack does
    pop = ws.popularity_recipe([m for m, _ in plan.members]) if plan.task == "retriever" else popularity.NO_POPULARITY
    with ws.catalog.transaction() as con:
        # the merged adapter reads texts as its newest source was trained to (see Scorer)
        templates = nodes.newest_templates(con, [m for m, _ in plan.members])
        node_id = nodes.insert_node(
            con, name=name, kind="merged", task=plan.task, base_id=plan.base_id, parents=parents, links=[],
            columns={**prepared.columns, "metrics": to_json(record),
                     "hyperparams": to_json({"merge": recipe, "templates": templates,
                                             prior.RECORD_KEY: plan.prior.to_dict(),
                                             **({SHAPE_KEY: plan.shape.to_dict()} if plan.task == "ranker" else {}),
                                             **({popularity.RECORD_KEY: pop.to_dict()} if pop.used else {})})},
        )
        log_event(con, "merge", {"sources": recipe["source_nodes"], "method": recipe["method"]},
                  detail={"id": node_id, "reconstruction_error": result.reconstruction_error})
    return node_id


def staging_dir(ws: Workspace) -> str:
    """Where merges write before registering: the store's own tmp (same file system as the store)."""
    ws.store.ensure()
    return str(ws.store.tmp)


def merge_nodes(ws: Workspace, refs: Sequence[Any], method: str, weights: Sequence[float] | None, *,
                target_rank: int | None, density: float | None, name: str | None, seed: int) -> int:
    plan = plan_merge(ws, refs, weights)
    if len(plan.members) == 1 and method in COPYING_METHODS:
        only = plan.members[0][0]
        raise InvalidInput(
            f"nothing to merge: {refs[0]!r} is one plain adapter (#{only.id} {only.ref}), and a {method} merge of "
            "one adapter is a copy of it; merge two or more adapters or a stack node (svd, ties or dare reshape "
            "a single adapter)")
    name = check_name(name or f"{plan.task}-merged")
    with tempfile.TemporaryDirectory(dir=staging_dir(ws)) as tmp:
        out = Path(tmp) / "merged"
        result = merge_to_folder(ws, plan, method, out, target_rank=target_rank, density=density, seed=seed)
        return register_merged(ws, plan, result, out, name=name)


def fold_node(ws: Workspace, ref: Any, folder: Path) -> Path:
    """Base + the node's deltas as a plain transformers checkpoint (no peft needed to load)."""
    plan = plan_merge(ws, [ref], None)
    if plan.source_mode == "ensemble":
        raise InvalidInput(f"{ref!r} averages outputs (ensemble); only summed deltas can be folded into weights")
    out = merge_maths.fold(plan_base(ws, plan), ws.member_folders(plan.members), folder,
                           tokenizer=ws.tokenizer(plan.base_id), task=plan.task_obj(),
                           record_extra={SHAPE_KEY: plan.shape.to_dict()} if plan.shape.tower else None)
    with ws.catalog.transaction() as con:
        log_event(con, "fold", {"ref": ref, "folder": str(out)}, detail={"members": [m.id for m, _ in plan.members]})
    return out
