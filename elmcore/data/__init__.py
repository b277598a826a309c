"""Tasks and datasets: readers of the published formats and offline generators (see ``registry``)."""

from .base import ArrayTask, Batch, OutputHead, Task
from .registry import TASKS, generate, get_task

__all__ = ["Task", "ArrayTask", "Batch", "OutputHead", "TASKS", "get_task", "generate"]
