"""AdapterManager: the façade users meet in Python. Thin on purpose: each method checks its
arguments' shape, delegates to one workflow (:mod:`adapters_mgr.workflows`) on the manager's
:class:`~adapters_mgr.workflows.workspace.Workspace`, and records a failure in the event log.

>>> mgr = AdapterManager("/tmp/demo-root")                        # doctest: +SKIP
>>> base_id = mgr.register_base()                                 # the embedded MiniLM BERT
>>> aid = mgr.register(my_peft_model, name="ranker")              # any PeftModel or PEFT folder
>>> mgr.promote(aid, "production"); mgr.rollback("production")    # moving pointers, nothing deleted

Why some workflows are imported inside methods: training, merging and serving pull in torch,
transformers and peft (seconds to import); catalog-only commands (``ls``, ``lineage``, ``rollback``)
must not pay for that. The import-rules test checks these lazy imports make no cycle.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from adapters_mgr.catalog import aliases as alias_ops
from adapters_mgr.catalog import nodes
from adapters_mgr.catalog.bases import list_bases
from adapters_mgr.catalog.lineage import Lineage
from adapters_mgr.catalog.records import Adapter, Ref, check_alias, resolve
from adapters_mgr.catalog.sql import log_event
from adapters_mgr.errors import AdaptersMgrError, InvalidInput, Locked
from adapters_mgr.lora.base_model import HeadSpec
from adapters_mgr.lora.merge_methods import check_method
from adapters_mgr.store import GC_GRACE_SECONDS
from adapters_mgr.workflows import aliases as alias_flows
from adapters_mgr.workflows import bases as base_flows
from adapters_mgr.workflows import integrity, register
from adapters_mgr.workflows.config import UpdateConfig
from adapters_mgr.workflows.workspace import Workspace, default_root

if TYPE_CHECKING:
    from torch import nn

    from adapters_mgr.data.api import DataAPI
    from adapters_mgr.serving.scorer import Scorer
    from adapters_mgr.workflows.update import UpdateResult

F = TypeVar("F", bound=Callable[..., Any])

#: keyword arguments of :meth:`AdapterManager.train` that are not :class:`UpdateConfig` knobs
TRAIN_OPTIONS = ("parent", "base", "name", "eval_batches", "promote", "alias", "tolerance", "dry_run")

__all__ = ["AdapterManager", "default_root"]


def _logs_failures(operation: str) -> Callable[[F], F]:
    """Record a failed mutating operation in the event log (its success is logged in-transaction)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: AdapterManager, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except AdaptersMgrError as exc:
                if not isinstance(exc, Locked):
                    self._log_failure(operation, args, kwargs, exc)
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


class AdapterManager:
    """Registry of LoRA adapters over shared frozen BERT bases, rooted in one folder.

    ``root`` holds ``catalog.duckdb`` (the single source of truth), ``store/`` (immutable PEFT
    folders) and ``bases/`` (copies of in-memory bases that had no folder of their own).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, lock_timeout: float | None = None):
        self.workspace = Workspace(root, lock_timeout=lock_timeout)
        self.root = self.workspace.root
        self.catalog = self.workspace.catalog
        self.store = self.workspace.store

    def __repr__(self) -> str:
        return f"AdapterManager({str(self.root)!r})"

    # ------------------------------------------------------------------ set-up
    def init(self) -> dict[str, Any]:
        """Create the root, the catalog (all migrations) and the store; safe to call again."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.store.ensure()
        with self.catalog.connect() as con:
            migrations = [r[0] for r in con.execute("SELECT name FROM _migrations ORDER BY applied_at").fetchall()]
        return {"root": str(self.root), "catalog": str(self.catalog.path), "migrations": migrations}

    @property
    def data(self) -> DataAPI:
        """The data side: sources, sync, batches, quarantine (see :mod:`adapters_mgr.data`)."""
        return self.workspace.data

    # ------------------------------------------------------------------ data, on the manager
    # The data side lives in DataAPI (``mgr.data``, with everything else it offers: interactions,
    # training rows, texts, templates ...). These are its everyday calls, on the manager itself so
    # one object covers an update from new data to a promoted adapter.
    def add_source(self, name: str, uri: str | Path, **options: Any) -> dict[str, Any]:
        """Register a file or glob as a source of interactions, users or items (options: see
        :meth:`adapters_mgr.data.api.DataAPI.add_source`: format, mapping, ts_format, kind, ...)."""
        return self.data.add_source(name, uri, **options)

    def sync(self, *, sources: list[str] | str | None = None, window: str | None = None,
             **options: Any) -> list[str]:
        """Take in what is new since each source's watermark as immutable batches; the new batch ids
        (none when nothing is new). ``window='7d'`` cuts a historic log into weekly batches."""
        return self.data.sync(sources=sources, window=window, **options)

    def batches(self) -> list[dict[str, Any]]:
        """Every interaction batch, oldest first, with its counts per rule and per duplicate kind."""
        return self.data.batches()

    def batch(self, batch_id: str) -> dict[str, Any]:
        """One batch (NotFound for an unknown id)."""
        return self.data.batch(batch_id)

    def quarantine(self, batch: str | None = None, rule: str | None = None, **filters: Any) -> list[dict[str, Any]]:
        """Quarantined rows with their rule, detail, source, file and the source row as read."""
        return self.data.quarantine(batch, rule, **filters)

    def replay_sample(self, batch_ids_or_before: str | list[str], *, ratio: float, seed: int,
                      **options: Any) -> Any:
        """A seeded sample of earlier kept rows for replay, reproducible from (seed, batch ids)."""
        return self.data.replay_sample(batch_ids_or_before, ratio=ratio, seed=seed, **options)

    # ------------------------------------------------------------------ bases
    @_logs_failures("register_base")
    def register_base(self, source: Any = None, *, name: str | None = None) -> str:
        """Register a base model (default: the embedded MiniLM BERT) by its weight hash; returns its id.

        ``source`` may be a checkpoint folder, a hub id, ``"default"``, or an in-memory model; an
        in-memory model with no folder of its own is saved once under ``<root>/bases/``.
        """
        return base_flows.register_base(self.workspace, source, name=name)

    def bases(self) -> list[dict[str, Any]]:
        with self.catalog.connect() as con:
            return list_bases(con)

    def base(self, ref: str) -> dict[str, Any]:
        return self.workspace.base(ref)

    def default_base(self) -> str:
        """The embedded MiniLM base's id, registering it on first use (hashing it once)."""
        return base_flows.default_base(self.workspace)

    def base_model(self, base_ref: str, head: HeadSpec = HeadSpec(), *, force: bool = False) -> nn.Module:
        """The shared frozen base with the given head, loaded once per manager and hash-checked."""
        return self.workspace.base_model(base_ref, head, force=force)

    def tokenizer(self, base_ref: str) -> Any:
        """The base's tokenizer, loaded once per manager."""
        return self.workspace.tokenizer(base_ref)

    # ------------------------------------------------------------------ register
    @_logs_failures("register")
    def register(
        self,
        source: Any,
        *,
        name: str,
        base: Any = None,
        parents: Sequence[Any] = (),
        batches: Any = (),
        eval_batches: Iterable[str] = (),
        metrics: dict[str, Any] | None = None,
        task: str | None = None,
        kind: str = "trained",
        hyperparams: dict[str, Any] | None = None,
        description: str | None = None,
        adapter_name: str | None = None,
    ) -> int:
        """Store an adapter (an in-memory PeftModel or a PEFT folder) and catalog it; returns its id.

        For people who train with their own code: ``register(model, name="ranker")`` is enough.
        ``parents`` entries are refs or ``(ref, relation, weight)``; ``batches`` are data batch ids
        (role ``train``) or ``(id, role)`` pairs. Same name + same bytes + same base + same parents
        returns the existing id instead of a new version, so retries are safe; the same bytes on another
        base are another node. An adapter whose tensor shapes do not fit the base is refused
        (``InvalidInput``) before anything is written.
        """
        return register.register(self.workspace, source, name=name, base=base, parents=parents, batches=batches,
                                 eval_batches=eval_batches, metrics=metrics, task=task, kind=kind,
                                 hyperparams=hyperparams, description=description, adapter_name=adapter_name)

    @_logs_failures("stack")
    def stack(
        self,
        refs: Sequence[Ref],
        weights: Sequence[float] | None = None,
        mode: str = "weights",
        *,
        name: str | None = None,
        description: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> int:
        """Register a stack node: several adapters active at once, combined by ``mode``.

        ``weights`` mode sums the LoRA deltas (one forward pass); ``ensemble`` averages each
        adapter's outputs. No weights are written: the node is its ``stacked_on`` edges.
        """
        return register.stack(self.workspace, refs, weights, mode, name=name, description=description,
                              metrics=metrics)

    # ------------------------------------------------------------------ training
    @_logs_failures("train")
    def train(
        self,
        batches: Any = "latest",
        *,
        task: str = "ranker",
        policy: str = "fresh",
        parent: Ref | None = None,
        base: str | None = None,
        name: str | None = None,
        eval_batches: Any = None,
        promote: str | None = None,
        alias: str = "production",
        tolerance: float = 0.0,
        progress: bool = True,
        **knobs: Any,
    ) -> int:
        """Train an incremental LoRA update on data batches and register it with full lineage.

        Returns the new node's id (for ``stack``/``long_short`` the stack node; the trained adapter is
        its newest parent). ``policy``: fresh | warm_start | stack | long_short. ``eval_batches``:
        default the next batch in time (prequential), else a held-out tail of the training rows.
        ``promote``: None | 'always' | 'if_better' (not worse than the alias's current target by
        more than ``tolerance`` on the task's primary metric). ``knobs``: the fields of
        :class:`~adapters_mgr.workflows.config.UpdateConfig` (rank, alpha, dropout, target_modules,
        epochs, lr, warmup_ratio, batch_size, max_length, seed, replay_ratio, replay_recency,
        replay_half_life, replay_relevance, mode, new_weight, prior, prior_shrinkage, max_train_rows,
        max_eval_rows).
        """
        return self.train_update(batches, task=task, policy=policy, parent=parent, base=base, name=name,
                                 eval_batches=eval_batches, promote=promote, alias=alias, tolerance=tolerance,
                                 progress=progress, **knobs).node_id

    def train_update(self, batches: Any = "latest", *, task: str = "ranker", policy: str = "fresh",
                     progress: bool = True, **kwargs: Any) -> UpdateResult:
        """Like :meth:`train`, returning the whole :class:`~adapters_mgr.workflows.update.UpdateResult`."""
        from adapters_mgr.workflows.update import run_update  # heavy: torch

        known = set(UpdateConfig.__dataclass_fields__)
        knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in known}
        unknown = set(kwargs) - set(TRAIN_OPTIONS)
        if unknown:
            raise InvalidInput(f"unknown training option(s) {sorted(unknown)}; see help(AdapterManager.train)")
        if "target_modules" in knobs:
            knobs["target_modules"] = tuple(knobs["target_modules"])
        cfg = UpdateConfig(task=task, policy=policy, **knobs)
        return run_update(self.workspace, batches, cfg, progress=progress, **kwargs)

    def reproduce(self, ref: Ref) -> dict[str, Any]:
        """Re-train a recorded adapter from its recorded config and batches; report whether the bytes match."""
        from adapters_mgr.workflows.update import reproduce  # heavy: torch

        return reproduce(self.workspace, ref)

    # ------------------------------------------------------------------ merge / compact / serve
    @_logs_failures("merge")
    def merge(
        self,
        refs: Sequence[Ref],
        method: str = "cat",
        weights: Sequence[float] | None = None,
        *,
        target_rank: int | None = None,
        density: float | None = None,
        name: str | None = None,
        seed: int = 0,
    ) -> int:
        """Merge adapters (or a stack node's members) into one new adapter with ``merged_from`` edges.

        Methods: cat (exact), svd (to ``target_rank``), linear, ties, dare_linear, dare_ties. The
        recipe (sources, weights, method, density, rank) and the reconstruction error are stored.
        One plain adapter is refused for cat and linear (the result would be a copy of it); svd,
        ties and dare change even one adapter (rank, pruning), so they take it.
        """
        check_method(method, target_rank, density)  # before the heavy import: a bad method fails in milliseconds
        from adapters_mgr.workflows.merge import merge_nodes  # heavy: torch

        return merge_nodes(self.workspace, refs, method, weights, target_rank=target_rank, density=density,
                           name=name, seed=seed)

    def fold(self, ref: Ref, folder: str | os.PathLike[str]) -> Path:
        """Export base + the node's deltas as a plain transformers checkpoint (no peft needed to load)."""
        from adapters_mgr.workflows.merge import fold_node  # heavy: torch

        return fold_node(self.workspace, ref, Path(folder))

    @_logs_failures("compact")
    def compact(self, alias: str = "production", *, max_depth: int = 4, method: str = "cat",
                target_rank: int | None = None, tolerance: float = 0.005, eval_batches: Any = None,
                max_eval_rows: int | None = None, seed: int = 0, max_length: int = 64) -> dict[str, Any]:
        """Turn a stack deeper than ``max_depth`` into one merged adapter; move the alias to it only if
        its evaluation is within ``tolerance`` of the stack's. ``max_eval_rows`` / ``seed`` /
        ``max_length`` as the updates used them give the gate's rows, and reuse its figure."""
        check_method(method, target_rank)  # before the heavy import
        from adapters_mgr.workflows.compact import compact_alias  # heavy: torch

        return compact_alias(self.workspace, alias, max_depth=max_depth, method=method, target_rank=target_rank,
                             tolerance=tolerance, eval_batches=eval_batches, max_eval_rows=max_eval_rows,
                             seed=seed, max_length=max_length)

    def scorer(self, node_or_alias: Any = None, *, ranker: Any = None, max_length: int = 64) -> Scorer:
        """A :class:`~adapters_mgr.serving.scorer.Scorer` serving this node (following it if it is an alias)."""
        from adapters_mgr.serving.scorer import Scorer  # heavy: torch

        return Scorer(self.workspace, node_or_alias, ranker=ranker, max_length=max_length)

    @_logs_failures("recompute")
    def recompute(self, alias: str = "production", *, users: Any = "changed", k: int = 10, ranker: Any = None,
                  top_m: int = 50, progress: bool = True) -> dict[str, Any]:
        """Recompute top-``k`` recommendations (all or changed users) into the ``recommendations`` table."""
        from adapters_mgr.serving.recommend import recompute  # heavy: torch

        return recompute(self.workspace, alias, users=users, k=k, ranker=ranker, top_m=top_m, progress=progress)

    def recommendations(self, user: Any = None, *, alias: str | None = "production") -> list[dict[str, Any]]:
        """The current top-K lists (newest complete run per user) with the node that produced each."""
        from adapters_mgr.serving.recommend import current  # heavy: torch

        return current(self.workspace, user, alias)

    # ------------------------------------------------------------------ reading
    def get(self, ref: Ref) -> Adapter:
        """One node by id, ``name@version``, alias or name (latest active version)."""
        return self.workspace.get(ref)

    def resolve(self, ref: Ref) -> int:
        with self.catalog.connect() as con:
            return resolve(con, ref)

    def list(
        self,
        *,
        name: str | None = None,
        kind: str | None = None,
        alias: str | None = None,
        status: str | None = "active",
        base: str | None = None,
        task: str | None = None,
        limit: int | None = None,
    ) -> list[Adapter]:
        """Catalog nodes, newest first. ``status=None`` (or 'all') includes deleted ones."""
        with self.catalog.connect() as con:
            return nodes.list_nodes(con, name=name, kind=kind, alias=alias, status=status, base=base, task=task,
                                    limit=limit)

    def list_json(self, **filters: Any) -> str:
        """The same rows as :meth:`list`, as a JSON array rendered by DuckDB (fast for scripts)."""
        with self.catalog.connect() as con:
            return nodes.list_nodes_json(con, **filters)

    def lineage(self, ref: Ref, *, depth: int | None = None) -> Lineage:
        """Ancestors and descendants of a node to any depth (recursive SQL), with their data batches."""
        return self.workspace.lineage(ref, depth=depth)

    def events(self, *, limit: int = 50, operation: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events"
        params: list[Any] = []
        if operation:
            sql += " WHERE operation = ?"
            params.append(operation)
        return self.catalog.query(sql + f" ORDER BY id DESC LIMIT {int(limit)}", params)

    # ------------------------------------------------------------------ aliases
    @_logs_failures("set_alias")
    def set_alias(self, alias: str, ref: Ref, *, reason: str | None = None, action: str = "set") -> int:
        """Point ``alias`` at a node; returns the node id. Every move is kept in ``alias_history``.

        Refused (``IntegrityError``, alias unchanged) when the node's files, or a stack member's, are
        missing or differ from their checksums: an alias must never point at weights that cannot load.
        """
        return alias_flows.set_alias(self.workspace, alias, ref, action=action, reason=reason)

    def promote(self, ref: Ref, alias: str = "production", *, reason: str | None = None) -> int:
        """Point ``alias`` (default ``production``) at a node."""
        return self.set_alias(alias, ref, reason=reason, action="promote")

    @_logs_failures("rollback")
    def rollback(self, alias: str = "production", to: Ref | None = None, *, reason: str | None = None) -> int:
        """Move ``alias`` back: to its previous target by default, or to ``to``. Returns the new target.

        Nothing is deleted or unmerged; repeated rollbacks keep walking back through the history. The
        target's files are checked first, as for :meth:`set_alias`.
        """
        return alias_flows.rollback(self.workspace, alias, to, reason=reason)

    def alias_target(self, alias: str) -> int | None:
        """The node an alias points at now, or None when the alias does not exist."""
        return self.workspace.alias_target(alias)

    def alias_history(self, alias: str | None = None) -> list[dict[str, Any]]:
        if alias is not None:
            check_alias(alias)
        with self.catalog.connect() as con:
            return alias_ops.history(con, alias)

    def aliases(self) -> list[dict[str, Any]]:
        with self.catalog.connect() as con:
            return alias_ops.list_aliases(con)

    @_logs_failures("remove_alias")
    def remove_alias(self, alias: str, *, reason: str | None = None) -> int:
        with self.catalog.transaction() as con:
            return alias_ops.remove_logged(con, alias, reason)

    # ------------------------------------------------------------------ delete / restore
    @_logs_failures("delete")
    def delete(self, ref: Ref, *, force: bool = False, reason: str | None = None) -> int:
        """Soft-delete a node (its row and files stay). Refused while an alias points at it or an
        active descendant needs it, unless ``force``."""
        with self.catalog.transaction() as con:
            return nodes.soft_delete(con, ref, force=force, reason=reason)

    @_logs_failures("restore")
    def restore(self, ref: Ref) -> int:
        """Undo a soft delete."""
        with self.catalog.transaction() as con:
            return nodes.restore(con, ref)

    # ------------------------------------------------------------------ files
    def adapter_folder(self, ref: Ref) -> Path:
        """The verified PEFT folder of an adapter (checksums checked now)."""
        return self.workspace.adapter_folder(ref)

    @_logs_failures("export")
    def export(self, ref: Ref, folder: str | os.PathLike[str]) -> Path:
        """Copy a node's PEFT folder out, with an ``adapters_mgr.json`` provenance file beside it."""
        return register.export(self.workspace, ref, Path(folder))

    @_logs_failures("import")
    def import_peft(
        self, folder: str | os.PathLike[str], *, name: str | None = None, base: str | None = None,
        task: str | None = None, metrics: dict[str, Any] | None = None,
    ) -> int:
        """Register an outside PEFT folder as an ``imported`` node. If it was exported from a catalog
        (``adapters_mgr.json``) and those bytes are known here, an ``imported`` edge links the two."""
        return register.import_peft(self.workspace, Path(folder), name=name, base=base, task=task, metrics=metrics)

    @_logs_failures("load")
    def load(self, ref: Ref, *, base_model: nn.Module | None = None, force: bool = False) -> Any:
        """A PeftModel with this adapter active, on the shared base (loaded once per manager).

        Adapters of one base share one PeftModel: loading another adapter adds it by name and makes
        it active (``peft`` ``load_adapter`` + ``set_adapter``), so the base is never copied. Pass
        ``base_model`` to attach to a model of your own instead (its weight hash is checked).
        """
        from adapters_mgr.workflows.loading import load  # heavy: peft

        return load(self.workspace, ref, base_model=base_model, force=force)

    # ------------------------------------------------------------------ integrity
    def verify(self) -> dict[str, Any]:
        """Check every stored file against the catalog; report orphans both ways. Changes nothing."""
        return integrity.verify(self.workspace)

    @_logs_failures("gc")
    def gc(self, *, dry_run: bool = False, grace: float = GC_GRACE_SECONDS) -> dict[str, Any]:
        """Remove orphan folders and staging leftovers; mark rows whose files are gone ``missing`` and
        rows whose bytes changed ``corrupt`` (their folder moves to ``store/quarantine``). Rows are
        never deleted: lineage must keep its nodes.

        ``grace`` (seconds, like git prune's expiry): an orphan or staging folder that changed less than
        ``grace`` ago may belong to a register still in flight (renamed into the store, not yet in the
        catalog), so it is kept and reported as an action ``skip`` ("skipped (younger than grace)")
        and in ``skipped``. The default (:data:`~adapters_mgr.store.GC_GRACE_SECONDS`, an hour) is safe
        while other processes write; ``grace=0`` removes every orphan at once, e.g. right after a
        crash, when nothing else is writing.
        """
        return integrity.gc(self.workspace, dry_run=dry_run, grace=grace)

    # ------------------------------------------------------------------ internals
    def _log_failure(self, operation: str, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception) -> None:
        try:
            with self.catalog.transaction() as con:
                log_event(con, operation, {"args": [repr(a)[:200] for a in args],
                                           "kwargs": {k: repr(v)[:200] for k, v in kwargs.items()}},
                          outcome="error", detail={"error": type(exc).__name__, "message": str(exc)})
        except Exception:  # noqa: BLE001 - logging a failure must never mask the failure itself
            pass
