"""Training core: task recipes, LoRA settings, update policies, the trainer, scoring and metrics.

Catalog-independent: everything here works on in-memory models, examples and PEFT folders; the
manager decides what to train on and registers what comes out.

Heads (ranker only; the retriever has none):
- every ranker adapter saves its own trained classification head (peft ``modules_to_save``);
- ``fresh``: the head is drawn from ``seed`` (not copied from the base's per-process random head);
  ``warm_start``: copied from the parent; ``stack``: starts from the newest parent's head;
- ``weights`` mode (stack / long_short): deltas summed, the NEWEST adapter's head is used;
- ``ensemble`` mode: each adapter runs with its own head, P(like) averaged with weights;
- merges must take the newest source's head, so a ``cat`` merge equals the ``weights`` stack.

Typical use::

    result = train_adapter(base, tokenizer, "ranker", rows, policy="stack", parents=[(folder, 1.0)])
    result.save(tmp_dir)          # only the new adapter; the manager registers it
    result.release()              # detach peft layers before the next training on this base
"""

from adapters_mgr.lora.adapters import AdapterSource, InMemoryAdapter, release
from adapters_mgr.lora.peft_scoring import MODES, ScoringModel, evaluate_adapters
from adapters_mgr.lora.policies import POLICIES, ParentAdapter
from adapters_mgr.lora.replay import replay_mix
from adapters_mgr.lora.settings import LoraSettings
from adapters_mgr.lora.tasks import RankerTask, RetrieverTask, Task, get_task, task_names
from adapters_mgr.lora.trainer import TrainResult, train_adapter

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
    "replay_mix",
    "task_names",
    "train_adapter",
]
