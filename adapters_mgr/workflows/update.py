"""Incremental updates: from data batches to a registered, evaluated, maybe promoted adapter.

:func:`run_update` is four steps, each its own function: :func:`plan_update` resolves and checks
everything before any model work; :func:`load_rows` reads training, replay and eval rows (no model
yet); :func:`train_together` trains (every process of a launch) and :func:`finish_training` evaluates
the new node and saves the new adapter to a temporary folder; :func:`gate_step`
evaluates the alias's current target on the same eval examples and decides; :func:`register_step`
stores the bytes and writes the adapter (+ stack node) in ONE catalog transaction, then the alias
moves if the gate said so. Ctrl-C or a crash at any point leaves either a complete registered
update or nothing visible (at worst an orphan folder for ``gc``).

Several processes (``torchrun`` / ``accelerate launch --multi_gpu``, see :class:`~adapters_mgr.lora.trainer.Team`):
only the main process (rank 0) plans, reads the rows and hands the plan, the training rows, the base's
row and the parents' verified folders to the others (:class:`TrainInputs`: every process trains on
the same inputs even if the catalog moves meanwhile, and the others never open it); all train
together (data-parallel); only once every process has finished training (the trainer's last
collective) does rank 0 evaluate, gate, store and register, while the others wait for its verdict.
The other processes never open the catalog, so never write it (not even a failure event: theirs is
reported on their stderr and exit status, rank 0's in the catalog as usual). A process that dies or
fails before every process has finished training makes rank 0 fail in a collective: nothing is
registered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import duckdb
import peft
import torch
import transformers

from adapters_mgr.catalog import aliases, nodes
from adapters_mgr.catalog.evaluations import examples_key
from adapters_mgr.catalog.nodes import ParentSpec
from adapters_mgr.catalog.records import Adapter, check_alias, check_name
from adapters_mgr.catalog.sql import log_event, to_json
from adapters_mgr.data import popularity, prior
from adapters_mgr.data.popularity import NO_POPULARITY, PopularityRecipe
from adapters_mgr.data.prior import NO_PRIOR, PriorRecipe
from adapters_mgr.data.sampling import subsample_rows
from adapters_mgr.errors import Conflict, InvalidInput, NotFound
from adapters_mgr.faults import maybe_crash
from adapters_mgr.lora.base_model import load_base_model, load_tokenizer
from adapters_mgr.lora.policies import Policy, get_policy
from adapters_mgr.lora.ranker_shape import CROSS, SHAPES, RankerShape, shape_of
from adapters_mgr.lora.replay import replay_mix
from adapters_mgr.lora.settings import LoraSettings
from adapters_mgr.lora.tasks import Task, get_task, task_names
from adapters_mgr.lora.trainer import DistributedError, Team, TrainResult, train_adapter
from adapters_mgr.store import WEIGHTS_FILE, sha256_file
from adapters_mgr.workflows.bases import default_base
from adapters_mgr.workflows.config import UpdateConfig
from adapters_mgr.workflows.evaluation import (
    PROMOTE_CHOICES,
    eval_examples,
    evaluate_node,
    gate_decision,
    node_examples,
    remember,
    retriever_task,
    rows_label,
    task_with_prior,
    with_eval_popularity,
    with_history,
    with_popularity,
    with_primary,
    with_prior,
)
from adapters_mgr.workflows.register import store_adapter
from adapters_mgr.workflows.workspace import Workspace

HOLDOUT_FRACTION = 0.1
PRIOR_CHOICES = ("auto", "bias", "none")
SHAPE_CHOICES = ("auto", *SHAPES)
FRESH_RANKER_SHAPE = "history"  # what --ranker-shape auto trains for a ranker without parents (README:
# "History rankers": on ML-100K and the drift stream it is the one shape that adds to the prior)
POPULARITY_CHOICES = ("auto", "log", "none")
POPULARITY_EVENTS_CHOICES = ("auto", *popularity.EVENTS)
#: A fresh retriever's popularity term: like counts decayed with a 14-day half-life (data/popularity.py
#: says what it scores against all-history counts on MovieLens-100K)
FRESH_POPULARITY = {"events": "likes", "half_life_days": 14.0}


@dataclass
class UpdateResult:
    """What :func:`run_update` did: the node to serve, the adapter it trained, metrics and the gate."""

    node_id: int
    adapter_id: int
    metrics: dict[str, Any]
    baseline: dict[str, Any] | None
    decision: str | None
    promoted: bool
    train_batches: list[str]
    eval_batches: list[str]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class UpdatePlan:
    """Everything resolved and checked before any row is read or any model loaded."""

    cfg: UpdateConfig
    policy: Policy
    task: Task
    name: str
    base_id: str
    parent: Adapter | None
    members: list[tuple[Adapter, float]]  # the parent node's adapters, with weights
    train_ids: list[str]
    eval_ids: list[str]
    batches: list[dict[str, Any]]  # every batch, oldest first
    promote: str | None = None
    alias: str = "production"
    tolerance: float = 0.0
    prior: PriorRecipe = NO_PRIOR  # the as-of prior the new adapter scores on top of (recorded with it)
    popularity: PopularityRecipe = NO_POPULARITY  # retriever: the popularity term, with its starting weights
    lora_layers: tuple[int, ...] | None = None  # ``top_layers`` as the base's layer indices (None: all)

    @property
    def seq(self) -> dict[str, int]:
        return {b["id"]: b["seq"] for b in self.batches}

    def settings(self) -> LoraSettings | None:
        """The new adapter's LoRA shape (None: inherited from the parent)."""
        if self.policy.inherits_shape:
            return None
        cfg = self.cfg
        return LoraSettings(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=tuple(cfg.target_modules),
                            layers=self.lora_layers)


@dataclass
class UpdateRows:
    """The rows of one update and the eval examples built from them."""

    templates: dict[str, str]
    train: list[dict[str, Any]]  # new rows + replayed ones
    eval: list[dict[str, Any]]
    replay_ids: list[str]
    examples: Any
    own_examples: Any = None
    """The examples as the new adapter scores them (a history ranker: its history texts); None: ``examples``."""

    @property
    def scored(self) -> Any:
        return self.examples if self.own_examples is None else self.own_examples


@dataclass
class TrainInputs:
    """What every process of a launch trains from, resolved once by rank 0 and handed to the others,
    so they train on the same rows, base and parents and never open the catalog."""

    plan: UpdatePlan
    rows: list[dict[str, Any]]
    base: dict[str, Any]  # the base's catalog row (id, source, weights_sha256 ...)
    parents: list[tuple[str, float]]  # verified folders of the parent node's adapters, with weights

    @classmethod
    def resolve(cls, ws: Workspace, plan: UpdatePlan, rows: UpdateRows) -> TrainInputs:
        return cls(plan, rows.train, ws.base(plan.base_id), ws.member_folders(plan.members))

    def base_model(self, ws: Workspace) -> Any:
        """The shared base from the row (no catalog read), hash-checked, cached in the workspace."""
        head = self.plan.task.head
        key = (self.base["id"], head.key)
        if key not in ws.base_models:
            model = load_base_model(self.base["source"], head)
            ws.check_base_hash(model, self.base, force=False,
                               context=f"base {self.base['id']} loaded from {self.base['source']}")
            ws.base_models[key] = model
        return ws.base_models[key]

    def tokenizer(self, ws: Workspace) -> Any:
        if self.base["id"] not in ws.tokenizers:
            ws.tokenizers[self.base["id"]] = load_tokenizer(self.base["source"])
        return ws.tokenizers[self.base["id"]]


@dataclass
class Trained:
    """What training produced, the model already released: a folder and the figures to record (the
    main process only: the others of a launch save and register nothing)."""

    folder: Path
    metrics: dict[str, Any]
    node_weights: list[float]
    node_mode: str
    hyperparameters: dict[str, Any]


@dataclass
class Gate:
    baseline: dict[str, Any] | None
    current_id: int | None
    decision: str | None
    record: dict[str, Any]  # the metrics as recorded, with the primary figure and the baseline


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "duckdb": duckdb.__version__,
            "adapters_mgr": version("adapters-mgr")}


# -- 1. plan ------------------------------------------------------------------------------------------
def check_config(cfg: UpdateConfig) -> tuple[Task, Policy]:
    """Every knob checked in milliseconds, before any data or model is touched."""
    if cfg.task not in task_names():
        raise InvalidInput(f"unknown task {cfg.task!r}: use one of {', '.join(task_names())}")
    policy = get_policy(cfg.policy)
    LoraSettings(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=tuple(cfg.target_modules))
    for knob in ("epochs", "batch_size", "max_length"):
        if int(getattr(cfg, knob)) <= 0:
            raise InvalidInput(f"{knob} must be a positive integer, got {getattr(cfg, knob)!r}")
    if not cfg.lr > 0:
        raise InvalidInput(f"lr must be positive, got {cfg.lr!r}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise InvalidInput(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio!r}")
    if cfg.replay_ratio < 0:
        raise InvalidInput(f"replay_ratio must be >= 0, got {cfg.replay_ratio!r}")
    policy.check(mode=cfg.mode)
    for knob in ("max_train_rows", "max_eval_rows", "top_layers"):
        value = getattr(cfg, knob)
        if value is not None and value <= 0:
            raise InvalidInput(f"{knob} must be positive, got {value!r}")
    if cfg.prior not in PRIOR_CHOICES:
        raise InvalidInput(f"prior {cfg.prior!r} is unknown; use one of {', '.join(PRIOR_CHOICES)}")
    if cfg.prior == "bias" and cfg.task != "ranker":
        raise InvalidInput(f"prior 'bias' is for the ranker; a {cfg.task} takes prior 'none' (or 'auto')")
    if cfg.ranker_shape not in SHAPE_CHOICES:
        raise InvalidInput(f"ranker_shape {cfg.ranker_shape!r} is unknown; use one of {', '.join(SHAPE_CHOICES)}")
    if cfg.ranker_shape != "auto" and cfg.task != "ranker":
        raise InvalidInput(f"ranker_shape is for the ranker; a {cfg.task} takes 'auto'")
    PriorRecipe(shrinkage=cfg.prior_shrinkage)  # checks the shrinkage
    if cfg.popularity not in POPULARITY_CHOICES:
        raise InvalidInput(f"popularity {cfg.popularity!r} is unknown; use one of {', '.join(POPULARITY_CHOICES)}")
    if cfg.popularity == "log" and cfg.task != "retriever":
        raise InvalidInput(f"popularity 'log' is for the retriever; a {cfg.task} takes 'none' (or 'auto')")
    if cfg.popularity_events not in POPULARITY_EVENTS_CHOICES:
        raise InvalidInput(f"popularity_events {cfg.popularity_events!r} is unknown; use one of "
                           f"{', '.join(POPULARITY_EVENTS_CHOICES)}")
    half_life = cfg.popularity_half_life
    if half_life is not None and (isinstance(half_life, bool) or not half_life >= 0 or half_life == float("inf")):
        raise InvalidInput(f"popularity_half_life must be a number of days >= 0 (0: no decay), got {half_life!r}")
    return get_task(cfg.task), policy


def resolve_prior(ws: Workspace, cfg: UpdateConfig, members: list[tuple[Adapter, float]]) -> PriorRecipe:
    """The prior the new adapter trains on: as asked, or ('auto') its parents' (bias for a fresh
    ranker, none for a retriever). It must be the parents' own: the new adapter is combined with
    them, or continues their head, and a node adds ONE prior to its output."""
    parents = ws.prior_recipe([m for m, _ in members]) if members else None
    kind = cfg.prior
    if kind == "auto":
        kind = parents.kind if parents is not None else ("bias" if cfg.task == "ranker" else "none")
    recipe = PriorRecipe(kind="bias", shrinkage=float(cfg.prior_shrinkage)) if kind == "bias" else NO_PRIOR
    if parents is not None and parents != recipe:
        ids = [m.id for m, _ in members]
        raise Conflict(f"the parent adapters {ids} were trained with prior {parents.kind!r}"
                       f"{f' (shrinkage {parents.shrinkage:g})' if parents.used else ''}; the new adapter would use "
                       f"{recipe.kind!r}{f' (shrinkage {recipe.shrinkage:g})' if recipe.used else ''}. Train with "
                       "prior='auto' (--prior auto) to continue theirs, or policy 'fresh' to start over")
    return recipe


def resolve_shape(ws: Workspace, cfg: UpdateConfig, members: list[tuple[Adapter, float]]) -> RankerShape:
    """The ranker's shape: as asked, or ('auto') its parents' (``FRESH_RANKER_SHAPE`` for a fresh
    ranker). On top of parents, a tower's scale and bias start from the newest parent's learned ones
    (the new adapter continues their node); the shape itself must be theirs."""
    if cfg.task != "ranker":
        return CROSS
    parents = ws.ranker_shape([m for m, _ in members]) if members else None
    kind = cfg.ranker_shape
    if kind == "auto":
        kind = parents.shape if parents is not None else FRESH_RANKER_SHAPE
    if parents is not None:
        if parents.shape != kind:
            raise Conflict(f"the parent adapters {[m.id for m, _ in members]} are {parents.shape} rankers; the new "
                           f"adapter would be a {kind} one. Train with --ranker-shape auto to continue theirs, or "
                           "policy 'fresh' to start over")
        return parents.continued()
    return RankerShape(shape=kind)


def resolve_popularity(ws: Workspace, cfg: UpdateConfig, members: list[tuple[Adapter, float]]) -> PopularityRecipe:
    """The retriever's popularity term: as asked, or ('auto') its parents' (log for a fresh
    retriever, none for a ranker). A fresh term starts at sim_weight 0, pop_weight 1 (exactly
    popularity); on top of parents that have one, it starts from the newest parent's learned weights."""
    if cfg.task != "retriever":
        return NO_POPULARITY
    parents = ws.popularity_recipe([m for m, _ in members]) if members else None
    kind = cfg.popularity
    if kind == "auto":
        kind = "log" if parents is None or parents.used else "none"
    if kind == "none":
        return NO_POPULARITY
    inherited = parents is not None and parents.used
    events = cfg.popularity_events
    if events == "auto":
        events = parents.events if inherited else FRESH_POPULARITY["events"]
    half_life = cfg.popularity_half_life
    if half_life is None:
        half_life = parents.half_life_days if inherited else FRESH_POPULARITY["half_life_days"]
    half_life = float(half_life) if half_life else None  # 0: no decay
    recipe = PopularityRecipe(logq=bool(cfg.popularity_logq), events=events, half_life_days=half_life)
    if inherited:
        if (parents.events, parents.half_life_days) != (events, half_life):
            ids = [m.id for m, _ in members]
            raise Conflict(f"the parent adapters {ids} count popularity as {parents.events} with half-life "
                           f"{parents.half_life_days or 'none'}; the new adapter would count {events} with half-life "
                           f"{half_life or 'none'}: its learned weights would read another term. Leave "
                           "--popularity-events / --popularity-half-life unset to continue theirs, or train fresh")
        recipe = replace(recipe, smoothing=parents.smoothing).with_weights(parents.sim_weight, parents.pop_weight)
    return recipe


def resolve_train_batches(batches: list[dict[str, Any]], wanted: Any) -> list[str]:
    if not batches:
        raise NotFound("there are no data batches; add a source and run `adapters-mgr data sync` first")
    if wanted in (None, "latest"):
        return [batches[-1]["id"]]
    ids = [wanted] if isinstance(wanted, str) else [str(b) for b in wanted]
    if not ids:
        raise InvalidInput("no training batches given")
    by_id = {b["id"]: b for b in batches}
    out = []
    for b in ids:
        if b == "latest":
            b = batches[-1]["id"]
        if b not in by_id:
            raise NotFound(f"no data batch {b!r}; list them with `adapters-mgr data batches`")
        out.append(b)
    out = sorted(dict.fromkeys(out), key=lambda b: by_id[b]["seq"])
    if not any(by_id[b]["num_rows"] for b in out):
        raise InvalidInput(f"training batches {out} hold no kept rows; nothing to train on")
    return out


def resolve_eval_batches(batches: list[dict[str, Any]], train: list[str], wanted: Any) -> list[str]:
    """Explicit ids; or the batch right after the newest training batch (prequential); else []."""
    if wanted == "holdout":
        return []
    seq = {b["id"]: b["seq"] for b in batches}
    if wanted not in (None, "next"):
        ids = [wanted] if isinstance(wanted, str) else [str(b) for b in wanted]
        for b in ids:
            if b not in seq:
                raise NotFound(f"no data batch {b!r} to evaluate on; list them with `adapters-mgr data batches`")
        overlap = set(ids) & set(train)
        if overlap:
            raise InvalidInput(f"batches {sorted(overlap)} are both training and evaluation data")
        return ids
    newest = max(seq[b] for b in train)
    return [b["id"] for b in batches if b["seq"] > newest and b["num_rows"]][:1]


def resolve_parent(ws: Workspace, cfg: UpdateConfig, policy: Policy, parent: Any, base_id: str | None
                   ) -> tuple[Adapter | None, list[tuple[Adapter, float]]]:
    """The parent node and its member adapters, checked against the policy, task and base."""
    if parent is None:
        policy.check(parents=0, mode=cfg.mode)
        return None, []
    policy.check(parents=1, mode=cfg.mode)  # fresh refuses any parent before it is even looked up
    node = ws.get(parent)
    if node.status != "active":
        raise Conflict(f"parent {parent!r} (adapter {node.id}) is {node.status}")
    if node.task != cfg.task:
        raise Conflict(f"parent {parent!r} (adapter {node.id}) is a {node.task} adapter, not {cfg.task}")
    if base_id is not None and node.base_id != base_id:
        raise Conflict(f"parent {parent!r} (adapter {node.id}) is on base {node.base_id}, not {base_id}")
    policy.check(parents=1, mode=cfg.mode, parent_is_stack=node.kind == "stack", parent_label=repr(parent))
    members, parent_mode = ws.members(node)
    if policy.trains_on_parents and parent_mode != "weights":
        raise InvalidInput(f"cannot stack on {parent!r}: it combines in {parent_mode} mode, stack needs weights")
    return node, members


def plan_update(ws: Workspace, batches: Any, cfg: UpdateConfig, *, parent: Any = None, base: str | None = None,
                name: str | None = None, eval_batches: Any = None, promote: str | None = None,
                alias: str = "production", tolerance: float = 0.0) -> UpdatePlan:
    _, policy = check_config(cfg)
    if promote not in PROMOTE_CHOICES:
        raise InvalidInput(f"invalid promote {promote!r}: use None, 'always' or 'if_better'")
    if promote is not None:
        check_alias(alias)
    if tolerance < 0:
        raise InvalidInput(f"tolerance must be >= 0, got {tolerance!r}")
    name = check_name(name or cfg.task)
    all_batches = ws.data.batches()
    train_ids = resolve_train_batches(all_batches, batches)
    eval_ids = resolve_eval_batches(all_batches, train_ids, eval_batches)
    base_id = ws.base(base)["id"] if base is not None else None
    parent_node, members = resolve_parent(ws, cfg, policy, parent, base_id)
    if base_id is None:
        base_id = parent_node.base_id if parent_node is not None else default_base(ws)
    recipe = resolve_prior(ws, cfg, members)
    pop = resolve_popularity(ws, cfg, members)
    shape = resolve_shape(ws, cfg, members)
    # recorded as resolved: 'auto' never reaches the catalog
    cfg = dataclasses.replace(cfg, prior=recipe.kind, popularity=pop.kind,
                              ranker_shape=shape.shape if cfg.task == "ranker" else "auto")
    task = retriever_task(pop) if cfg.task == "retriever" else task_with_prior(cfg.task, recipe, shape)
    return UpdatePlan(cfg, policy, task, name, base_id, parent_node, members, train_ids,
                      eval_ids, all_batches, promote, alias, tolerance, recipe, pop, top_layers(ws, cfg, base_id))


def top_layers(ws: Workspace, cfg: UpdateConfig, base_id: str) -> tuple[int, ...] | None:
    """``cfg.top_layers`` as layer indices of this base (its recorded config says how many it has)."""
    if cfg.top_layers is None:
        return None
    config = ws.base(base_id).get("config") or {}
    if isinstance(config, str):
        config = json.loads(config)
    total = config.get("num_hidden_layers")
    if not isinstance(total, int):
        raise InvalidInput(f"base {base_id} records no num_hidden_layers; top_layers cannot be resolved")
    return LoraSettings.top(cfg.top_layers, total)


# -- 2. rows ------------------------------------------------------------------------------------------
def replay_rows(ws: Workspace, plan: UpdatePlan, new_rows: list[dict[str, Any]], templates: dict[str, str]
                ) -> tuple[list[dict[str, Any]], list[str]]:
    """Seeded replay: DuckDB draws a candidate pool (recency window), ``replay_mix`` picks the final
    rows weighted by recency half-life and relevance to the new batch's users/items."""
    cfg, seq = plan.cfg, plan.seq
    if cfg.replay_ratio <= 0:
        return new_rows, []
    first = plan.train_ids[0]
    if not any(b["seq"] < seq[first] for b in plan.batches):
        return new_rows, []
    want = int(round(cfg.replay_ratio * len(new_rows)))
    if want == 0:
        return new_rows, []
    candidates = ws.data.replay_sample(first, ratio=1.0, recency=cfg.replay_recency, seed=cfg.seed,
                                       max_rows=3 * want, with_text=True, templates=templates)
    first_seq = seq[first]
    history = [{**r, "batch_age": first_seq - 1 - seq.get(r.get("batch_id"), first_seq - 1)} for r in candidates]
    mixed = replay_mix(new_rows, history, ratio=cfg.replay_ratio, seed=cfg.seed, half_life=cfg.replay_half_life,
                       relevance_boost=cfg.replay_relevance)
    replayed = mixed[len(new_rows):]
    used = sorted({str(r["batch_id"]) for r in replayed if r.get("batch_id")}, key=lambda b: seq.get(b, 0))
    return [dict(r) for r in mixed], used


def load_rows(ws: Workspace, plan: UpdatePlan) -> UpdateRows:
    """Training rows (subsampled, plus replay) and eval examples; the templates are part of the recipe."""
    cfg, seq = plan.cfg, plan.seq
    templates = ws.data.templates()
    rows = subsample_rows(ws.data.training_rows(plan.train_ids, templates=templates), cfg.max_train_rows, cfg.seed)
    if not rows:
        raise InvalidInput(f"training batches {plan.train_ids} hold no rows")
    if plan.eval_ids:
        eval_rows = ws.data.training_rows(plan.eval_ids, templates=templates)
        first_eval = min(b["ts_min"] for b in plan.batches if b["id"] in plan.eval_ids)
        history = [b["id"] for b in plan.batches if b["seq"] < min(seq[e] for e in plan.eval_ids)]
    else:  # no later batch: hold out the newest tail of the training rows
        cut = max(1, int(len(rows) * HOLDOUT_FRACTION))
        if len(rows) - cut < 1:
            raise InvalidInput("too few rows to hold out an evaluation tail; pass eval batches")
        rows, eval_rows = rows[:-cut], rows[-cut:]
        first_eval = eval_rows[0]["ts"]
        history = [b["id"] for b in plan.batches if b["seq"] < min(seq[t] for t in plan.train_ids)]
    eval_rows = with_prior(ws, subsample_rows(eval_rows, cfg.max_eval_rows, cfg.seed + 1), plan.prior)
    train_rows, replay_ids = replay_rows(ws, plan, rows, templates)
    train_rows = with_popularity(ws, with_prior(ws, train_rows, plan.prior), plan.popularity)
    if cfg.task == "ranker" and len({r["label"] for r in eval_rows}) < 2:
        raise InvalidInput("evaluation rows hold a single label class; AUC is undefined (choose other eval batches)")
    if plan.eval_ids:  # everything before the eval batch counts as seen
        examples = eval_examples(ws, cfg.task, eval_rows, history, first_eval - timedelta(microseconds=1),
                                 templates=templates)
    else:  # held-out tail: earlier batches plus the training part of this one
        examples = eval_examples(ws, cfg.task, eval_rows, history, first_eval, extra_seen=rows, templates=templates)
    examples = with_eval_popularity(ws, examples, plan.popularity)
    shape = getattr(plan.task, "shape", CROSS)
    if shape.history:  # the rows keep their texts for the gate's baseline; the new ranker reads histories
        train_rows = with_history(ws, train_rows, shape, templates["item"])
        return UpdateRows(templates, train_rows, eval_rows, replay_ids, examples,
                          with_history(ws, examples, shape, templates["item"]))
    return UpdateRows(templates, train_rows, eval_rows, replay_ids, examples)


# -- 3. train -----------------------------------------------------------------------------------------
def train_together(ws: Workspace, inputs: TrainInputs, *, progress: bool) -> TrainResult:
    """Train on the shared base (every process of a multi-process launch, data-parallel). Returns
    once every process has finished training (the trainer's last collective); nothing evaluated or
    saved yet. On failure the base is already bare again."""
    plan, cfg = inputs.plan, inputs.plan.cfg
    return train_adapter(
        inputs.base_model(ws), inputs.tokenizer(ws), plan.task, inputs.rows,
        settings=plan.settings(), epochs=cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr, warmup_ratio=cfg.warmup_ratio,
        batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed, policy=cfg.policy,
        parents=inputs.parents, new_weight=cfg.new_weight, mode=cfg.mode, progress=progress,
    )


def finish_training(plan: UpdatePlan, eval_set: Any, result: TrainResult, out: Path) -> Trained:
    """The main process's part after training: the node's eval metrics, the folder, the figures to
    record; the model is released either way."""
    try:
        result.metrics.update(plan.task.evaluate(result.scorer(), eval_set))
        result.save(out)
        hyper = {
            **{k: v for k, v in result.hyperparameters.items() if k != "settings"},
            "lora": result.settings.to_dict() if hasattr(result.settings, "to_dict") else str(result.settings),
            "samples_per_s": result.samples_per_s,
            "train_wall_s": result.wall_s,
        }
        return Trained(out, dict(result.metrics), list(result.node_weights), result.mode, hyper)
    finally:
        result.release()


def remember_trained(ws: Workspace, plan: UpdatePlan, rows: UpdateRows, node_id: int,
                     metrics: dict[str, Any]) -> None:
    """Record the new node's figures on its eval examples, so the next gate (its baseline), a
    compaction or a report reads them instead of evaluating again; only when the node, scored on
    its own, sees exactly these examples (same prior offsets and popularity counts)."""
    _, scored, _, _ = node_examples(ws, plan.task, ws.get(node_id), rows.examples)
    key = examples_key(scored)
    if key == examples_key(rows.scored):
        remember(ws, node_id, key, plan.cfg.max_length, metrics)


# -- 4. gate ------------------------------------------------------------------------------------------
def gate_step(ws: Workspace, plan: UpdatePlan, rows: UpdateRows, metrics: dict[str, Any]) -> Gate:
    """The alias's current target, evaluated on the same examples when it is comparable, and the decision."""
    baseline = None
    current_id = None
    target = ws.alias_target(plan.alias)
    if target is not None:
        current = ws.get(target)
        if current.status == "active" and current.task == plan.cfg.task and current.base_id == plan.base_id:
            current_id = current.id
            cur_metrics = evaluate_node(ws, ws.base_model(plan.base_id, plan.task.head), ws.tokenizer(plan.base_id),
                                        plan.task, current, rows.examples, max_length=plan.cfg.max_length)
            baseline = {"alias": plan.alias, "node_id": current.id, **cur_metrics}
    primary = plan.task.primary_metric
    decision = gate_decision(plan.promote, metrics[primary], baseline[primary] if baseline else None,
                             plan.tolerance)
    return Gate(baseline, current_id, decision, with_primary(metrics, plan.task, baseline))


# -- 5. register (+ promote) --------------------------------------------------------------------------
def register_step(ws: Workspace, plan: UpdatePlan, rows: UpdateRows, trained: Trained, gate: Gate,
                  parent_ref: Any) -> tuple[int, int]:
    """Store the bytes, then the adapter (and the stack node a stacking policy makes) in one transaction."""
    cfg, policy, parent = plan.cfg, plan.policy, plan.parent
    prepared = store_adapter(ws, trained.folder, base=plan.base_id)
    hyper = {
        **cfg.to_dict(),
        **trained.hyperparameters,
        "train_rows": len(rows.train),
        "eval_rows": len(rows.eval),
        "eval": "batches" if plan.eval_ids else "holdout_tail",
        "versions": library_versions(),
        "policy": cfg.policy,
        "parent": parent.id if parent is not None else None,
        "templates": rows.templates,
        prior.RECORD_KEY: plan.prior.to_dict(),
    }
    links = ([(b, "train") for b in plan.train_ids] + [(b, "eval") for b in plan.eval_ids]
             + [(b, "replay") for b in rows.replay_ids])
    adapter_parents: list[ParentSpec] = []
    if parent is not None and policy.relation == "warm_start":
        adapter_parents = [ParentSpec(parent.id, "warm_start", 1.0)]
    elif parent is not None and policy.relation == "stacked_on":
        adapter_parents = [ParentSpec(parent.id, "stacked_on", None, {"trained_on_top": True})]
    adapter_metrics = gate.record if not policy.makes_stack_node else {"node_metrics": gate.record}
    with ws.catalog.transaction() as con:
        adapter_id = nodes.insert_node(
            con, name=plan.name, kind="trained", task=cfg.task, base_id=plan.base_id, parents=adapter_parents,
            links=links, columns={**prepared.columns, "hyperparams": to_json(hyper),
                                  "metrics": to_json(adapter_metrics)},
        )
        node_id = adapter_id
        if policy.makes_stack_node:
            member_ids = [m.id for m, _ in plan.members] + [adapter_id]
            specs = [ParentSpec(mid, "stacked_on", float(w))
                     for mid, w in zip(member_ids, trained.node_weights, strict=True)]
            trainable = sum(m.trainable_params or 0 for m, _ in plan.members) + int(
                prepared.columns["trainable_params"])
            node_id = nodes.insert_node(
                con, name=f"{plan.name}-{cfg.policy.replace('_', '-')}", kind="stack", task=cfg.task,
                base_id=plan.base_id, parents=specs, links=links, stack_mode=trained.node_mode,
                columns=nodes.stack_columns(trainable, trained.node_weights, trained.node_mode, metrics=gate.record,
                                            hyperparams={"policy": cfg.policy, "trained_adapter": adapter_id}),
            )
        log_event(con, "train", {"batches": plan.train_ids, "policy": cfg.policy, "parent": parent_ref,
                                 "task": cfg.task},
                  detail={"node_id": node_id, "adapter_id": adapter_id, "metrics": trained.metrics})
        maybe_crash("train:in_txn")
    return node_id, adapter_id


def promote_step(ws: Workspace, plan: UpdatePlan, gate: Gate, node_id: int, metrics: dict[str, Any]) -> bool:
    """Move the alias when the gate said so; the gate's figures go to the event log either way."""
    if gate.decision is None:
        return False
    primary = plan.task.primary_metric
    current = gate.baseline[primary] if gate.baseline else None
    record = {"new": node_id, "new_metric": metrics.get(primary), "current": gate.current_id,
              "current_metric": current, "metric": primary, "tolerance": plan.tolerance,
              "decision": gate.decision, "mode": plan.promote}
    with ws.catalog.transaction() as con:
        if gate.decision == "promote":
            reason = f"{plan.promote}: {primary} {metrics.get(primary):.4f}" + (
                f" vs {current:.4f}" if current is not None else "")
            aliases.point(con, plan.alias, node_id, action="promote", reason=reason)
        log_event(con, "promotion_gate", record, detail=record)
    return gate.decision == "promote"


def run_update(ws: Workspace, batches: Any, cfg: UpdateConfig, *, parent: Any = None, base: str | None = None,
               name: str | None = None, eval_batches: Any = None, promote: str | None = None,
               alias: str = "production", tolerance: float = 0.0, progress: bool = True,
               dry_run: bool = False) -> UpdateResult:
    """Train one incremental update and register it with full lineage (see ``AdapterManager.train``).

    Under a multi-process launch every process calls this; each gets rank 0's result, the others
    with ``extra['role'] == 'worker'`` (they registered nothing themselves)."""
    started = time.perf_counter()
    team = Team.join()
    if not team.is_main:
        return _follow_main(ws, team, progress=progress)
    try:
        plan = plan_update(ws, batches, cfg, parent=parent, base=base, name=name, eval_batches=eval_batches,
                           promote=promote, alias=alias, tolerance=tolerance)
        rows = load_rows(ws, plan)
        eval_set = plan.task.parse_eval(rows.scored)  # checked before any model work
        inputs = None if dry_run else TrainInputs.resolve(ws, plan, rows)
    except Exception as exc:
        _tell_failure(team, exc)
        raise
    if dry_run:
        result = UpdateResult(0, 0, {}, None, None, False, plan.train_ids, plan.eval_ids,
                              time.perf_counter() - started,
                              extra={"train_rows": len(rows.train), "eval_rows": len(rows.eval)})
        team.share(("done", result))
        return result
    assert inputs is not None
    team.share(("train", inputs))
    tmp = Path(tempfile.mkdtemp(prefix="update-", dir=ws.store.tmp if ws.store.tmp.exists() else None))
    try:
        # A failure while training sends no message: the other processes are inside the trainer's
        # collectives, and notice at once when this process exits (the CLI's case)
        result = train_together(ws, inputs, progress=progress)
        try:  # every process has finished training; the others wait for rank 0's verdict
            trained = finish_training(plan, eval_set, result, tmp / "adapter")
            maybe_crash("train:trained")
            gate = gate_step(ws, plan, rows, trained.metrics)
            node_id, adapter_id = register_step(ws, plan, rows, trained, gate, parent)
            remember_trained(ws, plan, rows, node_id, trained.metrics)
        except Exception as exc:
            _tell_failure(team, exc)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        promoted = promote_step(ws, plan, gate, node_id, trained.metrics)
    except Exception as exc:
        _tell_failure(team, exc)
        raise
    update = UpdateResult(
        node_id=node_id, adapter_id=adapter_id, metrics=gate.record, baseline=gate.baseline,
        decision=gate.decision, promoted=promoted, train_batches=plan.train_ids, eval_batches=plan.eval_ids,
        wall_s=time.perf_counter() - started,
        extra={"replay_batches": rows.replay_ids, "train_rows": len(rows.train),
               "eval_label": rows_label(rows.examples), "samples_per_s": trained.hyperparameters["samples_per_s"],
               **({"processes": team.size} if team.size > 1 else {})},
    )
    _quietly(team.share, ("done", update))  # registered: a peer gone by now changes nothing
    return update


def _follow_main(ws: Workspace, team: Team, *, progress: bool) -> UpdateResult:
    """A non-main process: rank 0's inputs, training together, then rank 0's verdict. Never opens
    the catalog; its failures are raised as DistributedError (not an AdaptersMgrError, so the
    façade does not log them: rank 0 alone records failures)."""
    message = team.share()
    if message[0] == "failed":
        raise DistributedError(f"the main process failed before training: {message[1]}")
    if message[0] == "train":
        try:
            train_together(ws, message[1], progress=progress).release()
        except Exception as exc:
            raise DistributedError(f"process {team.rank} failed during training: {exc}") from exc
        message = team.share()
    if message[0] == "failed":
        raise DistributedError(f"the main process failed after training: {message[1]}")
    update: UpdateResult = message[1]
    update.extra = {**update.extra, "role": "worker", "rank": team.rank}
    return update


def _tell_failure(team: Team, exc: Exception) -> None:
    """Let the waiting processes go (they raise DistributedError); a no-op in a single process."""
    _quietly(team.share, ("failed", f"{type(exc).__name__}: {exc}"))


def _quietly(call: Any, *args: Any) -> None:
    """A message to the other processes must not mask this one's outcome (a peer may be gone)."""
    with contextlib.suppress(Exception):
        call(*args)


def reproduce(ws: Workspace, ref: Any, *, progress: bool = False) -> dict[str, Any]:
    """Re-run the training recorded for a trained adapter on its recorded batches; compare the bytes."""
    node = ws.get(ref)
    if node.kind != "trained":
        raise InvalidInput(f"adapter {node.id} is {node.kind}; only trained adapters can be reproduced")
    hp = dict(node.hyperparams or {})
    recipe = prior.recipe_of(hp)  # adapters from before the prior: 'none', as they were trained
    pop = popularity.start_recipe_of(hp)  # retrievers from before the popularity term: none
    shape = shape_of(hp).restart()  # rankers from before shapes: cross-encoders; towers from their start
    cfg = dataclasses.replace(UpdateConfig.from_record(hp), prior=recipe.kind, popularity=pop.kind)
    task = retriever_task(pop) if cfg.task == "retriever" else task_with_prior(cfg.task, recipe, shape)
    policy = get_policy(cfg.policy)
    lin = ws.lineage(node.id, depth=1)
    links = lin.batches.get(node.id, [])
    train_ids = [b["batch_id"] for b in links if b["role"] == "train"]
    replay_ids = [b["batch_id"] for b in links if b["role"] == "replay"]
    members: list[tuple[Adapter, float]] = []
    parent_edges = lin.parents_of(node.id)
    if parent_edges:
        members, _ = ws.members(lin.nodes[parent_edges[0].parent_id])
    if policy.makes_stack_node and policy.relation is None:  # long_short: its partners are the stack's members
        stack_edges = [e for e in lin.children_of(node.id) if e.relation == "stacked_on"]
        if stack_edges:
            stack_node = ws.get(stack_edges[0].child_id)
            members = [(m, w) for m, w in ws.members(stack_node)[0] if m.id != node.id]
    plan = UpdatePlan(cfg, policy, task, node.name, node.base_id, None, members, train_ids, [], ws.data.batches(),
                      prior=recipe, popularity=pop, lora_layers=top_layers(ws, cfg, node.base_id))
    # adapters registered before templates were recorded: the catalog's current templates
    templates = hp.get("templates") or ws.data.templates()
    rows = subsample_rows(ws.data.training_rows(train_ids, templates=templates), cfg.max_train_rows, cfg.seed)
    if hp.get("eval") == "holdout_tail":
        rows = rows[: -max(1, int(len(rows) * HOLDOUT_FRACTION))]
    train_rows = replay_rows(ws, plan, rows, templates)[0] if replay_ids or cfg.replay_ratio else rows
    train_rows = with_popularity(ws, with_prior(ws, train_rows, recipe), pop)
    train_rows = with_history(ws, train_rows, shape, templates["item"])
    result = train_adapter(ws.base_model(node.base_id, task.head), ws.tokenizer(node.base_id), task, train_rows,
                           settings=plan.settings(), epochs=cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr,
                           warmup_ratio=cfg.warmup_ratio,
                           batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed, policy=cfg.policy,
                           parents=ws.member_folders(members), new_weight=cfg.new_weight, mode=cfg.mode,
                           progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result.save(Path(tmp) / "a")
        finally:
            result.release()
        sha = sha256_file(Path(tmp) / "a" / WEIGHTS_FILE)
    return {"adapter_id": node.id, "recorded_sha256": node.weights_sha256, "reproduced_sha256": sha,
            "identical": sha == node.weights_sha256}


__all__ = ["UpdateConfig", "UpdatePlan", "UpdateResult", "plan_update", "reproduce", "run_update"]
