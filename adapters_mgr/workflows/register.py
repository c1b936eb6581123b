"""Adapters into and out of the registry: register (a PeftModel or a PEFT folder), stack, import, export.

Order of every registration: validate everything (refs, batches, the folder's LoRA config and
safetensors header, every tensor's shape against the base's), then commit the bytes to the store,
then one catalog transaction. A crash between the last two leaves an orphan folder that ``verify``
reports and ``gc`` removes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_mgr.catalog import nodes
from adapters_mgr.catalog.nodes import ParentSpec
from adapters_mgr.catalog.records import KINDS, Adapter, Ref, check_name, fetch_ref
from adapters_mgr.catalog.sql import log_event, to_json, utcnow
from adapters_mgr.data import prior
from adapters_mgr.errors import Conflict, InvalidInput
from adapters_mgr.faults import maybe_crash
from adapters_mgr.lora.ranker_shape import RECORD_KEY as SHAPE_KEY
from adapters_mgr.lora.ranker_shape import shape_of
from adapters_mgr.lora.settings import PEFT_TASK_TYPES
from adapters_mgr.store import WEIGHTS_FILE, check_peft_folder, export_folder, header_shapes, read_provenance
from adapters_mgr.workflows.bases import base_for_source, check_fits_base
from adapters_mgr.workflows.workspace import Workspace

TASK_BY_PEFT_TYPE = {peft_type: task for task, peft_type in PEFT_TASK_TYPES.items()}


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter whose bytes are in the store, with the catalog columns that describe them."""

    base_id: str
    task: str | None
    columns: dict[str, Any]
    shape_check: str = ""  # how the tensors were checked against the base (for the register event)


def store_adapter(ws: Workspace, source: Any, *, base: Any = None, adapter_name: str | None = None,
                  check: Callable[[dict[str, Any]], None] | None = None) -> PreparedAdapter:
    """Stage, identify the base, and commit the adapter's bytes to the store (not yet cataloged).
    ``check(peft_config)`` may refuse the folder before any byte reaches the store."""
    if isinstance(source, str | os.PathLike):
        staged = ws.store.stage_folder(Path(source))
    elif hasattr(source, "peft_config") and hasattr(source, "save_pretrained"):
        staged = ws.store.stage_model(source, adapter_name)
    else:
        raise InvalidInput(f"cannot register {type(source).__name__}: pass a PeftModel or a PEFT folder path")
    try:
        base_row = base_for_source(ws, source, staged, base)
        shape_check = check_fits_base(base_row, staged.shapes)  # refuses before any byte reaches the store
        if check is not None:
            check(staged.peft_config)
        trainable = nodes.param_count(staged.shapes)  # from the header validated at staging, not the stored copy
        maybe_crash("register:staged")
        key = ws.store.commit(staged)
    except BaseException:
        ws.store.discard(staged)
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
        shape_check=shape_check,
    )


def insert_node(ws: Workspace, **node: Any) -> int:
    """One transaction: :func:`adapters_mgr.catalog.nodes.insert_node` and nothing else."""
    with ws.catalog.transaction() as con:
        node_id = nodes.insert_node(con, **node)
        maybe_crash("register:in_txn")
    return node_id


def register(
    ws: Workspace,
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
    """Store an adapter and catalog it (see :meth:`adapters_mgr.AdapterManager.register`)."""
    check_name(name)
    if kind not in KINDS or kind == "stack":
        raise InvalidInput(f"invalid kind {kind!r} for register: use trained, merged or imported")
    parent_specs = [ParentSpec.coerce(p) for p in parents]
    links = nodes.batch_links(batches, eval_batches)
    with ws.catalog.connect() as con:
        nodes.check_refs(con, parent_specs, links, kind)
    prepared = store_adapter(ws, source, base=base, adapter_name=adapter_name,
                             check=lambda pc: check_ranker_shape(pc, task, hyperparams))
    return insert_node(
        ws,
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
        event_detail={"shape_check": prepared.shape_check},
    )


def check_ranker_shape(peft_config: dict[str, Any], task: str | None, hyperparams: dict[str, Any] | None) -> None:
    """A folder registered as a ranker is of the shape its hyperparams record: a two-tower ranker's
    folder is a FEATURE_EXTRACTION one, and its scale and bias (not in the folder) must come with it."""
    if task != "ranker":
        return
    shape = shape_of(hyperparams)
    peft_type = str(peft_config.get("task_type"))
    if peft_type == "FEATURE_EXTRACTION" and not shape.tower:
        raise InvalidInput("this folder is a bare-encoder (FEATURE_EXTRACTION) adapter: as a ranker it is a two-tower "
                           f"one, and its scale and bias must be given (hyperparams['{SHAPE_KEY}'], shape 'tower')")
    if peft_type == "SEQ_CLS" and shape.tower:
        raise InvalidInput("this folder is a sequence-classification (cross-encoder) adapter, but its hyperparams "
                           "record a two-tower ranker shape")


def check_members_fit(ws: Workspace, members: Sequence[Adapter]) -> None:
    """Every member's stored tensors fit the stack's base (their headers only; no weights loaded).

    Registration checks this since issue 15; a catalog filled before may hold adapters that do not
    fit, and a stack of them would fail only when served. A member whose file is gone is left to
    ``verify`` (and promoting the stack refuses it).
    """
    if not members:
        return
    base_row = ws.base(members[0].base_id)
    for member in members:
        if member.store_key is None:
            continue
        weights = ws.store.path(member.store_key) / WEIGHTS_FILE
        if not weights.is_file():
            continue
        try:
            check_fits_base(base_row, header_shapes(weights))
        except InvalidInput as exc:
            raise InvalidInput(f"cannot stack adapter {member.id} ({member.ref}): {exc}") from exc


def stack(
    ws: Workspace,
    refs: Sequence[Ref],
    weights: Sequence[float] | None = None,
    mode: str = "weights",
    *,
    name: str | None = None,
    description: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> int:
    """Register a stack node: several adapters active at once, combined by ``mode``."""
    if mode not in ("weights", "ensemble"):
        raise InvalidInput(f"invalid stack mode {mode!r}: use 'weights' or 'ensemble'")
    if len(refs) < 1:
        raise InvalidInput("a stack needs at least one adapter")
    weights = list(weights) if weights is not None else [1.0] * len(refs)
    if len(weights) != len(refs):
        raise InvalidInput(f"{len(weights)} weights given for {len(refs)} adapters; give one per adapter")
    with ws.catalog.connect() as con:
        members = [fetch_ref(con, r) for r in refs]
    bases = {m.base_id for m in members}
    tasks = {m.task for m in members}
    if len(bases) > 1:
        raise Conflict(f"adapters {[m.id for m in members]} are on different bases {sorted(bases)}")
    if len(tasks) > 1:
        raise Conflict(f"adapters {[m.id for m in members]} are for different tasks {sorted(map(str, tasks))}")
    check_members_fit(ws, members)
    ws.prior_recipe(members)  # a node adds ONE prior: members trained with different ones are refused
    if members and members[0].task == "ranker":
        ws.ranker_shape(members)  # a cross-encoder's head and a tower's cosine do not add up
    name = check_name(name or f"stack-{'-'.join(str(m.id) for m in members)}")
    specs = [ParentSpec(m.id, "stacked_on", float(w)) for m, w in zip(members, weights, strict=True)]
    return insert_node(
        ws,
        name=name,
        kind="stack",
        task=members[0].task,
        base_id=members[0].base_id,
        parents=specs,
        links=[],
        stack_mode=mode,
        columns=nodes.stack_columns(sum(m.trainable_params or 0 for m in members), weights, mode,
                                    metrics=metrics, description=description),
    )


def export(ws: Workspace, ref: Ref, folder: Path) -> Path:
    """Copy a node's PEFT folder out, with an ``adapters_mgr.json`` provenance file beside it."""
    lin = ws.lineage(ref, depth=1)
    node = lin.root
    src = ws.verified_folder(node)
    base_row = ws.base(node.base_id)
    provenance = {
        "adapter": node.to_dict(),
        "base": {k: base_row[k] for k in ("id", "name", "source", "weights_sha256")},
        "parents": [e.to_dict() for e in lin.parents_of(node.id)],
        "batches": lin.batches.get(node.id, []),
        "exported_at": utcnow().isoformat(),
    }
    dest = export_folder(src, folder, provenance)
    with ws.catalog.transaction() as con:
        log_event(con, "export", {"ref": ref, "folder": str(dest)}, detail={"id": node.id})
    return dest


def import_peft(ws: Workspace, folder: Path, *, name: str | None = None, base: str | None = None,
                task: str | None = None, metrics: dict[str, Any] | None = None) -> int:
    """Register an outside PEFT folder as an ``imported`` node, linked to its source when known here."""
    check_peft_folder(folder)  # a file, a missing folder or bad contents: one clear error before anything else
    provenance = read_provenance(folder)
    prov_adapter = provenance.get("adapter", {})
    name = name or prov_adapter.get("name") or folder.name
    parents: list[Any] = []
    if base is None and provenance.get("base", {}).get("weights_sha256"):
        row = ws.find_base(sha=provenance["base"]["weights_sha256"])
        base = row["id"] if row else None
    sha = prov_adapter.get("weights_sha256")
    if sha:
        rows = ws.catalog.query(
            "SELECT id FROM adapters WHERE weights_sha256 = ? AND status = 'active' ORDER BY id LIMIT 1", [sha]
        )
        if rows:
            parents.append((rows[0]["id"], "imported"))
    # the prior is not in the folder: an export's provenance carries the recipe the adapter scores with
    recipe = (prov_adapter.get("hyperparams") or {}).get(prior.RECORD_KEY)
    shape = (prov_adapter.get("hyperparams") or {}).get(SHAPE_KEY)  # a tower's scale and bias, likewise
    return register(ws, folder, name=name, base=base, parents=parents, kind="imported",
                    task=task or prov_adapter.get("task"), metrics=metrics or prov_adapter.get("metrics"),
                    hyperparams={"imported_from": str(folder.resolve()),
                                 **({prior.RECORD_KEY: recipe} if recipe else {}),
                                 **({SHAPE_KEY: shape} if shape else {})})
