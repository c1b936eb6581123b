"""Registering base models and telling which base an adapter belongs to.

A base is identified by the sha256 of its backbone weights (see :mod:`adapters_mgr.lora.base_model`);
an in-memory base with no folder of its own is saved once under ``<root>/bases/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_mgr.catalog import bases as base_rows
from adapters_mgr.errors import IntegrityError, NotFound
from adapters_mgr.lora import base_model as base_mod
from adapters_mgr.store import CONFIG_FILE, StagedAdapter, atomic_folder, read_provenance
from adapters_mgr.workflows.workspace import Workspace

if TYPE_CHECKING:
    from torch import nn


def register_base(ws: Workspace, source: Any = None, *, name: str | None = None) -> str:
    """Register a base (default: the embedded MiniLM BERT) by its weight hash; returns its id."""
    if source is not None and not isinstance(source, str | os.PathLike):
        return register_base_model(ws, source, name=name)
    resolved = base_mod.resolve_source(source)
    model = base_mod.load_base_model(resolved)
    sha = base_mod.weights_sha256(model)
    if name is None:
        embedded = str(base_mod.embedded_model_path())
        name = base_mod.DEFAULT_BASE_NAME if resolved == embedded else Path(resolved).name
    base_id = _insert(ws, model, sha, name=name, source=resolved)
    ws.base_models[(base_id, base_mod.HeadSpec().key)] = model
    return base_id


def register_base_model(ws: Workspace, model: nn.Module, *, name: str | None) -> str:
    """Register an in-memory base: its backbone is saved once under ``<root>/bases/<id>``."""
    sha = base_mod.weights_sha256(model)
    existing = ws.find_base(sha=sha)
    if existing is not None:
        return str(existing["id"])
    base_id = base_rows.base_id_for(sha)
    folder = ws.root / "bases" / base_id
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        base_mod.quiet_transformers()
        with atomic_folder(folder) as tmp:
            base_mod.backbone(model).save_pretrained(str(tmp), safe_serialization=True)
    name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or base_id
    return _insert(ws, model, sha, name=str(name) or base_id, source=str(folder))


def _insert(ws: Workspace, model: nn.Module, sha: str, *, name: str, source: str) -> str:
    with ws.catalog.transaction() as con:
        return base_rows.insert_base(con, sha=sha, name=name, source=source,
                                     architecture=base_mod.architecture(model),
                                     config=base_mod.config_dict(model),
                                     num_parameters=base_mod.num_parameters(model))


def default_base(ws: Workspace) -> str:
    """The embedded MiniLM base's id, registering it on first use (hashing it once)."""
    embedded = str(base_mod.embedded_model_path())
    rows = ws.catalog.query("SELECT id FROM base_models WHERE source = ? ORDER BY created_at", [embedded])
    return rows[0]["id"] if rows else register_base(ws)


def base_for_source(ws: Workspace, source: Any, staged: StagedAdapter, base: Any) -> dict[str, Any]:
    """Which registered base an adapter belongs to: explicit, by hash of an in-memory model, by the
    provenance file of an export, or by the ``base_model_name_or_path`` its PEFT config names."""
    if base is not None and not isinstance(base, str):
        return ws.base(register_base_model(ws, base, name=None))
    if base is not None:
        row = ws.base(base)
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
        found = ws.find_base(sha=sha)
        if found is None:
            raise NotFound(
                f"the model's base (weights sha256 {sha[:12]}…) is not registered; "
                "call register_base(...) with it first"
            )
        return found
    if isinstance(source, str | os.PathLike):
        prov_sha = read_provenance(Path(source)).get("base", {}).get("weights_sha256")
        found = ws.find_base(sha=prov_sha) if prov_sha else None
        if found is not None:
            return found
    named = staged.peft_config.get("base_model_name_or_path")
    if named:
        found = ws.find_base(ref=str(named))
        if found is None:
            resolved = Path(str(named)).expanduser()
            if resolved.exists():
                found = ws.find_base(ref=str(resolved.resolve()))
                if found is None:
                    found = ws.base(register_base(ws, str(resolved)))
        if found is not None:
            return found
    config = Path(source) / CONFIG_FILE if isinstance(source, str | os.PathLike) else CONFIG_FILE
    fix = "pass base= (CLI: --base) a registered base id or name (list them with `adapters-mgr bases`)"
    if not named:
        raise NotFound(f"cannot tell which base the adapter belongs to: {config} names no base_model_name_or_path; "
                       f"{fix}")
    raise NotFound(
        f"the adapter's base {named!r} (base_model_name_or_path in {config}) is not registered and is not a "
        f"local folder; register it first (`adapters-mgr register-base`) or {fix}"
    )


__all__ = ["base_for_source", "default_base", "register_base", "register_base_model"]
