"""AdapterManager: the façade users meet in Python. Thin on purpose: it validates, then delegates
to the catalog (state), the store (bytes) and the base loader (shared frozen model).

>>> mgr = AdapterManager("/tmp/demo-root")                        # doctest: +SKIP
>>> base_id = mgr.register_base()                                 # the embedded MiniLM BERT
>>> aid = mgr.register(my_peft_model, name="ranker")              # any PeftModel or PEFT folder
>>> mgr.promote(aid, "production"); mgr.rollback("production")    # moving pointers, nothing deleted
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from adapters_mgr.catalog import aliases as alias_ops
from adapters_mgr.catalog import lineage_index
from adapters_mgr.catalog.db import Catalog
from adapters_mgr.catalog.lineage import Lineage, load_lineage
from adapters_mgr.catalog.records import (
    ADAPTER_JSON_ROW,
    ADAPTER_SELECT,
    KINDS,
    RELATIONS,
    STATUSES,
    Adapter,
    Ref,
    adapter_status,
    check_alias,
    check_name,
    fetch_adapter,
    fetch_ref,
    ref_id,
    resolve,
)
from adapters_mgr.catalog.sql import fetch_dicts, log_event, to_json, utcnow
from adapters_mgr.errors import AdaptersMgrError, Conflict, IntegrityError, InvalidInput, Locked, NotFound
from adapters_mgr.faults import maybe_crash
from adapters_mgr.lora import base_model as base_mod
from adapters_mgr.store import (
    CONFIG_FILE,
    GC_GRACE_SECONDS,
    WEIGHTS_FILE,
    AdapterStore,
    StagedAdapter,
    age_seconds,
    check_peft_folder,
    export_folder,
    read_safetensors_header,
)

if TYPE_CHECKING:
    from torch import nn

    from adapters_mgr.data.api import DataAPI
    from adapters_mgr.workflows.update import UpdateResult

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_RELATION = {"trained": "warm_start", "merged": "merged_from", "stack": "stacked_on", "imported": "imported"}
BATCH_ROLES = ("train", "eval", "replay")
TASK_BY_PEFT_TYPE = {"SEQ_CLS": "ranker", "FEATURE_EXTRACTION": "retriever"}


def default_root() -> Path:
    return Path(os.environ.get("ADAPTERS_MGR_ROOT") or ".adapters")


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


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter whose bytes are in the store, with the catalog columns that describe them."""

    base_id: str
    task: str | None
    columns: dict[str, Any]


@dataclass(frozen=True)
class ParentSpec:
    """A lineage edge to create: which parent, how related, with what weight and parameters."""

    ref: Ref
    relation: str | None = None
    weight: float | None = None
    params: dict[str, Any] | None = None

    @classmethod
    def coerce(cls, value: Any) -> ParentSpec:
        if isinstance(value, ParentSpec):
            return value
        if isinstance(value, dict):
            ref = value.get("ref", value.get("id"))
            return cls(ref, value.get("relation"), value.get("weight"), value.get("params"))
        if isinstance(value, tuple | list):
            return cls(*value)
        return cls(value)


def _batch_links(batches: Any, eval_batches: Iterable[str]) -> list[tuple[str, str]]:
    links: list[tuple[str, str]] = []
    if isinstance(batches, dict):
        for role, ids in batches.items():
            links += [(str(b), role) for b in ids]
    else:
        for item in batches or ():
            links.append((str(item[0]), str(item[1])) if isinstance(item, tuple | list) else (str(item), "train"))
    links += [(str(b), "eval") for b in eval_batches]
    for _, role in links:
        if role not in BATCH_ROLES:
            raise InvalidInput(f"invalid batch role {role!r}: use one of {', '.join(BATCH_ROLES)}")
    return list(dict.fromkeys(links))


def _param_count(shapes: dict[str, list[int]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def stack_columns(
    trainable: int, weights: Sequence[float], mode: str, *, metrics: dict[str, Any] | None = None,
    hyperparams: dict[str, Any] | None = None, description: str | None = None,
) -> dict[str, Any]:
    """Catalog columns of a stack node: it has no weights file, only its members and how they combine."""
    return {
        "trainable_params": trainable,
        "hyperparams": to_json({"mode": mode, "weights": list(weights), **(hyperparams or {})}),
        "metrics": to_json(metrics or {}),
        "description": description,
    }


def _provenance(folder: Path) -> dict[str, Any]:
    """The ``adapters_mgr.json`` an export writes beside the PEFT files, if any."""
    prov_file = folder / "adapters_mgr.json"
    if not prov_file.is_file():
        return {}
    try:
        provenance = json.loads(prov_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{prov_file} is not valid JSON: {exc}; fix or remove it") from exc
    bad = not isinstance(provenance, dict) or any(
        not isinstance(provenance.get(k, {}), dict) for k in ("adapter", "base")
    )
    if bad:
        raise InvalidInput(
            f"{prov_file} is not an adapters_mgr provenance file (expected a JSON object with 'adapter' and "
            "'base' objects); fix or remove it"
        )
    return provenance


def head_for(peft_config: dict[str, Any], shapes: dict[str, list[int]]) -> base_mod.HeadSpec:
    """The task head the base needs for this adapter (a sequence classifier keeps its head in the file)."""
    if peft_config.get("task_type") == "SEQ_CLS":
        for key, shape in shapes.items():
            if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return base_mod.HeadSpec("seq_cls", int(shape[0]))
        return base_mod.HeadSpec("seq_cls", 2)
    return base_mod.HeadSpec("encoder")


class AdapterManager:
    """Registry of LoRA adapters over shared frozen BERT bases, rooted in one folder.

    ``root`` holds ``catalog.duckdb`` (the single source of truth), ``store/`` (immutable PEFT
    folders) and ``bases/`` (copies of in-memory bases that had no folder of their own).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, lock_timeout: float | None = None):
        self.root = Path(root if root is not None else default_root()).expanduser().resolve()
        self.catalog = Catalog(self.root / "catalog.duckdb", lock_timeout=lock_timeout)
        self.store = AdapterStore(self.root / "store")
        self._base_models: dict[tuple[str, str], nn.Module] = {}
        self._peft_models: dict[tuple[str, str], Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._data: DataAPI | None = None

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
        if self._data is None:
            from adapters_mgr.data.api import DataAPI

            self._data = DataAPI(self.catalog, self.root)
        return self._data

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
        if source is not None and not isinstance(source, str | os.PathLike):
            return self._register_base_model(source, name=name)
        resolved = base_mod.resolve_source(source)
        model = base_mod.load_base_model(resolved)
        sha = base_mod.weights_sha256(model)
        if name is None:
            embedded = str(base_mod.embedded_model_path())
            name = base_mod.DEFAULT_BASE_NAME if resolved == embedded else Path(resolved).name
        base_id = self._insert_base(model, sha, name=name, source=resolved)
        self._base_models[(base_id, base_mod.HeadSpec().key)] = model
        return base_id

    def _register_base_model(self, model: nn.Module, *, name: str | None) -> str:
        sha = base_mod.weights_sha256(model)
        existing = self._find_base(sha=sha)
        if existing is not None:
            return existing["id"]
        base_id = f"base-{sha[:12]}"
        folder = self.root / "bases" / base_id
        if not folder.exists():
            tmp = self.root / "bases" / f".{base_id}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            base_mod.quiet_transformers()
            base_mod.backbone(model).save_pretrained(str(tmp), safe_serialization=True)
            os.rename(tmp, folder)
        name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or base_id
        return self._insert_base(model, sha, name=str(name) or base_id, source=str(folder))

    def _insert_base(self, model: nn.Module, sha: str, *, name: str, source: str) -> str:
        base_id = f"base-{sha[:12]}"
        with self.catalog.transaction() as con:
            row = con.execute("SELECT id FROM base_models WHERE weights_sha256 = ?", [sha]).fetchone()
            if row is not None:
                return str(row[0])
            con.execute(
                "INSERT INTO base_models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    base_id,
                    name,
                    source,
                    sha,
                    base_mod.architecture(model),
                    to_json(base_mod.config_dict(model)),
                    base_mod.num_parameters(model),
                    utcnow(),
                ],
            )
            log_event(con, "register_base", {"name": name, "source": source}, detail={"id": base_id, "sha256": sha})
        return base_id

    def bases(self) -> list[dict[str, Any]]:
        return self.catalog.query("SELECT * EXCLUDE (config) FROM base_models ORDER BY created_at")

    def _find_base(self, *, sha: str | None = None, ref: str | None = None) -> dict[str, Any] | None:
        if sha is not None:
            rows = self.catalog.query("SELECT * FROM base_models WHERE weights_sha256 = ?", [sha])
        else:
            rows = self.catalog.query(
                "SELECT * FROM base_models WHERE id = ? OR name = ? OR source = ? OR weights_sha256 LIKE ? "
                "ORDER BY created_at",
                [ref, ref, ref, f"{ref}%"],
            )
        if len(rows) > 1 and sha is None:
            raise InvalidInput(f"base reference {ref!r} is ambiguous: {[r['id'] for r in rows]}; use a base id")
        return rows[0] if rows else None

    def base(self, ref: str) -> dict[str, Any]:
        row = self._find_base(ref=ref)
        if row is None:
            raise NotFound(f"no base model {ref!r}; list them with `adapters-mgr bases`")
        return row

    def _base_for_source(self, source: Any, staged: StagedAdapter, base: Any) -> dict[str, Any]:
        """Which registered base an adapter belongs to: explicit, by hash of an in-memory model, or by
        the ``base_model_name_or_path`` its PEFT config names."""
        if base is not None and not isinstance(base, str):
            return self.base(self._register_base_model(base, name=None))
        if base is not None:
            row = self.base(base)
            if hasattr(source, "peft_config"):
                actual = base_mod.weights_sha256(source)
                if actual != row["weights_sha256"]:
                    raise IntegrityError(
                        f"the model's base weights (sha256 {actual[:12]}…) differ from base {row['id']}; "
                        "pass the base it was trained on"
                    )
            return row
        if hasattr(source, "peft_config"):
            sha = base_mod.weights_sha256(source)
            row = self._find_base(sha=sha)
            if row is None:
                raise NotFound(
                    f"the model's base (weights sha256 {sha[:12]}…) is not registered; "
                    "call register_base(...) with it first"
                )
            return row
        if isinstance(source, str | os.PathLike):
            prov_sha = _provenance(Path(source)).get("base", {}).get("weights_sha256")
            row = self._find_base(sha=prov_sha) if prov_sha else None
            if row is not None:
                return row
        named = staged.peft_config.get("base_model_name_or_path")
        if named:
            row = self._find_base(ref=str(named))
            if row is None:
                resolved = Path(str(named)).expanduser()
                if resolved.exists():
                    row = self._find_base(ref=str(resolved.resolve()))
                    if row is None:
                        row = self.base(self.register_base(str(resolved)))
            if row is not None:
                return row
        config = Path(source) / CONFIG_FILE if isinstance(source, str | os.PathLike) else CONFIG_FILE
        fix = "pass base= (CLI: --base) a registered base id or name (list them with `adapters-mgr bases`)"
        if not named:
            raise NotFound(f"cannot tell which base the adapter belongs to: {config} names no base_model_name_or_path; "
                           f"{fix}")
        raise NotFound(
            f"the adapter's base {named!r} (base_model_name_or_path in {config}) is not registered and is not a "
            f"local folder; register it first (`adapters-mgr register-base`) or {fix}"
        )

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
        (role ``train``) or ``(id, role)`` pairs. Same name + same bytes + same parents returns the
        existing id instead of a new version, so retries are safe.
        """
        check_name(name)
        if kind not in KINDS or kind == "stack":
            raise InvalidInput(f"invalid kind {kind!r} for register: use trained, merged or imported")
        parent_specs = [ParentSpec.coerce(p) for p in parents]
        links = _batch_links(batches, eval_batches)
        self._validate_refs(parent_specs, links, kind)
        prepared = self._store_adapter(source, base=base, adapter_name=adapter_name)
        return self._insert_node(
            name=name,
            kind=kind,
            task=task or prepared.task,
            base_id=prepared.base_id,
            parents=parent_specs,
            links=links,
            columns={
                **prepared.columns,
                "hyperparams": to_json(hyperparams or {}),
                "metrics": to_json(metrics or {}),
                "description": description,
            },
        )

    def _store_adapter(self, source: Any, *, base: Any = None, adapter_name: str | None = None) -> PreparedAdapter:
        """Stage, identify the base, and commit the adapter's bytes to the store (not yet cataloged).

        The source is validated (LoRA config, safetensors header) before anything is written to the
        store. A crash after the commit leaves an orphan folder that ``verify`` reports and ``gc``
        removes once it is older than gc's ``grace``.
        """
        if isinstance(source, str | os.PathLike):
            staged = self.store.stage_folder(Path(source))
        elif hasattr(source, "peft_config") and hasattr(source, "save_pretrained"):
            staged = self.store.stage_model(source, adapter_name)
        else:
            raise InvalidInput(f"cannot register {type(source).__name__}: pass a PeftModel or a PEFT folder path")
        try:
            base_row = self._base_for_source(source, staged, base)
            trainable = _param_count(staged.shapes)  # from the header validated at staging, not the stored copy
            maybe_crash("register:staged")
            key = self.store.commit(staged)
        except BaseException:
            self.store.discard(staged)
            raise
        maybe_crash("register:renamed")
        pc = staged.peft_config
        targets = pc.get("target_modules")
        task_type = pc.get("task_type")
        return PreparedAdapter(
            base_id=base_row["id"],
            task=TASK_BY_PEFT_TYPE.get(str(task_type), str(task_type).lower() if task_type else None),
            columns={
                "peft_config": to_json(pc),
                "lora_rank": pc.get("r"),
                "lora_alpha": pc.get("lora_alpha"),
                "target_modules": to_json(sorted(targets) if isinstance(targets, list) else targets),
                "store_key": key,
                "bytes": staged.bytes,
                "weights_sha256": staged.weights_sha256,
                "config_sha256": staged.config_sha256,
                "trainable_params": trainable,
            },
        )

    def _validate_refs(self, parents: list[ParentSpec], links: list[tuple[str, str]], kind: str) -> None:
        with self.catalog.connect() as con:
            for spec in parents:
                resolve(con, spec.ref)
                relation = spec.relation or DEFAULT_RELATION[kind]
                if relation not in RELATIONS:
                    raise InvalidInput(f"invalid relation {relation!r}: use one of {', '.join(RELATIONS)}")
            for batch_id, _ in links:
                if con.execute("SELECT 1 FROM batches WHERE id = ?", [batch_id]).fetchone() is None:
                    raise NotFound(f"no data batch {batch_id!r}; list them with `adapters-mgr data batches`")

    def _insert_node(self, **node: Any) -> int:
        """One transaction: the node row with the next version of its name, its edges, batch links, event.
        Takes the keyword arguments of :meth:`_insert_node_in`."""
        with self.catalog.transaction() as con:
            node_id = self._insert_node_in(con, **node)
            maybe_crash("register:in_txn")
        return node_id

    def _insert_node_in(
        self,
        con: Any,
        *,
        name: str,
        kind: str,
        task: str | None,
        base_id: str,
        parents: list[ParentSpec],
        links: list[tuple[str, str]],
        columns: dict[str, Any],
        stack_mode: str | None = None,
    ) -> int:
        """The body of :meth:`_insert_node`, for callers that put several nodes in one transaction."""
        parent_ids = [resolve(con, p.ref) for p in parents]
        existing = self._find_identical(con, name, columns.get("weights_sha256"), columns.get("config_sha256"),
                                        parent_ids, kind, stack_mode)
        if existing is not None:
            log_event(con, "register", {"name": name}, outcome="exists", detail={"id": existing})
            return existing
        for pid in parent_ids:
            parent = fetch_adapter(con, pid)
            if parent.status != "active":
                raise Conflict(f"parent adapter {pid} is {parent.status}; restore it or choose another parent")
            if parent.base_id != base_id:
                raise Conflict(
                    f"parent adapter {pid} was trained on base {parent.base_id}, not {base_id}; "
                    "lineage cannot cross bases"
                )
        version_row = con.execute(
            "SELECT coalesce(max(version), 0) + 1 FROM adapters WHERE name = ?", [name]
        ).fetchone()
        assert version_row is not None
        now = utcnow()
        cols = {
            "name": name,
            "version": int(version_row[0]),
            "kind": kind,
            "task": task,
            "base_id": base_id,
            "stack_mode": stack_mode,
            "status": "active",
            "created_at": now,
            "updated_at": now,
            **columns,
        }
        row = con.execute(
            f"INSERT INTO adapters ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) RETURNING id",
            list(cols.values()),
        ).fetchone()
        assert row is not None
        node_id = int(row[0])
        for order, (spec, pid) in enumerate(zip(parents, parent_ids, strict=True)):
            con.execute(
                "INSERT INTO lineage VALUES (?, ?, ?, ?, ?, ?)",
                [node_id, pid, spec.relation or DEFAULT_RELATION[kind], spec.weight, order, to_json(spec.params)],
            )
        lineage_index.index_node(con, node_id, parent_ids)
        for batch_id, role in links:
            con.execute("INSERT INTO adapter_batches VALUES (?, ?, ?)", [node_id, batch_id, role])
        log_event(
            con,
            "register",
            {"name": name, "kind": kind, "parents": parent_ids, "batches": links},
            detail={"id": node_id, "version": cols["version"], "weights_sha256": columns.get("weights_sha256")},
        )
        return node_id

    @staticmethod
    def _find_identical(
        con: Any, name: str, weights_sha: str | None, config_sha: str | None, parent_ids: list[int],
        kind: str, stack_mode: str | None,
    ) -> int | None:
        if weights_sha is None:
            return None
        rows = con.execute(
            "SELECT id FROM adapters WHERE name = ? AND weights_sha256 = ? AND config_sha256 = ? AND kind = ? "
            "AND status = 'active' ORDER BY id",
            [name, weights_sha, config_sha, kind],
        ).fetchall()
        for (candidate,) in rows:
            existing = [r[0] for r in con.execute(
                "SELECT parent_id FROM lineage WHERE child_id = ? ORDER BY ord", [candidate]).fetchall()]
            if existing == parent_ids:
                return int(candidate)
        return None

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
        if mode not in ("weights", "ensemble"):
            raise InvalidInput(f"invalid stack mode {mode!r}: use 'weights' or 'ensemble'")
        if len(refs) < 1:
            raise InvalidInput("a stack needs at least one adapter")
        weights = list(weights) if weights is not None else [1.0] * len(refs)
        if len(weights) != len(refs):
            raise InvalidInput(f"{len(weights)} weights given for {len(refs)} adapters; give one per adapter")
        with self.catalog.connect() as con:
            members = [fetch_ref(con, r) for r in refs]
        bases = {m.base_id for m in members}
        tasks = {m.task for m in members}
        if len(bases) > 1:
            raise Conflict(f"adapters {[m.id for m in members]} are on different bases {sorted(bases)}")
        if len(tasks) > 1:
            raise Conflict(f"adapters {[m.id for m in members]} are for different tasks {sorted(map(str, tasks))}")
        name = check_name(name or f"stack-{'-'.join(str(m.id) for m in members)}")
        specs = [ParentSpec(m.id, "stacked_on", float(w)) for m, w in zip(members, weights, strict=True)]
        return self._insert_node(
            name=name,
            kind="stack",
            task=members[0].task,
            base_id=members[0].base_id,
            parents=specs,
            links=[],
            stack_mode=mode,
            columns=stack_columns(sum(m.trainable_params or 0 for m in members), weights, mode,
                                  metrics=metrics, description=description),
        )

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
        more than ``tolerance`` on the task's primary metric). ``knobs``: rank, alpha, dropout,
        target_modules, epochs, lr, warmup_ratio, batch_size, max_length, seed, replay_ratio, replay_recency,
        replay_half_life, replay_relevance, mode, new_weight, max_train_rows, max_eval_rows.
        """
        return self.train_update(batches, task=task, policy=policy, parent=parent, base=base, name=name,
                                 eval_batches=eval_batches, promote=promote, alias=alias, tolerance=tolerance,
                                 progress=progress, **knobs).node_id

    def train_update(self, batches: Any = "latest", *, task: str = "ranker", policy: str = "fresh",
                     progress: bool = True, **kwargs: Any) -> UpdateResult:
        """Like :meth:`train`, returning the whole :class:`~adapters_mgr.workflows.update.UpdateResult`."""
        from adapters_mgr.workflows.update import UpdateConfig, run_update

        known = set(UpdateConfig.__dataclass_fields__)
        knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in known}
        unknown = set(kwargs) - {"parent", "base", "name", "eval_batches", "promote", "alias", "tolerance", "dry_run"}
        if unknown:
            raise InvalidInput(f"unknown training option(s) {sorted(unknown)}; see help(AdapterManager.train)")
        if "target_modules" in knobs:
            knobs["target_modules"] = tuple(knobs["target_modules"])
        cfg = UpdateConfig(task=task, policy=policy, **knobs)
        return run_update(self, batches, cfg, progress=progress, **kwargs)

    def reproduce(self, ref: Ref) -> dict[str, Any]:
        """Re-train a recorded adapter from its recorded config and batches; report whether the bytes match."""
        from adapters_mgr.workflows.update import reproduce

        return reproduce(self, ref)

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
        """
        from adapters_mgr.workflows.merge import merge_nodes

        return merge_nodes(self, refs, method, weights, target_rank=target_rank, density=density, name=name,
                           seed=seed)

    def fold(self, ref: Ref, folder: str | os.PathLike[str]) -> Path:
        """Export base + the node's deltas as a plain transformers checkpoint (no peft needed to load)."""
        from adapters_mgr.workflows.merge import fold_node

        return fold_node(self, ref, Path(folder))

    @_logs_failures("compact")
    def compact(self, alias: str = "production", *, max_depth: int = 4, method: str = "cat",
                target_rank: int | None = None, tolerance: float = 0.005, eval_batches: Any = None) -> dict[str, Any]:
        """Turn a stack deeper than ``max_depth`` into one merged adapter; move the alias to it only if
        its evaluation is within ``tolerance`` of the stack's."""
        from adapters_mgr.workflows.merge import compact_alias

        return compact_alias(self, alias, max_depth=max_depth, method=method, target_rank=target_rank,
                             tolerance=tolerance, eval_batches=eval_batches)

    def scorer(self, node_or_alias: Any = None, *, ranker: Any = None, max_length: int = 64) -> Any:
        """A :class:`~adapters_mgr.serving.scorer.Scorer` serving this node (following it if it is an alias)."""
        from adapters_mgr.serving.scorer import Scorer

        return Scorer(self, node_or_alias, ranker=ranker, max_length=max_length)

    @_logs_failures("recompute")
    def recompute(self, alias: str = "production", *, users: Any = "changed", k: int = 10, ranker: Any = None,
                  top_m: int = 50, progress: bool = True) -> dict[str, Any]:
        """Recompute top-``k`` recommendations (all or changed users) into the ``recommendations`` table."""
        from adapters_mgr.serving.recommend import recompute

        return recompute(self, alias, users=users, k=k, ranker=ranker, top_m=top_m, progress=progress)

    def recommendations(self, user: Any = None, *, alias: str | None = "production") -> list[dict[str, Any]]:
        """The current top-K lists (newest complete run per user) with the node that produced each."""
        from adapters_mgr.serving.recommend import current

        return current(self, user, alias)

    # ------------------------------------------------------------------ reading
    def get(self, ref: Ref) -> Adapter:
        """One node by id, ``name@version``, alias or name (latest active version)."""
        with self.catalog.connect() as con:
            return fetch_ref(con, ref)

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
        filters = dict(name=name, kind=kind, alias=alias, status=status, base=base, task=task, limit=limit)
        with self.catalog.connect() as con:
            where, params = self._list_filter(con, **filters)
            return [Adapter.from_row(r) for r in fetch_dicts(con, ADAPTER_SELECT + where, params)]

    def list_json(self, **filters: Any) -> str:
        """The same rows as :meth:`list`, as a JSON array rendered by DuckDB (fast for scripts)."""
        with self.catalog.connect() as con:
            where, params = self._list_filter(con, **filters)
            sql = (
                "SELECT coalesce(to_json(list(j ORDER BY j.id DESC)), '[]')::VARCHAR "
                f"FROM ({ADAPTER_JSON_ROW}{where}) j"
            )
            row = con.execute(sql, params).fetchone()
        assert row is not None
        return str(row[0])

    @staticmethod
    def _list_filter(
        con: Any, *, name: str | None = None, kind: str | None = None, alias: str | None = None,
        status: str | None = "active", base: str | None = None, task: str | None = None, limit: int | None = None,
    ) -> tuple[str, list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if name is not None:
            where.append("a.name = ?")
            params.append(name)
        if kind is not None:
            if kind not in KINDS:
                raise InvalidInput(f"invalid kind {kind!r}: use one of {', '.join(KINDS)}")
            where.append("a.kind = ?")
            params.append(kind)
        if status not in (None, "all"):
            if status not in STATUSES:
                raise InvalidInput(f"invalid status {status!r}: use one of {', '.join(STATUSES)} or all")
            where.append("a.status = ?")
            params.append(status)
        if task is not None:
            where.append("a.task = ?")
            params.append(task)
        if alias is not None:
            where.append("a.id IN (SELECT adapter_id FROM aliases WHERE name = ?)")
            params.append(alias)
        if base is not None:
            row = con.execute(
                "SELECT id FROM base_models WHERE id = ? OR name = ? OR weights_sha256 LIKE ?",
                [base, base, f"{base}%"],
            ).fetchone()
            if row is None:
                raise NotFound(f"no base model {base!r}; list them with `adapters-mgr bases`")
            where.append("a.base_id = ?")
            params.append(row[0])
        if limit is not None and limit < 0:
            raise InvalidInput(f"limit must be >= 0, got {limit}")
        sql = (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY a.id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql, params

    def lineage(self, ref: Ref, *, depth: int | None = None) -> Lineage:
        """Ancestors and descendants of a node to any depth (recursive SQL), with their data batches."""
        if depth is not None and depth < 0:
            raise InvalidInput(f"depth must be >= 0, got {depth}")
        with self.catalog.connect() as con:
            return load_lineage(con, ref_id(con, ref), max_depth=depth if depth is not None else 1_000_000)

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
        """Point ``alias`` at a node; returns the node id. Every move is kept in ``alias_history``."""
        check_alias(alias)
        with self.catalog.transaction() as con:
            target = fetch_ref(con, ref)
            if target.status != "active":
                raise Conflict(f"adapter {target.id} is {target.status}; an alias can only point at an active one")
            previous = alias_ops.move(con, alias, target.id, action=action, reason=reason)
            log_event(con, action, {"alias": alias, "ref": ref, "reason": reason},
                      detail={"from": previous, "to": target.id})
        return target.id

    def promote(self, ref: Ref, alias: str = "production", *, reason: str | None = None) -> int:
        """Point ``alias`` (default ``production``) at a node."""
        return self.set_alias(alias, ref, reason=reason, action="promote")

    @_logs_failures("rollback")
    def rollback(self, alias: str = "production", to: Ref | None = None, *, reason: str | None = None) -> int:
        """Move ``alias`` back: to its previous target by default, or to ``to``. Returns the new target.

        Nothing is deleted or unmerged; repeated rollbacks keep walking back through the history.
        """
        check_alias(alias)
        with self.catalog.transaction() as con:
            current, stack = alias_ops.rollback_state(con, alias)
            if current is None:
                raise NotFound(f"no alias {alias!r}; list them with `adapters-mgr alias`")
            target_id = resolve(con, to) if to is not None else alias_ops.rollback_target(alias, stack)
            status = adapter_status(con, target_id)  # not fetch_adapter: rollback is a hot path
            if status != "active":
                raise Conflict(f"cannot roll {alias!r} back to adapter {target_id}: it is {status}")
            alias_ops.move(con, alias, target_id, action="rollback", reason=reason, previous=current)
            log_event(con, "rollback", {"alias": alias, "to": to, "reason": reason},
                      detail={"from": current, "to": target_id})
        return target_id

    def alias_target(self, alias: str) -> int | None:
        """The node an alias points at now, or None when the alias does not exist."""
        with self.catalog.connect() as con:
            return alias_ops.current_target(con, alias)

    def alias_history(self, alias: str | None = None) -> list[dict[str, Any]]:
        if alias is not None:
            check_alias(alias)
        with self.catalog.connect() as con:
            return alias_ops.history(con, alias)

    def aliases(self) -> list[dict[str, Any]]:
        return self.catalog.query(
            "SELECT al.name AS alias, al.adapter_id, a.name || '@' || a.version AS ref, a.status, al.updated_at "
            "FROM aliases al JOIN adapters a ON a.id = al.adapter_id ORDER BY al.name"
        )

    @_logs_failures("remove_alias")
    def remove_alias(self, alias: str, *, reason: str | None = None) -> int:
        check_alias(alias)
        with self.catalog.transaction() as con:
            previous = alias_ops.remove(con, alias, reason)
            log_event(con, "remove_alias", {"alias": alias, "reason": reason}, detail={"from": previous})
        return previous

    # ------------------------------------------------------------------ delete / restore
    @_logs_failures("delete")
    def delete(self, ref: Ref, *, force: bool = False, reason: str | None = None) -> int:
        """Soft-delete a node (its row and files stay). Refused while an alias points at it or an
        active descendant needs it, unless ``force``."""
        with self.catalog.transaction() as con:
            node = fetch_ref(con, ref)
            if node.status == "deleted":
                raise Conflict(f"adapter {node.id} is already deleted")
            blockers = []
            if node.aliases:
                blockers.append(f"alias {', '.join(node.aliases)} points at it")
            children = [r[0] for r in con.execute(
                "SELECT DISTINCT l.child_id FROM lineage l JOIN adapters c ON c.id = l.child_id "
                "WHERE l.parent_id = ? AND c.status = 'active' ORDER BY 1", [node.id]).fetchall()]
            if children:
                blockers.append(f"active descendants {children} need it")
            if blockers and not force:
                raise Conflict(f"cannot delete adapter {node.id}: {'; '.join(blockers)} (use --force to override)")
            con.execute("UPDATE adapters SET status = 'deleted', updated_at = ? WHERE id = ?", [utcnow(), node.id])
            log_event(con, "delete", {"ref": ref, "force": force, "reason": reason},
                      outcome="forced" if blockers else "ok", detail={"id": node.id, "blockers": blockers})
        return node.id

    @_logs_failures("restore")
    def restore(self, ref: Ref) -> int:
        """Undo a soft delete."""
        with self.catalog.transaction() as con:
            node = fetch_ref(con, ref)
            if node.status != "deleted":
                raise Conflict(f"adapter {node.id} is {node.status}, not deleted")
            con.execute("UPDATE adapters SET status = 'active', updated_at = ? WHERE id = ?", [utcnow(), node.id])
            log_event(con, "restore", {"ref": ref}, detail={"id": node.id})
        return node.id

    # ------------------------------------------------------------------ files
    def adapter_folder(self, ref: Ref) -> Path:
        """The verified PEFT folder of an adapter (checksums checked now)."""
        node = self.get(ref)
        return self._verified_folder(node)

    def _verified_folder(self, node: Adapter) -> Path:
        if node.kind == "stack" or node.store_key is None:
            raise InvalidInput(f"adapter {node.id} is a {node.kind} node with no weights file of its own")
        if node.status in ("missing", "corrupt"):
            raise IntegrityError(f"adapter {node.id} is marked {node.status}; see `adapters-mgr verify`")
        assert node.weights_sha256 is not None
        return self.store.verified_path(node.store_key, node.weights_sha256, node.config_sha256,
                                        f"adapter {node.id} ({node.ref})")

    @_logs_failures("export")
    def export(self, ref: Ref, folder: str | os.PathLike[str]) -> Path:
        """Copy a node's PEFT folder out, with an ``adapters_mgr.json`` provenance file beside it."""
        lin = self.lineage(ref, depth=1)
        node = lin.root
        src = self._verified_folder(node)
        base_row = self.base(node.base_id)
        provenance = {
            "adapter": node.to_dict(),
            "base": {k: base_row[k] for k in ("id", "name", "source", "weights_sha256")},
            "parents": [e.to_dict() for e in lin.parents_of(node.id)],
            "batches": lin.batches.get(node.id, []),
            "exported_at": utcnow().isoformat(),
        }
        dest = export_folder(src, Path(folder), provenance)
        with self.catalog.transaction() as con:
            log_event(con, "export", {"ref": ref, "folder": str(dest)}, detail={"id": node.id})
        return dest

    @_logs_failures("import")
    def import_peft(
        self, folder: str | os.PathLike[str], *, name: str | None = None, base: str | None = None,
        task: str | None = None, metrics: dict[str, Any] | None = None,
    ) -> int:
        """Register an outside PEFT folder as an ``imported`` node. If it was exported from a catalog
        (``adapters_mgr.json``) and those bytes are known here, an ``imported`` edge links the two."""
        folder = Path(folder)
        check_peft_folder(folder)  # a file, a missing folder or bad contents: one clear error before anything else
        provenance = _provenance(folder)
        prov_adapter = provenance.get("adapter", {})
        name = name or prov_adapter.get("name") or folder.name
        parents: list[Any] = []
        if base is None and provenance.get("base", {}).get("weights_sha256"):
            row = self._find_base(sha=provenance["base"]["weights_sha256"])
            base = row["id"] if row else None
        sha = prov_adapter.get("weights_sha256")
        if sha:
            rows = self.catalog.query(
                "SELECT id FROM adapters WHERE weights_sha256 = ? AND status = 'active' ORDER BY id LIMIT 1", [sha]
            )
            if rows:
                parents.append((rows[0]["id"], "imported"))
        return self.register(folder, name=name, base=base, parents=parents, kind="imported",
                             task=task or prov_adapter.get("task"), metrics=metrics or prov_adapter.get("metrics"),
                             hyperparams={"imported_from": str(folder.resolve())})

    # ------------------------------------------------------------------ loading
    def base_model(
        self, base_ref: str, head: base_mod.HeadSpec = base_mod.HeadSpec(), *, force: bool = False
    ) -> nn.Module:
        """The shared frozen base with the given head, loaded once per manager and hash-checked."""
        row = self.base(base_ref)
        key = (row["id"], head.key)
        model = self._base_models.get(key)
        if model is None:
            model = base_mod.load_base_model(row["source"], head)
            self._check_base_hash(model, row, force=force, context=f"base {row['id']} loaded from {row['source']}")
            self._base_models[key] = model
        return model

    def tokenizer(self, base_ref: str) -> Any:
        """The base's tokenizer, loaded once per manager."""
        row = self.base(base_ref)
        tok = self._tokenizers.get(row["id"])
        if tok is None:
            tok = self._tokenizers[row["id"]] = base_mod.load_tokenizer(row["source"])
        return tok

    def default_base(self) -> str:
        """The embedded MiniLM base's id, registering it on first use (hashing it once)."""
        embedded = str(base_mod.embedded_model_path())
        rows = self.catalog.query("SELECT id FROM base_models WHERE source = ? ORDER BY created_at", [embedded])
        return rows[0]["id"] if rows else self.register_base()

    def _check_base_hash(self, model: nn.Module, row: dict[str, Any], *, force: bool, context: str) -> None:
        actual = base_mod.weights_sha256(model)
        if actual == row["weights_sha256"]:
            return
        if not force:
            raise IntegrityError(
                f"{context}: weights sha256 {actual[:12]}… differ from the registered {row['weights_sha256'][:12]}…; "
                "refusing to load adapters onto a different base; use the base the adapter was registered "
                "with (only the Python API's AdapterManager.load(..., force=True) overrides this, and logs it)"
            )
        with self.catalog.transaction() as con:
            log_event(con, "load", {"base": row["id"], "context": context}, outcome="forced",
                      detail={"expected": row["weights_sha256"], "actual": actual})

    @_logs_failures("load")
    def load(self, ref: Ref, *, base_model: nn.Module | None = None, force: bool = False) -> Any:
        """A PeftModel with this adapter active, on the shared base (loaded once per manager).

        Adapters of one base share one PeftModel: loading another adapter adds it by name and makes
        it active (``peft`` ``load_adapter`` + ``set_adapter``), so the base is never copied. Pass
        ``base_model`` to attach to a model of your own instead (its weight hash is checked).
        """
        from peft import PeftModel

        node = self.get(ref)
        if node.status == "deleted":
            raise Conflict(f"adapter {node.id} is deleted; `adapters-mgr restore {node.id}` first")
        folder = self._verified_folder(node)
        base_row = self.base(node.base_id)
        shapes = read_safetensors_header(folder / WEIGHTS_FILE)
        head = head_for(json.loads((folder / CONFIG_FILE).read_text()), shapes)
        adapter_name = f"a{node.id}"
        if base_model is not None:
            self._check_base_hash(base_model, base_row, force=force, context="the given base_model")
            return PeftModel.from_pretrained(base_model, str(folder), adapter_name=adapter_name)
        key = (base_row["id"], head.key)
        peft_model = self._peft_models.get(key)
        if peft_model is None:
            model = self.base_model(base_row["id"], head, force=force)
            peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name)
            self._peft_models[key] = peft_model
        elif adapter_name not in peft_model.peft_config:
            peft_model.load_adapter(str(folder), adapter_name=adapter_name)
        peft_model.set_adapter(adapter_name)
        peft_model.eval()
        return peft_model

    # ------------------------------------------------------------------ integrity
    def verify(self) -> dict[str, Any]:
        """Check every stored file against the catalog; report orphans both ways. Changes nothing."""
        problems: list[dict[str, Any]] = []
        rows = self.catalog.query(
            "SELECT id, name, version, store_key, weights_sha256, config_sha256, status FROM adapters "
            "WHERE store_key IS NOT NULL ORDER BY id"
        )
        referenced: set[str] = set()
        checked: dict[str, str | None] = {}
        for row in rows:
            key = row["store_key"]
            referenced.add(key)
            if row["status"] in ("missing", "corrupt"):
                continue
            if key not in checked:
                try:
                    self.store.verified_path(key, row["weights_sha256"], row["config_sha256"], f"adapter {row['id']}")
                    checked[key] = None
                except IntegrityError as exc:
                    checked[key] = "missing" if not self.store.path(key).exists() else "checksum_mismatch"
                    problems.append({"kind": checked[key], "adapter_id": row["id"], "store_key": key,
                                     "detail": str(exc)})
                    continue
            elif checked[key] is not None:
                problems.append({"kind": checked[key], "adapter_id": row["id"], "store_key": key,
                                 "detail": "shares a damaged folder"})
        for key in self.store.keys():  # noqa: SIM118 - a method, not a dict
            if key not in referenced:
                problems.append({"kind": "orphan_folder", "store_key": key,
                                 "detail": f"{self.store.path(key)} has no catalog row"})
        for tmp in self.store.tmp_dirs():
            problems.append({"kind": "staging_leftover", "path": str(tmp), "detail": "left by an interrupted write"})
        dangling = self.catalog.query(
            "SELECT l.child_id, l.parent_id FROM lineage l LEFT JOIN adapters p ON p.id = l.parent_id "
            "LEFT JOIN adapters c ON c.id = l.child_id WHERE p.id IS NULL OR c.id IS NULL"
        )
        problems += [{"kind": "dangling_edge", **d, "detail": "lineage edge to an unknown node"} for d in dangling]
        alias_bad = self.catalog.query(
            "SELECT al.name, al.adapter_id FROM aliases al LEFT JOIN adapters a ON a.id = al.adapter_id "
            "WHERE a.id IS NULL OR a.status <> 'active'"
        )
        problems += [{"kind": "alias_to_inactive", **a, "detail": "alias points at a node that is not active"}
                     for a in alias_bad]
        with self.catalog.connect() as con:
            if not lineage_index.is_current(con):
                problems.append({"kind": "stale_lineage_index",
                                 "detail": "lineage rows were written without the API; gc (or the next lineage "
                                           "call) rebuilds lineage_chain / lineage_hops"})
        return {"ok": not problems, "adapters_checked": len(rows), "folders": len(self.store.keys()),
                "problems": problems}

    @_logs_failures("gc")
    def gc(self, *, dry_run: bool = False, grace: float = GC_GRACE_SECONDS) -> dict[str, Any]:
        """Remove orphan folders and staging leftovers; mark rows whose files are gone ``missing`` and
        rows whose bytes changed ``corrupt`` (their folder moves to ``store/quarantine``). Rows are
        never deleted: lineage must keep its nodes.

        ``grace`` (seconds, like git prune's expiry): an orphan or staging folder that changed less than
        ``grace`` ago may belong to a register still in flight (renamed into the store, not yet in the
        catalog), so it is kept and reported as an action ``skip`` ("skipped (younger than grace)")
        and in ``skipped``. The default (:data:`GC_GRACE_SECONDS`, an hour) is safe while other
        processes write; ``grace=0`` removes every orphan at once, e.g. right after a crash, when
        nothing else is writing.
        """
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
            raise InvalidInput(f"grace must be a number of seconds >= 0, got {grace!r}")
        report = self.verify()
        actions: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        marks: list[tuple[int, str]] = []
        quarantined: set[str] = set()

        def young(kind: str, path: Path, where: dict[str, Any]) -> bool:
            if grace <= 0:
                return False
            age = age_seconds(path)
            if age is None or age >= grace:
                return False
            entry = {"action": "skip", "kind": kind, **where, "age_s": round(age, 1),
                     "reason": "skipped (younger than grace)"}
            actions.append(entry)
            skipped.append(entry)
            return True

        for problem in report["problems"]:
            kind = problem["kind"]
            if kind == "orphan_folder":
                key = problem["store_key"]
                if young(kind, self.store.path(key), {"store_key": key}):
                    continue
                actions.append({"action": "remove_folder", "store_key": key})
                if not dry_run:
                    self.store.remove(key)
            elif kind == "staging_leftover":
                if young(kind, Path(problem["path"]), {"path": problem["path"]}):
                    continue
                actions.append({"action": "remove_staging", "path": problem["path"]})
                if not dry_run:
                    shutil.rmtree(problem["path"], ignore_errors=True)
            elif kind == "stale_lineage_index":
                actions.append({"action": "rebuild_lineage_index"})
            elif kind in ("missing", "checksum_mismatch"):
                status = "missing" if kind == "missing" else "corrupt"
                marks.append((problem["adapter_id"], status))
                actions.append({"action": f"mark_{status}", "adapter_id": problem["adapter_id"]})
                key = problem["store_key"]
                if kind == "checksum_mismatch" and key not in quarantined:
                    quarantined.add(key)
                    actions.append({"action": "quarantine_folder", "store_key": key})
                    if not dry_run:
                        self.store.quarantine(key)
        if not dry_run:
            with self.catalog.transaction() as con:
                if any(a["action"] == "rebuild_lineage_index" for a in actions):
                    lineage_index.rebuild(con)
                for adapter_id, status in marks:
                    con.execute("UPDATE adapters SET status = ?, updated_at = ? WHERE id = ?",
                                [status, utcnow(), adapter_id])
                log_event(con, "gc", {"dry_run": dry_run, "grace": grace}, detail={"actions": actions})
        return {"dry_run": dry_run, "grace": grace, "actions": actions, "skipped": skipped,
                "problems_before": len(report["problems"])}

    # ------------------------------------------------------------------ internals
    def _log_failure(self, operation: str, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception) -> None:
        try:
            with self.catalog.transaction() as con:
                log_event(con, operation, {"args": [repr(a)[:200] for a in args],
                                           "kwargs": {k: repr(v)[:200] for k, v in kwargs.items()}},
                          outcome="error", detail={"error": type(exc).__name__, "message": str(exc)})
        except Exception:  # noqa: BLE001 - logging a failure must never mask the failure itself
            pass
