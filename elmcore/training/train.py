"""The training loop: epochs × batches, validation, best-model selection, checkpoints, resume.

A run directory holds:
  run.json        the settings of the run (so ``--resume`` needs nothing else), and under
                  "task_info" what the run found in its data (``Task.run_info``: a character
                  model's vocabulary, units, reference levels such as the unigram entropy)
  last.npz        the latest checkpoint (parameters, optimiser, RNG state, position)
  best.npz        the model with the best validation metric so far
  metrics.jsonl   one JSON record per step ("step") and per epoch ("epoch"); an epoch record
                  names the split its metrics were measured on ("split": "valid"). Epochs are
                  numbered from 1, as on the console (logs written before numbered them from 0:
                  ``runlog.epochs_from_one`` reads both)
  summary.json    final figures, written when the run ends
  train.log       the run's console lines (appended to by every resume)

The model is selected on the task's validation split. A task without one gets one
carved from its training examples when they are in memory (deterministic from the
seed); otherwise the run says, in its log and records, that it selects on "train".
The test split is never used for selection.

Determinism: every random draw comes from generators seeded by (seed, epoch):
the data order and windows from one, input dropout from another whose state is
saved in each checkpoint (on a GPU it draws one seed per step, and the mask is
drawn on the device from it: ``input_keep_mask``). A resumed run therefore replays
the interrupted epoch's batches, skips those already trained on, and ends
bit-identical (on the CPU) to a run that was never interrupted.

Stateful tasks (``Task.stateful``, truncated BPTT): each batch starts from the model
state the previous batch of the epoch ended in (a constant: no gradient crosses it),
and every epoch starts from the zero state. A checkpoint taken mid-epoch holds that
state, so a resumed run goes on from it.

One trainer at a time: a run holds an exclusive lock on ``RUN/.lock`` while it
runs, and a second trainer on the same directory is refused; the file is removed
when the run ends. Default run
directories are created exclusively, so runs started in the same second get
different names.

Divergence: training stops (and records why in metrics.jsonl) when the loss,
an output or a gradient is not finite, or when the loss exceeds
``DIVERGENCE_FACTOR`` times the loss of the run's first step. The untrained
model's loss is where descent started; a loss that many times higher means the
optimiser is no longer descending but has thrown away everything it learned and
more (an Adam step of size lr moves every weight by about lr, so a too-large
lr sends the outputs, and the loss with their square, up by orders of magnitude
at once, while a finite loss can still be far beyond anything meaningful, e.g.
an MSE of 2e40 in float64). Ordinary noise, even at a learning rate that is
merely too high, stays well within a factor of 1000.
"""

import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys
import time
import typing
from typing import Optional

import numpy as np

from elmcore.training.checkpoint import load_file, save_checkpoint, save_model
from elmcore.neuron.config import ELMConfig
from elmcore.engine.fields import NETWORK_VERSION, SINGLE_NEURON_ONLY_FIELDS
from elmcore.engine.backend import host_scalars
from elmcore.engine.memory import check_memory
from elmcore.data.base import ArrayTask
from elmcore.data.registry import DEFAULT_TASK
from elmcore.training.distributed import announce_run_dir, communicator, mark_collective
from elmcore.errors import CheckpointError, ELMError, NonFiniteOutputError, did_you_mean
from elmcore.training.evaluate import evaluate, metric_value
from elmcore.storage.fileio import (atomic_write_text, describe_os_error, interrupts_deferred, read_json,
                                    refuse_inputs, remove_stale_temporaries, write_error)
from elmcore.engine.factory import build_model
from elmcore.engine.fields import shown
from elmcore.training.optim import Optimizer, cosine_lr, norm_from_squares, squared_norms
from elmcore.training.runlog import epochs_from_one, finite_or_none, read_records
from elmcore.training.warmup import warm_up

RUN_FILE = "run.json"
LAST = "last.npz"
BEST = "best.npz"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOCK = ".lock"
TRAIN_LOG = "train.log"
RUN_FILES = (RUN_FILE, LAST, BEST, METRICS, SUMMARY)
# The run.json entry that records the data (Task.run_info), not a setting.
TASK_INFO = "task_info"

# Stop when the loss exceeds this many times the loss of the run's first step (see the module docstring).
DIVERGENCE_FACTOR = 1e3

# Share of the training examples held out for model selection when a task has no validation split.
CARVED_VALID_FRACTION = 0.1
# Without a progress bar (stderr not a terminal), one line every this many batches.
LOG_EVERY_BATCHES = 100


class TrainingDiverged(ELMError):
    """The loss, an output or a gradient became non-finite, or the loss exploded; the last good checkpoint is kept."""


class RunDirectoryBusy(ELMError):
    """Another trainer holds this run directory's lock."""


class RunFinished(ELMError):
    """``--resume`` of a run that has trained all its epochs: there is nothing to continue."""


# Integer settings are counts, sizes and seeds: beyond a 64-bit integer none has a meaning.
MAX_SETTING_INT = 2 ** 63 - 1
# Settings whose values are names from a fixed list.
SETTING_CHOICES = {"optimizer": ("adam", "adamw", "adamax"), "dtype": ("float32", "float64"),
                   "device": ("cpu", "cuda", "auto")}


@dataclasses.dataclass
class TrainSettings:
    task: str = DEFAULT_TASK
    data_dir: Optional[str] = None
    task_options: dict = dataclasses.field(default_factory=dict)
    model: dict = dataclasses.field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 32
    batches_per_epoch: Optional[int] = None
    optimizer: str = "adam"
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    # Epochs after which a new cosine cycle starts from lr (what `elm train --resume RUN --extend` records).
    lr_restarts: list = dataclasses.field(default_factory=list)
    weight_decay: float = 0.0
    clip_norm: Optional[float] = 1.0
    input_dropout: float = 0.0
    burn_in: int = 0
    eval_batch_size: int = 64
    valid_max_batches: Optional[int] = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    checkpoint_every: int = 50
    run_dir: Optional[str] = None
    # Steps per recomputation segment of the backward (docs/architecture.md, "Long sequences in
    # bounded memory"); None: recompute only when a batch's whole cache would not fit in memory.
    recompute_segment: Optional[int] = None

    def validate(self):
        """Check every setting's type (from its annotation) and range; errors name the setting."""
        for field in dataclasses.fields(self):
            _check_setting_type(field.name, getattr(self, field.name), field.type)
        clash = sorted(set(self.task_options) & {"name", "data_dir", "seed"})
        if clash:
            raise ELMError(f"task_options may not set {', '.join(clash)}: they are run settings of their own")
        for name, choices in SETTING_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ELMError(f"training setting '{name}' must be one of {', '.join(choices)}, "
                               f"got {getattr(self, name)!r}")
        checks = [("epochs", self.epochs >= 1), ("batch_size", self.batch_size >= 1),
                  ("lr", self.lr > 0), ("min_lr", 0 <= self.min_lr <= self.lr),
                  ("input_dropout", 0 <= self.input_dropout < 1), ("burn_in", self.burn_in >= 0),
                  ("checkpoint_every", self.checkpoint_every >= 1), ("warmup_steps", self.warmup_steps >= 0),
                  ("eval_batch_size", self.eval_batch_size >= 1), ("seed", self.seed >= 0),
                  ("weight_decay", self.weight_decay >= 0)]
        for name, minimum in (("batches_per_epoch", 1), ("valid_max_batches", 1), ("recompute_segment", 1)):
            if getattr(self, name) is not None:
                checks.append((name, getattr(self, name) >= minimum))
        if self.clip_norm is not None:
            checks.append(("clip_norm", self.clip_norm > 0))
        bounds = [0, *self.lr_restarts, self.epochs]
        checks.append(("lr_restarts", all(a < b for a, b in zip(bounds, bounds[1:]))))
        for name, ok in checks:
            if not ok:
                raise ELMError(f"training setting '{name}' has an impossible value: {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d, source=None):
        """Settings from a parsed run config (or run.json); every type and range is checked here."""
        where = f" ({source})" if source else ""
        if not isinstance(d, dict):
            raise ELMError(f"run settings{where} must be a JSON object / TOML table, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ELMError(f"unknown training setting(s){where}: {', '.join(map(str, unknown))}"
                           f"{did_you_mean(unknown[0], known)} (known: {', '.join(sorted(known))})")
        settings = cls(**d)
        try:
            settings.validate()
        except ELMError as e:
            raise ELMError(f"{e}{where}") from None
        return settings


def _check_setting_type(name, value, annotation):
    """``value`` fits ``annotation`` (int, float, str, dict, or Optional of one); JSON's true is no integer."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if value is None:
        if optional:
            return
        raise ELMError(f"training setting '{name}' may not be null")
    if base is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_SETTING_INT
        wanted = f"an integer of at most {MAX_SETTING_INT}"
    elif base is float:
        # A Python int past the float range must not reach math.isfinite (which would overflow).
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max
        wanted = "a finite number"
    elif base is str:
        ok, wanted = isinstance(value, str) and "\0" not in value, "a string (without NUL characters)"
    elif base is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        wanted = "a table of KEY = VALUE"
    elif base is list:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        wanted = "a list of integers"
    else:
        return
    if not ok:
        raise ELMError(f"training setting '{name}' must be {wanted}{' or null' if optional else ''}, "
                       f"got {type(value).__name__} {shown(value)}")


def resolve_settings(overrides: dict, source=None) -> TrainSettings:
    """The named task's default run for the family ``overrides`` ask for, with ``overrides`` on top.

    ``overrides`` are a run file's settings updated with command-line flags; its
    ``model`` and ``task_options`` are merged field by field into the default
    run's, so ``--set num_memory=8`` keeps the default run's other model fields.
    Bare ``elm train`` and ``elm train --task adding`` are therefore one experiment.
    One resolution for every caller: ``elmcore.training.resolve``.
    """
    from elmcore.training.resolve import resolve_layers
    return resolve_layers([(source or "settings", overrides)], source=source).settings


def run_model_config(task, model_settings):
    """The model config a run builds: the task's suggestions (``Task.model_defaults``), then the run's fields.

    A network takes no single-neuron field (routing, tau_s, w_s) from the task's suggestions.
    """
    suggested = task.model_defaults()
    if model_settings.get("version") == NETWORK_VERSION:
        suggested = {k: v for k, v in suggested.items() if k not in SINGLE_NEURON_ONLY_FIELDS}
    d = {**suggested, **model_settings}
    for key in ("num_input", "num_output"):
        if d[key] != getattr(task, key):
            raise ELMError(f"model {key} = {d[key]!r} does not match task '{task.name}' "
                           f"({getattr(task, key)})")
    return ELMConfig.from_dict(d)


def scheduled_lr(settings, step, per_epoch):
    """The learning rate of ``step`` (0-based): a cosine cycle from ``lr`` (after the warm-up) down to
    ``min_lr`` over the run's epochs, and, for each epoch E of ``lr_restarts``, a new cycle from ``lr``
    (no warm-up) over the epochs from E up to the next restart or the end."""
    bounds = [0, *settings.lr_restarts, settings.epochs]
    for start, stop in zip(bounds, bounds[1:]):
        if step < stop * per_epoch or stop == settings.epochs:
            return cosine_lr(step - start * per_epoch, (stop - start) * per_epoch, settings.lr, settings.min_lr,
                             settings.warmup_steps if start == 0 else 0)


def describe_extension(settings, from_epoch):
    """What ``--extend`` does to the learning rate, in words (printed and kept in train.log)."""
    return (f"a new cosine cycle of the learning rate from {settings.lr:g} (the run's lr) down to "
            f"{settings.min_lr:g} (its min_lr) over epochs {from_epoch + 1}-{settings.epochs}, the optimiser "
            f"state kept; run.json records it as lr_restarts {settings.lr_restarts}")


def _quiet(message):
    pass


def data_inputs(task, data_dir):
    """The data files a run of ``task`` on ``data_dir`` reads (none where either is not valid yet:
    the settings check reports that), so that nothing the run writes lands on them."""
    from elmcore.data.registry import data_files
    try:
        return data_files(DEFAULT_TASK if task is None else task, data_dir)
    except (ELMError, TypeError, ValueError, OSError):
        return []


def carve_validation(task, fraction, seed):
    """Move ``fraction`` of an in-memory task's training examples into a new "valid" split.

    The held-out examples are drawn from ``default_rng([seed, 2])`` (the data order uses
    ``[seed, epoch]``), so a resumed run holds out the same ones. Returns how many, or 0
    when the task already has a validation split or keeps its examples out of memory.
    """
    if task.num_examples("valid") or not isinstance(task, ArrayTask) or "train" not in task.splits:
        return 0
    X, target = task.splits["train"]
    n_valid = int(round(fraction * len(X)))
    if n_valid < 1 or n_valid >= len(X):
        return 0
    order = np.random.default_rng([seed, 2]).permutation(len(X))
    held, kept = np.sort(order[:n_valid]), np.sort(order[n_valid:])
    task.splits = {**task.splits, "train": (X[kept], target[kept]), "valid": (X[held], target[held])}
    return n_valid


def input_keep_mask(backend, rng, shape, rate):
    """Which inputs of a training batch of ``shape`` input dropout keeps (True), each dropped with probability
    ``rate``, on the model's device.

    On the CPU the mask is ``rng.random(shape) >= rate``, as it always was. On a GPU it is drawn there
    (``backend.random_uniform``) from one seed drawn from ``rng``, so that no mask crosses the bus and
    ``rng``'s state, which checkpoints keep, still decides every mask of a resumed run.
    """
    if backend.xp is np:
        return rng.random(shape) >= rate
    return backend.random_uniform(int(rng.integers(2 ** 63)), shape) >= rate


class Trainer:
    """Runs (or resumes) one training run in ``settings.run_dir``.

    ``progress``: "bar" (a tqdm bar on stderr), "lines" (a ``log`` line every
    ``log_every`` batches), "none", or "auto"/True (a bar when stderr is a
    terminal, lines otherwise, so a log file holds no carriage-return redraws);
    False is "none". Epoch lines and the final lines go to ``log`` in every mode.
    """

    def __init__(self, settings: TrainSettings, task=None, progress="auto", log=print, log_every=None, inputs=(),
                 sources_line=None):
        """``inputs``: files the caller read the settings from; the run may not write over them.
        ``sources_line``: where each setting came from (``elmcore.training.resolve.describe_sources``),
        logged just before the start-up line, once the run directory has been accepted."""
        settings.validate()
        self.comm = communicator(settings.device)
        progress, log = self.comm.output_on_root(progress, log)
        # Console lines go to train.log too, once the run directory is open (those before it wait).
        self._console, self._log_file, self._pending_lines = log, None, []
        if self.comm.size > 1:
            self._log(f"data-parallel over {self.comm.describe()}: each takes its share of every batch")
        self.settings = settings
        if progress is True or progress == "auto":
            progress = "bar" if _stderr_is_terminal() else "lines"
        elif progress is False or progress is None:
            progress = "none"
        if progress not in ("bar", "lines", "none"):
            raise ELMError(f"progress must be bar, lines, none or auto, got {progress!r}")
        self.progress = progress
        self.log_every = LOG_EVERY_BATCHES if log_every is None else log_every
        if self.log_every < 1:
            raise ELMError(f"log_every must be >= 1, got {self.log_every}")
        self.log = self._log
        self.inputs = [os.fspath(p) for p in inputs if p is not None]
        if task is None:
            from elmcore.data.registry import get_task
            task = get_task(settings.task, data_dir=settings.data_dir, seed=settings.seed, **settings.task_options)
        self.task = task
        self.inputs += [f for f in data_inputs(settings.task, settings.data_dir) if f not in self.inputs]
        if task.stateful and self.comm.size > 1:
            raise ELMError(f"task {task.name} is stateful (each batch row a stream whose state is carried "
                           "from batch to batch): it trains in one process, not data-parallel")
        self._carry = None  # a stateful task's model state between batches
        self.carved_valid = carve_validation(task, CARVED_VALID_FRACTION, settings.seed)
        # Selection never uses the test split: its score would no longer estimate unseen data.
        self.selection_split = "valid" if task.num_examples("valid") else "train"
        # Without a --run-dir: runs/<task>-<time>, made unique when the directory is created.
        self.run_dir = settings.run_dir or os.path.join(
            "runs", f"{settings.task}-{time.strftime('%Y%m%d-%H%M%S')}")
        self._lock_file = None
        self._created_dir = self._created_parent = self._activations_checked = False
        self._last_checkpoint_step = None
        self._extended_from = None  # the epochs a finished run had, when --extend continues it
        self.sources_line = sources_line

    def _log(self, message):
        """A console line, kept in the run directory's train.log as well."""
        self._console(message)
        if self._log_file is not None:
            try:
                self._log_file.write(message + "\n")
                self._log_file.flush()
            except OSError as e:
                raise write_error(self._log_file.name, e) from None
        elif self._pending_lines is not None:
            self._pending_lines.append(message)

    def append_to_log(self, message):
        """Add a line the caller printed (``elm train``'s final line) to the run's train.log."""
        if self.comm.is_root and os.path.isdir(self.run_dir):
            try:
                with open(os.path.join(self.run_dir, TRAIN_LOG), "a", encoding="utf-8") as f:
                    f.write(message + "\n")
            except OSError as e:
                raise write_error(os.path.join(self.run_dir, TRAIN_LOG), e) from None

    def resume_command(self):
        """The command that continues this run, as the user would type it."""
        launcher = f"mpiexec -n {self.comm.size} " if self.comm.size > 1 else ""
        return f"{launcher}elm train --resume {shlex.quote(self.run_dir)}"

    def interrupted_message(self):
        """What to say when the run is interrupted (Ctrl-C): the last checkpoint and how to go on."""
        last = os.path.join(self.run_dir, LAST)
        if self._last_checkpoint_step is None or not os.path.exists(last):
            return ("interrupted before the first checkpoint (one is written every "
                    f"{self.settings.checkpoint_every} steps and after each epoch): nothing to resume, "
                    "start the run again")
        position = getattr(self, "position", {})
        return (f"interrupted at step {position.get('step')}; the last checkpoint is {last} (step "
                f"{self._last_checkpoint_step}). Continue with: {self.resume_command()}")

    # ---- the run directory: one trainer at a time ------------------------------
    def _open_run_dir(self, must_exist):
        """Create (unless resuming) and lock the run directory; clear what a killed writer left.

        Only rank 0 touches the directory; the others learn its name, which rank 0 may have
        made unique.
        """
        self.run_dir = self.comm.on_root(self._open_run_dir_on_root, must_exist)
        announce_run_dir(self.run_dir)

    def _open_run_dir_on_root(self, must_exist):
        if must_exist:
            if not os.path.isdir(self.run_dir):
                raise ELMError(f"cannot resume: {self.run_dir} is not a directory")
        elif self.settings.run_dir is None:
            parent = os.path.dirname(self.run_dir)
            self._created_parent = bool(parent) and not os.path.exists(parent)
            self.run_dir = _make_unique_dir(self.run_dir)
            self._created_dir = True
        else:
            existed = os.path.exists(self.run_dir)
            try:
                os.makedirs(self.run_dir, exist_ok=True)
            except OSError as e:
                raise ELMError(f"cannot create the run directory {self.run_dir}: "
                               f"{describe_os_error(e)}") from None
            self._created_dir = not existed
        for name in (*RUN_FILES, LOCK, TRAIN_LOG):
            refuse_inputs(os.path.join(self.run_dir, name), self.inputs)
        self._lock_file = _lock_run_dir(self.run_dir)
        if not must_exist and os.path.exists(os.path.join(self.run_dir, LAST)):
            raise ELMError(f"run directory {self.run_dir} already holds a run; use --resume {self.run_dir} "
                           "or choose another --run-dir")
        path = os.path.join(self.run_dir, TRAIN_LOG)
        try:
            self._log_file = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(path, e) from None
        pending, self._pending_lines = self._pending_lines, None
        self._log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: training in process {os.getpid()}\n"
                             + "".join(line + "\n" for line in pending or ()))
        for stale in remove_stale_temporaries(self.run_dir, RUN_FILES):
            self.log(f"removed {stale}, left by an interrupted write")
        return self.run_dir

    def _close_run_dir(self, failed):
        """Release the lock (its file goes); after a failure before anything was recorded, remove the
        directory we made."""
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None
        self._pending_lines = None
        if failed and self._created_dir and not os.path.exists(os.path.join(self.run_dir, LAST)) \
                and not self._holds_records():
            for name in (RUN_FILE, METRICS, TRAIN_LOG, LOCK):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.run_dir, name))
            with contextlib.suppress(OSError):
                os.rmdir(self.run_dir)  # only if nothing else was put there
                if self._created_parent:
                    os.rmdir(os.path.dirname(self.run_dir))
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.run_dir, LOCK))  # while still holding it (see _lock_run_dir)
            self._lock_file.close()
            self._lock_file = None

    def _holds_records(self):
        try:
            return bool(read_records(self._metrics_path())[0])
        except ELMError:  # unreadable: keep the directory, the error that brought us here is the one to show
            return True

    # ---- setup -------------------------------------------------------------
    def model_config(self):
        return run_model_config(self.task, self.settings.model)

    def batches_per_epoch(self):
        n = self.task.num_batches("train", self.settings.batch_size)
        if self.settings.batches_per_epoch is not None:
            n = min(n, self.settings.batches_per_epoch) if n else self.settings.batches_per_epoch
        if n <= 0:
            raise ELMError(f"task '{self.task.name}' has no training examples")
        return n

    def _new_state(self):
        s = self.settings
        cfg = self.model_config()
        model = build_model(cfg, seed=s.seed, dtype=s.dtype, device=s.device)  # a bad config fails before any mkdir
        model.recompute_segment = s.recompute_segment
        self._open_run_dir(must_exist=False)
        self.model = model
        self.optimizer = self._make_optimizer()
        self.position = {"step": 0, "epoch": 0, "batch": 0, "dropout_rng": None,
                         "best_metric": None, "best_step": None, "first_loss": None,
                         "epoch_loss_sum": 0.0, "epoch_examples": 0}
        self.comm.on_root(self._write_run_file)
        self._truncate_metrics(0, 0)

    def recorded_settings(self):
        """The settings as run.json and summary.json keep them: paths absolute, so that the run
        directory works from any working directory."""
        d = dataclasses.asdict(self.settings)
        d["run_dir"] = os.path.abspath(self.run_dir)
        if d["data_dir"] is not None:
            d["data_dir"] = os.path.abspath(d["data_dir"])
        return d

    def _restart_run_files(self):
        self._write_run_file()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.run_dir, SUMMARY))  # written anew when the extension ends

    def _write_run_file(self):
        record = self.recorded_settings()
        info = self.task.run_info()
        if info:
            record[TASK_INFO] = info
        atomic_write_text(os.path.join(self.run_dir, RUN_FILE), json.dumps(record, indent=2) + "\n")

    def _make_optimizer(self):
        s = self.settings
        return Optimizer({k: self.model.params[k] for k in self.model.trainable_keys}, kind=s.optimizer,
                         lr=s.lr, weight_decay=s.weight_decay, clip_norm=s.clip_norm)

    def _checked_checkpoint(self, path):
        """The training checkpoint at ``path``, refused unless it is this run's: its kind, a position the
        run can reach, and the model of run.json."""
        loaded = load_file(path)
        if loaded.kind != "elmcore-checkpoint":
            raise ELMError(f"{path} is a model file, not a training checkpoint")
        position = _checked_position(loaded.meta.get("position"), path)
        _check_position_fits(position, self.batches_per_epoch(), self.settings.batch_size, path)
        expected = self.model_config().to_dict()
        stored = loaded.config.to_dict()
        if stored != expected:
            differ = sorted(set(stored) ^ set(expected) | {k for k in stored if stored[k] != expected.get(k)})
            raise CheckpointError(
                f"{path} holds a {loaded.config.version} model that is not the model of {self.run_dir}/{RUN_FILE} "
                f"({expected.get('version')}); they differ in {', '.join(differ)}. Resume only a run's own "
                "checkpoint")
        return loaded

    def _restore(self):
        path = os.path.join(self.run_dir, LAST)
        loaded = self._checked_checkpoint(path)  # before the directory is opened: a refusal changes nothing
        self._open_run_dir(must_exist=True)
        self.position = _checked_position(loaded.meta.get("position"), path)
        self.model = loaded.build_model(dtype=self.settings.dtype, device=self.settings.device)
        self.model.recompute_segment = self.settings.recompute_segment
        self.optimizer = self._make_optimizer()
        try:
            self.optimizer.load_state_dict(_checked_optim_state(loaded.optim_state, path))
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: optimizer state missing or damaged ({e})") from None
        self._last_checkpoint_step = self.position["step"]
        if self.task.stateful and self.position["batch"]:
            self._carry = self._restored_carry(loaded, path)
        self.comm.on_root(self._truncate_metrics, self.position["step"], self.position["epoch"])
        self.log(f"resuming from last.npz: step {self.position['step']}, {self.position['epoch']} of "
                 f"{self.settings.epochs} epochs done")
        if self._extended_from is not None:
            self.comm.on_root(self._restart_run_files)
            self.log(f"extending the finished run from {self._extended_from} to {self.settings.epochs} epochs: "
                     + describe_extension(self.settings, self._extended_from))

    def _restored_carry(self, loaded, path):
        """The model state a stateful run's interrupted epoch goes on from, checked against the model."""
        expect = self.model.init_state(self.settings.batch_size)
        if set(loaded.state) != set(expect):
            raise CheckpointError(f"{path}: a stateful run's checkpoint taken mid-epoch must hold the model state "
                                  f"({', '.join(sorted(expect))}), found {', '.join(sorted(loaded.state)) or 'none'}")
        for key, value in loaded.state.items():
            if value.shape != tuple(expect[key].shape):
                raise CheckpointError(f"{path}: model state '{key}' has shape {value.shape}, the model needs "
                                      f"{tuple(expect[key].shape)}")
        return {key: self.model.xp.asarray(value, dtype=self.model.dtype) for key, value in loaded.state.items()}

    @classmethod
    def resume(cls, run_dir, progress="auto", log=print, task=None, log_every=None, extend=False, **overrides):
        """A trainer that continues ``run_dir`` from its last checkpoint with its saved settings.

        ``overrides`` may change ``device`` and ``recompute_segment`` (the gradients are the same
        bit for bit); ``epochs`` only with ``extend``, which continues a
        finished run for more epochs on a new cosine cycle of the learning rate (``lr_restarts``).
        A finished run without ``extend`` raises :class:`RunFinished`.
        """
        run_dir = os.fspath(run_dir)
        path = os.path.join(run_dir, RUN_FILE)
        last = os.path.join(run_dir, LAST)
        if not os.path.exists(last):
            raise ELMError(f"cannot resume: no checkpoint {last}")
        try:
            recorded = read_json(path, "run settings", regular_only=True)
            if isinstance(recorded, dict):
                recorded.pop(TASK_INFO, None)
            settings = TrainSettings.from_dict(recorded, source=path)
        except ELMError as e:
            raise ELMError(f"cannot resume: {e}") from None
        # Before anything else, a finished run's answer included: settings whose data is one of the
        # run's own files are refused whatever the run's state, not only when a write would hit them.
        reads = data_inputs(settings.task, settings.data_dir)
        for name in (*RUN_FILES, LOCK, TRAIN_LOG):
            refuse_inputs(os.path.join(run_dir, name), reads)
        done = _checked_position(load_file(last).meta.get("position"), last)["epoch"]
        finished = done >= settings.epochs
        epochs = overrides.pop("epochs", None)
        quoted = shlex.quote(run_dir)
        if extend:
            if epochs is None or epochs <= settings.epochs:
                raise ELMError(f"--extend needs --epochs N, the new total, above the run's {settings.epochs} "
                               f"epochs (e.g. elm train --resume {quoted} --extend --epochs {settings.epochs + 10})")
            if not finished:
                raise ELMError(f"run {run_dir} has not finished ({done} of {settings.epochs} epochs): "
                               f"resume it first (elm train --resume {quoted}), then --extend it")
            extended_from = settings.epochs
            settings = dataclasses.replace(settings, epochs=epochs,
                                           lr_restarts=[*settings.lr_restarts, settings.epochs])
        elif epochs is not None and epochs != settings.epochs:
            how = (f"to train it for more epochs, continue it on a new learning-rate cycle: elm train --resume "
                   f"{quoted} --extend --epochs {max(epochs, settings.epochs + 1)}")
            if finished:
                raise ELMError(f"run {run_dir} is finished ({settings.epochs} epochs); --epochs {epochs} would "
                               f"restart its learning-rate schedule mid-way. {how[0].upper()}{how[1:]}")
            raise ELMError(f"--epochs cannot change while resuming run {run_dir} ({done} of {settings.epochs} "
                           "epochs done): it would change the learning-rate schedule mid-run. Resume it as it "
                           "is; once finished, --extend it")
        elif finished and os.path.exists(os.path.join(run_dir, SUMMARY)):
            # Checked as a resume would check it: damaged settings or another model's checkpoint are
            # errors, whether or not there is anything left to train.
            cls(dataclasses.replace(settings, run_dir=run_dir, **overrides), task=task, progress=False,
                log=_quiet)._checked_checkpoint(last)
            read_records(os.path.join(run_dir, METRICS))
            raise RunFinished(f"run {run_dir} is finished ({settings.epochs} of {settings.epochs} epochs): nothing "
                              f"to resume. To train it for more epochs: elm train --resume {quoted} --extend "
                              f"--epochs {settings.epochs + 10}")
        settings = dataclasses.replace(settings, run_dir=run_dir, **overrides)
        trainer = cls(settings, task=task, progress=progress, log=log, log_every=log_every)
        trainer._resuming = True
        trainer._extended_from = extended_from if extend else None
        return trainer

    # ---- metrics log ---------------------------------------------------------
    def _metrics_path(self):
        return os.path.join(self.run_dir, METRICS)

    def _truncate_metrics(self, step, epoch):
        """Drop records past the checkpoint we restart from, so the log tells one consistent story.

        Damaged lines (torn by a kill, not UTF-8, not records) are dropped too.
        """
        if not self.comm.is_root:
            return
        path = self._metrics_path()
        records, damaged = read_records(path)
        if damaged:
            self.log(f"{path}: dropped {damaged} damaged line(s)")
        kept = [json.dumps(rec) + "\n" for rec in epochs_from_one(records)
                if (rec["type"] == "step" and rec["step"] <= step) or
                (rec["type"] == "epoch" and rec["epoch"] <= epoch) or
                (rec["type"] == "diverged" and rec["step"] <= step)]
        atomic_write_text(path, "".join(kept))

    def _record(self, rec):
        if not self.comm.is_root:
            return
        try:
            with open(self._metrics_path(), "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            raise write_error(self._metrics_path(), e) from None

    # ---- checkpoints -----------------------------------------------------------
    def _meta(self):
        return {"position": self.position, "step": self.position["step"], "epoch": self.position["epoch"],
                "best_metric": self.position["best_metric"], "metric_name": self.task.metric,
                "selection_split": self.selection_split, "task": self.task.name}

    def _save_checkpoint(self):
        # A Ctrl-C during the write is held until the file is in place (fileio.atomic_output); it must
        # also wait for the step to be recorded, or the resume line would name the checkpoint before.
        with interrupts_deferred():
            if self.comm.is_root:
                carry = (None if self._carry is None
                         else {k: self.model.backend.to_host(v) for k, v in self._carry.items()})
                save_checkpoint(os.path.join(self.run_dir, LAST), self.model.config, self.model.state_dict(),
                                self.optimizer.state_dict(), self._meta(), dtype=self.settings.dtype,
                                vocab=self.task.vocabulary, state=carry)
            self._last_checkpoint_step = self.position["step"]  # on every rank: they report divergence alike

    # ---- the loop ---------------------------------------------------------------
    def run(self):
        failed = True
        try:
            summary = self._run()
            failed = False
            return summary
        except KeyboardInterrupt:
            self.log(self.interrupted_message())
            raise
        finally:
            if getattr(self, "_bar", None) is not None:
                self._bar.close()  # an error message then starts on a line of its own
            if getattr(self, "_threads_before", None) is not None:
                import numba
                numba.set_num_threads(self._threads_before)
            self._close_run_dir(failed)

    def _first_batch(self):
        """The first training batch in file order (its shape and dtype are every batch's), or None."""
        batches = self.task.batches("train", self.settings.batch_size)
        try:
            return next(iter(batches), None)
        finally:
            if hasattr(batches, "close"):
                batches.close()  # stops any prefetching worker of a streaming task

    def _choose_threads(self, batch):
        """Set the Numba threads for this run's step size on the CPU (``elmcore.training.threads``); say how many."""
        if self.model.xp is not np or batch is None:
            return self.settings.device
        import numba

        from elmcore.training.threads import choose_threads
        work = min(len(batch.X), self.settings.batch_size) * batch.X.shape[1] * self.model.num_parameters
        threads, why = choose_threads(work, numba.config.NUMBA_NUM_THREADS)
        if threads != numba.get_num_threads():
            self._threads_before = numba.get_num_threads()
            numba.set_num_threads(threads)
        return f"{self.settings.device}, {why}"

    def _run(self):
        s = self.settings
        if getattr(self, "_resuming", False):
            self._restore()
        else:
            self._new_state()
        per_epoch = self.batches_per_epoch()
        total_steps = per_epoch * s.epochs
        first = self._first_batch()
        if self.sources_line and not getattr(self, "_resuming", False):
            self.log(self.sources_line)
        self.log(f"run {self.run_dir}: task {self.task.name}, {self.model.config.version}, "
                 f"{self.model.num_parameters} parameters, {s.epochs} epochs x {per_epoch} batches of "
                 f"{s.batch_size} ({self._choose_threads(first)}, {s.dtype})")
        if first is not None:  # compile before the clock starts (a notice if that takes a while)
            X = first.X[:2, :8]
            warm_up(self.model, X.astype(np.float32) if s.input_dropout > 0 else X, self.log)
        units = self._units_line()
        if units:
            self.log(units)
        if self.carved_valid:
            self.log(f"task {self.task.name} has no validation split: {self.carved_valid} training examples "
                     f"(drawn from seed {s.seed}) are held out to select the model")
        elif self.selection_split == "train":
            self.log(f"warning: task {self.task.name} has no validation split; the model is selected on the "
                     "TRAINING split, so its selection score is optimistic (give the data a validation split)")
        reference = self.task.reference_level(self.selection_split) if self.comm.is_root else None
        start_time = time.perf_counter()
        samples_seen = 0
        last_valid = None
        while self.position["epoch"] < s.epochs:
            epoch = self.position["epoch"]
            skip = self.position["batch"]
            dropout_rng = np.random.default_rng([s.seed, epoch, 1])
            if skip and self.position["dropout_rng"] is not None:
                dropout_rng.bit_generator.state = self.position["dropout_rng"]
            data_rng = np.random.default_rng([s.seed, epoch])
            if not skip:
                self._carry = None  # every epoch's streams start from the zero state
            bar = self._bar = _progress(per_epoch, skip, f"epoch {epoch + 1}/{s.epochs}", self.progress == "bar")
            # Sums over the epoch's batches so far: a resumed epoch goes on from the checkpoint's.
            epoch_loss = float(self.position.get("epoch_loss_sum") or 0.0) if skip else 0.0
            epoch_n = int(self.position.get("epoch_examples") or 0) if skip else 0
            t_epoch = time.perf_counter()
            for b, batch in enumerate(self.task.batches("train", s.batch_size, rng=data_rng, shuffle=True)):
                if b >= per_epoch:
                    break
                if b < skip:
                    continue
                loss, norm, lr = self._train_step(batch, dropout_rng, total_steps)
                n = len(batch.X)
                samples_seen += n
                epoch_loss += loss * n
                epoch_n += n
                self.position.update(step=self.position["step"] + 1, batch=b + 1,
                                     dropout_rng=dropout_rng.bit_generator.state,
                                     epoch_loss_sum=epoch_loss, epoch_examples=epoch_n)
                if self.position.get("first_loss") is None:
                    self.position["first_loss"] = loss
                rate = samples_seen / max(time.perf_counter() - start_time, 1e-9)
                self._record({"type": "step", "step": self.position["step"], "epoch": epoch + 1, "batch": b,
                              "loss": loss, "lr": lr, "grad_norm": norm, "samples_per_s": rate})
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{loss:.4g}", "samples/s": f"{rate:.0f}"}
                    if last_valid is not None:
                        post[f"{self.selection_split} {self.task.metric}"] = f"{last_valid:.4g}"
                    bar.set_postfix(post)
                elif self.progress == "lines" and (b + 1) % self.log_every == 0 and b + 1 < per_epoch:
                    self.log(f"epoch {epoch + 1}/{s.epochs} batch {b + 1}/{per_epoch}: loss {loss:.4g}, "
                             f"{rate:.0f} samples/s")
                if self.position["step"] % s.checkpoint_every == 0:
                    self._save_checkpoint()
            if bar is not None:
                bar.close()
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    valid = self._validate()
            except NonFiniteOutputError:
                # Raised on the rank whose share of the validation batches failed: not a collective error.
                self._diverged(f"the model's outputs on validation data are not finite after step "
                               f"{self.position['step']}", step=self.position["step"], every_rank=False)
            last_valid = metric_value(self.task, valid)
            improved = self._is_better(last_valid)
            if improved:
                self.position.update(best_metric=last_valid, best_step=self.position["step"])
            if improved and self.comm.is_root:
                save_model(os.path.join(self.run_dir, BEST), self.model.config, self.model.state_dict(),
                           dtype=s.dtype, vocab=self.task.vocabulary)
            seconds = time.perf_counter() - t_epoch
            self._record({"type": "epoch", "epoch": epoch + 1, "step": self.position["step"],
                          "train_loss": epoch_loss / max(epoch_n, 1), "split": self.selection_split,
                          "metric": self.task.metric, "metrics": valid, "best": improved, "seconds": seconds,
                          "loss_function": self.task.loss, **({"reference": reference} if reference else {})})
            loss_unit = f" {self.task.loss_unit}" if self.task.loss_unit else ""
            metric_unit = f" {self.task.metric_unit}" if self.task.metric_unit else ""
            self.log(f"epoch {epoch + 1}/{s.epochs}: train loss {epoch_loss / max(epoch_n, 1):.4g}{loss_unit}, "
                     f"{self.selection_split} {self.task.metric} {last_valid:.4g}{metric_unit}"
                     f"{' (best)' if improved else ''} [{seconds:.1f} s]")
            self.position.update(epoch=epoch + 1, batch=0, dropout_rng=None, epoch_loss_sum=0.0,
                                 epoch_examples=0)
            self._carry = None
            self._save_checkpoint()
        return self._finish(time.perf_counter() - start_time, samples_seen)

    def _train_step(self, batch, dropout_rng, total_steps):
        s = self.settings
        backend = self.model.backend
        X, target, weight = self.comm.shard_batch(batch.X, batch.target)
        X = backend.upload(X)  # as the batch holds it (spikes in one byte): a quarter of float32's bytes
        if s.input_dropout > 0:
            # The mask of the whole global batch, of which this rank keeps its rows: the same masks
            # whatever the number of ranks.
            start, stop, _ = self.comm.shard_rows(len(batch.X))
            keep = input_keep_mask(backend, dropout_rng, batch.X.shape, s.input_dropout)[start:stop]
            X = X * keep / np.float32(1 - s.input_dropout)
        if not self._activations_checked:
            held_out = max(self.task.num_examples("valid"), self.task.num_examples("test"))
            batch_size = max(len(X), min(s.eval_batch_size, held_out))
            check_memory(self.model.config.activation_bytes(batch_size, X.shape[1], self.model.dtype.itemsize),
                         f"training on batches of {batch_size} sequences of {X.shape[1]} steps",
                         self.model.backend)
            self._activations_checked = True
        lr = scheduled_lr(s, self.position["step"], total_steps // s.epochs)
        step = self.position["step"] + 1
        # Overflow is detected below by explicit finiteness checks, which name the step. Every scalar
        # those checks need (the outputs' finiteness, the loss, each gradient's squared norm and
        # finiteness, each updated parameter's finiteness) stays on the model's device until one copy
        # reads them all (host_scalars): on a GPU each read alone would wait for the device. So the
        # update is applied before the checks; a step that fails them raises, and no checkpoint is
        # written after it.
        xp = self.model.xp
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                with self.model.outputs_checked_by_caller():
                    Y, cache = self.model.forward(X, return_cache=True, state=self._carry)
            except NonFiniteOutputError:
                # Not raised here: the other ranks would wait in the all-reduce forever. This rank
                # joins it with zero gradients and a failure flag, and every rank decides below.
                failed, loss, Y = True, 0.0, None
                grads = {k: xp.zeros_like(self.model.params[k]) for k in self.model.trainable_keys}
            else:
                failed = xp.logical_not(xp.all(xp.isfinite(Y)))  # explained below, after the collective
                loss, dY = self.task.loss_and_grad(Y, target, burn_in=s.burn_in)
                # Reduced before any check, so that every rank judges the global batch's loss alike.
                grads = self.model.backward(dY, cache)
                if self.task.stateful:
                    self._carry = cache["final_state"]  # the next window's start, a constant (truncated BPTT)
            loss, grads, failed_ranks = self.comm.allreduce_gradients(grads, loss, weight, failed=failed)
            squares = squared_norms(grads)
            grads_finite = [xp.all(xp.isfinite(g)) for g in grads.values()]
            self.optimizer.step(grads, lr=lr, squares=squares)
            params_finite = [xp.all(xp.isfinite(self.model.params[k])) for k in self.model.trainable_keys]
            scalars = host_scalars(self.model.backend, [failed, failed_ranks, loss, *squares, *grads_finite,
                                                        *params_finite])
            local_failed, failed_ranks, loss = scalars[0], int(round(scalars[1])), scalars[2]
            squares = scalars[3:3 + len(grads)]
            grads_finite = dict(zip(grads, scalars[3 + len(grads):3 + 2 * len(grads)]))
            params_finite = dict(zip(self.model.trainable_keys, scalars[3 + 2 * len(grads):]))
            if local_failed and Y is not None:
                try:
                    self.model.explain_non_finite_output(self.model.prepare_input(X))  # NaN input: DataError
                except NonFiniteOutputError:
                    pass
            if failed_ranks:
                where = f" on {failed_ranks} of {self.comm.size} ranks" if self.comm.size > 1 else ""
                self._diverged(f"the model's outputs are not finite at step {step}{where}")
            if not math.isfinite(loss):
                self._diverged(f"the loss is {loss} at step {step}", loss)
            first = self.position.get("first_loss")
            if first is not None and first > 0 and loss > DIVERGENCE_FACTOR * first:
                self._diverged(f"the loss {loss:.3g} at step {step} exceeds {DIVERGENCE_FACTOR:g} times the "
                               f"loss of the first step ({first:.3g}): training diverged", loss)
            bad = [k for k, finite in grads_finite.items() if not finite]
            if bad:
                self._diverged(f"the gradient of {bad[0]} is not finite at step {step}", loss)
            norm = norm_from_squares(squares)
            # Never let a checkpoint hold an overflowed parameter.
            bad = [k for k, finite in params_finite.items() if not finite]
            if bad:
                self._diverged(f"the update of step {step} made {bad[0]} non-finite", loss)
        return loss, norm, lr

    def _units_line(self):
        """What the loss and the metric are measured in, and the task's reference levels (None if it has neither)."""
        task = self.task
        parts = []
        if task.loss_unit:
            parts.append(f"loss in {task.loss_unit}")
        if task.metric_unit:
            parts.append(f"{task.metric} in {task.metric_unit}")
        levels = task.reference_levels()
        if levels:
            unit = f" {task.metric_unit}" if task.metric_unit else ""
            parts.append("reference: " + ", ".join(f"{label} {value:.4g}{unit}" for label, value in levels.items()))
        if task.stateful:
            parts.append(f"stateful: {self.settings.batch_size} streams carry their state from batch to batch")
        return f"{task.name}: " + "; ".join(parts) if parts else None

    def _diverged(self, what, loss=None, step=None, every_rank=True):
        """Record and raise the divergence of ``step`` (default: the step being taken).

        The message is built from what every rank of a data-parallel run holds alike (the steps
        checkpointed, the best step), never from the file system, so every rank reports the same.
        A step's checks judge the reduced loss and gradients, so every rank raises at once
        (``every_rank``) and rank 0 alone reports.
        """
        last = os.path.join(self.run_dir, LAST)
        if self._last_checkpoint_step is not None:
            good = "" if self._last_checkpoint_step == step else "good "  # at ``step``: the diverged parameters
            where = f"the last {good}checkpoint is {last} (step {self._last_checkpoint_step})"
        else:
            where = "no checkpoint was written yet"
        if self.position.get("best_step") is not None:
            where += f", the best model so far {os.path.join(self.run_dir, BEST)}"
        self._record({"type": "diverged", "step": self.position["step"] + 1 if step is None else step,
                      "epoch": self.position["epoch"] + 1,
                      "loss": finite_or_none(loss), "message": what})
        error = TrainingDiverged(f"training stopped: {what} (epoch {self.position['epoch'] + 1}); {where}. "
                                 "Try a lower --lr or --clip-norm.")
        raise mark_collective(error) if every_rank else error

    def _validate(self):
        return self.task.validation_metrics(self.model, self.selection_split, self.settings.eval_batch_size,
                                            self.settings.valid_max_batches, comm=self.comm)

    def _is_better(self, value):
        best = self.position["best_metric"]
        if value is None or not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best if self.task.higher_is_better else value < best

    def _finish(self, seconds, samples):
        summary = {"run_dir": self.run_dir, "task": self.task.name, "steps": self.position["step"],
                   "epochs": self.position["epoch"], "metric": self.task.metric,
                   "selection_split": self.selection_split, "best_metric": self.position["best_metric"],
                   "best_step": self.position["best_step"],
                   "parameters": self.model.num_parameters, "seconds": seconds,
                   "samples_per_s": samples / seconds if seconds > 0 else None,
                   "settings": self.recorded_settings()}
        if not self.comm.is_root:
            return summary
        best_path = os.path.join(self.run_dir, BEST)
        if self.task.num_examples("test") and os.path.exists(best_path):
            best = load_file(best_path).build_model(dtype=self.settings.dtype, device=self.settings.device)
            summary["test"] = evaluate(best, self.task, "test", batch_size=self.settings.eval_batch_size)
            self.log(f"test {self.task.metric} of the best model (selected on {self.selection_split}): "
                     f"{summary['test'][self.task.metric]:.4g}"
                     + (f" {self.task.metric_unit}" if self.task.metric_unit else ""))
        atomic_write_text(os.path.join(self.run_dir, SUMMARY), json.dumps(summary, indent=2) + "\n")
        return summary


def read_summary(run_dir):
    """A finished run's summary.json, every field its readers use checked; a damaged one is an ELMError naming it."""
    path = os.path.join(os.fspath(run_dir), SUMMARY)
    summary = read_json(path, "run summary", regular_only=True)

    def damaged(what):
        return ELMError(f"{path}: {what}; the run summary is damaged")

    def is_count(v):
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SETTING_INT

    def is_finite(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= sys.float_info.max

    if not isinstance(summary, dict):
        raise damaged(f"a JSON object expected, got {type(summary).__name__}")
    if not isinstance(summary.get("metric"), str):
        raise damaged(f"'metric' must be a metric name, got {shown(summary.get('metric'))}")
    checks = [(("steps", "epochs", "best_step", "parameters"), is_count, "an integer >= 0"),
              (("best_metric", "seconds", "samples_per_s"), is_finite, "a finite number"),
              (("selection_split", "run_dir", "task"), lambda v: isinstance(v, str), "a string")]
    for keys, ok, wanted in checks:
        for key in keys:
            if summary.get(key) is not None and not ok(summary[key]):
                raise damaged(f"'{key}' must be {wanted} or null, got {shown(summary[key])}")
    test = summary.get("test")
    if test is not None and (not isinstance(test, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in test.values())):
        raise damaged(f"'test' must map metric names to numbers, got {shown(test)}")
    return summary


def _make_unique_dir(base):
    """Create ``base``, or ``base-2``, ``base-3``, … if taken: mkdir is atomic, so two runs never share one."""
    parent = os.path.dirname(base)
    try:
        if parent:
            os.makedirs(parent, exist_ok=True)
        for n in range(1, 10000):
            candidate = base if n == 1 else f"{base}-{n}"
            try:
                os.mkdir(candidate)
                return candidate
            except FileExistsError:
                continue
    except OSError as e:
        raise ELMError(f"cannot create a run directory {base}: {describe_os_error(e)}") from None
    raise ELMError(f"cannot create a run directory: {base}-2 … {base}-9999 all exist; pass --run-dir")


def _lock_run_dir(run_dir):
    """An exclusive lock on ``run_dir`` held as long as the returned file stays open."""
    path = os.path.join(run_dir, LOCK)
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise ELMError(f"cannot lock the run directory {run_dir}: {describe_os_error(e)}") from None
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise RunDirectoryBusy(f"run directory {run_dir} is in use by another trainer"
                               f"{f' (process {holder})' if holder.isdigit() else ''}; wait for it to finish "
                               "or choose another --run-dir") from None
    try:
        same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        same = False
    if not same:  # the trainer that held it removed the file while we opened it: lock the one there now
        handle.close()
        return _lock_run_dir(run_dir)
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _checked_position(position, path):
    """A checkpoint's loop position, every entry checked (a damaged one fails here, not mid-epoch)."""
    if not isinstance(position, dict):
        raise CheckpointError(f"{path}: checkpoint metadata lacks the training position")

    def bad(key, wanted):
        return CheckpointError(f"{path}: training position '{key}' must be {wanted}, got {position.get(key)!r}")

    def is_count(v):
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SETTING_INT

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= sys.float_info.max

    for key in ("step", "epoch", "batch"):
        if not is_count(position.get(key)):
            raise bad(key, "an integer >= 0")
    for key, check, wanted in (("best_metric", is_number, "a finite number or null"),
                               ("best_step", is_count, "an integer >= 0 or null"),
                               ("first_loss", is_number, "a finite number or null"),
                               ("epoch_loss_sum", is_number, "a finite number"),
                               ("epoch_examples", is_count, "an integer >= 0")):
        if position.get(key) is not None and not check(position[key]):
            raise bad(key, wanted)
    state = position.get("dropout_rng")
    if state is not None:
        try:
            np.random.default_rng(0).bit_generator.state = state
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
            raise bad("dropout_rng", "a NumPy PCG64 generator state") from None
    return dict(position)


def _check_position_fits(position, per_epoch, batch_size, path):
    """The saved position is one this run can reach: an epoch has at most ``per_epoch`` batches of at most
    ``batch_size`` examples, so batch <= step <= epoch·per_epoch + batch, and the best step is one taken."""
    step, epoch, batch = position["step"], position["epoch"], position["batch"]
    problems = []
    if batch > per_epoch:
        problems.append(f"batch {batch} of an epoch of {per_epoch} batches")
    elif not batch <= step <= epoch * per_epoch + batch:
        problems.append(f"step {step} at batch {batch} of epoch {epoch} (epochs of {per_epoch} batches)")
    if position.get("best_step") is not None and position["best_step"] > step:
        problems.append(f"best_step {position['best_step']} after step {step}")
    if (position.get("epoch_examples") or 0) > batch * batch_size:
        problems.append(f"epoch_examples {position['epoch_examples']} in {batch} batches of {batch_size}")
    if problems:
        raise CheckpointError(f"{path}: its training position does not fit this run ({'; '.join(problems)}): "
                              "the checkpoint is damaged, or the run's data changed since it was written")


def _checked_optim_state(state, path):
    """The optimizer state with its step count checked and every array finite."""
    t = state.get("t")
    if t is None or t.shape != () or t.dtype.kind not in "iu" or int(t) < 0:
        raise CheckpointError(f"{path}: optimizer step count 't' missing or not an integer >= 0")
    for key, value in state.items():
        if value.dtype.kind not in "fiu":
            raise CheckpointError(f"{path}: optimizer state '{key}' is not numeric ({value.dtype})")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise CheckpointError(f"{path}: optimizer state '{key}' holds NaN or infinite values")
    return state


def _stderr_is_terminal():
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def _progress(total, initial, desc, enabled):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
