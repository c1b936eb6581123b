"""Update policies: how the model to train is assembled from the shared base and parent adapters.

- ``fresh``: a new LoRA on the bare base (seeded init; ranker head seeded too).
- ``warm_start``: the new adapter starts as an exact copy of ONE parent's tensors (and head) and
  keeps its LoRA shape; the parent's folder is only read.
- ``stack``: the parents are attached, active and FROZEN, their deltas summed with per-parent
  weights (``weights`` mode); only the new adapter trains, on top of them. The ranker's new head
  starts from the newest parent's head. The node to serve is parents + new in ``weights`` mode.
- ``long_short``: the new adapter is the *short-term* one: trained fresh on the newest batch alone
  (the long-term parent is NOT active while it trains, as in Shi et al. 2024). The node to serve
  combines the frozen long-term parent and the new short-term adapter in ``ensemble`` (outputs
  averaged) or ``weights`` (deltas summed) mode. The long-term adapter itself is trained with
  ``fresh`` on a long history and refreshed now and then by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from adapters_mgr.errors import InvalidInput
from adapters_mgr.lora import adapters as peft_wiring
from adapters_mgr.lora.adapters import AdapterSource, InMemoryAdapter
from adapters_mgr.lora.peft_scoring import check_combination
from adapters_mgr.lora.settings import PEFT_TASK_TYPES, LoraSettings
from adapters_mgr.lora.tasks import Task

POLICIES = ("fresh", "warm_start", "stack", "long_short")


@dataclass(frozen=True)
class ParentAdapter:
    """A parent adapter: a PEFT folder or an in-memory adapter, and its weight in the combination."""

    source: AdapterSource
    weight: float = 1.0


@dataclass(frozen=True)
class Plan:
    """Everything decided (and validated) before any model work."""

    policy: str
    parents: tuple[ParentAdapter, ...]
    settings: LoraSettings
    new_weight: float
    mode: str
    adapter_name: str

    @property
    def parent_names(self) -> list[str]:
        return [f"parent_{i}" for i in range(len(self.parents))]

    @property
    def node_names(self) -> list[str]:
        """Adapters of the node to serve, oldest first (the newest one's head is used in weights mode)."""
        if self.policy in ("fresh", "warm_start"):
            return [self.adapter_name]
        return [*self.parent_names, self.adapter_name]

    @property
    def node_weights(self) -> list[float]:
        if self.policy in ("fresh", "warm_start"):
            return [1.0]
        return [p.weight for p in self.parents] + [self.new_weight]

    @property
    def training_names(self) -> list[str]:
        """Adapters active while the new one trains (only ``stack`` trains on top of parents)."""
        return self.node_names if self.policy == "stack" else [self.adapter_name]

    @property
    def training_weights(self) -> list[float]:
        return self.node_weights if self.policy == "stack" else [1.0]


def _as_parent(item: Any) -> ParentAdapter:
    if isinstance(item, ParentAdapter):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return ParentAdapter(item[0], float(item[1]))
    if isinstance(item, str | Path | InMemoryAdapter):
        return ParentAdapter(item, 1.0)
    raise InvalidInput(f"a parent must be a PEFT folder, an InMemoryAdapter or (source, weight), got {item!r}")


def plan(
    task: Task,
    policy: str,
    parents: Sequence[Any],
    settings: LoraSettings | None,
    new_weight: float,
    mode: str,
    adapter_name: str,
) -> Plan:
    """Validate the policy's arguments (parents readable, same task type, shapes) before any work."""
    if policy not in POLICIES:
        raise InvalidInput(f"unknown policy {policy!r}; choose one of {list(POLICIES)}")
    if not adapter_name or adapter_name.startswith("parent_") or "." in adapter_name:
        raise InvalidInput(f"adapter name {adapter_name!r} is not allowed (empty, dotted, or 'parent_*')")
    items = tuple(_as_parent(p) for p in parents)
    expected = {"fresh": (0, 0), "warm_start": (1, 1), "stack": (1, 10_000), "long_short": (1, 1)}[policy]
    if not expected[0] <= len(items) <= expected[1]:
        want = {"fresh": "no parent", "warm_start": "exactly one parent", "stack": "at least one parent",
                "long_short": "exactly one parent (the long-term adapter)"}[policy]
        raise InvalidInput(f"policy {policy!r} needs {want}, got {len(items)}")
    if policy == "stack" and mode != "weights":
        raise InvalidInput("policy 'stack' trains on the parents' summed deltas, so its mode must be 'weights';"
                           " for an output ensemble use policy 'long_short' with mode='ensemble'")
    if policy in ("stack", "long_short"):
        check_combination([p.weight for p in items] + [float(new_weight)], mode)
    configs = [peft_wiring.source_config(p.source) for p in items]
    want_type = PEFT_TASK_TYPES[task.name]
    for parent, config in zip(items, configs, strict=True):
        got = getattr(config.task_type, "value", config.task_type)
        if got != want_type:
            raise InvalidInput(f"parent {parent.source} is a {got} adapter but task {task.name!r} needs {want_type}")
    if policy == "warm_start":
        inherited = LoraSettings.from_peft_config(configs[0])
        if settings is not None and not settings.same_shape(inherited):
            raise InvalidInput(
                f"warm_start keeps the parent's LoRA shape (r={inherited.r}, alpha={inherited.alpha},"
                f" targets={list(inherited.target_modules)}); got {settings.to_dict()}. Pass settings=None"
                " or use policy 'fresh' for a new shape"
            )
        settings = inherited if settings is None else settings
    return Plan(policy, items, settings or LoraSettings(), float(new_weight), mode, adapter_name)


def build(task_model: nn.Module, task: Task, p: Plan, seed: int) -> Any:
    """Attach the parents and the new adapter to ``task_model``; returns the PeftModel.

    The new adapter is the only trainable thing; the caller must seed the RNGs just before (LoRA
    A-matrices are drawn from the global torch RNG by peft).
    """
    from accelerate.utils import set_seed
    from peft import get_peft_model

    set_seed(seed)
    if p.policy == "warm_start":
        model = peft_wiring.attach(task_model, p.parents[0].source, p.adapter_name, trainable=True)
    else:
        model: Any = task_model
        for name, parent in zip(p.parent_names, p.parents, strict=True):
            model = peft_wiring.attach(model, parent.source, name, trainable=False)
        config = p.settings.to_peft_config(task.name)
        set_seed(seed)  # the new adapter's init must not depend on how many parents were loaded
        if model is task_model:
            model = get_peft_model(task_model, config, adapter_name=p.adapter_name)
        else:
            model.add_adapter(p.adapter_name, config)
        copy_from = p.parent_names[-1] if p.policy == "stack" else None
        task.init_head(model, p.adapter_name, seed, copy_from=copy_from)
    return model


__all__ = ["POLICIES", "ParentAdapter", "Plan", "build", "plan"]
