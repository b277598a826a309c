"""Tasks and datasets: readers of the published formats and offline generators (see ``registry``)."""

from elmcore.data.base import ArrayTask, Batch, OutputHead, Task
from elmcore.data.registry import TASKS, generate, get_task

__all__ = ["Task", "ArrayTask", "Batch", "OutputHead", "TASKS", "get_task", "generate"]
