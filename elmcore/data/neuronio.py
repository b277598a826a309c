"""NeuronIO (Beniaguev et al.): safe reader, streaming task and an offline surrogate generator.

File format (ELM_SPEC §8): pickles named ``*sim__*.p``, written by Python 2 with
protocol 2, each holding ``{'Params': {...}, 'Results': {'listOfSingleSimulationDicts':
[...]}}`` with, per simulation, the input spike times per dendritic segment
(``exInputSpikeTimes`` / ``inhInputSpikeTimes``: ``{segment: [ms, ...]}``), the
output spike times (``outputSpikeTimes``, ms) and the soma voltage sampled once per
ms (``somaVoltageLowRes``, mV). The published set has 128 simulations × 6000 ms per
file and 639 segments.

Conventions, as in the release's loader (``neuronio_data_utils.parse_sim_experiment_file``):

- Input: 2·segments rows, excitatory first, then inhibitory. An input spike at time
  ``t`` ms sets bin ``int(t)`` (the published times are integer ms, so this is the
  release's ``matrix[seg, t] = 1``); a segment spiking twice in one bin still reads 1.
  The model sees ``+1`` for excitatory and ``-1`` for inhibitory spikes
  (ELM_SPEC §5 ``synapse_types``), 0 elsewhere.
- Output spike at time ``t`` ms -> bin ``int(t - 0.5)`` (truncation, as the release).
- Soma targets: training ``(min(v, -55) - (-67.7)) * 0.1``; evaluation
  ``min(v, -55) - (-67.7)`` in mV.

Memory: a decoded file keeps its input as sparse events (the inputs spiking in each
ms, int16, plus a per-simulation index by time), never as a dense
(sims, 6000, 1278) array (3.9 GB per published file); windows are densified on demand.
"""

import glob
import math
import os
import pickle
import queue
import re
import struct
import threading
from collections import OrderedDict

import numpy as np

from ..errors import DataError, ELMError
from ..fileio import atomic_output
from ..losses import SOMA_BIAS_MV, SOMA_SCALE, prepare_soma
from .base import SPLITS, Batch, Task

FILE_PATTERN = "*sim__*.p"
NUM_SEGMENTS = 639
NUM_INPUT = 2 * NUM_SEGMENTS
SIMS_PER_FILE = 128
SIM_DURATION_MS = 6000
# The release starts training windows this far into a simulation (its loader's
# ``ignore_time_from_start``): the first ms still carry the simulator's settling.
RELEASE_IGNORE_TIME_FROM_START = 500
DATA_SOURCE = ("NeuronIO (Beniaguev, Segev & London, 'Single cortical neurons as deep artificial "
               "neural networks', Neuron 2021), on Kaggle: "
               "https://www.kaggle.com/datasets/selfishgene/single-neurons-as-deep-nets-nmda-train-data "
               "and https://www.kaggle.com/datasets/selfishgene/single-neurons-as-deep-nets-nmda-test-data")


# ---- safe unpickling -------------------------------------------------------------

def _numpy_multiarray():
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy < 2
        from numpy.core import multiarray
    return multiarray


def _latin1_encode(text, encoding="latin1"):
    """Python 3 writes bytes at protocol 2 as ``_codecs.encode(text, 'latin1')``; allow only that."""
    if not isinstance(text, str) or str(encoding).lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as a latin1 bytes literal")
    return text.encode("latin1")


def _empty_bytes(*args):
    """Python 3 writes b'' at protocol 2 as ``bytes()``; anything else could allocate at will."""
    if args:
        raise pickle.UnpicklingError("bytes(...) is only allowed without arguments")
    return b""


def _allowed_globals():
    """(module, name) as written in the pickle -> the object it may resolve to.

    Exactly what pickled NumPy arrays, dtypes and scalars need, under both their
    NumPy 1 (``numpy.core``) and NumPy 2 (``numpy._core``) module names, plus the two
    helpers Python 3 uses for bytes at protocol 2 (restricted to that use).
    """
    ma = _numpy_multiarray()
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("_codecs", "encode"): _latin1_encode,
             ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = ma._reconstruct
        table[(module, "scalar")] = ma.scalar
    return table


class _RefusedGlobal(Exception):
    """Raised from ``find_class`` so the loader can name the global and the file."""

    def __init__(self, module, name):
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class _NeuronIOUnpickler(pickle.Unpickler):
    _ALLOWED = None

    def find_class(self, module, name):
        if _NeuronIOUnpickler._ALLOWED is None:
            _NeuronIOUnpickler._ALLOWED = _allowed_globals()
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(module, name) from None


def load_neuronio_pickle(path):
    """The object stored in a NeuronIO pickle, without executing any code it names.

    Only NumPy arrays, dtypes and scalars plus plain containers (dict, list, tuple,
    str, numbers) are rebuilt; any other global is refused with a :class:`DataError`
    that names it and the file. Python 2 files are read with ``encoding='ASCII'``
    first and, if their byte strings are not ASCII, again with ``'latin1'`` (the
    release's rule; NumPy decodes latin1 array payloads back to the original bytes).
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read NeuronIO file {path}: {e}") from None
    with f:
        for encoding in ("ASCII", "latin1"):
            f.seek(0)
            try:
                return _NeuronIOUnpickler(f, encoding=encoding).load()
            except UnicodeDecodeError:
                continue  # latin1 decodes every byte string, so the second pass cannot end here
            except _RefusedGlobal as e:
                raise DataError(f"NeuronIO file {path}: refused to load pickled global '{e.qualified}' "
                                "(only NumPy arrays and plain containers are allowed)") from None
            except Exception as e:  # truncated / corrupt pickles raise many different types
                raise DataError(f"NeuronIO file {path} is not a readable pickle "
                                f"({type(e).__name__}: {e})") from None
    raise DataError(f"NeuronIO file {path}: byte strings decode neither as ASCII nor as latin1")


# ---- decoding ------------------------------------------------------------------

def input_signs(num_segments=NUM_SEGMENTS):
    """The model's input encoding per row: +1 excitatory (first half), -1 inhibitory."""
    return np.concatenate([np.ones(num_segments, np.float32), -np.ones(num_segments, np.float32)])


def soma_training_target(soma_mV):
    """Capped at -55 mV, minus the bias -67.7 mV, times 0.1 (the release's training target)."""
    return prepare_soma(np.asarray(soma_mV)).astype(np.float32)


def soma_eval_target(soma_mV):
    """Capped at -55 mV and bias-subtracted, in mV (the release's evaluation target)."""
    return prepare_soma(np.asarray(soma_mV), scale=1.0).astype(np.float32)


class NeuronIOFile:
    """One decoded NeuronIO file: sparse input events plus dense per-ms targets.

    Attributes
    ----------
    path : str
    num_segments : int
        Dendritic segments; the input has ``2 * num_segments`` rows.
    duration_ms : int
        Simulation length T (one bin per ms).
    event_ptr : ndarray, (num_sims, T + 1) int64
        Events of simulation ``s`` at ms ``t`` are ``event_input[event_ptr[s, t]:event_ptr[s, t + 1]]``.
    event_input : ndarray, (E,) int16
        Input row of each event, sorted by simulation, then time, then row.
    spikes : ndarray, (num_sims, T) float32
        Output spike train, 1.0 in bin ``int(t - 0.5)`` of each output spike.
    soma_mV : ndarray, (num_sims, T) float32
        Raw soma voltage in mV (see :func:`soma_training_target`, :func:`soma_eval_target`).
    """

    def __init__(self, path, num_segments, duration_ms, event_ptr, event_input, spikes, soma_mV):
        self.path = path
        self.num_segments = num_segments
        self.duration_ms = duration_ms
        self.event_ptr = event_ptr
        self.event_input = event_input
        self.spikes = spikes
        self.soma_mV = soma_mV
        self._signs = input_signs(num_segments)

    @property
    def num_sims(self):
        return self.spikes.shape[0]

    @property
    def num_input(self):
        return 2 * self.num_segments

    def input_window(self, sim, start, length, out=None):
        """Dense ±1 input of simulation ``sim`` over ms [start, start + length): (length, num_input) float32."""
        ptr = self.event_ptr[sim, start:start + length + 1]
        rows = np.repeat(np.arange(length), np.diff(ptr))
        cols = self.event_input[ptr[0]:ptr[-1]]
        if out is None:
            out = np.zeros((length, self.num_input), np.float32)
        else:
            out[...] = 0
        out[rows, cols] = self._signs[cols]
        return out

    def input(self, sim):
        """Dense ±1 input of a whole simulation: (T, num_input) float32."""
        return self.input_window(sim, 0, self.duration_ms)


def _require(condition, path, message):
    if not condition:
        raise DataError(f"NeuronIO file {path}: {message}")


def _as_int(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def _spike_dict_events(spikes, num_segments, duration_ms, row_offset, path, where):
    """(bin, input row) of every input spike in one ``{segment: [ms, ...]}`` dict."""
    _require(isinstance(spikes, dict), path, f"{where} must be a dict of segment -> spike times, "
                                             f"got {type(spikes).__name__}")
    times, rows = [], []
    for segment, seg_times in spikes.items():
        seg = _as_int(segment)
        _require(seg is not None and 0 <= seg < num_segments, path,
                 f"{where} has segment key {segment!r}; keys must be integers in [0, {num_segments})")
        try:
            t = np.asarray(seg_times, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise DataError(f"NeuronIO file {path}: {where}[{seg}] must hold spike times in ms") from None
        times.append(t)
        rows.append(np.full(t.size, seg + row_offset, np.int64))
    if not times:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    t = np.concatenate(times)
    bad = ~((t >= 0) & (t < duration_ms))  # also catches NaN
    if bad.any():
        seg = int(np.concatenate(rows)[np.argmax(bad)]) - row_offset
        raise DataError(f"NeuronIO file {path}: {where}[{seg}] has spike times outside "
                        f"[0, {duration_ms}) ms or non-finite")
    return t.astype(np.int64), np.concatenate(rows)  # t >= 0, so truncation is int(t)


def _field(mapping, key, path, where):
    _require(isinstance(mapping, dict), path, f"{where} must be a dict, got {type(mapping).__name__}")
    _require(key in mapping, path, f"missing field {where}['{key}']")
    return mapping[key]


def read_neuronio_file(path):
    """Decode one NeuronIO pickle (see the module docstring for the conventions).

    Returns
    -------
    NeuronIOFile

    Raises
    ------
    DataError
        Unreadable or unsafe pickle, missing fields, spike times or segments out of
        range, non-finite voltages, or a soma trace whose length is not the duration.
    """
    path = os.fspath(path)
    obj = load_neuronio_pickle(path)
    params = _field(obj, "Params", path, "file")
    results = _field(obj, "Results", path, "file")
    seg_types = _field(params, "allSegmentsType", path, "['Params']")
    _require(isinstance(seg_types, (list, tuple, np.ndarray)) and len(seg_types) > 0, path,
             "['Params']['allSegmentsType'] must be a non-empty list")
    num_segments = len(seg_types)
    seconds = _field(params, "totalSimDurationInSec", path, "['Params']")
    _require(isinstance(seconds, (int, float, np.integer, np.floating)) and not isinstance(seconds, bool)
             and math.isfinite(float(seconds)) and seconds > 0, path,
             f"['Params']['totalSimDurationInSec'] must be a positive number, got {seconds!r}")
    duration_ms = int(round(float(seconds) * 1000))
    _require(duration_ms >= 1 and abs(duration_ms - float(seconds) * 1000) < 1e-6, path,
             f"['Params']['totalSimDurationInSec'] = {seconds!r} is not a whole number of ms")
    sims = _field(results, "listOfSingleSimulationDicts", path, "['Results']")
    _require(isinstance(sims, (list, tuple)) and len(sims) > 0, path,
             "['Results']['listOfSingleSimulationDicts'] must be a non-empty list")

    num_input = 2 * num_segments
    n = len(sims)
    spikes = np.zeros((n, duration_ms), np.float32)
    soma = np.empty((n, duration_ms), np.float32)
    event_ptr = np.empty((n, duration_ms + 1), np.int64)
    inputs, total = [], 0
    for k, sim in enumerate(sims):
        where = f"simulation {k}"
        ex = _spike_dict_events(_field(sim, "exInputSpikeTimes", path, where), num_segments, duration_ms,
                                0, path, f"{where} exInputSpikeTimes")
        inh = _spike_dict_events(_field(sim, "inhInputSpikeTimes", path, where), num_segments, duration_ms,
                                 num_segments, path, f"{where} inhInputSpikeTimes")
        # One code per (bin, row): sorting orders events by time, dropping repeats merges
        # a segment's spikes within one ms into one, as the release's binary matrix does.
        codes = np.sort(np.concatenate([ex[0], inh[0]]) * num_input + np.concatenate([ex[1], inh[1]]))
        codes = codes[np.concatenate([[True], codes[1:] != codes[:-1]])] if codes.size else codes
        event_ptr[k] = total + np.searchsorted(codes // num_input, np.arange(duration_ms + 1))
        inputs.append((codes % num_input).astype(np.int16))
        total += codes.size

        try:
            out_times = np.asarray(_field(sim, "outputSpikeTimes", path, where), dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise DataError(f"NeuronIO file {path}: {where} outputSpikeTimes must be spike times in ms") from None
        _require(np.all(np.isfinite(out_times)), path, f"{where} outputSpikeTimes holds non-finite values")
        out_bins = (out_times - 0.5).astype(np.int64)
        _require(np.all((out_bins >= 0) & (out_bins < duration_ms)), path,
                 f"{where} outputSpikeTimes has a spike outside the {duration_ms} ms simulation")
        spikes[k, out_bins] = 1.0

        try:
            v = np.asarray(_field(sim, "somaVoltageLowRes", path, where), dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise DataError(f"NeuronIO file {path}: {where} somaVoltageLowRes must be numbers (mV)") from None
        _require(v.size == duration_ms, path,
                 f"{where} somaVoltageLowRes has {v.size} samples, the duration needs {duration_ms}")
        _require(np.all(np.isfinite(v)), path, f"{where} somaVoltageLowRes holds NaN or infinite values")
        soma[k] = v
    event_input = np.concatenate(inputs) if inputs else np.zeros(0, np.int16)
    return NeuronIOFile(path, num_segments, duration_ms, event_ptr, event_input, spikes, soma)


# ---- file discovery and the task -------------------------------------------------

def _natural_key(path):
    """Sort ``..._2.p`` before ``..._10.p``."""
    parts = re.split(r"(\d+)", os.path.basename(path))
    return [int(p) if p.isdigit() else p for p in parts], path


def _find_files(directory):
    return sorted(glob.glob(os.path.join(glob.escape(directory), "**", FILE_PATTERN), recursive=True),
                  key=_natural_key)


def _missing_data_error(directory, detail):
    return DataError(f"{detail}: no NeuronIO files matching '{FILE_PATTERN}' in {directory}. "
                     f"Get the data from {DATA_SOURCE}, or make a surrogate with "
                     "elmcore.data.neuronio.generate_neuronio_surrogate.")


def discover_splits(data_dir, valid_fraction=0.1, test_fraction=0.1):
    """{split: [file, ...]} for a NeuronIO data directory.

    If ``data_dir`` has any of the sub-folders ``train``, ``valid``, ``test``, each
    split is the ``*sim__*.p`` files below its folder (searched recursively, so
    ``train/`` may hold the published ``full_ergodic_train_batch_*`` folders or links
    to them; the release trained on batches 2-10, validated on batch 1 and tested on
    the separate test set). Otherwise all files below ``data_dir`` are sorted by name
    (numbers compared as numbers) and split without any randomness, so every run
    and seed sees the same split: the last ``max(1, round(test_fraction·n))`` files
    are test (when n ≥ 3), the ``max(1, round(valid_fraction·n))`` before them valid
    (when n ≥ 2), the rest train.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise _missing_data_error(data_dir, "NeuronIO data directory not found")
    for name, frac in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
            raise ELMError(f"{name} must be a number in [0, 1), got {frac!r}")
    subdirs = {s: os.path.join(data_dir, s) for s in SPLITS if os.path.isdir(os.path.join(data_dir, s))}
    if subdirs:
        splits = {s: _find_files(subdirs[s]) if s in subdirs else [] for s in SPLITS}
        if not splits["train"]:
            raise _missing_data_error(os.path.join(data_dir, "train"), "NeuronIO training split is empty")
        return splits
    files = _find_files(data_dir)
    if not files:
        raise _missing_data_error(data_dir, "NeuronIO data missing")
    n = len(files)
    n_test = max(1, round(test_fraction * n)) if n >= 3 and test_fraction > 0 else 0
    n_valid = max(1, round(valid_fraction * n)) if n >= 2 and valid_fraction > 0 else 0
    n_valid = min(n_valid, n - n_test - 1)
    n_train = n - n_test - n_valid
    return {"train": files[:n_train], "valid": files[n_train:n_train + n_valid], "test": files[n_train + n_valid:]}


class _DecodedFileCache:
    """At most ``capacity`` decoded files in memory, least recently used evicted first.

    Shared by the prefetch thread and the caller, hence the lock; decoding happens
    under it, after eviction, so the bound holds even while a file is being read.
    """

    def __init__(self, capacity, check):
        self.capacity = capacity
        self._check = check
        self._files = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path):
        with self._lock:
            if path in self._files:
                self._files.move_to_end(path)
                return self._files[path]
            while len(self._files) >= self.capacity:
                self._files.popitem(last=False)
            decoded = read_neuronio_file(path)
            self._check(decoded)
            self._files[path] = decoded
            return decoded


class _WorkerFailed:
    def __init__(self, error):
        self.error = error


_END = object()


class NeuronIOTask(Task):
    """NeuronIO as a :class:`Task`: random training windows, streamed file by file.

    Parameters
    ----------
    data_dir : str or path
        Folder with ``*sim__*.p`` files, or with ``train/``, ``valid/``, ``test/``
        sub-folders (see :func:`discover_splits` for the split rule).
    window : int
        Window length in ms (the release's ``input_window_size``, 500).
    burn_in : int
        The release's ``burn_in_time`` (150) for windowed evaluation; kept here for
        the evaluator, the batches themselves are unaffected.
    file_load_fraction : float
        Each visit to a training file draws ``max(1, int(fraction · sims · T / window))``
        windows from it (the release's rule, 0.3 in its loader, 0.5 for the best model).
    ignore_time_from_start : int or None
        Training windows start in ``[ignore, T − window]``. ``None``: the release's
        500 ms, reduced to ``T − window`` for simulations too short for it.
    windows_per_epoch : int or None
        Training windows per epoch; ``None``: one visit per training file.
    valid_fraction, test_fraction : float
        Used only when there are no split sub-folders.
    seed : int
        Training windows come from this seed when ``batches`` gets no ``rng``.
    prefetch_batches : int
        Bound of the queue a background thread fills while the caller trains.
    max_decoded_files : int
        At most this many decoded files are held at once (≥ 1).

    Every file of a data directory must have the same segment count, simulation
    count and duration (the published files: 639, 128, 6000 ms); the first
    training file is decoded at construction to learn them.
    """

    name = "neuronio"
    loss = "neuronio"
    metric = "auc"
    higher_is_better = True

    def __init__(self, data_dir, window=500, burn_in=150, file_load_fraction=0.3,
                 ignore_time_from_start=None, windows_per_epoch=None, valid_fraction=0.1,
                 test_fraction=0.1, seed=0, prefetch_batches=4, max_decoded_files=2):
        _require_int("window", window, 1)
        _require_int("burn_in", burn_in, 0)
        _require_int("seed", seed, 0)
        _require_int("prefetch_batches", prefetch_batches, 1)
        _require_int("max_decoded_files", max_decoded_files, 1)
        if windows_per_epoch is not None:
            _require_int("windows_per_epoch", windows_per_epoch, 1)
        if isinstance(file_load_fraction, bool) or not isinstance(file_load_fraction, (int, float)) \
                or not (math.isfinite(file_load_fraction) and file_load_fraction > 0):
            raise ELMError(f"file_load_fraction must be a number > 0, got {file_load_fraction!r}")
        if burn_in >= window:
            raise ELMError(f"burn_in ({burn_in}) must be shorter than window ({window})")
        self.data_dir = os.fspath(data_dir)
        self.files = discover_splits(self.data_dir, valid_fraction, test_fraction)
        self.window, self.burn_in, self.seed = window, burn_in, seed
        self.file_load_fraction = float(file_load_fraction)
        self.windows_per_epoch = windows_per_epoch
        self.prefetch_batches = prefetch_batches
        self._layout = None
        self._cache = _DecodedFileCache(max_decoded_files, self._check_layout)
        first = self._cache.get(self.files["train"][0])
        self.num_segments, self.sims_per_file, self.duration_ms = \
            first.num_segments, first.num_sims, first.duration_ms
        self.num_input, self.num_output = first.num_input, 2
        if window > self.duration_ms:
            raise ELMError(f"window ({window} ms) is longer than the simulations ({self.duration_ms} ms)")
        slack = self.duration_ms - window
        if ignore_time_from_start is None:
            ignore_time_from_start = min(RELEASE_IGNORE_TIME_FROM_START, slack)
        _require_int("ignore_time_from_start", ignore_time_from_start, 0)
        if ignore_time_from_start > slack:
            raise ELMError(f"ignore_time_from_start ({ignore_time_from_start}) leaves no room for a "
                           f"{window} ms window in {self.duration_ms} ms simulations (at most {slack})")
        self.ignore_time_from_start = ignore_time_from_start

    def _check_layout(self, decoded):
        layout = (decoded.num_segments, decoded.num_sims, decoded.duration_ms)
        if self._layout is None:
            self._layout, self._layout_source = layout, decoded.path
        elif layout != self._layout:
            raise DataError(
                f"NeuronIO file {decoded.path} has {layout[0]} segments, {layout[1]} simulations of "
                f"{layout[2]} ms, but {self._layout_source} has {self._layout[0]}, {self._layout[1]} of "
                f"{self._layout[2]} ms; all files of a data directory must match")

    # ---- sizes --------------------------------------------------------------
    @property
    def windows_per_file(self):
        return max(1, int(self.file_load_fraction * self.sims_per_file * self.duration_ms / self.window))

    def num_examples(self, split):
        files = self.files.get(split, [])
        if not files:
            return 0
        if split == "train":
            return self.windows_per_epoch or len(files) * self.windows_per_file
        return len(files) * self.sims_per_file * (self.duration_ms // self.window)

    def model_defaults(self):
        defaults = {**super().model_defaults(), "memory_tau_min": 1.0, "memory_tau_max": 150.0}
        if self.num_input == NUM_INPUT:  # the release's NeuronIO architecture
            defaults.update(num_branch=45, num_synapse_per_branch=100,
                            input_to_synapse_routing="neuronio_routing")
        return defaults

    def describe(self):
        return {**super().describe(), "window_ms": self.window, "burn_in_ms": self.burn_in,
                "simulation_ms": self.duration_ms, "simulations_per_file": self.sims_per_file,
                **{f"files_{s}": len(self.files[s]) for s in SPLITS}}

    # ---- plans: which windows, in which order --------------------------------
    def _train_plan(self, rng, batch_size):
        """[(file, sims, starts)] for one epoch, drawn entirely from ``rng``.

        Like the release, files are visited in random order and each batch-sized
        group of windows takes distinct simulations of one file where it can.
        """
        files, remaining, plan = self.files["train"], self.num_examples("train"), []
        lo, hi = self.ignore_time_from_start, self.duration_ms - self.window
        while remaining > 0:
            for f in rng.permutation(len(files)):
                take = min(self.windows_per_file, remaining)
                for i in range(0, take, batch_size):
                    g = min(batch_size, take - i)
                    sims = rng.choice(self.sims_per_file, size=g, replace=g > self.sims_per_file)
                    plan.append((files[f], sims, rng.integers(lo, hi + 1, size=g)))
                remaining -= take
                if remaining == 0:
                    break
        return plan

    def _eval_plan(self, split, rng):
        """Every non-overlapping window [k·window, (k+1)·window) of every simulation, file by file."""
        files = self.files[split]
        per_sim = self.duration_ms // self.window
        sims = np.repeat(np.arange(self.sims_per_file), per_sim)
        starts = np.tile(np.arange(per_sim) * self.window, self.sims_per_file)
        order = np.arange(len(files))
        plan = []
        if rng is not None:
            rng.shuffle(order)
        for f in order:
            idx = rng.permutation(sims.size) if rng is not None else np.arange(sims.size)
            plan.append((files[f], sims[idx], starts[idx]))
        return plan

    # ---- batches --------------------------------------------------------------
    def batches(self, split, batch_size, rng=None, shuffle=False):
        """Batches of (B, window, num_input) ±1 input and (B, window, 2) targets.

        ``train``: random windows (see the class docstring), from ``rng`` or, without
        one, from the task seed (then every epoch repeats the same windows).
        ``valid`` / ``test``: every non-overlapping window, in file order, or in an
        order drawn from ``rng`` with ``shuffle``. Target ``[..., 0]`` is the spike
        train (0/1), ``[..., 1]`` the training soma target. A background thread
        decodes files and assembles the next ``prefetch_batches`` batches.
        """
        if split not in SPLITS:
            raise ELMError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        _require_int("batch_size", batch_size, 1)
        if not self.files[split]:
            return
        if split == "train":
            plan = self._train_plan(rng if rng is not None else np.random.default_rng(self.seed), batch_size)
        else:
            plan = self._eval_plan(split, rng if shuffle else None)
        yield from self._prefetched(plan, batch_size)

    def _assemble(self, plan, batch_size, stop):
        filled = 0
        for path, sims, starts in plan:
            decoded = self._cache.get(path)
            for sim, start in zip(sims, starts):
                if stop.is_set():
                    return
                if filled == 0:
                    X = np.empty((batch_size, self.window, self.num_input), np.float32)
                    Y = np.empty((batch_size, self.window, 2), np.float32)
                sl = slice(start, start + self.window)
                decoded.input_window(sim, start, self.window, out=X[filled])
                Y[filled, :, 0] = decoded.spikes[sim, sl]
                Y[filled, :, 1] = soma_training_target(decoded.soma_mV[sim, sl])
                filled += 1
                if filled == batch_size:
                    yield Batch(X, Y)
                    filled = 0
        if filled:
            yield Batch(X[:filled], Y[:filled])

    def _prefetched(self, plan, batch_size):
        q = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()

        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def work():
            try:
                for batch in self._assemble(plan, batch_size, stop):
                    if not put(batch):
                        return
                put(_END)
            except BaseException as e:  # handed to the consumer, which re-raises it
                put(_WorkerFailed(e))

        worker = threading.Thread(target=work, name="neuronio-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _WorkerFailed):
                    raise item.error
                yield item
        finally:
            stop.set()
            worker.join()

    # ---- full simulations for windowed evaluation ------------------------------
    def simulations(self, split):
        """Yield (X (T, num_input) float32 ±1, spikes (T,) float32, soma (T,) float32 mV) per simulation.

        ``soma`` is the evaluation target: capped at -55 mV and bias-subtracted,
        not scaled. Files are decoded one at a time through the bounded cache.
        """
        for group in self.simulation_groups(split):
            yield from group

    def simulation_groups(self, split):
        """Per file, an iterator over its simulations as ``simulations`` yields them.

        The release's evaluation aligns the soma prediction file by file, so the
        evaluator needs to know where one file ends.
        """
        if split not in SPLITS:
            raise ELMError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        for path in self.files[split]:
            yield self._file_simulations(path)

    def _file_simulations(self, path):
        decoded = self._cache.get(path)
        for sim in range(decoded.num_sims):
            yield decoded.input(sim), decoded.spikes[sim].copy(), soma_eval_target(decoded.soma_mV[sim])


def _require_int(name, value, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ELMError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ---- teacher and surrogate ----------------------------------------------------------

def teacher_path():
    """Path of the packaged teacher (see ``elmcore/data/teacher/README.md``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "teacher", "best_elm_neuron.npz")


def load_teacher(dtype="float32", device="cpu"):
    """The release's best NeuronIO ELM (54,002 parameters, MIT, Spieler et al. 2024) as an ``elmcore.ELM``."""
    from ..config import ELMConfig
    from ..model import ELM
    path = teacher_path()
    try:
        with np.load(path, allow_pickle=False) as z:
            config = ELMConfig.from_json(str(z["config"]), source=f"{path}:config")
            params = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
    except FileNotFoundError:
        raise ELMError(f"the packaged teacher model is missing: {path} (reinstall elmcore)") from None
    except (OSError, ValueError, KeyError) as e:
        raise ELMError(f"cannot read the packaged teacher model {path}: {e}") from None
    return ELM(config, params=params, dtype=dtype, device=device)


# The published input process (Beniaguev et al., simulate_L5PC_and_create_dataset.py,
# NMDA setting), in its own units: per tree, total spikes per 100 ms; inhibition =
# excitation + a difference. Rates are redrawn every "keep" ms and smoothed in time.
SURROGATE_NUM_BASAL = 262  # the release's basal cutoff: segments 0..261 basal, the rest apical
SURROGATE_EX_PER_100MS = (0.0, 800.0)
SURROGATE_INH_DIFF_PER_100MS = (-600.0, 200.0)
SURROGATE_KEEP_RATE_MS = (25, 30, 35, 40, 45, 55, 60, 65, 70, 75, 80, 85, 90, 100, 150, 200, 300, 450)
SURROGATE_SMOOTHING_SIGMA_MS = (25, 30, 35, 40, 50, 60, 80, 100, 150, 200, 300, 400, 500, 600)
SURROGATE_JITTER_MS = 20
SURROGATE_SPATIAL_GAIN = (0.5, 1.5)


def _smooth(rate, sigma):
    """Gaussian smoothing in time (width 1 + 7σ, as published), edges padded with their value."""
    half = int(7 * sigma) // 2
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    return np.convolve(np.pad(rate, half, mode="edge"), kernel, mode="valid")


def surrogate_input(rng, duration_ms, num_segments=NUM_SEGMENTS):
    """Excitatory and inhibitory spikes of one synthetic simulation: two (num_segments, T) bool arrays.

    The published NeuronIO input process, simplified where it needs the neuron's
    morphology: for each tree (basal: the first 262 segments, apical: the rest)
    the total rate is drawn uniformly per interval (excitation 0-800 spikes per
    100 ms per tree, inhibition excitation + U(-600, 200), at least 0) and held for
    an interval drawn per simulation (25-450 ms ± 20), then smoothed by a Gaussian
    with σ drawn per simulation (25-600 ms ± 20). The tree rate is shared evenly
    among its segments (the published process weights segments by length; without
    the morphology all weigh the same) with a fixed per-segment gain U(0.5, 1.5),
    and each ms's spike probability is exponentially distributed around that rate.
    On average this gives ~15 Hz excitatory and ~11 Hz inhibitory input per segment.
    """
    keep = max(5, int(rng.choice(SURROGATE_KEEP_RATE_MS)) + int(rng.integers(-SURROGATE_JITTER_MS,
                                                                             SURROGATE_JITTER_MS + 1)))
    sigma = max(5, int(rng.choice(SURROGATE_SMOOTHING_SIGMA_MS)) + int(rng.integers(-SURROGATE_JITTER_MS,
                                                                                     SURROGATE_JITTER_MS + 1)))
    n_intervals = -(-duration_ms // keep)
    n_basal = min(SURROGATE_NUM_BASAL, num_segments)
    trees = [(0, n_basal), (n_basal, num_segments)]
    ex_rate = np.zeros((num_segments, duration_ms), np.float32)
    inh_rate = np.zeros((num_segments, duration_ms), np.float32)
    for a, b in trees:
        if b <= a:
            continue
        ex = rng.uniform(*SURROGATE_EX_PER_100MS, size=n_intervals)
        inh = rng.uniform(np.maximum(0.0, ex + SURROGATE_INH_DIFF_PER_100MS[0]),
                          ex + SURROGATE_INH_DIFF_PER_100MS[1])
        # spikes per 100 ms per tree -> spike probability per ms per segment
        per_seg = 1.0 / (100.0 * (b - a))
        ex_rate[a:b] = _smooth(np.repeat(ex, keep)[:duration_ms], sigma) * per_seg
        inh_rate[a:b] = _smooth(np.repeat(inh, keep)[:duration_ms], sigma) * per_seg
    ex_rate *= rng.uniform(*SURROGATE_SPATIAL_GAIN, size=(num_segments, 1)).astype(np.float32)
    inh_rate *= rng.uniform(*SURROGATE_SPATIAL_GAIN, size=(num_segments, 1)).astype(np.float32)
    spikes = []
    for rate in (ex_rate, inh_rate):
        probability = rng.standard_exponential(rate.shape, dtype=np.float32) * rate
        spikes.append(rng.random(rate.shape, dtype=np.float32) < probability)
    return spikes[0], spikes[1]


def _spike_time_dict(spikes):
    """{segment: [ms, ...]} for the segments that spike, as the published files store it.

    Keys are NumPy int64 like the published files; times are Python ints (the
    published lists hold NumPy int64 scalars; both read identically and ints keep
    the files small).
    """
    seg, t = np.nonzero(spikes)
    bounds = np.concatenate([[0], np.cumsum(np.bincount(seg, minlength=spikes.shape[0]))])
    return {np.int64(s): t[bounds[s]:bounds[s + 1]].tolist()
            for s in range(spikes.shape[0]) if bounds[s + 1] > bounds[s]}


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: byte and ASCII strings as ``str`` opcodes, NumPy 1 names.

    Python 3 at protocol 2 would store bytes through ``_codecs.encode`` and NumPy 2
    names (``numpy._core``); the published files do neither, and a surrogate should
    exercise exactly the reader path real files take (ASCII, then latin1).
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, data):
        n = len(data)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + data)

    def save_bytes(self, obj):
        self._save_py2_str(obj)
        self.memoize(obj)

    def save_str(self, obj):
        if obj.isascii():
            self._save_py2_str(obj.encode("ascii"))
            self.memoize(obj)
        else:
            super().save_str(obj)

    def save_global(self, obj, name=None):
        for known, module, attr in _py2_global_names():
            if obj is known:
                self.write(pickle.GLOBAL + f"{module}\n{attr}\n".encode("ascii"))
                self.memoize(obj)
                return
        super().save_global(obj, name)

    def save_list(self, obj):
        """Lists of small non-negative ints (spike times: millions per file) in one join.

        The bytes are those of the generic path (BININT1 / BININT2 items, APPENDS
        per 1000); anything else takes the generic path.
        """
        if not obj or not all(type(v) is int and 0 <= v < 65536 for v in obj):
            return super().save_list(obj)
        self.write(pickle.EMPTY_LIST)
        self.memoize(obj)
        codes = _small_int_codes()
        for start in range(0, len(obj), self._BATCHSIZE):
            chunk = obj[start:start + self._BATCHSIZE]
            if len(chunk) == 1:
                self.write(codes[chunk[0]] + pickle.APPEND)
            else:
                self.write(pickle.MARK + b"".join([codes[v] for v in chunk]) + pickle.APPENDS)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str
    dispatch[list] = save_list


_SMALL_INT_CODES = []


def _small_int_codes():
    """Pickle encodings of 0..65535 (BININT1 below 256, else BININT2), built once."""
    if not _SMALL_INT_CODES:
        _SMALL_INT_CODES.extend(pickle.BININT1 + bytes([v]) for v in range(256))
        _SMALL_INT_CODES.extend(pickle.BININT2 + struct.pack("<H", v) for v in range(256, 65536))
    return _SMALL_INT_CODES


def _py2_global_names():
    ma = _numpy_multiarray()
    return ((ma._reconstruct, "numpy.core.multiarray", "_reconstruct"),
            (ma.scalar, "numpy.core.multiarray", "scalar"),
            (np.ndarray, "numpy", "ndarray"), (np.dtype, "numpy", "dtype"))


def write_neuronio_file(path, params, simulations):
    """Write a NeuronIO pickle ``{'Params': params, 'Results': {'listOfSingleSimulationDicts': ...}}``
    atomically, at protocol 2 in the Python 2 style of the published files."""
    obj = {"Params": params, "Results": {"listOfSingleSimulationDicts": list(simulations)}}
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            _Python2Pickler(f, protocol=2).dump(obj)


def surrogate_params(num_simulations, duration_ms, seed, num_segments=NUM_SEGMENTS):
    """The ``Params`` dict of a surrogate file (the fields the readers use, plus provenance).

    ``allSegments_DistFromSoma`` is a placeholder (no morphology here): distances
    evenly spaced along each tree, basal up to 300 µm, apical up to 1300 µm.
    """
    n_basal = min(SURROGATE_NUM_BASAL, num_segments)
    seconds = duration_ms // 1000 if duration_ms % 1000 == 0 else duration_ms / 1000.0
    return {
        "allSegmentsType": ["basal"] * n_basal + ["apical"] * (num_segments - n_basal),
        "allSegments_DistFromSoma": (np.linspace(5.0, 300.0, n_basal).tolist()
                                     + np.linspace(5.0, 1300.0, num_segments - n_basal).tolist()),
        "totalSimDurationInSec": seconds,
        "numSimulations": num_simulations,
        "randomSeed": seed,
        "surrogate": "elmcore NeuronIO surrogate: synthetic input labelled by the released best ELM "
                     "neuron (Spieler et al. 2024, MIT); not a biophysical simulation",
    }


def generate_neuronio_surrogate(out_dir, n_files, sims_per_file=SIMS_PER_FILE, duration_ms=SIM_DURATION_MS,
                                seed=0, teacher=None, teacher_batch=16, teacher_chunk_ms=1000, progress=True):
    """Write NeuronIO-format files whose labels come from a teacher ELM instead of a simulator.

    For each simulation: input spikes from :func:`surrogate_input`; the teacher
    (default: :func:`load_teacher`, float32, CPU) runs on the ±1 input; output
    spikes are sampled per ms from ``sigmoid(y[..., 0])`` and written at
    ``t = bin + 1.0`` ms (so the reader's ``int(t − 0.5)`` gives the bin back);
    the soma is ``y[..., 1] / 0.1 + (−67.7)`` mV (the inverse of the target
    preparation). Files are named ``sim__surrogate_seed{seed}_{k}.p``, hold the
    published structure and are written atomically; the same arguments give the
    same bytes. Every draw of simulation ``i`` in file ``k`` comes from
    ``default_rng([seed, k, i])`` (input) and ``default_rng([seed, k, i, 1])``
    (output spikes). Spike times and the soma are stored as float32 (the published
    files use float16, which cannot hold every ms above 2048 exactly).

    Returns
    -------
    list of str
        The files written, in order.
    """
    _require_int("n_files", n_files, 1)
    _require_int("sims_per_file", sims_per_file, 1)
    _require_int("duration_ms", duration_ms, 1)
    _require_int("seed", seed, 0)
    _require_int("teacher_batch", teacher_batch, 1)
    _require_int("teacher_chunk_ms", teacher_chunk_ms, 1)
    teacher = load_teacher() if teacher is None else teacher
    cfg = teacher.config
    if cfg.num_input % 2 or cfg.num_output < 2:
        raise ELMError(f"the teacher must take 2·segments inputs and give at least 2 outputs, "
                       f"got num_input={cfg.num_input}, num_output={cfg.num_output}")
    num_segments = cfg.num_input // 2
    from tqdm import tqdm

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    signs = input_signs(num_segments)
    with tqdm(total=n_files * sims_per_file, desc="NeuronIO surrogate", unit="sim", disable=not progress) as bar:
        for k in range(n_files):
            sims = []
            for first in range(0, sims_per_file, teacher_batch):
                idx = range(first, min(first + teacher_batch, sims_per_file))
                spikes = [surrogate_input(np.random.default_rng([seed, k, i]), duration_ms, num_segments)
                          for i in idx]
                Y = _run_teacher(teacher, spikes, signs, duration_ms, teacher_chunk_ms)
                for j, i in enumerate(idx):
                    ex, inh = spikes[j]
                    p = 1.0 / (1.0 + np.exp(-Y[j, :, 0].astype(np.float64)))
                    out_bins = np.nonzero(np.random.default_rng([seed, k, i, 1]).random(duration_ms) < p)[0]
                    sims.append({
                        "exInputSpikeTimes": _spike_time_dict(ex),
                        "inhInputSpikeTimes": _spike_time_dict(inh),
                        "outputSpikeTimes": (out_bins + 1.0).astype(np.float32),
                        "somaVoltageLowRes": (Y[j, :, 1].astype(np.float64) / SOMA_SCALE
                                              + SOMA_BIAS_MV).astype(np.float32),
                    })
                bar.update(len(idx))
            path = os.path.join(out_dir, f"sim__surrogate_seed{seed}_{k}.p")
            write_neuronio_file(path, surrogate_params(sims_per_file, duration_ms, seed, num_segments), sims)
            written.append(path)
    return written


def _run_teacher(teacher, spikes, signs, duration_ms, chunk_ms):
    """Teacher outputs (B, T, num_output) on ±1 input, streamed in time chunks to bound memory."""
    B = len(spikes)
    state = teacher.init_state(B)
    outputs = []
    for start in range(0, duration_ms, chunk_ms):
        stop = min(start + chunk_ms, duration_ms)
        X = np.zeros((B, stop - start, signs.size), np.float32)
        for b, (ex, inh) in enumerate(spikes):
            X[b, :, :ex.shape[0]] = ex[:, start:stop].T
            X[b, :, ex.shape[0]:] = inh[:, start:stop].T
        X *= signs
        Y, state = teacher.run(X, state)
        outputs.append(np.asarray(teacher.backend.to_host(Y)))
    return np.concatenate(outputs, axis=1)
