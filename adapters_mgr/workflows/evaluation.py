"""Evaluation in the catalog's terms: eval examples from batches, a node's metrics, and the ONE
promotion rule that both ``train --promote if_better`` and ``compact`` apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters_mgr.catalog import evaluations
from adapters_mgr.catalog.records import Adapter
from adapters_mgr.data.popularity import PopularityRecipe
from adapters_mgr.data.prior import PriorRecipe
from adapters_mgr.lora.examples import OFFSET_COLUMN, POPULARITY_COLUMN
from adapters_mgr.lora.peft_scoring import evaluate_adapters
from adapters_mgr.lora.ranker_shape import CROSS, RankerShape
from adapters_mgr.lora.tasks import Task, get_task
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
    # ``as_of``: the time the popularity term counts up to (with_eval_popularity adds the counts)
    return {"rows": rows, "catalog": catalog, "seen": seen, "as_of": cutoff}


def retriever_task(recipe: PopularityRecipe) -> Task:
    """The retriever recipe that scores the way a node with this popularity recipe (and its
    learned weights) was trained; no recipe: the cosine alone, as every older retriever."""
    return get_task("retriever", popularity=recipe.to_dict() if recipe.used else None)


def with_popularity(ws: Workspace, rows: list[dict[str, Any]], recipe: PopularityRecipe) -> list[dict[str, Any]]:
    """Retriever training rows with the column ``item_pop_count`` (the item's interactions strictly
    before the row) when ``recipe`` adds the popularity term; the rows as they are otherwise."""
    if not recipe.used or not rows:
        return rows
    counts = ws.data.row_popularity(rows, recipe)
    return [{**r, POPULARITY_COLUMN: int(c)} for r, c in zip(rows, counts, strict=True)]


def with_eval_popularity(ws: Workspace, examples: Any, recipe: PopularityRecipe) -> Any:
    """Retriever eval examples plus ``popularity`` (each catalog item's interactions strictly
    before the period: the examples' ``as_of``) when ``recipe`` adds the popularity term."""
    if not recipe.used or not isinstance(examples, dict) or "catalog" not in examples:
        return examples
    items = list(examples["catalog"])
    counts = ws.data.item_popularity(items, examples.get("as_of"), recipe=recipe)
    return {**examples, "popularity": dict(zip(items, counts.tolist(), strict=True))}


def task_with_prior(task: str, recipe: PriorRecipe, shape: RankerShape = CROSS) -> Task:
    """The task recipe that scores the way a node with this prior (and ranker shape, with its
    learned numbers) was trained (the ranker adds the prior's logit to its residual; the retriever
    takes no prior)."""
    if task == "ranker":
        return get_task("ranker", prior=recipe.kind, shape=shape)
    return get_task(task)


def with_prior(ws: Workspace, rows: list[dict[str, Any]], recipe: PriorRecipe) -> list[dict[str, Any]]:
    """Ranker rows with the column ``prior_logit`` of ``recipe``, each as of its own event (copies;
    the rows are returned as they are for prior 'none', whose scores add nothing)."""
    logits = ws.data.prior_logits(rows, recipe) if rows else None
    if logits is None:
        return rows
    return [{**r, OFFSET_COLUMN: float(v)} for r, v in zip(rows, logits, strict=True)]


def with_history(ws: Workspace, rows: list[dict[str, Any]], shape: RankerShape, item_template: str
                 ) -> list[dict[str, Any]]:
    """Ranker rows as a ``history`` ranker reads them (copies): the user text is the user's liked and
    disliked items strictly before the row, the item text the item's content text
    (:mod:`adapters_mgr.data.history`); the rows as they are for every other shape."""
    if not shape.history or not rows:
        return rows
    users, items = ws.data.history_texts(rows, item_template)
    return [{**r, "user_text": u, "item_text": i} for r, u, i in zip(rows, users, items, strict=True)]


def item_template_of(ws: Workspace, adapters: list[Adapter]) -> str:
    """The item template the adapters' newest member trained with (else the catalog's current one)."""
    return (ws.newest_templates(adapters) or ws.data.templates())["item"]


def node_examples(ws: Workspace, task: Task, node: Adapter, examples: Any) -> tuple[Task, Any, Any, str]:
    """(task recipe, examples as the node scores them, member folders, mode): the node's own prior
    offsets added to ranker rows, its popularity counts to retriever examples, and (a history
    ranker) its history texts."""
    members, mode = ws.members(node)
    if task.name == "retriever":  # the node's own popularity term and learned weights (none: the cosine)
        pop = ws.popularity_recipe([m for m, _ in members])
        return retriever_task(pop), with_eval_popularity(ws, examples, pop), ws.member_folders(members), mode
    recipe = ws.prior_recipe([m for m, _ in members])
    if task.name == "ranker" and recipe.used:
        examples = with_prior(ws, list(examples), recipe)
    shape = ws.ranker_shape([m for m, _ in members]) if task.name == "ranker" else CROSS
    if shape.history:
        examples = with_history(ws, list(examples), shape, item_template_of(ws, [m for m, _ in members]))
    return task_with_prior(task.name, recipe, shape), examples, ws.member_folders(members), mode


def evaluate_node(ws: Workspace, base_model: Any, tokenizer: Any, task: Task, node: Adapter, examples: Any, *,
                  max_length: int = 64) -> dict[str, float]:
    """Metrics of a catalog node (an adapter, or a stack in its own mode) on ``examples``, scored
    with the node's own prior (so a gate compares an old node without it fairly to a new one with it).
    Computed once per node and examples: a figure recorded earlier is returned as it was."""
    scored_task, scored, folders, mode = node_examples(ws, task, node, examples)
    return cached_metrics(ws, node.id, evaluations.examples_key(scored), max_length, lambda: evaluate_adapters(
        base_model, tokenizer, scored_task, folders, scored, mode, max_length=max_length))


def cached_metrics(ws: Workspace, node_id: int, key: evaluations.ExamplesKey, max_length: int,
                   compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The node's recorded figures on the examples ``key`` names, else ``compute()``, recorded."""
    with ws.catalog.connect() as con:
        known = evaluations.lookup(con, node_id, key, max_length)
    if known is not None:
        return known
    metrics = compute()
    remember(ws, node_id, key, max_length, metrics)
    return metrics


def remember(ws: Workspace, node_id: int, key: evaluations.ExamplesKey, max_length: int,
             metrics: dict[str, Any]) -> None:
    """Record ``metrics`` as node ``node_id``'s figures on the examples ``key`` names."""
    with ws.catalog.transaction() as con:
        evaluations.record(con, node_id, key, max_length, metrics)


rows_label = evaluations.rows_label


def with_primary(metrics: dict[str, Any], task: Task, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics as recorded in the catalog: plus the task's primary figure and what it was compared to."""
    primary = task.primary_metric
    record = {**metrics, "primary": metrics.get(primary), "primary_metric": primary}
    if baseline is not None:
        record["baseline"] = baseline
    return record
