"""Spiking Heidelberg Digits (Cramer et al.) and SHD-Adding.

File format (docs/spec.md §9): HDF5 ``shd_train.h5`` / ``shd_test.h5`` with
``spikes/times`` (ragged float, seconds), ``spikes/units`` (ragged int, 0..699) and
``labels`` (0..19; 0-9 English, 10-19 German digits).

Binning, exactly as the release (``shd_data_loader.py``): with ``step = bin_size/1000``
the edges are ``np.arange(0, 1 + step, step)``, a spike's bin is
``np.digitize(t, edges) - 1`` and the last bin is dropped, so T = len(edges) − 1
(100 for 10 ms; 334 for 3 ms, whose last edge is 1.002 s). A spike at an edge
belongs to the later bin; spikes at or after the last edge (e.g. at 1.0 s for
10 ms bins) are dropped. Edges are the float values ``arange`` produces
(``3 * 0.01`` is slightly above 0.03), as in the release. Each bin holds the spike
count of its unit (the release densified a sparse tensor, which sums repeats);
nothing is clipped.

SHD-Adding (the ELM paper's task): two samples concatenated in time (2T steps),
label ``(l1 mod 10) + (l2 mod 10)``, 19 classes.
"""

import os
import stat

import numpy as np

from elmcore.errors import DataError, ELMError
from elmcore.storage.fileio import atomic_output
from elmcore.engine.optional import require
from elmcore.data.base import SPLITS, Batch, Task

NUM_UNITS = 700
NUM_CLASSES = 20
ADDING_NUM_CLASSES = 19
FILES = {"train": "shd_train.h5", "test": "shd_test.h5"}
DATA_SOURCE = ("https://zenkelab.org/datasets/ (Cramer, Stradmann, Schemmel & Zenke, 'The Heidelberg "
               "Spiking Data Sets for the Systematic Evaluation of Spiking Neural Networks', IEEE TNNLS 2020)")
# The release's SHD-Adding run: 2000 training and 500 validation batches of 8 per
# epoch, and 2000 test batches (its test loader reuses the training count).
ADDING_EXAMPLES = {"train": 16000, "valid": 4000, "test": 16000}
# Declared sample counts beyond this are refused before reading (the published files: 8156 and 2264).
MAX_SAMPLES = 1_000_000
_SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


def time_bin_edges(bin_size):
    """The release's edges ``arange(0, 1 + step, step)``, step = bin_size / 1000 s."""
    step = bin_size / 1000
    return np.arange(0, 1 + step, step)


def num_time_bins(bin_size):
    return len(time_bin_edges(bin_size)) - 1


def bin_spikes(times, units, edges, out=None):
    """Spike counts per (bin, unit): (len(edges) − 1, 700) float32.

    ``times`` in seconds, ``units`` in [0, 700); see the module docstring for the rule.
    """
    T = len(edges) - 1
    bins = np.digitize(np.asarray(times, dtype=np.float64), edges) - 1
    keep = (bins >= 0) & (bins < T)
    codes = bins[keep] * NUM_UNITS + np.asarray(units, dtype=np.int64)[keep]
    counts = np.bincount(codes, minlength=T * NUM_UNITS).reshape(T, NUM_UNITS)
    if out is None:
        return counts.astype(np.float32)
    out[...] = counts
    return out


def write_shd_h5(path, times_list, units_list, labels, times_dtype=np.float64):
    """Write an SHD file in the published layout: ragged (vlen) ``spikes/times`` in seconds,
    ragged ``spikes/units`` (uint16), ``labels`` (uint8).

    Used for test fixtures and small hand-made sets; written atomically. The
    published files store times in a narrower float; any float dtype reads the same way.
    """
    h5py = require("h5py")
    if not (len(times_list) == len(units_list) == len(labels)):
        raise DataError(f"{path}: times, units and labels must have one entry per sample, got "
                        f"{len(times_list)}, {len(units_list)}, {len(labels)}")
    times_list = [np.asarray(t, dtype=times_dtype).ravel() for t in times_list]
    units_list = [np.asarray(u).ravel() for u in units_list]
    for i, (t, u) in enumerate(zip(times_list, units_list)):
        if t.size != u.size:
            raise DataError(f"{path}: sample {i} has {t.size} times but {u.size} units")
    n = len(labels)
    with atomic_output(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            spikes = f.create_group("spikes")
            times = spikes.create_dataset("times", (n,), dtype=h5py.vlen_dtype(np.dtype(times_dtype)))
            units = spikes.create_dataset("units", (n,), dtype=h5py.vlen_dtype(np.uint16))
            for i in range(n):
                times[i] = times_list[i]
                units[i] = units_list[i].astype(np.uint16)
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.uint8))


def read_shd_h5(path):
    """(times, units, labels) of an SHD file: lists of per-sample arrays and an int64 array.

    Raises
    ------
    DataError
        Missing datasets, ragged arrays of different lengths, non-finite or negative
        times, units outside [0, 700), labels outside [0, 20).
    """
    h5py = require("h5py")
    path = os.fspath(path)
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block in open()
        raise DataError(f"SHD file {path} is not a regular file")
    try:
        with h5py.File(path, "r") as f:
            datasets = {}
            for key in ("spikes/times", "spikes/units", "labels"):
                # get() resolves links; a soft-link loop or a dangling link raises here, inside the try.
                item = f.get(key)
                if item is None:
                    raise DataError(f"SHD file {path}: missing dataset '{key}'")
                if not isinstance(item, h5py.Dataset) or item.ndim != 1:
                    raise DataError(f"SHD file {path}: '{key}' must be a one-dimensional dataset")
                if item.shape[0] > MAX_SAMPLES:
                    raise DataError(f"SHD file {path}: '{key}' declares {item.shape[0]} samples (at most "
                                    f"{MAX_SAMPLES} are read; the published sets hold about 10,000)")
                datasets[key] = item
            times = list(datasets["spikes/times"][()])
            units = list(datasets["spikes/units"][()])
            labels = np.asarray(datasets["labels"][()])
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:  # h5py's errors, e.g. "too many links"
        raise DataError(f"SHD file {path} is not a readable HDF5 file ({e})") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"SHD file {path}: 'labels' must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    if not (len(times) == len(units) == len(labels)):
        raise DataError(f"SHD file {path}: {len(times)} spike-time lists, {len(units)} unit lists and "
                        f"{len(labels)} labels; they must match")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"SHD file {path}: labels must be in [0, {NUM_CLASSES}), got {labels.min()}..{labels.max()}")
    for i, (t, u) in enumerate(zip(times, units)):
        t, u = np.asarray(t), np.asarray(u)
        if t.shape != u.shape or t.ndim != 1:
            raise DataError(f"SHD file {path}: sample {i} has {t.size} times but {u.size} units")
        if t.dtype.kind != "f" or not np.all(np.isfinite(t)) or (t.size and t.min() < 0):
            raise DataError(f"SHD file {path}: sample {i} spikes/times must be finite seconds >= 0")
        if u.dtype.kind not in "iu" or (u.size and (u.min() < 0 or u.max() >= NUM_UNITS)):
            raise DataError(f"SHD file {path}: sample {i} spikes/units must be integers in [0, {NUM_UNITS})")
        times[i], units[i] = t, u
    return times, units, labels.astype(np.int64)


def validation_mask(num_samples, valid_fraction, seed):
    """The release's split: each training sample goes to validation with probability
    ``valid_fraction``, drawn by ``default_rng(seed).binomial`` (seed 0, 0.2 in the release)."""
    rng = np.random.default_rng(seed)
    return rng.binomial(1, valid_fraction, size=num_samples).astype(bool)


class SHDTask(Task):
    """SHD (20 classes) or SHD-Adding (19 classes) as a :class:`Task`.

    Parameters
    ----------
    data_dir : str or path
        Folder holding ``shd_train.h5`` and ``shd_test.h5``.
    bin_size : int
        Bin width in ms (the release: 10, giving 100 steps).
    adding : bool
        SHD-Adding instead of SHD.
    seed : int
        SHD-Adding: pairs of the training split are drawn from ``rng`` when
        ``batches`` gets one, else from ``default_rng([seed, 0])``; the fixed
        validation / test pairs from ``default_rng([seed, 1])`` / ``([seed, 2])``.
    valid_fraction : float
        Share of the training file held out for validation (release: 0.2).
    split_seed : int
        Seed of the validation split (release: 0); separate from ``seed`` so that
        runs with different seeds validate on the same samples.
    adding_examples : dict or None
        SHD-Adding pairs per split and epoch (default: the release's 16000 / 4000 / 16000).
    """

    loss = "cross_entropy_last"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, data_dir, bin_size=10, adding=False, seed=0, valid_fraction=0.2, split_seed=0,
                 adding_examples=None):
        for name, value, minimum in (("bin_size", bin_size, 1), ("seed", seed, 0), ("split_seed", split_seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ELMError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if bin_size > 1000:
            raise ELMError(f"bin_size must be at most 1000 ms (the binned interval is 1 s), got {bin_size}")
        if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)) \
                or not 0 <= valid_fraction < 1:
            raise ELMError(f"valid_fraction must be a number in [0, 1), got {valid_fraction!r}")
        self.data_dir = os.fspath(data_dir)
        self.bin_size, self.adding, self.seed = int(bin_size), bool(adding), int(seed)
        self.edges = time_bin_edges(self.bin_size)
        self.num_bins = len(self.edges) - 1
        self.name = "shd_adding" if self.adding else "shd"
        self.num_input = NUM_UNITS
        self.num_output = ADDING_NUM_CLASSES if self.adding else NUM_CLASSES
        self.adding_examples = dict(ADDING_EXAMPLES, **(adding_examples or {}))
        for split, count in self.adding_examples.items():
            if split not in SPLITS or isinstance(count, bool) or not isinstance(count, (int, np.integer)) \
                    or count < 0:
                raise ELMError(f"adding_examples must map train/valid/test to counts >= 0, got {split!r}: {count!r}")

        paths = {s: os.path.join(self.data_dir, f) for s, f in FILES.items()}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise DataError(f"SHD data missing: need {FILES['train']} and {FILES['test']} in {self.data_dir} "
                            f"(not found: {', '.join(os.path.basename(p) for p in missing)}). "
                            f"Download them from {DATA_SOURCE}.")
        train = read_shd_h5(paths["train"])
        test = read_shd_h5(paths["test"])
        valid = validation_mask(len(train[2]), valid_fraction, split_seed)
        self.samples = {
            "train": _select(train, ~valid),
            "valid": _select(train, valid),
            "test": test,
        }
        self._fixed_pairs = {}

    # ---- sizes ------------------------------------------------------------------
    @property
    def num_steps(self):
        return 2 * self.num_bins if self.adding else self.num_bins

    def num_examples(self, split):
        if split not in self.samples:
            return 0
        n = len(self.samples[split][2])
        if self.adding:
            return self.adding_examples[split] if n else 0
        return n

    @property
    def step_ms(self):
        return float(self.bin_size)

    def model_defaults(self):
        return {**super().model_defaults(), "delta_t": float(self.bin_size),
                "memory_tau_min": 1.0, "memory_tau_max": 500.0}

    def describe(self):
        info = {**super().describe(), "bin_size_ms": self.bin_size, "time_steps": self.num_steps}
        # SHD-Adding's classes depend on the drawn pairs; report the digits they are drawn from.
        key = "source_label_counts" if self.adding else "class_counts"
        for split in SPLITS:
            info[f"{key}_{split}"] = np.bincount(self.samples[split][2], minlength=NUM_CLASSES).tolist()
        return info

    # ---- pairs (SHD-Adding) -------------------------------------------------------
    def pairs(self, split, rng=None):
        """(n, 2) sample indices of the SHD-Adding examples of ``split`` (with replacement).

        Training pairs come from ``rng`` (a fresh draw per call); without one, and
        always for validation and test, from the fixed per-split seed.
        """
        n = len(self.samples[split][2])
        count = self.adding_examples[split]
        if split == "train" and rng is not None:
            return rng.integers(0, n, size=(count, 2))
        if split not in self._fixed_pairs:
            fixed = np.random.default_rng([self.seed, _SPLIT_CODES[split]])
            self._fixed_pairs[split] = fixed.integers(0, n, size=(count, 2))
        return self._fixed_pairs[split]

    # ---- batches ------------------------------------------------------------------
    def batches(self, split, batch_size, rng=None, shuffle=False):
        """(B, T, 700) float32 spike counts (T = 2·bins for SHD-Adding) and (B,) int64 labels."""
        if split not in SPLITS:
            raise ELMError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ELMError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        times, units, labels = self.samples[split]
        if not len(labels):
            return
        if self.adding:
            pairs = self.pairs(split, rng if split == "train" else None)
            if shuffle and rng is not None and split != "train":
                pairs = pairs[rng.permutation(len(pairs))]
        else:
            pairs = np.arange(len(labels))[:, None]
            if shuffle and rng is not None:
                pairs = pairs[rng.permutation(len(pairs))]
        T = self.num_bins
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            X = np.zeros((len(chunk), T * chunk.shape[1], NUM_UNITS), np.float32)
            for b, members in enumerate(chunk):
                for part, i in enumerate(members):
                    bin_spikes(times[i], units[i], self.edges, out=X[b, part * T:(part + 1) * T])
            if self.adding:
                y = labels[chunk[:, 0]] % 10 + labels[chunk[:, 1]] % 10
            else:
                y = labels[chunk[:, 0]]
            yield Batch(X, y.astype(np.int64))


def _select(samples, mask):
    times, units, labels = samples
    idx = np.nonzero(mask)[0]
    return [times[i] for i in idx], [units[i] for i in idx], labels[idx]
