"""peft wiring shared by training and scoring: attach adapters, activate weighted stacks, freeze,
save, and detach again.

Why a module of its own: peft's public API covers one active adapter well, but a *weighted* stack of
several adapters with a classification head needs a few steps that peft does not bundle (set the
LoRA layers of all adapters active, scale each, pick one head because a ``modules_to_save`` wrapper
can only have one active copy), and ``unload()`` would replace the base's head by the adapter's
trained copy. Everything here works on one shared base model in place: adapters are attached to it
and removed again, the base weights are never copied or modified.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_mgr.errors import InvalidInput, NotFound
from adapters_mgr.lora.quiet import known_warnings_silenced


@dataclass(frozen=True)
class InMemoryAdapter:
    """An adapter not (yet) written to disk: its ``LoraConfig`` and peft state dict (no adapter names
    in the keys, as ``get_peft_model_state_dict`` returns it and as ``adapter_model.safetensors`` holds)."""

    config: Any
    state_dict: dict[str, torch.Tensor]


AdapterSource = str | Path | InMemoryAdapter


def _tuner_classes() -> tuple[type, type]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return BaseTunerLayer, AuxiliaryTrainingWrapper


def has_injected_adapters(module: nn.Module) -> bool:
    """True when peft layers are already injected (a previous adapter was not released)."""
    layer_cls, aux_cls = _tuner_classes()
    return any(isinstance(m, layer_cls | aux_cls) for m in module.modules())


def read_adapter_config(folder: str | Path) -> Any:
    """The ``LoraConfig`` of a PEFT folder, with a clear error when it is not one."""
    path = Path(folder)
    if not (path / "adapter_config.json").is_file():
        raise NotFound(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    data = json.loads((path / "adapter_config.json").read_text())
    if data.get("peft_type") != "LORA":
        raise InvalidInput(f"{path} holds a {data.get('peft_type')!r} adapter; only LoRA adapters are supported")
    from peft import LoraConfig

    return LoraConfig.from_pretrained(str(path))


def source_config(source: AdapterSource) -> Any:
    return source.config if isinstance(source, InMemoryAdapter) else read_adapter_config(source)


@known_warnings_silenced()  # peft's constructor trips a transformers deprecation (see lora/quiet.py)
def attach(model: nn.Module, source: AdapterSource, name: str, *, trainable: bool = False) -> Any:
    """Attach ``source`` under ``name``; ``model`` is the task model or a PeftModel built on it.

    Returns the PeftModel (new on the first attach). Loading never writes into the source folder.
    """
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    is_peft = isinstance(model, PeftModel)
    if isinstance(source, InMemoryAdapter):
        config = copy_config(source.config, inference_mode=not trainable)
        if is_peft:
            model.add_adapter(name, config)
            peft_model = model
        else:
            peft_model = get_peft_model(model, config, adapter_name=name)
        result = set_peft_model_state_dict(peft_model, source.state_dict, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if name in k or "lora_" in k]
        if unexpected:
            raise InvalidInput(f"adapter {name!r} does not fit this base: unexpected keys {unexpected[:3]}")
        return peft_model
    folder = str(source)
    read_adapter_config(folder)
    if is_peft:
        model.load_adapter(folder, adapter_name=name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, folder, adapter_name=name, is_trainable=trainable)


def copy_config(config: Any, **changes: Any) -> Any:
    """A deep copy of a peft config with ``changes`` set on it (the original is never modified)."""
    new = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(new, key, value)
    return new


def activate(model: nn.Module, names: Sequence[str], weights: Sequence[float] | None = None,
             head: str | None = None) -> None:
    """Make ``names`` the active adapters, each LoRA delta scaled by its weight (summed in one pass),
    and ``head`` (default: the last, i.e. newest, name) the active ``modules_to_save`` copy.

    Scaling uses peft's ``LoraLayer.set_scale`` (delta = weight * alpha / r * B A), so a weight of 1
    is exactly the adapter as trained. ``requires_grad`` flags are not touched here; see ``freeze``.
    """
    from peft.tuners.lora import LoraLayer

    names = list(names)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names) or not names:
        raise InvalidInput(f"need one weight per adapter, got {len(weights)} for {len(names)}")
    head = names[-1] if head is None else head
    layer_cls, aux_cls = _tuner_classes()
    for module in model.modules():
        if isinstance(module, aux_cls):
            present = [n for n in (head,) if n in module._adapters]
            module.set_adapter(present if present else [])
        elif isinstance(module, layer_cls):
            present = [n for n in names if n in getattr(module, "lora_A", {})]
            # LoraLayer.set_adapter flips requires_grad on; restore the flags afterwards
            flags = {id(p): p.requires_grad for p in module.parameters()}
            module.set_adapter(present)
            for p in module.parameters():
                p.requires_grad_(flags[id(p)])
            if isinstance(module, LoraLayer):
                for n, w in zip(names, weights, strict=True):
                    module.set_scale(n, w)


def freeze(model: nn.Module, trainable: str | None) -> int:
    """Only adapter ``trainable`` (its LoRA matrices and head copy) requires grad; returns their count."""
    count = 0
    for pname, param in model.named_parameters():
        parts = pname.split(".")
        # the adapter name is the key right after lora_A / lora_B / modules_to_save in peft's layout
        train = trainable is not None and any(
            part in ("lora_A", "lora_B", "modules_to_save") and i + 1 < len(parts) and parts[i + 1] == trainable
            for i, part in enumerate(parts)
        )
        param.requires_grad_(train)
        count += param.numel() if train else 0
    return count


def adapter_state(model: nn.Module, name: str) -> InMemoryAdapter:
    """Detached CPU copy of adapter ``name`` (config + tensors), safe to keep after ``release``."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=name)
    config = copy_config(model.peft_config[name], inference_mode=True)
    return InMemoryAdapter(config, {k: v.detach().to("cpu").clone() for k, v in state.items()})


def save_adapter(model: nn.Module, name: str, folder: str | Path) -> Path:
    """Write adapter ``name`` as a standard PEFT folder (adapter_config.json + adapter_model.safetensors)
    directly in ``folder`` (peft itself would nest non-'default' adapters in a sub-folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), selected_adapters=[name], safe_serialization=True)
    if name != "default":
        nested = folder / name
        for item in nested.iterdir():
            target = folder / item.name
            if target.exists():
                target.unlink()
            shutil.move(str(item), str(target))
        nested.rmdir()
    return folder


def release(model: nn.Module) -> nn.Module:
    """Remove every peft layer and return the bare task model, bit-identical to before attaching.

    Unlike ``PeftModel.unload()``, a ``modules_to_save`` wrapper is replaced by its *original* module,
    so the base's own head comes back, not an adapter's trained copy.
    """
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    layer_cls, aux_cls = _tuner_classes()
    replaced = True
    while replaced:  # outermost first; repeat until no wrapper is left
        replaced = False
        for qualified, module in list(inner.named_modules()):
            if not isinstance(module, layer_cls | aux_cls) or not qualified:
                continue
            parent_name, _, child = qualified.rpartition(".")
            parent = inner.get_submodule(parent_name) if parent_name else inner
            original = module.original_module if isinstance(module, aux_cls) else module.get_base_layer()
            setattr(parent, child, original)
            replaced = True
            break
    if hasattr(inner, "peft_config"):
        del inner.peft_config
    for param in inner.parameters():
        param.requires_grad_(False)
    return inner


__all__ = [
    "AdapterSource",
    "InMemoryAdapter",
    "activate",
    "adapter_state",
    "attach",
    "copy_config",
    "freeze",
    "has_injected_adapters",
    "read_adapter_config",
    "release",
    "save_adapter",
    "source_config",
]
