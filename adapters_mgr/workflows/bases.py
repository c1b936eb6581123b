"""Registering base models and telling which base an adapter belongs to.

A base is identified by the sha256 of its backbone weights (see :mod:`adapters_mgr.lora.base_model`);
an in-memory base with no folder of its own is saved once under ``<root>/bases/``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_mgr.catalog import bases as base_rows
from adapters_mgr.catalog.sql import from_json
from adapters_mgr.errors import IntegrityError, InvalidInput, NotFound
from adapters_mgr.lora import base_model as base_mod
from adapters_mgr.store import CONFIG_FILE, StagedAdapter, atomic_folder, header_shapes, read_provenance
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


# -- does an adapter fit its base? ---------------------------------------------------------------
# Checked at registration from the safetensors headers alone (no weights loaded): an adapter saved
# from a 48-wide BERT must not register on a 32-wide base and fail only when someone loads it.
BASE_WEIGHTS = "model.safetensors"
BASE_WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_PREFIX = "base_model.model."
HEAD_MODULES = ("classifier", "score")  # task heads (peft modules_to_save): not in the backbone file
BERT_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072}
# Which dimension of a tensor must equal which dimension of its module's weight (Linear: [out, in]).
_LORA_AXES = (  # (marker, tensor axis, base-weight axis)
    (".lora_A.", 1, 1), (".lora_B.", 0, 0),
    (".lora_embedding_A", 1, 0), (".lora_embedding_B", 0, 1),
    (".lora_magnitude_vector", 0, 0),
)
# Without the base's header: a BERT layer's weight shape from its config, by module path.
_CONFIG_SHAPES = (
    (re.compile(r"attention\.self\.(query|key|value)$"), ("hidden_size", "hidden_size")),
    (re.compile(r"attention\.output\.dense$"), ("hidden_size", "hidden_size")),
    (re.compile(r"intermediate\.dense$"), ("intermediate_size", "hidden_size")),
    (re.compile(r"(?<!attention\.)output\.dense$"), ("hidden_size", "intermediate_size")),
    (re.compile(r"pooler\.dense$"), ("hidden_size", "hidden_size")),
)


def _base_folder(source: str) -> Path | None:
    """The local folder of a base's checkpoint: its source folder, or a hub id's cached snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:  # a hub id downloaded before: look in the local cache only (never the network)
        from huggingface_hub import try_to_load_from_cache

        for name in (BASE_WEIGHTS, BASE_WEIGHTS_INDEX):
            cached = try_to_load_from_cache(source, name)
            if isinstance(cached, str):
                return Path(cached).parent
    except Exception:  # noqa: BLE001 - not a valid repo id, no hub library...: simply not on disk
        pass
    return None


def base_shapes(row: dict[str, Any]) -> tuple[dict[str, list[int]] | None, str]:
    """The base checkpoint's tensor shapes from its safetensors header(s), or None and why not."""
    folder = _base_folder(str(row["source"]))
    if folder is None:
        return None, f"base source {row['source']} is not on this disk"
    try:
        if (folder / BASE_WEIGHTS).is_file():
            return header_shapes(folder / BASE_WEIGHTS), f"header of {folder / BASE_WEIGHTS}"
        if (folder / BASE_WEIGHTS_INDEX).is_file():  # a sharded checkpoint: every shard's header
            files = sorted(set(json.loads((folder / BASE_WEIGHTS_INDEX).read_text())["weight_map"].values()))
            shapes: dict[str, list[int]] = {}
            for name in files:
                shapes.update(header_shapes(folder / name))
            return shapes, f"headers of {folder / BASE_WEIGHTS_INDEX}"
    except (InvalidInput, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"cannot read the base's header ({exc})"
    return None, f"{folder} has no {BASE_WEIGHTS}"


def _config_sizes(row: dict[str, Any]) -> dict[str, int]:
    config = from_json(row.get("config")) or {}
    sizes = {k: config.get(k) for k in BERT_DEFAULTS}
    if config.get("model_type") == "bert":  # a diff dict leaves BERT's defaults out
        sizes = {k: v if v is not None else BERT_DEFAULTS[k] for k, v in sizes.items()}
    return {k: int(v) for k, v in sizes.items() if isinstance(v, int) and not isinstance(v, bool)}


def _index(base: dict[str, list[int]]) -> dict[str, list[int]]:
    """The base's keys, plus each without its first component (``bert.encoder...`` -> ``encoder...``)."""
    index = dict(base)
    for key, shape in base.items():
        parts = key.split(".")
        if len(parts) > 2:
            index.setdefault(".".join(parts[1:]), shape)
    return index


def _lookup(index: dict[str, list[int]], module: str, suffix: str) -> tuple[str, list[int]] | None:
    """The base tensor of ``module`` (a path in the adapted model), matching the longest tail of it."""
    parts = module.split(".")
    for start in range(len(parts)):
        key = ".".join(parts[start:]) + suffix
        if key in index:
            return key, index[key]
    return None


def _split(name: str) -> tuple[str, int, int, str] | None:
    """``(module, tensor axis, base axis, base suffix)`` for a LoRA tensor, None for another tensor."""
    for marker, axis, base_axis in _LORA_AXES:
        if marker in name:
            return name.split(marker)[0], axis, base_axis, ".weight"
    return None


def _refuse(key: str, shape: list[int], base_id: str, why: str) -> InvalidInput:
    return InvalidInput(
        f"adapter tensor {key} {shape} does not fit base {base_id}: {why}; the adapter was trained on another "
        "base model; register it on that base (--base)"
    )


def check_fits_base(row: dict[str, Any], shapes: dict[str, list[int]]) -> str:
    """Refuse (``InvalidInput``, one line naming the first misfit) an adapter whose tensors cannot load
    on this base; returns how it was checked, for the register event.

    The base's tensor shapes come from its safetensors header; when that cannot be read without
    loading the model (a hub id not in the local cache, a ``.bin``-only checkpoint) from its recorded
    config (``hidden_size``, ``intermediate_size``: BERT's layer names only); failing both, nothing
    is checked and the returned note says so.
    """
    base, how = base_shapes(row)
    sizes = _config_sizes(row)
    if base is None and "hidden_size" not in sizes:
        return f"not checked: {how}, and the base's config has no hidden_size"
    index = _index(base) if base is not None else {}
    if base is not None:
        hidden = next((s[1] for k, s in index.items() if k.endswith("word_embeddings.weight") and len(s) == 2), None)
        if hidden is not None:  # the header's word, not the recorded config's
            sizes["hidden_size"] = hidden
    unchecked: list[str] = []
    base_id = str(row["id"])
    for key, shape in sorted(shapes.items()):
        name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
        split = _split(name)
        module, _, leaf = name.rpartition(".") if split is None else (split[0], "", "")
        if any(part in HEAD_MODULES for part in module.split(".")):
            # A task head (modules_to_save, or LoRA on it): its number of labels is the adapter's own
            # (the head is built to fit it on load), so only its input must be the base's hidden size.
            in_axis = (1 if leaf == "weight" else None) if split is None else (split[1] if split[2] == 1 else None)
            hidden = sizes.get("hidden_size")
            if in_axis is not None and len(shape) == 2 and hidden is not None and shape[in_axis] != hidden:
                raise _refuse(key, shape, base_id, f"dimension {in_axis} is {shape[in_axis]} but the base's hidden "
                              f"size is {hidden}")
            continue
        if split is None:  # another saved module (modules_to_save): the base's own tensor, same shape
            found = _lookup(index, module, "." + leaf) if module else None
            if found is None:
                unchecked.append(key)
            elif list(found[1]) != list(shape):
                raise _refuse(key, shape, base_id, f"the base's {found[0]} is {found[1]}")
            continue
        module, axis, base_axis, suffix = split
        if len(shape) <= axis:
            raise InvalidInput(f"adapter tensor {key} has shape {shape}, not a LoRA factor; the file is damaged")
        if base is not None:
            found = _lookup(index, module, suffix)
            if found is None:
                raise _refuse(key, shape, base_id, f"the base has no {module}{suffix}")
            base_key, base_shape = found
            if len(base_shape) <= base_axis or base_shape[base_axis] != shape[axis]:
                raise _refuse(key, shape, base_id, f"dimension {axis} is {shape[axis]} but the base's {base_key} "
                              f"is {base_shape}")
            continue
        rule = next((dims for pattern, dims in _CONFIG_SHAPES if pattern.search(module)), None)
        if rule is None or any(d not in sizes for d in rule):
            unchecked.append(key)
            continue
        expected_shape = [sizes[d] for d in rule]
        if expected_shape[base_axis] != shape[axis]:
            raise _refuse(key, shape, base_id, f"dimension {axis} is {shape[axis]} but the base's config gives "
                          f"{module} a {expected_shape} weight")
    source = how if base is not None else f"the base's config ({how})"
    return f"checked against {source}" + (f"; {len(unchecked)} tensor(s) not checked" if unchecked else "")


__all__ = ["base_for_source", "base_shapes", "check_fits_base", "default_base", "register_base", "register_base_model"]
