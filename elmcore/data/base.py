"""What the training loop needs from a task: batches, sizes, the loss and the metric.

Every dataset (real reader or offline generator) is exposed as a :class:`Task`.
The trainer and ``elm eval`` only talk to this interface.
"""

import dataclasses
from typing import Iterator, Optional

import numpy as np

# Losses the trainer knows (elmcore.losses):
#   "cross_entropy_last": target (B,) int64 class labels, read from Y[:, -1, :]
#   "cross_entropy_all":  target (B, T) int64 next tokens, every step (char-level language modelling)
#   "neuronio":           target (B, T, 2) float: [:, :, 0] spike 0/1, [:, :, 1] soma (capped, −bias, ×0.1)
#   "mse":                target (B, T, num_output) float, every step
#   "mse_last":           target (B, num_output) float, last step only
LOSSES = ("cross_entropy_last", "cross_entropy_all", "neuronio", "mse", "mse_last")
SPLITS = ("train", "valid", "test")


@dataclasses.dataclass
class Batch:
    X: np.ndarray        # (B, T, num_input) float32 (or uint8 one-hot / spikes), in the model's input encoding
    target: np.ndarray   # see LOSSES


class Task:
    """Base class; subclasses set the attributes and implement ``batches``."""

    name: str = ""
    num_input: int = 0
    num_output: int = 0
    loss: str = "cross_entropy_last"
    metric: str = "accuracy"          # "accuracy", "auc" (NeuronIO spike AUC), "mse" or "bpc" (bits per character)
    higher_is_better: bool = True

    def batches(self, split: str, batch_size: int, rng: Optional[np.random.Generator] = None,
                shuffle: bool = False) -> Iterator[Batch]:
        """Yield the batches of one epoch of ``split`` (the last one may be smaller).

        With ``shuffle`` and an ``rng`` the order (and, for window-sampling tasks,
        the windows) is drawn from ``rng`` only, so a run is reproducible from its seed.
        """
        raise NotImplementedError

    def num_examples(self, split: str) -> int:
        raise NotImplementedError

    def model_defaults(self) -> dict:
        """ELMConfig fields this task suggests (e.g. delta_t, memory_tau_max); num_input/num_output always."""
        return {"num_input": self.num_input, "num_output": self.num_output}

    def describe(self) -> dict:
        """Counts, lengths and class balance for ``elm data info``."""
        return {"task": self.name, "num_input": self.num_input, "num_output": self.num_output,
                **{f"n_{s}": self.num_examples(s) for s in SPLITS}}


class ArrayTask(Task):
    """A task whose splits are in-memory arrays {split: (X, target)}."""

    def __init__(self, name, splits, num_output, loss="cross_entropy_last", metric="accuracy",
                 higher_is_better=True, defaults=None):
        self.name = name
        self.splits = splits
        any_x = next(iter(splits.values()))[0]
        self.num_input = int(any_x.shape[2])
        self.num_output = int(num_output)
        self.loss, self.metric, self.higher_is_better = loss, metric, higher_is_better
        self._defaults = dict(defaults or {})

    def num_examples(self, split):
        return 0 if split not in self.splits else int(len(self.splits[split][0]))

    def batches(self, split, batch_size, rng=None, shuffle=False):
        if split not in self.splits:
            return
        X, y = self.splits[split]
        order = np.arange(len(X))
        if shuffle and rng is not None:
            rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            sel = order[start:start + batch_size]
            yield Batch(np.ascontiguousarray(X[sel], dtype=np.float32), y[sel])

    def model_defaults(self):
        return {**super().model_defaults(), **self._defaults}
