"""Incremental updates: from data batches to a registered, evaluated, maybe promoted adapter.

This is the glue between the data side (batches, as-of texts, replay), the training core (policies,
trainer, scoring) and the catalog (registration with full lineage, aliases, events). Everything is
validated before any model work; the only writes are one store commit and one catalog transaction
(adapter + stack node together), then possibly one alias move. So Ctrl-C or a crash at any point
leaves either a complete registered update or nothing visible (at worst an orphan folder for ``gc``).
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_mgr.catalog.sql import log_event, to_json
from adapters_mgr.data.sampling import subsample_rows
from adapters_mgr.errors import Conflict, InvalidInput, NotFound
from adapters_mgr.faults import maybe_crash
from adapters_mgr.lora.base_model import HeadSpec
from adapters_mgr.workflows.config import UpdateConfig

if TYPE_CHECKING:
    from adapters_mgr.catalog.records import Adapter
    from adapters_mgr.manager import AdapterManager

PROMOTE_CHOICES = (None, "always", "if_better")
HOLDOUT_FRACTION = 0.1


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


def _library_versions() -> dict[str, str]:
    import duckdb
    import peft
    import torch
    import transformers

    import adapters_mgr

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "duckdb": duckdb.__version__,
            "adapters_mgr": adapters_mgr.__version__}


class UpdatePlanner:
    """Resolves and checks everything an update needs, before any model is touched."""

    def __init__(self, mgr: AdapterManager, cfg: UpdateConfig) -> None:
        self.mgr = mgr
        self.cfg = cfg
        self.batches = mgr.data.batches()
        self.seq = {b["id"]: b["seq"] for b in self.batches}

    def check_config(self) -> None:
        from adapters_mgr.lora import POLICIES, LoraSettings, task_names

        cfg = self.cfg
        if cfg.task not in task_names():
            raise InvalidInput(f"unknown task {cfg.task!r}: use one of {', '.join(task_names())}")
        if cfg.policy not in POLICIES:
            raise InvalidInput(f"unknown policy {cfg.policy!r}: use one of {', '.join(POLICIES)}")
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
        if cfg.mode not in ("weights", "ensemble"):
            raise InvalidInput(f"invalid mode {cfg.mode!r}: use 'weights' or 'ensemble'")
        if cfg.policy == "stack" and cfg.mode != "weights":
            raise InvalidInput("policy 'stack' trains on top of the summed parents: it needs mode='weights'")
        for knob in ("max_train_rows", "max_eval_rows"):
            value = getattr(cfg, knob)
            if value is not None and value <= 0:
                raise InvalidInput(f"{knob} must be positive, got {value!r}")

    def train_batches(self, batches: Any) -> list[str]:
        if not self.batches:
            raise NotFound("there are no data batches; add a source and run `adapters-mgr data sync` first")
        if batches in (None, "latest"):
            return [self.batches[-1]["id"]]
        ids = [batches] if isinstance(batches, str) else [str(b) for b in batches]
        if not ids:
            raise InvalidInput("no training batches given")
        out = []
        for b in ids:
            if b == "latest":
                b = self.batches[-1]["id"]
            if b not in self.seq:
                raise NotFound(f"no data batch {b!r}; list them with `adapters-mgr data batches`")
            out.append(b)
        out = sorted(dict.fromkeys(out), key=lambda b: self.seq[b])
        empty = [b for b in out if not self._batch(b)["num_rows"]]
        if len(empty) == len(out):
            raise InvalidInput(f"training batches {out} hold no kept rows; nothing to train on")
        return out

    def _batch(self, batch_id: str) -> dict[str, Any]:
        return next(b for b in self.batches if b["id"] == batch_id)

    def eval_batches(self, train: list[str], eval_batches: Any) -> list[str]:
        """Explicit ids; or the batch right after the newest training batch (prequential); else []."""
        if eval_batches == "holdout":
            return []
        if eval_batches not in (None, "next"):
            ids = [eval_batches] if isinstance(eval_batches, str) else [str(b) for b in eval_batches]
            for b in ids:
                if b not in self.seq:
                    raise NotFound(f"no data batch {b!r} to evaluate on; list them with `adapters-mgr data batches`")
            overlap = set(ids) & set(train)
            if overlap:
                raise InvalidInput(f"batches {sorted(overlap)} are both training and evaluation data")
            return ids
        newest = max(self.seq[b] for b in train)
        later = [b["id"] for b in self.batches if b["seq"] > newest and b["num_rows"]]
        return later[:1]

    def parent(self, parent: Any, base_id: str | None) -> Adapter | None:
        cfg = self.cfg
        if parent is None:
            if cfg.policy != "fresh":
                raise InvalidInput(f"policy {cfg.policy!r} needs a parent (an id, NAME@VERSION or alias)")
            return None
        if cfg.policy == "fresh":
            raise InvalidInput("policy 'fresh' trains on the bare base and takes no parent; drop --parent")
        node = self.mgr.get(parent)
        if node.status != "active":
            raise Conflict(f"parent {parent!r} (adapter {node.id}) is {node.status}")
        if node.task != cfg.task:
            raise Conflict(f"parent {parent!r} (adapter {node.id}) is a {node.task} adapter, not {cfg.task}")
        if base_id is not None and node.base_id != base_id:
            raise Conflict(f"parent {parent!r} (adapter {node.id}) is on base {node.base_id}, not {base_id}")
        if cfg.policy in ("warm_start", "long_short") and node.kind == "stack":
            raise InvalidInput(
                f"policy {cfg.policy!r} needs a single adapter as parent; {parent!r} is a stack node "
                "(use policy 'stack', or name one of its members)"
            )
        return node


def node_members(mgr: AdapterManager, node: Adapter) -> tuple[list[tuple[Adapter, float]], str]:
    """The adapters a node activates, with weights, and how they combine (for a plain adapter: itself)."""
    if node.kind != "stack":
        return [(node, 1.0)], "weights"
    lin = mgr.lineage(node.id, depth=1)
    members = [(lin.nodes[e.parent_id], e.weight if e.weight is not None else 1.0)
               for e in lin.parents_of(node.id) if e.relation == "stacked_on"]
    return members, node.stack_mode or "weights"


def newest_templates(mgr: AdapterManager, adapters: list[Adapter]) -> dict[str, str] | None:
    """The text templates recorded by the newest of ``adapters`` that recorded any (None: none did)."""
    for adapter in sorted(adapters, key=lambda a: a.id, reverse=True):
        full = adapter if adapter.hyperparams is not None else mgr.get(adapter.id)
        recorded = (full.hyperparams or {}).get("templates")
        if recorded:
            return dict(recorded)
    return None


class EvalData:
    """Evaluation examples for a task, built from eval batches or a held-out tail of training rows."""

    @staticmethod
    def build(mgr: AdapterManager, task: str, rows: list[dict[str, Any]], history_before: list[str],
              cutoff: Any, extra_seen: list[dict[str, Any]] = (), templates: dict[str, str] | None = None) -> Any:
        """Ranker: the rows. Retriever: positives, the item catalog's text as of ``cutoff``, and what
        each user interacted with before it (excluded from ranking, as in full-catalog evaluation)."""
        if task == "ranker":
            return rows
        catalog = mgr.data.item_texts(as_of=cutoff, templates=templates)
        seen: dict[str, set[str]] = {}
        history = mgr.data.interactions(history_before) if history_before else []
        for r in [*history, *extra_seen]:
            seen.setdefault(str(r["user_id"]), set()).add(str(r["item_id"]))
        return {"rows": rows, "catalog": catalog, "seen": seen}


def _replay_rows(mgr: AdapterManager, planner: UpdatePlanner, train: list[str], new_rows: list[dict[str, Any]],
                 cfg: UpdateConfig, templates: dict[str, str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Seeded replay: DuckDB draws a candidate pool (recency window), training's ``replay_mix`` picks
    the final rows weighted by recency half-life and relevance to the new batch's users/items."""
    from adapters_mgr.lora import replay_mix

    if cfg.replay_ratio <= 0:
        return new_rows, []
    first = train[0]
    if not any(b["seq"] < planner.seq[first] for b in planner.batches):
        return new_rows, []
    want = int(round(cfg.replay_ratio * len(new_rows)))
    if want == 0:
        return new_rows, []
    candidates = mgr.data.replay_sample(first, ratio=1.0, recency=cfg.replay_recency, seed=cfg.seed,
                                        max_rows=3 * want, with_text=True, templates=templates)
    first_seq = planner.seq[first]
    history = [{**r, "batch_age": first_seq - 1 - planner.seq.get(r.get("batch_id"), first_seq - 1)}
               for r in candidates]
    mixed = replay_mix(new_rows, history, ratio=cfg.replay_ratio, seed=cfg.seed, half_life=cfg.replay_half_life,
                       relevance_boost=cfg.replay_relevance)
    replayed = mixed[len(new_rows):]
    used = sorted({str(r["batch_id"]) for r in replayed if r.get("batch_id")}, key=lambda b: planner.seq.get(b, 0))
    return [dict(r) for r in mixed], used


def run_update(
    mgr: AdapterManager,
    batches: Any,
    cfg: UpdateConfig,
    *,
    parent: Any = None,
    base: str | None = None,
    name: str | None = None,
    eval_batches: Any = None,
    promote: str | None = None,
    alias: str = "production",
    tolerance: float = 0.0,
    progress: bool = True,
    dry_run: bool = False,
) -> UpdateResult:
    """Train one incremental update and register it with full lineage (see ``AdapterManager.train``)."""
    from adapters_mgr.catalog.records import check_alias, check_name
    from adapters_mgr.lora import LoraSettings, evaluate_adapters, get_task, train_adapter
    from adapters_mgr.manager import ParentSpec, stack_columns

    started = time.perf_counter()
    planner = UpdatePlanner(mgr, cfg)
    planner.check_config()
    if promote not in PROMOTE_CHOICES:
        raise InvalidInput(f"invalid promote {promote!r}: use None, 'always' or 'if_better'")
    if promote is not None:
        check_alias(alias)
    if tolerance < 0:
        raise InvalidInput(f"tolerance must be >= 0, got {tolerance!r}")
    name = check_name(name or cfg.task)
    train_ids = planner.train_batches(batches)
    eval_ids = planner.eval_batches(train_ids, eval_batches)
    base_id = mgr.base(base)["id"] if base is not None else None
    parent_node = planner.parent(parent, base_id)
    if base_id is None:
        base_id = parent_node.base_id if parent_node is not None else mgr.default_base()
    task = get_task(cfg.task)

    # -- data (no model yet) ---------------------------------------------------------------------
    # the texts' templates are part of the recipe: recorded with the adapter, reused by ``reproduce``
    templates = mgr.data.templates()
    rows = mgr.data.training_rows(train_ids, templates=templates)
    rows = subsample_rows(rows, cfg.max_train_rows, cfg.seed)
    if not rows:
        raise InvalidInput(f"training batches {train_ids} hold no rows")
    if eval_ids:
        eval_rows = mgr.data.training_rows(eval_ids, templates=templates)
        first_eval = min(planner._batch(b)["ts_min"] for b in eval_ids)
        history = [b["id"] for b in planner.batches if b["seq"] < min(planner.seq[e] for e in eval_ids)]
    else:  # no later batch: hold out the newest tail of the training rows
        cut = max(1, int(len(rows) * HOLDOUT_FRACTION))
        if len(rows) - cut < 1:
            raise InvalidInput("too few rows to hold out an evaluation tail; pass eval batches")
        rows, eval_rows = rows[:-cut], rows[-cut:]
        first_eval = eval_rows[0]["ts"]
        history = [b["id"] for b in planner.batches if b["seq"] < min(planner.seq[t] for t in train_ids)]
    eval_rows = subsample_rows(eval_rows, cfg.max_eval_rows, cfg.seed + 1)
    train_rows, replay_ids = _replay_rows(mgr, planner, train_ids, rows, cfg, templates)
    if cfg.task == "ranker" and len({r["label"] for r in eval_rows}) < 2:
        raise InvalidInput("evaluation rows hold a single label class; AUC is undefined (choose other eval batches)")
    if eval_ids:  # everything before the eval batch counts as seen
        eval_examples = EvalData.build(mgr, cfg.task, eval_rows, history, first_eval - timedelta(microseconds=1),
                                       templates=templates)
    else:  # held-out tail: earlier batches plus the training part of this one
        eval_examples = EvalData.build(mgr, cfg.task, eval_rows, history, first_eval, extra_seen=rows,
                                       templates=templates)

    # -- parents on disk ---------------------------------------------------------------------------
    members: list[tuple[Adapter, float]] = []
    mode = cfg.mode
    if parent_node is not None:
        members, parent_mode = node_members(mgr, parent_node)
        if cfg.policy == "stack" and parent_mode != "weights":
            raise InvalidInput(f"cannot stack on {parent!r}: it combines in {parent_mode} mode, stack needs weights")
    folders = [(mgr.adapter_folder(m.id), w) for m, w in members]
    settings = None
    if cfg.policy != "warm_start":
        settings = LoraSettings(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                                target_modules=tuple(cfg.target_modules))
    if dry_run:
        return UpdateResult(0, 0, {}, None, None, False, train_ids, eval_ids, time.perf_counter() - started,
                            extra={"train_rows": len(train_rows), "eval_rows": len(eval_rows)})

    # -- train ------------------------------------------------------------------------------------
    head = HeadSpec("seq_cls", 2) if cfg.task == "ranker" else HeadSpec("encoder")
    base_model = mgr.base_model(base_id, head)
    tokenizer = mgr.tokenizer(base_id)
    result = train_adapter(
        base_model, tokenizer, task, train_rows, settings=settings, epochs=cfg.epochs, lr=cfg.lr,
        warmup_ratio=cfg.warmup_ratio, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed,
        policy=cfg.policy,
        parents=[(str(f), w) for f, w in folders], new_weight=cfg.new_weight, mode=mode,
        eval_examples=eval_examples, progress=progress,
    )
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch / torchrun: one process registers
        result.release()
        return UpdateResult(0, 0, dict(result.metrics), None, None, False, train_ids, eval_ids,
                            time.perf_counter() - started, extra={"role": "worker"})
    tmp = Path(tempfile.mkdtemp(prefix="update-", dir=mgr.store.tmp if mgr.store.tmp.exists() else None))
    try:
        result.save(tmp / "adapter")
        metrics = {k: v for k, v in result.metrics.items()}
        node_weights = list(result.node_weights)
        node_mode = result.mode
        trained_settings = result.settings
        samples_per_s, train_wall = result.samples_per_s, result.wall_s
        hyper_train = dict(result.hyperparameters)
    finally:
        result.release()
    maybe_crash("train:trained")

    # -- the promotion gate: the alias's current target on the same eval examples -----------------
    baseline = None
    current_id = None
    target = mgr.alias_target(alias)
    if target is not None:
        current = mgr.get(target)
        if current.status == "active" and current.task == cfg.task and current.base_id == base_id:
            current_id = current.id
            cur_members, cur_mode = node_members(mgr, current)
            cur_metrics = evaluate_adapters(
                base_model, tokenizer, task, [(str(mgr.adapter_folder(m.id)), w) for m, w in cur_members],
                eval_examples, cur_mode, max_length=cfg.max_length,
            )
            baseline = {"alias": alias, "node_id": current.id, **cur_metrics}
    primary = task.primary_metric
    decision = None
    if promote == "always":
        decision = "promote"
    elif promote == "if_better":
        if baseline is None:
            decision = "promote"
        else:
            better = metrics[primary] >= baseline[primary] - tolerance
            decision = "promote" if better else "keep"
    metrics_record = {**metrics, "primary": metrics.get(primary), "primary_metric": primary}
    if baseline is not None:
        metrics_record["baseline"] = baseline

    # -- register: adapter (+ stack node) in one transaction ----------------------------------------
    try:
        prepared = mgr._store_adapter(tmp / "adapter", base=base_id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    hyper = {
        **cfg.to_dict(),
        **{k: v for k, v in hyper_train.items() if k not in ("settings",)},
        "lora": trained_settings.to_dict() if hasattr(trained_settings, "to_dict") else str(trained_settings),
        "samples_per_s": samples_per_s,
        "train_wall_s": train_wall,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "eval": "batches" if eval_ids else "holdout_tail",
        "versions": _library_versions(),
        "policy": cfg.policy,
        "parent": parent_node.id if parent_node is not None else None,
        "templates": templates,
    }
    links = [(b, "train") for b in train_ids] + [(b, "eval") for b in eval_ids] + [(b, "replay") for b in replay_ids]
    adapter_parents: list[ParentSpec] = []
    if cfg.policy == "warm_start" and parent_node is not None:
        adapter_parents = [ParentSpec(parent_node.id, "warm_start", 1.0)]
    elif cfg.policy == "stack" and parent_node is not None:
        adapter_parents = [ParentSpec(parent_node.id, "stacked_on", None, {"trained_on_top": True})]
    is_stack = cfg.policy in ("stack", "long_short")
    adapter_metrics = metrics_record if not is_stack else {"node_metrics": metrics_record}
    with mgr.catalog.transaction() as con:
        adapter_id = mgr._insert_node_in(
            con, name=name, kind="trained", task=cfg.task, base_id=base_id, parents=adapter_parents, links=links,
            columns={**prepared.columns, "hyperparams": to_json(hyper), "metrics": to_json(adapter_metrics)},
        )
        node_id = adapter_id
        if is_stack:
            member_ids = [m.id for m, _ in members] + [adapter_id]
            specs = [ParentSpec(mid, "stacked_on", float(w)) for mid, w in zip(member_ids, node_weights, strict=True)]
            trainable = sum(m.trainable_params or 0 for m, _ in members) + int(prepared.columns["trainable_params"])
            node_id = mgr._insert_node_in(
                con, name=f"{name}-{cfg.policy.replace('_', '-')}", kind="stack", task=cfg.task, base_id=base_id,
                parents=specs, links=links, stack_mode=node_mode,
                columns=stack_columns(trainable, node_weights, node_mode, metrics=metrics_record,
                                      hyperparams={"policy": cfg.policy, "trained_adapter": adapter_id}),
            )
        log_event(con, "train", {"batches": train_ids, "policy": cfg.policy, "parent": parent, "task": cfg.task},
                  detail={"node_id": node_id, "adapter_id": adapter_id, "metrics": metrics})
        maybe_crash("train:in_txn")

    # -- promotion ---------------------------------------------------------------------------------
    promoted = False
    if decision is not None:
        gate = {"new": node_id, "new_metric": metrics.get(primary), "current": current_id,
                "current_metric": baseline.get(primary) if baseline else None, "metric": primary,
                "tolerance": tolerance, "decision": decision, "mode": promote}
        if decision == "promote":
            mgr.promote(node_id, alias, reason=f"{promote}: {primary} {metrics.get(primary):.4f}"
                        + (f" vs {baseline[primary]:.4f}" if baseline else ""))
            promoted = True
        with mgr.catalog.transaction() as con:
            log_event(con, "promotion_gate", gate, detail=gate)
    return UpdateResult(
        node_id=node_id, adapter_id=adapter_id, metrics=metrics_record, baseline=baseline, decision=decision,
        promoted=promoted, train_batches=train_ids, eval_batches=eval_ids, wall_s=time.perf_counter() - started,
        extra={"replay_batches": replay_ids, "train_rows": len(train_rows), "samples_per_s": samples_per_s},
    )


def reproduce(mgr: AdapterManager, ref: Any, *, progress: bool = False) -> dict[str, Any]:
    """Re-run the training recorded for a trained adapter on its recorded batches; compare the bytes."""
    from adapters_mgr.lora import LoraSettings, get_task, train_adapter
    from adapters_mgr.store import WEIGHTS_FILE, sha256_file

    node = mgr.get(ref)
    if node.kind != "trained":
        raise InvalidInput(f"adapter {node.id} is {node.kind}; only trained adapters can be reproduced")
    hp = dict(node.hyperparams or {})
    fields = {f for f in UpdateConfig.__dataclass_fields__}
    cfg = UpdateConfig(**{k: (tuple(v) if k == "target_modules" else v) for k, v in hp.items() if k in fields})
    lin = mgr.lineage(node.id, depth=1)
    links = lin.batches.get(node.id, [])
    train_ids = [b["batch_id"] for b in links if b["role"] == "train"]
    replay_ids = [b["batch_id"] for b in links if b["role"] == "replay"]
    planner = UpdatePlanner(mgr, cfg)
    # adapters registered before templates were recorded: the catalog's current templates
    templates = hp.get("templates") or mgr.data.templates()
    rows = subsample_rows(mgr.data.training_rows(train_ids, templates=templates), cfg.max_train_rows, cfg.seed)
    if hp.get("eval") == "holdout_tail":
        rows = rows[: -max(1, int(len(rows) * HOLDOUT_FRACTION))]
    train_rows, _ = (_replay_rows(mgr, planner, train_ids, rows, cfg, templates) if replay_ids or cfg.replay_ratio
                     else (rows, []))
    parent_edges = lin.parents_of(node.id)
    folders: list[tuple[str, float]] = []
    if parent_edges:
        pnode = lin.nodes[parent_edges[0].parent_id]
        members, _ = node_members(mgr, pnode)
        folders = [(str(mgr.adapter_folder(m.id)), w) for m, w in members]
    if cfg.policy == "long_short":
        stack_edges = [e for e in lin.children_of(node.id) if e.relation == "stacked_on"]
        if stack_edges:
            snode_lin = mgr.lineage(stack_edges[0].child_id, depth=1)
            others = [e for e in snode_lin.parents_of(stack_edges[0].child_id) if e.parent_id != node.id]
            folders = [(str(mgr.adapter_folder(e.parent_id)), e.weight or 1.0) for e in others]
    settings = None if cfg.policy == "warm_start" else LoraSettings(
        r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=tuple(cfg.target_modules))
    head = HeadSpec("seq_cls", 2) if cfg.task == "ranker" else HeadSpec("encoder")
    base_model = mgr.base_model(node.base_id, head)
    result = train_adapter(base_model, mgr.tokenizer(node.base_id), get_task(cfg.task), train_rows, settings=settings,
                           epochs=cfg.epochs, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio,
                           batch_size=cfg.batch_size, max_length=cfg.max_length,
                           seed=cfg.seed, policy=cfg.policy, parents=folders, new_weight=cfg.new_weight,
                           mode=cfg.mode, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result.save(Path(tmp) / "a")
        finally:
            result.release()
        sha = sha256_file(Path(tmp) / "a" / WEIGHTS_FILE)
    return {"adapter_id": node.id, "recorded_sha256": node.weights_sha256, "reproduced_sha256": sha,
            "identical": sha == node.weights_sha256}


__all__ = ["UpdateConfig", "UpdateResult", "node_members", "reproduce", "run_update"]
