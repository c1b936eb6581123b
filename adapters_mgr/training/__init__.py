"""Training core: task recipes, LoRA settings, update policies, the trainer, scoring and metrics.

Catalog-independent: everything here works on in-memory models, examples and PEFT folders; the
manager decides what to train on and registers what comes out.
"""

from adapters_mgr.training.adapters import AdapterSource, InMemoryAdapter, release
from adapters_mgr.training.lora import LoraSettings
from adapters_mgr.training.policies import POLICIES, ParentAdapter
from adapters_mgr.training.scoring import MODES, ScoringModel, evaluate_adapters
from adapters_mgr.training.tasks import RankerTask, RetrieverTask, Task, get_task, task_names
from adapters_mgr.training.trainer import TrainResult, train_adapter

__all__ = [
    "MODES",
    "POLICIES",
    "AdapterSource",
    "InMemoryAdapter",
    "LoraSettings",
    "ParentAdapter",
    "RankerTask",
    "RetrieverTask",
    "ScoringModel",
    "Task",
    "TrainResult",
    "evaluate_adapters",
    "get_task",
    "release",
    "task_names",
    "train_adapter",
]
