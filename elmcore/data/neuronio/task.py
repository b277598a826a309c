"""NeuronIO as a training task: split discovery, a bounded cache of decoded files, and
random training windows assembled by a background thread while the caller trains."""

import math
import os
import queue
import re
import threading
from collections import OrderedDict

import numpy as np

from elmcore.errors import DataError, ELMError
from elmcore.data.base import SPLITS, Batch, Task
from elmcore.data.walk import find_files
from elmcore.data.neuronio.files import (DATA_SOURCE, FILE_PATTERN, NUM_INPUT, RELEASE_IGNORE_TIME_FROM_START,
                                         read_neuronio_file, require_int)
from elmcore.data.neuronio.evaluation import evaluate_neuronio
from elmcore.data.neuronio.loss import neuronio_loss
from elmcore.data.neuronio.soma import soma_eval_target, soma_training_target


def _natural_key(path):
    """Sort ``..._2.p`` before ``..._10.p``."""
    parts = re.split(r"(\d+)", os.path.basename(path))
    return [int(p) if p.isdigit() else p for p in parts], path


def _find_files(directory):
    return sorted(find_files(directory, FILE_PATTERN), key=_natural_key)


def _missing_data_error(directory, detail):
    return DataError(f"{detail}: no NeuronIO files matching '{FILE_PATTERN}' in {directory}. "
                     f"Get the data from {DATA_SOURCE}, or make a surrogate with "
                     "`elm data generate neuronio --out DIR`.")


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
    step_ms = 1.0  # one input step per millisecond of simulation
    higher_is_better = True

    def __init__(self, data_dir, window=500, burn_in=150, file_load_fraction=0.3,
                 ignore_time_from_start=None, windows_per_epoch=None, valid_fraction=0.1,
                 test_fraction=0.1, seed=0, prefetch_batches=4, max_decoded_files=2):
        require_int("window", window, 1)
        require_int("burn_in", burn_in, 0)
        require_int("seed", seed, 0)
        require_int("prefetch_batches", prefetch_batches, 1)
        require_int("max_decoded_files", max_decoded_files, 1)
        if windows_per_epoch is not None:
            require_int("windows_per_epoch", windows_per_epoch, 1)
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
        require_int("ignore_time_from_start", ignore_time_from_start, 0)
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

    def count_unit(self, split):
        if split == "train":
            return f"windows of {self.window} ms drawn at random per epoch"
        return f"windows of {self.window} ms (every non-overlapping window of every simulation)"

    def describe(self):
        return {**super().describe(), "window_ms": self.window, "burn_in_ms": self.burn_in,
                "simulation_ms": self.duration_ms, "simulations_per_file": self.sims_per_file,
                **{f"files_{s}": len(self.files[s]) for s in SPLITS},
                **{f"simulations_{s}": len(self.files[s]) * self.sims_per_file for s in SPLITS}}

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

    # ---- the task's hooks: its loss and the release's evaluation ----------------
    def loss_and_grad(self, Y, target, burn_in=0, **train_options):
        """The release's loss (:func:`~.loss.neuronio_loss`); ``burn_in`` steps of each window do not count."""
        return neuronio_loss(Y, target, burn_in=burn_in)

    def evaluate(self, model, split, batch_size=64, max_batches=None, window=None, burn_in=None, align=True,
                 max_files=None, comm=None):
        """The release's windowed protocol on full simulations (:func:`~.evaluation.evaluate_neuronio`).

        Options: ``window`` and ``burn_in`` in ms (default: the task's, 500 and 150),
        ``align`` (the per-file z-scoring of the soma prediction), ``max_files``.
        Whole files are evaluated, so ``max_batches`` has no meaning here; under data-parallel
        training every rank evaluates them whole (``comm`` is not used).
        """
        if max_batches is not None:
            raise ELMError("NeuronIO evaluates whole simulations file by file: limit it with max_files, "
                           "not max_batches")
        window = self.window if window is None else window
        burn_in = self.burn_in if burn_in is None else burn_in
        require_int("window", window, 1)
        require_int("burn_in", burn_in, 0)
        return evaluate_neuronio(model, self, split, window=window, burn_in=burn_in, align=bool(align),
                                 max_files=max_files, batch_size=batch_size)

    def validation_metrics(self, model, split, batch_size=64, max_batches=None, comm=None):
        """The release's protocol on the split's first file: full files cost minutes per epoch."""
        return self.evaluate(model, split, batch_size, max_files=1)

    def _window_with_spikes(self, split, max_windows=256):
        """(x, target, index) of the first of ``split``'s windows whose output spikes, among the first
        ``max_windows``; the first window (index None) when none does."""
        import numpy as np
        batches = self.batches(split, 16)
        first, seen = None, 0
        try:
            for batch in batches:
                spiking = np.nonzero((np.asarray(batch.target)[:, :, 0] > 0.5).any(axis=1))[0]
                if len(spiking):
                    k = int(spiking[0])
                    return np.asarray(batch.X[k]), np.asarray(batch.target[k]), seen + k
                if first is None:
                    first = (np.asarray(batch.X[0]), np.asarray(batch.target[0]), None)
                seen += len(batch.X)
                if seen >= max_windows:
                    break
        finally:
            batches.close()  # stops the prefetching worker
        return first

    def preview_figure(self, plt, split):
        """Excitatory and inhibitory input spikes, the soma trace and the output spikes of one window (the
        first in which the neuron spikes), in ms."""
        import numpy as np

        from elmcore.data.neuronio.soma import SOMA_BIAS_MV, SOMA_CAP_MV, SOMA_SCALE
        x, target, index = self._window_with_spikes(split)
        t_ms = np.arange(len(x))
        fig, (ax_in, ax_soma) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 2]})
        for sign, color, name in ((1, "C0", "excitatory"), (-1, "C3", "inhibitory")):
            steps, rows = np.nonzero(x * sign > 0)
            ax_in.scatter(steps, rows, s=1.5, c=color, marker="|", linewidths=0.6,
                          label=f"{name} ({len(steps)} spikes)")
        half = x.shape[1] // 2
        ax_in.axhline(half - 0.5, color="0.5", lw=0.8)
        ax_in.set_ylim(-0.5, x.shape[1] - 0.5)
        ax_in.set_ylabel("input (segment; exc. then inh.)")
        ax_in.legend(loc="upper right", fontsize=8, markerscale=6)
        soma = target[:, 1] / SOMA_SCALE + SOMA_BIAS_MV
        ax_soma.plot(t_ms, soma, color="k", lw=0.8,
                     label=f"soma (mV, capped at {SOMA_CAP_MV:g} as the loss sees it)")
        spikes = np.nonzero(target[:, 0] > 0.5)[0]
        for k, s in enumerate(spikes):
            ax_soma.axvline(s, color="C1", lw=1, alpha=0.8, label="output spike" if k == 0 else None)
        ax_soma.set_ylabel("soma (mV)")
        ax_soma.set_xlabel("time (ms)")
        ax_soma.legend(loc="upper right", fontsize=8)
        which = ("first window; none of the first 256 has an output spike" if index is None else
                 "first window" if index == 0 else f"window {index}, the first with an output spike")
        fig.suptitle(f"neuronio ({split}, {which}): {len(x)} ms, {len(spikes)} output spikes")
        return fig

    # ---- batches --------------------------------------------------------------
    def batches(self, split, batch_size, rng=None, shuffle=False):
        """Batches of (B, window, num_input) ±1 input (int8) and (B, window, 2) targets (float32).

        ``train``: random windows (see the class docstring), from ``rng`` or, without
        one, from the task seed (then every epoch repeats the same windows).
        ``valid`` / ``test``: every non-overlapping window, in file order, or in an
        order drawn from ``rng`` with ``shuffle``. Target ``[..., 0]`` is the spike
        train (0/1), ``[..., 1]`` the training soma target. A background thread
        decodes files and assembles the next ``prefetch_batches`` batches.
        """
        if split not in SPLITS:
            raise ELMError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        require_int("batch_size", batch_size, 1)
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
                    # ±1 spikes in one byte: a quarter of float32's bytes to copy to a GPU; the
                    # model's routing reads one-byte spikes as they are, to the same numbers.
                    X = np.empty((batch_size, self.window, self.num_input), np.int8)
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
