"""What the training loop needs from a task: batches, sizes, the loss and the metric.

Every dataset (real reader or offline generator) is exposed as a :class:`Task`.
The trainer, ``elm eval`` and ``elm predict`` only talk to this interface and
never name a task: a task with special needs overrides a hook —
:meth:`Task.loss_and_grad` (its loss), :meth:`Task.evaluate` (its evaluation
protocol and options), :meth:`Task.validation_metrics` (what selects the best
model during training) — and declares output heads for ``elm predict`` in its
registry entry (:class:`OutputHead`).
"""

import dataclasses
from typing import Iterator, Optional

import numpy as np

from elmcore.errors import ELMError

# Losses by name (elmcore.training.losses.LOSS_FUNCTIONS), what the default loss_and_grad uses:
#   "cross_entropy_last": target (B,) int64 class labels, read from Y[:, -1, :]
#   "cross_entropy_all":  target (B, T) int64 next tokens, every step (char-level language modelling)
#   "mse":                target (B, T, num_output) float, every step
#   "mse_last":           target (B, num_output) float, last step only
# A task with a loss of its own overrides loss_and_grad; its ``loss`` then only
# names it (NeuronIO: "neuronio", target (B, T, 2): spike 0/1 and prepared soma).
LOSSES = ("cross_entropy_last", "cross_entropy_all", "mse", "mse_last")
SPLITS = ("train", "valid", "test")
# What `elm data generate` writes beside a data set: its task, options and counts (``elm data info`` reads it).
MANIFEST = "elmcore_data.json"


@dataclasses.dataclass
class Batch:
    X: np.ndarray        # (B, T, num_input) float32 (or uint8 one-hot / spikes), in the model's input encoding
    target: np.ndarray   # see LOSSES


@dataclasses.dataclass(frozen=True)
class OutputHead:
    """A named transform of model outputs for ``elm predict --head NAME``, declared by a task's registry entry."""
    name: str
    summary: str
    function: tuple      # (module, attribute): f(Y (..., num_output)) -> array of the same leading shape
    min_outputs: int = 1  # outputs the model must have


class Task:
    """Base class; subclasses set the attributes and implement ``batches``."""

    name: str = ""
    num_input: int = 0
    num_output: int = 0
    loss: str = "cross_entropy_last"
    metric: str = "accuracy"          # "accuracy", "auc" (NeuronIO spike AUC), "mse" or "bpc" (bits per character)
    higher_is_better: bool = True
    # Units the logs and plots print beside the loss and the metric ("nats/char"), where they have one.
    loss_unit: Optional[str] = None
    metric_unit: Optional[str] = None
    # Character-level tasks: the elmcore.data.vocab.Vocabulary of the channels, stored with the model and the run.
    vocabulary = None
    # Whether batch row b of consecutive batches continues one stream (truncated BPTT): the trainer
    # then starts each batch from the state the previous one ended in, and resets it every epoch.
    stateful: bool = False

    def batches(self, split: str, batch_size: int, rng: Optional[np.random.Generator] = None,
                shuffle: bool = False) -> Iterator[Batch]:
        """Yield the batches of one epoch of ``split`` (the last one may be smaller).

        With ``shuffle`` and an ``rng`` the order (and, for window-sampling tasks,
        the windows) is drawn from ``rng`` only, so a run is reproducible from its seed.
        """
        raise NotImplementedError

    def num_examples(self, split: str) -> int:
        raise NotImplementedError

    def num_batches(self, split: str, batch_size: int) -> int:
        """Batches of ``batch_size`` in one epoch of ``split`` (a stateful task's differ from the examples' count)."""
        return -(-self.num_examples(split) // batch_size)

    def model_defaults(self) -> dict:
        """ELMConfig fields this task suggests (e.g. delta_t, memory_tau_max); num_input/num_output always."""
        return {"num_input": self.num_input, "num_output": self.num_output}

    # ---- hooks: what generic code asks a task instead of naming it ---------------

    def loss_and_grad(self, Y, target, **train_options):
        """``(loss, dY)`` of model outputs Y (B, T, num_output) against a batch's ``target``.

        ``train_options`` are the run's settings a task's loss may take (the trainer
        passes ``burn_in``); the default, ``elmcore.training.losses.LOSS_FUNCTIONS[self.loss]``,
        takes none and ignores them.
        """
        from elmcore.training.losses import LOSS_FUNCTIONS
        if self.loss not in LOSS_FUNCTIONS:
            raise ELMError(f"task '{self.name}' names the loss {self.loss!r}, which elmcore.training.losses does not "
                           f"define ({', '.join(LOSS_FUNCTIONS)}); a task with its own loss overrides "
                           "loss_and_grad")
        return LOSS_FUNCTIONS[self.loss](Y, target)

    def evaluate(self, model, split, batch_size=64, max_batches=None, comm=None, **options) -> dict:
        """Metrics of ``model`` on ``split``: ``loss``, ``examples`` and ``self.metric`` at least.

        The default runs :meth:`batches` through the model (at most ``max_batches``
        batches) and takes no other options; a task with an evaluation protocol of
        its own overrides this and names the options it takes (``elm eval`` passes
        those the user gives). Under data-parallel training ``comm`` (``elmcore.training.distributed``)
        shares the batches out over the ranks; a task may ignore it and evaluate whole.
        """
        if options:
            raise ELMError(f"task '{self.name}' takes no evaluation option(s) {', '.join(sorted(options))}")
        from elmcore.training.evaluate import evaluate_batches
        return evaluate_batches(model, self, split, batch_size, max_batches, comm=comm)

    def validation_metrics(self, model, split, batch_size=64, max_batches=None, comm=None) -> dict:
        """What the trainer selects the best model on after each epoch (default: :meth:`evaluate`)."""
        return self.evaluate(model, split, batch_size, max_batches=max_batches, comm=comm)

    def reference_levels(self) -> dict:
        """{label: value} of the metric that logs print and plots draw beside it (a text's unigram entropy, say)."""
        return {}

    def run_info(self) -> dict:
        """What a run records about its data beside its settings (run.json "task_info"): the vocabulary,
        the units and the reference levels, where the task has them."""
        info = {}
        if self.vocabulary is not None:
            info["vocab"] = self.vocabulary.to_list()
        if self.loss_unit:
            info["loss_unit"] = self.loss_unit
        if self.metric_unit:
            info["metric_unit"] = self.metric_unit
        levels = self.reference_levels()
        if levels:
            info["references"] = {label: float(value) for label, value in levels.items()}
        return info

    # Milliseconds per input step where the data has a clock (NeuronIO: 1, SHD: its bin), else None.
    step_ms = None

    def preview_figure(self, plt, split):
        """A matplotlib figure of one example of ``split`` that shows what its inputs mean, or None.

        ``elm data info --preview`` draws the generic view (values over time, the target
        in the title) for a task that returns None.
        """
        return None

    def reference_level(self, split) -> Optional[dict]:
        """A score on ``split`` that learning must beat, ``{"value", "label"}`` for ``elm plot``, or None.

        Accuracy and AUC have theirs from the model (1 / classes, 0.5); a task whose metric has
        another names it (the adding problem's MSE of always answering the mean, a text's
        unigram entropy).
        """
        return None

    def count_unit(self, split) -> str:
        """What :meth:`num_examples` counts in ``split``, for ``elm data info`` (e.g. "windows of 256 bytes")."""
        return "examples"

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

    def reference_level(self, split):
        """For an MSE metric: the MSE on ``split`` of always answering the mean training target."""
        if self.metric != "mse" or not self.num_examples(split) or not self.num_examples("train"):
            return None
        train, target = np.asarray(self.splits["train"][1], np.float64), np.asarray(self.splits[split][1], np.float64)
        mean = train.mean(axis=tuple(range(train.ndim - 1))) if train.ndim > 1 else train.mean()
        return {"value": float(np.mean((target - mean) ** 2)), "label": "always answering the mean"}
