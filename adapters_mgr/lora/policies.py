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

Each policy is a ``Policy`` record (``get_policy(name)``): what it needs and makes as data, and its
rules checked in one place (``Policy.check``), by ``plan`` here and by the update workflow with the
catalog's facts, so every caller refuses the same things with the same messages.
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
from adapters_mgr.lora.peft_scoring import MODES, check_combination
from adapters_mgr.lora.quiet import known_warnings_silenced
from adapters_mgr.lora.settings import LoraSettings
from adapters_mgr.lora.tasks import Task


@dataclass(frozen=True)
class Policy:
    """An update policy's rules as data; the planner, trainer and workflows read these fields instead
    of testing the policy's name."""

    name: str
    needs_parent: bool
    """fresh: False (trains on the bare base); every other policy builds on a parent."""
    single_parent: bool
    """warm_start, long_short: exactly one plain adapter as parent (not a stack node)."""
    makes_stack_node: bool
    """stack, long_short: the node to serve is the parents plus the new adapter."""
    relation: str | None
    """Lineage edge from the trained adapter to its parent: 'warm_start', 'stacked_on' or None."""
    trains_on_parents: bool
    """stack: the parents are active (frozen) while the new adapter trains."""
    inherits_shape: bool
    """warm_start: the new adapter keeps the parent's LoRA shape."""
    parent_role: str = ""
    """What the parent is, for messages (long_short: 'the long-term adapter')."""

    def check(self, *, parents: int | None = None, mode: str, parent_is_stack: bool = False,
              parent_label: str = "") -> None:
        """Every rule of the policy, from facts only (no model, no file): ``parents`` is how many
        parents were given (None: not known yet, only the mode is checked), ``mode`` the serving
        combination, ``parent_is_stack`` whether the (single) parent is a stack node, named in the
        message by ``parent_label`` (used as is, e.g. ``repr`` of the user's reference)."""
        name = repr(self.name)
        if parents is not None:
            want = "exactly one parent" if self.single_parent else "at least one parent"
            if self.parent_role:
                want += f" ({self.parent_role})"
            if not self.needs_parent and parents:
                builders = ", ".join(repr(p.name) for p in _POLICIES.values() if p.needs_parent)
                raise InvalidInput(
                    f"policy {name} trains on the bare base and takes no parent, got {parents}: it needs no"
                    f" parent, so drop it (or use a policy that builds on one: {builders})"
                )
            if self.needs_parent and not parents:
                raise InvalidInput(f"policy {name} needs a parent, got none: it needs {want}")
            if self.single_parent and parents != 1:
                raise InvalidInput(f"policy {name} needs {want}, got {parents}")
            if self.single_parent and parent_is_stack:
                raise InvalidInput(
                    f"policy {name} needs a single adapter as parent; {parent_label or 'the parent'} is a stack"
                    " node (use policy 'stack', or name one of its members)"
                )
        if mode not in MODES:
            raise InvalidInput(f"unknown combination mode {mode!r}: use {' or '.join(map(repr, MODES))}")
        if self.trains_on_parents and mode != "weights":
            raise InvalidInput(
                f"policy {name} needs mode='weights', got {mode!r}: it trains on top of the parents' summed"
                " deltas, so its mode must be 'weights'; for an output ensemble use policy 'long_short' with"
                " mode='ensemble'"
            )


_POLICIES = {
    p.name: p
    for p in (
        Policy("fresh", needs_parent=False, single_parent=False, makes_stack_node=False, relation=None,
               trains_on_parents=False, inherits_shape=False),
        Policy("warm_start", needs_parent=True, single_parent=True, makes_stack_node=False, relation="warm_start",
               trains_on_parents=False, inherits_shape=True),
        Policy("stack", needs_parent=True, single_parent=False, makes_stack_node=True, relation="stacked_on",
               trains_on_parents=True, inherits_shape=False),
        Policy("long_short", needs_parent=True, single_parent=True, makes_stack_node=True, relation=None,
               trains_on_parents=False, inherits_shape=False, parent_role="the long-term adapter"),
    )
}
POLICIES: tuple[str, ...] = tuple(_POLICIES)


def get_policy(name: str | Policy) -> Policy:
    """The ``Policy`` called ``name`` (a ``Policy`` passes through); ``InvalidInput`` for any other name."""
    if isinstance(name, Policy):
        return name
    if not isinstance(name, str) or name not in _POLICIES:
        raise InvalidInput(f"unknown policy {name!r}; choose one of {list(POLICIES)}")
    return _POLICIES[name]


@dataclass(frozen=True)
class ParentAdapter:
    """A parent adapter: a PEFT folder or an in-memory adapter, and its weight in the combination."""

    source: AdapterSource
    weight: float = 1.0


@dataclass(frozen=True)
class Plan:
    """Everything decided (and validated) before any model work."""

    policy: Policy
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
        if not self.policy.makes_stack_node:
            return [self.adapter_name]
        return [*self.parent_names, self.adapter_name]

    @property
    def node_weights(self) -> list[float]:
        if not self.policy.makes_stack_node:
            return [1.0]
        return [p.weight for p in self.parents] + [self.new_weight]

    @property
    def training_names(self) -> list[str]:
        """Adapters active while the new one trains (only ``stack`` trains on top of parents)."""
        return self.node_names if self.policy.trains_on_parents else [self.adapter_name]

    @property
    def training_weights(self) -> list[float]:
        return self.node_weights if self.policy.trains_on_parents else [1.0]


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
    policy: str | Policy,
    parents: Sequence[Any],
    settings: LoraSettings | None,
    new_weight: float,
    mode: str,
    adapter_name: str,
) -> Plan:
    """Validate the policy's arguments (parents readable, same task type, shapes) before any work."""
    rules = get_policy(policy)
    if not adapter_name or adapter_name.startswith("parent_") or "." in adapter_name:
        raise InvalidInput(f"adapter name {adapter_name!r} is not allowed (empty, dotted, or 'parent_*')")
    items = tuple(_as_parent(p) for p in parents)
    rules.check(parents=len(items), mode=mode)
    if rules.makes_stack_node:
        check_combination([p.weight for p in items] + [float(new_weight)], mode)
    configs = [peft_wiring.source_config(p.source) for p in items]
    want_type = task.peft_task_type
    for parent, config in zip(items, configs, strict=True):
        got = getattr(config.task_type, "value", config.task_type)
        if got != want_type:
            raise InvalidInput(f"parent {parent.source} is a {got} adapter but task {task.name!r} needs {want_type}")
    if rules.makes_stack_node:  # the node folds every member: each must touch the same modules and layers
        mine = settings or LoraSettings()
        for parent, config in zip(items, configs, strict=True):
            theirs = LoraSettings.from_peft_config(config)
            if not theirs.same_placement(mine):
                raise InvalidInput(
                    f"a stack combines adapters on the same LoRA modules and layers: parent {parent.source} has "
                    f"{list(theirs.target_modules)} on {_layers(theirs)}, the new adapter "
                    f"{list(mine.target_modules)} on {_layers(mine)}; train it with the parent's (e.g. top_layers)")
    if rules.inherits_shape:
        inherited = LoraSettings.from_peft_config(configs[0])
        if settings is not None and not settings.same_shape(inherited):
            raise InvalidInput(
                f"warm_start keeps the parent's LoRA shape (r={inherited.r}, alpha={inherited.alpha},"
                f" targets={list(inherited.target_modules)}); got {settings.to_dict()}. Pass settings=None"
                " or use policy 'fresh' for a new shape"
            )
        settings = inherited if settings is None else settings
    return Plan(rules, items, settings or LoraSettings(), float(new_weight), mode, adapter_name)


def _layers(settings: LoraSettings) -> str:
    return "every layer" if settings.layers is None else f"layers {list(settings.layers)}"


@known_warnings_silenced()  # get_peft_model trips a transformers deprecation (see lora/quiet.py)
def build(task_model: nn.Module, task: Task, p: Plan, seed: int) -> Any:
    """Attach the parents and the new adapter to ``task_model``; returns the PeftModel.

    The new adapter is the only trainable thing; the caller must seed the RNGs just before (LoRA
    A-matrices are drawn from the global torch RNG by peft).
    """
    from accelerate.utils import set_seed
    from peft import get_peft_model

    set_seed(seed)
    if p.policy.inherits_shape:
        model = peft_wiring.attach(task_model, p.parents[0].source, p.adapter_name, trainable=True)
    else:
        model: Any = task_model
        for name, parent in zip(p.parent_names, p.parents, strict=True):
            model = peft_wiring.attach(model, parent.source, name, trainable=False)
        config = p.settings.to_peft_config(task.name, task.peft_task_type)
        set_seed(seed)  # the new adapter's init must not depend on how many parents were loaded
        if model is task_model:
            model = get_peft_model(task_model, config, adapter_name=p.adapter_name)
        else:
            model.add_adapter(p.adapter_name, config)
        copy_from = p.parent_names[-1] if p.policy.trains_on_parents else None
        task.init_head(model, p.adapter_name, seed, copy_from=copy_from)
    return model


__all__ = ["POLICIES", "ParentAdapter", "Plan", "Policy", "build", "get_policy", "plan"]
