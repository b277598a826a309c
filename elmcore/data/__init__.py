"""Tasks and datasets: readers of the published formats and offline generators (see ``registry``)."""

from .base import ArrayTask, Batch, Task
from .registry import TASKS, generate, get_task

__all__ = ["Task", "ArrayTask", "Batch", "TASKS", "get_task", "generate"]
