"""LoRA adapters as tensors: read a PEFT folder (or an in-memory adapter), check it, lay out deltas.

Shared by merging and folding (``adapters_mgr.lora.merge``) and the hot-swap serving engine
(``adapters_mgr.serving.engine``): everything here is plain tensor maths on ``LoraTensors``, with no
peft model and no write.

An adapter's delta on layer ``l`` is ``dW_l = scaling * B_l @ A_l`` with ``scaling = alpha / r``
(``alpha / sqrt(r)`` for rsLoRA, ``alpha_pattern`` honoured). Only plain LoRA on Linear layers is
supported (no DoRA, no trained biases, no Conv1D ``fan_in_fan_out``); anything else is refused with
``InvalidInput`` naming the adapter.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_mgr.errors import Conflict, InvalidInput
from adapters_mgr.lora.adapters import AdapterSource, InMemoryAdapter, read_adapter_config

TASK_OF_PEFT_TYPE = {"SEQ_CLS": "ranker", "FEATURE_EXTRACTION": "retriever"}
PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


# -- reading adapters ---------------------------------------------------------------------------
@dataclass
class LoraTensors:
    """One adapter's tensors, keyed by module path relative to the task model (no peft prefix).

    ``lora[path] = (A, B, scaling)`` with ``dW = scaling * B @ A``; ``extras`` holds the other saved
    tensors (the ranker's ``modules_to_save`` head), keyed by parameter path in the task model.
    """

    source: str
    sha256: str | None
    config: Any
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def task_type(self) -> str:
        value = getattr(self.config, "task_type", None)
        return str(getattr(value, "value", value))

    @property
    def task(self) -> str:
        return TASK_OF_PEFT_TYPE.get(self.task_type, self.task_type)

    @property
    def target_modules(self) -> tuple[str, ...]:
        targets = self.config.target_modules
        return (targets,) if isinstance(targets, str) else tuple(sorted(targets))

    @property
    def ranks(self) -> set[int]:
        return {int(a.shape[0]) for a, _, _ in self.lora.values()}

    @property
    def rank(self) -> int:
        return max(self.ranks) if self.lora else 0

    def delta(self, path: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        a, b, scaling = self.lora[path]
        return scaling * (b.to(dtype) @ a.to(dtype))


def _scaling(config: Any, path: str, rank: int) -> float:
    alpha = float(config.lora_alpha)
    if getattr(config, "alpha_pattern", None):
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(list(config.alpha_pattern), path)
        alpha = float(config.alpha_pattern.get(key, alpha))
    return alpha / math.sqrt(rank) if getattr(config, "use_rslora", False) else alpha / rank


def _check_supported(config: Any, source: str) -> None:
    if getattr(config, "use_dora", False):
        raise InvalidInput(f"{source} is a DoRA adapter; merging, folding and hot swap support plain LoRA only")
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        raise InvalidInput(f"{source} trains biases (bias={config.bias!r}); only bias='none' adapters are supported")
    if getattr(config, "fan_in_fan_out", False):
        raise InvalidInput(f"{source} uses fan_in_fan_out (Conv1D layers); BERT-style Linear layers only")


def parse_state_dict(config: Any, state: dict[str, torch.Tensor], source: str, sha256: str | None) -> LoraTensors:
    """Split a peft state dict (as saved: no adapter names in keys) into LoRA factors and extras."""
    _check_supported(config, source)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                factors.setdefault(name.split(marker)[0], {})[part] = tensor
                break
        else:
            if "lora_" in name:
                raise InvalidInput(f"{source}: unsupported LoRA tensor {key!r} (embedding or magnitude vector)")
            extras[name] = tensor
    lora = {}
    for path, pair in sorted(factors.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise InvalidInput(f"{source}: layer {path} has only {sorted(pair)}; the adapter file is incomplete")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidInput(f"{source}: layer {path} has A {tuple(a.shape)} and B {tuple(b.shape)}, not a LoRA pair")
        lora[path] = (a, b, _scaling(config, path, int(a.shape[0])))
    if not lora:
        raise InvalidInput(f"{source} holds no LoRA layers")
    return LoraTensors(source, sha256, config, lora, extras)


def read_lora(source: AdapterSource) -> LoraTensors:
    """Read a PEFT folder (or an ``InMemoryAdapter``) into ``LoraTensors``; the file is read once and hashed."""
    if isinstance(source, InMemoryAdapter):
        return parse_state_dict(source.config, dict(source.state_dict), "<in-memory adapter>", None)
    from safetensors.torch import load

    folder = Path(source)
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise InvalidInput(f"{folder} has no {WEIGHTS_FILE}; only safetensors PEFT folders are supported")
    data = weights.read_bytes()
    return parse_state_dict(config, load(data), str(folder), hashlib.sha256(data).hexdigest())


# -- checks ---------------------------------------------------------------------------------------
def check_weights(weights: Sequence[float]) -> list[float]:
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(float(w)):
            raise InvalidInput(f"adapter weights must be finite numbers, got {list(weights)}")
        out.append(float(w))
    return out


def check_compatible(adapters: Sequence[LoraTensors], task: str | None = None, *, task_type: str | None = None) -> str:
    """Same task type and same target modules/layers (ranks may differ); returns the task name.
    ``task_type``: the peft task type the caller's recipe needs (a two-tower ranker's folders are
    FEATURE_EXTRACTION ones, as the retriever's)."""
    if not adapters:
        raise InvalidInput("need at least one adapter")
    first = adapters[0]
    for i, other in enumerate(adapters[1:], start=1):
        if other.task_type != first.task_type:
            raise Conflict(
                f"adapter #{i} ({other.source}) is a {other.task} adapter (task_type {other.task_type}) but"
                f" adapter #0 ({first.source}) is a {first.task} adapter ({first.task_type}); combine adapters"
                " of one task only"
            )
        if other.target_modules != first.target_modules or set(other.lora) != set(first.lora):
            raise Conflict(
                f"adapter #{i} ({other.source}) targets {list(other.target_modules)} on {len(other.lora)} layers but"
                f" adapter #0 ({first.source}) targets {list(first.target_modules)} on {len(first.lora)} layers;"
                " only adapters with the same target modules can be combined"
            )
    if task is not None and first.task != task:
        raise Conflict(f"{first.source} is a {first.task} adapter, not a {task} adapter")
    if task_type is not None and first.task_type != task_type:
        raise Conflict(f"{first.source} is a {first.task} adapter ({first.task_type}); this recipe needs a "
                       f"{task_type} adapter (a two-tower ranker's is FEATURE_EXTRACTION, a cross-encoder's SEQ_CLS)")
    return first.task


def check_fits(model: nn.Module, adapters: Sequence[LoraTensors]) -> None:
    """Every adapted layer and head tensor exists in ``model`` (the task model) with matching shape."""
    params = dict(model.named_parameters())
    for ad in adapters:
        for path, (a, b, _) in ad.lora.items():
            weight = params.get(f"{path}.weight")
            if weight is None or tuple(weight.shape) != (b.shape[0], a.shape[1]):
                shape = None if weight is None else tuple(weight.shape)
                raise Conflict(
                    f"{ad.source} does not fit this base: layer {path} needs a {b.shape[0]}x{a.shape[1]} weight,"
                    f" the base has {shape}; was it trained on another base model?"
                )
        for path, tensor in ad.extras.items():
            target = params.get(path)
            if target is None or target.shape != tensor.shape:
                raise Conflict(f"{ad.source} does not fit this base: head tensor {path} missing or of another shape")


# -- deltas shared by merge, fold and serving ------------------------------------------------------
def stacked_factors(adapters: Sequence[LoraTensors], weights: Sequence[float]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per layer ``(B_cat, A_cat)`` with ``B_cat @ A_cat = sum_i w_i * scaling_i * B_i A_i`` (float32).

    The weight and scaling go into B, so folding is one ``addmm(W0, B_cat, A_cat)`` per layer.
    """
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    for path in adapters[0].lora:
        bs, as_ = [], []
        for ad, w in zip(adapters, weights, strict=True):
            a, b, scaling = ad.lora[path]
            bs.append(b.float() * float(w * scaling))
            as_.append(a.float())
        out[path] = (torch.cat(bs, dim=1).contiguous(), torch.cat(as_, dim=0).contiguous())
    return out


def head_of(adapters: Sequence[LoraTensors]) -> dict[str, torch.Tensor]:
    """The head tensors used by a combination: the newest (last) adapter's, possibly none."""
    return dict(adapters[-1].extras)


__all__ = [
    "CONFIG_FILE",
    "PREFIX",
    "TASK_OF_PEFT_TYPE",
    "WEIGHTS_FILE",
    "LoraTensors",
    "check_compatible",
    "check_fits",
    "check_weights",
    "head_of",
    "parse_state_dict",
    "read_lora",
    "stacked_factors",
]
