"""Built-in task recipes: ``ranker`` (cross-encoder) and ``retriever`` (two-tower)."""

from adapters_mgr.lora.tasks.base import Task, get_task, register_task, task_names
from adapters_mgr.lora.tasks.ranker import RankerTask
from adapters_mgr.lora.tasks.retriever import RetrieverTask

__all__ = ["RankerTask", "RetrieverTask", "Task", "get_task", "register_task", "task_names"]
