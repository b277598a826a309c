"""Synthetic long-memory tasks at any sequence length: the adding problem and delayed recall.

* ``adding`` (Hochreiter & Schmidhuber 1997, in the two-channel form of Le et
  al. 2015): channel 0 holds values drawn uniformly from [0, 1], channel 1 is 1
  at exactly two steps — one in the first half of the sequence, one in the
  second — and 0 elsewhere. The target is the sum of the two marked values,
  read from the last step (loss ``mse_last``, metric ``mse``, lower is
  better). Always predicting 1 scores an MSE of 1/6 ≈ 0.167.
* ``delayed-recall``: ``num_tokens`` = K possible cue tokens. Step 0 shows the
  cue one-hot on channels 0..K−1, the next ``length − 2`` steps are silent (all
  zeros), and the last step raises channel K, the recall signal. The class is
  the cue (loss ``cross_entropy_last``); chance is 1/K. Classes are exactly
  balanced up to one example per split.

Both are deterministic by seed and are stored as ``.npz`` files readable with
``np.load(allow_pickle=False)``: a JSON ``meta`` string plus ``<split>/X`` and
``<split>/target`` arrays for the splits ``train``, ``valid``, ``test``.
"""

import json
import os

import numpy as np

from elmcore.errors import DataError
from elmcore.storage.fileio import atomic_output, read_npz
from elmcore.data.base import SPLITS, ArrayTask
from elmcore.data.images import split_sizes

TASK_KINDS = {
    "adding": {"loss": "mse_last", "metric": "mse", "higher_is_better": False},
    "delayed-recall": {"loss": "cross_entropy_last", "metric": "accuracy", "higher_is_better": True},
}
DEFAULT_LENGTH = 100
DEFAULT_TOKENS = 8


def adding_problem(rng, n, length):
    """X (n, length, 2) float32 and target (n, 1) float32 of the adding problem."""
    if length < 2:
        raise DataError(f"adding problem length must be >= 2 (one marker per half), got {length}")
    values = rng.uniform(0.0, 1.0, (n, length))
    half = length // 2
    first = rng.integers(0, half, n)
    second = rng.integers(half, length, n)
    X = np.zeros((n, length, 2), dtype=np.float32)
    X[:, :, 0] = values
    rows = np.arange(n)
    X[rows, first, 1] = 1.0
    X[rows, second, 1] = 1.0
    # The target is the sum of the float32 values the model actually sees.
    target = (X[rows, first, 0] + X[rows, second, 0]).reshape(n, 1)
    return X, target.astype(np.float32)


def delayed_recall(rng, n, length, num_tokens=DEFAULT_TOKENS):
    """X (n, length, num_tokens + 1) float32 and class target (n,) int64 of delayed recall."""
    if length < 2:
        raise DataError(f"delayed recall length must be >= 2 (cue step and recall step), got {length}")
    if num_tokens < 2:
        raise DataError(f"delayed recall needs num_tokens >= 2, got {num_tokens}")
    cue = rng.permutation(np.arange(n) % num_tokens).astype(np.int64)
    X = np.zeros((n, length, num_tokens + 1), dtype=np.float32)
    X[np.arange(n), 0, cue] = 1.0
    X[:, length - 1, num_tokens] = 1.0
    return X, cue


class SyntheticTask(ArrayTask):
    """An :class:`ArrayTask` that remembers how it was made and can save itself."""

    def __init__(self, name, splits, meta):
        kind = TASK_KINDS[name]
        num_output = 1 if name == "adding" else int(meta["num_tokens"])
        super().__init__(name, splits, num_output, **kind)
        self.meta = dict(meta)
        self.seq_len = int(next(iter(splits.values()))[0].shape[1])

    def describe(self):
        info = {**super().describe(), "seq_len": self.seq_len}
        for split, (_, target) in self.splits.items():
            if self.loss == "cross_entropy_last":
                info[f"class_counts_{split}"] = np.bincount(target, minlength=self.num_output).tolist()
            elif len(target):
                info[f"target_mean_{split}"] = round(float(target.mean()), 4)
        return info

    def save(self, path):
        """Write the task to ``path`` (.npz, no pickled objects) atomically."""
        arrays = {"meta": np.array(json.dumps({"task": self.name, **self.meta}))}
        for split, (X, target) in self.splits.items():
            arrays[f"{split}/X"], arrays[f"{split}/target"] = X, target
        # np.savez given a file object writes exactly there (given a name it may append ".npz").
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        return os.fspath(path)


def make_synthetic(name, n=1000, seed=0, length=DEFAULT_LENGTH, num_tokens=DEFAULT_TOKENS,
                   valid_fraction=0.1, test_fraction=0.1):
    """Build ``adding`` or ``delayed-recall`` in memory; ``n`` counts all splits together."""
    if name not in TASK_KINDS:
        raise DataError(f"unknown synthetic task {name!r}; choose from {', '.join(TASK_KINDS)}")
    rng = np.random.default_rng(seed)
    splits = {}
    for split, size in split_sizes(n, valid_fraction, test_fraction).items():
        if name == "adding":
            splits[split] = adding_problem(rng, size, length)
        else:
            splits[split] = delayed_recall(rng, size, length, num_tokens)
    meta = {"seed": int(seed), "length": int(length)}
    if name == "delayed-recall":
        meta["num_tokens"] = int(num_tokens)
    return SyntheticTask(name, splits, meta)


def generate_synthetic(out_dir, name, n=1000, seed=0, length=DEFAULT_LENGTH, num_tokens=DEFAULT_TOKENS,
                       valid_fraction=0.1, test_fraction=0.1):
    """Write ``out_dir/<name>.npz`` (see :func:`make_synthetic`) and return its path."""
    task = make_synthetic(name, n=n, seed=seed, length=length, num_tokens=num_tokens,
                          valid_fraction=valid_fraction, test_fraction=test_fraction)
    return task.save(os.path.join(os.fspath(out_dir), f"{name}.npz"))


def _as_float32(array, where):
    """``array`` as float32; NaN, infinity or a value beyond float32's range (which the cast would make
    infinite, with only a NumPy warning to tell) is a DataError naming ``where``."""
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise DataError(f"{where} must hold real numbers, got {array.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(np.float32, copy=False)
    if not np.isfinite(cast).all():
        raise DataError(f"{where} holds NaN, infinite values or values beyond float32's range (±3.4e38)")
    return cast


def load_synthetic(path, expected=None):
    """Read a task written by :meth:`SyntheticTask.save`, checking every array.

    ``expected`` (a task name) rejects a file holding a different task.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"synthetic task file not found: {path}")
    try:
        arrays = read_npz(path, "a synthetic task file")
    except Exception as e:  # a truncated zip, a non-npz file, a pickled array or a forged header all land here
        raise DataError(f"cannot read synthetic task file {path}: {e}") from None
    try:
        meta = json.loads(str(arrays.pop("meta")))
        name = meta.pop("task")
    except (KeyError, ValueError, TypeError):
        raise DataError(f"{path}: missing or malformed 'meta' entry") from None
    if name not in TASK_KINDS:
        raise DataError(f"{path}: unknown task {name!r} in meta")
    if expected is not None and name != expected:
        raise DataError(f"{path} holds task {name!r}, not {expected!r}")
    if name == "delayed-recall" and not isinstance(meta.get("num_tokens"), int):
        raise DataError(f"{path}: meta lacks an integer 'num_tokens'")
    splits = {}
    width = 2 if name == "adding" else meta.get("num_tokens", 0) + 1
    for split in SPLITS:
        if f"{split}/X" not in arrays:
            continue
        X, target = arrays[f"{split}/X"], arrays.get(f"{split}/target")
        where = f"{path}: {split}/X"
        if X.ndim != 3 or X.shape[2] != width or not np.issubdtype(X.dtype, np.floating):
            raise DataError(f"{where} must be a float array (N, T, {width}), got {X.dtype} {X.shape}")
        X = _as_float32(X, where)
        want = (len(X), 1) if name == "adding" else (len(X),)
        if target is None or target.shape != want:
            raise DataError(f"{path}: {split}/target must have shape {want}, got "
                            f"{None if target is None else target.shape}")
        if name == "adding":
            target = _as_float32(target, f"{path}: {split}/target")
        else:
            if not np.issubdtype(target.dtype, np.integer) or target.min(initial=0) < 0 or \
                    target.max(initial=0) >= meta["num_tokens"]:
                raise DataError(f"{path}: {split}/target must be integer classes in "
                                f"[0, {meta['num_tokens']})")
            target = target.astype(np.int64)
        splits[split] = (X, target)
    if "train" not in splits:
        raise DataError(f"{path}: no 'train/X' array")
    lengths = {X.shape[1] for X, _ in splits.values()}
    if len(lengths) != 1:
        raise DataError(f"{path}: splits have different sequence lengths {sorted(lengths)}")
    return SyntheticTask(name, splits, meta)
