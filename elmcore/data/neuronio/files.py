"""Decoding one NeuronIO file into sparse input events and dense per-ms targets.

The conventions (input rows, spike bins, soma targets) are those of the package
docstring. A file is hostile until decoded: every count it declares is checked
against its size before anything that size is allocated, since a pickle can
point one list or trace at many places for a few bytes each.
"""

import math
import os

import numpy as np

from elmcore.errors import DataError, ELMError
from elmcore.data.neuronio.pickle_io import read_pickle_bytes, short_repr, unpickle_neuronio_bytes

FILE_PATTERN = "*sim__*.p"
NUM_SEGMENTS = 639
NUM_INPUT = 2 * NUM_SEGMENTS
SIMS_PER_FILE = 128
SIM_DURATION_MS = 6000
# The release starts training windows this far into a simulation (its loader's
# ``ignore_time_from_start``): the first ms still carry the simulator's settling.
RELEASE_IGNORE_TIME_FROM_START = 500
# Input rows are stored as int16 event codes.
MAX_SEGMENTS = np.iinfo(np.int16).max // 2
DATA_SOURCE = ("NeuronIO (Beniaguev, Segev & London, 'Single cortical neurons as deep artificial "
               "neural networks', Neuron 2021), on Kaggle: "
               "https://www.kaggle.com/datasets/selfishgene/single-neurons-as-deep-nets-nmda-train-data "
               "and https://www.kaggle.com/datasets/selfishgene/single-neurons-as-deep-nets-nmda-test-data")


def require_int(name, value, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ELMError(f"{name} must be an integer >= {minimum}, got {value!r}")


def input_signs(num_segments=NUM_SEGMENTS):
    """The model's input encoding per row: +1 excitatory (first half), -1 inhibitory."""
    return np.concatenate([np.ones(num_segments, np.float32), -np.ones(num_segments, np.float32)])


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
        """Dense ±1 input of simulation ``sim`` over ms [start, start + length): (length, num_input) float32,
        or written into ``out`` (any signed dtype: the training batches are int8)."""
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


class _NumberBudget:
    """Numbers (spike times, voltage samples) a file may still yield: at most one per byte of it.

    A pickle spends at least a byte on every number it really holds; only memo
    references that repeat one list or array make more, and those would be decoded
    once per reference.
    """

    def __init__(self, file_size, path):
        self.left, self.file_size, self.path = file_size, file_size, path

    def take(self, count, where):
        self.left -= count
        if self.left < 0:
            raise DataError(f"NeuronIO file {self.path}: {where} brings the numbers it holds beyond its "
                            f"{self.file_size} bytes (lists repeated by reference); refused")


def _numbers(value, budget, path, where):
    """``value`` (a list, tuple or array of numbers, or one number) as a float64 vector."""
    if isinstance(value, np.ndarray):
        budget.take(value.size, where)
        _require(value.dtype.kind in "biuf", path, f"{where} must hold real numbers, got {value.dtype}")
        return value.astype(np.float64).ravel()
    if isinstance(value, (list, tuple)):
        budget.take(len(value), where)
        try:
            # fromiter refuses nested sequences instead of allocating their product.
            return np.fromiter(value, dtype=np.float64, count=len(value))
        except (TypeError, ValueError, OverflowError):
            raise DataError(f"NeuronIO file {path}: {where} must be a flat list of numbers") from None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        budget.take(1, where)
        return np.array([float(value)])
    raise DataError(f"NeuronIO file {path}: {where} must be numbers, got {type(value).__name__}")


def _spike_dict_events(spikes, num_segments, duration_ms, row_offset, budget, path, where):
    """(bin, input row) of every input spike in one ``{segment: [ms, ...]}`` dict."""
    _require(isinstance(spikes, dict), path, f"{where} must be a dict of segment -> spike times, "
                                             f"got {type(spikes).__name__}")
    times, rows = [], []
    for segment, seg_times in spikes.items():
        seg = _as_int(segment)
        if seg is None or not 0 <= seg < num_segments:
            raise DataError(f"NeuronIO file {path}: {where} has segment key {short_repr(segment)}; keys must "
                            f"be integers in [0, {num_segments})")
        t = _numbers(seg_times, budget, path, f"{where}[{seg}]")
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
    """Decode one NeuronIO pickle (see the package docstring for the conventions).

    Returns
    -------
    NeuronIOFile

    Raises
    ------
    DataError
        Unreadable or unsafe pickle, missing fields, spike times or segments out of
        range, voltages that are not finite in float32, a soma trace whose length is
        not the duration, or more simulations, samples or spike times than the
        file's size could hold.
    """
    path = os.fspath(path)
    data = read_pickle_bytes(path)
    obj = unpickle_neuronio_bytes(data, path)
    budget = _NumberBudget(len(data), path)
    del data
    params = _field(obj, "Params", path, "file")
    results = _field(obj, "Results", path, "file")
    seg_types = _field(params, "allSegmentsType", path, "['Params']")
    _require((isinstance(seg_types, (list, tuple)) or isinstance(seg_types, np.ndarray) and seg_types.ndim == 1)
             and len(seg_types) > 0, path,
             "['Params']['allSegmentsType'] must be a non-empty list")
    num_segments = len(seg_types)
    _require(num_segments <= MAX_SEGMENTS, path,
             f"['Params']['allSegmentsType'] lists {num_segments} segments; at most {MAX_SEGMENTS} are supported")
    raw_seconds = _field(params, "totalSimDurationInSec", path, "['Params']")
    seconds = math.nan
    if isinstance(raw_seconds, (int, float, np.integer, np.floating)) and not isinstance(raw_seconds, bool):
        try:
            seconds = float(raw_seconds)
        except OverflowError:  # an int beyond float range
            seconds = math.inf
    _require(math.isfinite(seconds) and seconds > 0, path,
             f"['Params']['totalSimDurationInSec'] must be a positive number, got {short_repr(raw_seconds)}")
    sims = _field(results, "listOfSingleSimulationDicts", path, "['Results']")
    _require(isinstance(sims, (list, tuple)) and len(sims) > 0, path,
             "['Results']['listOfSingleSimulationDicts'] must be a non-empty list")
    n = len(sims)
    # Every simulation stores one soma sample per ms, so the file's size bounds
    # what the arrays below may take; checked before the duration becomes an int.
    _require(seconds * 1000 * n <= budget.file_size, path,
             f"declares {n} simulations of {seconds:g} s, more soma samples than its "
             f"{budget.file_size} bytes could hold")
    duration_ms = int(round(seconds * 1000))
    _require(duration_ms >= 1 and abs(duration_ms - seconds * 1000) < 1e-6, path,
             f"['Params']['totalSimDurationInSec'] = {short_repr(raw_seconds)} is not a whole number of ms")

    num_input = 2 * num_segments
    spikes = np.zeros((n, duration_ms), np.float32)
    soma = np.empty((n, duration_ms), np.float32)
    event_ptr = np.empty((n, duration_ms + 1), np.int64)
    inputs, total = [], 0
    for k, sim in enumerate(sims):
        where = f"simulation {k}"
        ex = _spike_dict_events(_field(sim, "exInputSpikeTimes", path, where), num_segments, duration_ms,
                                0, budget, path, f"{where} exInputSpikeTimes")
        inh = _spike_dict_events(_field(sim, "inhInputSpikeTimes", path, where), num_segments, duration_ms,
                                 num_segments, budget, path, f"{where} inhInputSpikeTimes")
        # One code per (bin, row): sorting orders events by time, dropping repeats merges
        # a segment's spikes within one ms into one, as the release's binary matrix does.
        codes = np.sort(np.concatenate([ex[0], inh[0]]) * num_input + np.concatenate([ex[1], inh[1]]))
        codes = codes[np.concatenate([[True], codes[1:] != codes[:-1]])] if codes.size else codes
        event_ptr[k] = total + np.searchsorted(codes // num_input, np.arange(duration_ms + 1))
        inputs.append((codes % num_input).astype(np.int16))
        total += codes.size

        out_times = _numbers(_field(sim, "outputSpikeTimes", path, where), budget, path,
                             f"{where} outputSpikeTimes")
        _require(np.all(np.isfinite(out_times)), path, f"{where} outputSpikeTimes holds non-finite values")
        # bin int(t - 0.5) (truncation) lies in [0, duration) exactly for t in (-0.5, duration + 0.5)
        _require(np.all((out_times > -0.5) & (out_times < duration_ms + 0.5)), path,
                 f"{where} outputSpikeTimes has a spike outside the {duration_ms} ms simulation")
        spikes[k, (out_times - 0.5).astype(np.int64)] = 1.0

        v = _numbers(_field(sim, "somaVoltageLowRes", path, where), budget, path, f"{where} somaVoltageLowRes")
        _require(v.size == duration_ms, path,
                 f"{where} somaVoltageLowRes has {v.size} samples, the duration needs {duration_ms}")
        with np.errstate(over="ignore"):
            v = v.astype(np.float32)
        _require(np.all(np.isfinite(v)), path,
                 f"{where} somaVoltageLowRes holds NaN, infinite or values beyond float32 range")
        soma[k] = v
    event_input = np.concatenate(inputs) if inputs else np.zeros(0, np.int16)
    return NeuronIOFile(path, num_segments, duration_ms, event_ptr, event_input, spikes, soma)
