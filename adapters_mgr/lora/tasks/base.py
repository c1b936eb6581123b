"""What a task recipe must provide, so the trainer and the scorer stay task-agnostic.

A recipe knows: which view of the shared base it trains (a sequence classifier or the bare
encoder), how to turn examples into tokenised batches, its loss, how one adapter (or one weighted
sum of adapters) produces outputs, and how to evaluate a scorer on held-out data. Policies, seeds,
devices and stacking live in the trainer and the scorer, not here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from adapters_mgr.errors import InvalidInput
from adapters_mgr.lora.base_model import HeadSpec
from adapters_mgr.lora.examples import Interactions
from adapters_mgr.lora.settings import PEFT_TASK_TYPES

if TYPE_CHECKING:
    from adapters_mgr.lora.peft_scoring import ScoringModel


class Task(ABC):
    """A built-in recipe (ranker or retriever)."""

    name: ClassVar[str]
    primary_metric: ClassVar[str]
    """The metric promotion gates compare (higher is better)."""

    @property
    @abstractmethod
    def head(self) -> HeadSpec:
        """The head the shared base must be loaded with for this task (``load_base_model(source, task.head)``)."""

    @property
    def peft_task_type(self) -> str:
        """The peft ``task_type`` of this recipe's folders (SEQ_CLS keeps a head in the folder)."""
        return PEFT_TASK_TYPES[self.name]

    @abstractmethod
    def task_model(self, base: nn.Module) -> nn.Module:
        """The module of the shared base this task attaches its LoRA to (a view, never a copy)."""

    @abstractmethod
    def parse_train(self, examples: Any) -> Interactions:
        """Validate and normalise training examples; raises InvalidInput before any model work."""

    @abstractmethod
    def parse_eval(self, examples: Any) -> Any:
        """Validate and normalise evaluation examples."""

    @abstractmethod
    def collate(self, data: Interactions, tokenizer: Any, max_length: int) -> Callable[[list[int]], dict[str, Any]]:
        """A DataLoader ``collate_fn`` over row indices of ``data`` producing tensors."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Training loss of one batch (``model`` may be wrapped by accelerate/DDP)."""

    @abstractmethod
    def evaluate(self, scorer: ScoringModel, eval_set: Any) -> dict[str, float]:
        """Task metrics of ``scorer`` on a parsed eval set."""

    def init_head(self, model: nn.Module, adapter_name: str, seed: int, copy_from: str | None = None) -> None:  # noqa: B027
        """Initialise the new adapter's own head copy, if the task has one (default: no head)."""

    def scalars(self) -> list[nn.Parameter]:
        """Learned numbers the task keeps outside the PEFT folder (trained alongside the LoRA, with
        their own learning rate ``scalar_lr``); recorded in the catalog by :meth:`learned`. Default: none."""
        return []

    scalar_lr: float = 0.0

    def learned(self) -> dict[str, Any]:
        """What training learned outside the folder, as hyperparams to record with the adapter."""
        return {}


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    _REGISTRY[name] = factory


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(task: str | Task, **options: Any) -> Task:
    """Resolve a task name ('ranker', 'retriever') or pass a Task instance through."""
    if isinstance(task, Task):
        return task
    if task not in _REGISTRY:
        raise InvalidInput(f"unknown task {task!r}; choose one of {task_names()}")
    return _REGISTRY[task](**options)
