"""An offline NeuronIO surrogate: the published input process, labelled by the release's best ELM.

Not a biophysical simulation: it lets the whole pipeline (files, reader, task,
training, the release's evaluation) run without the 100 GB Kaggle download.
"""

import os

import numpy as np

from elmcore.errors import ELMError
from elmcore.data.neuronio.files import NUM_SEGMENTS, SIM_DURATION_MS, SIMS_PER_FILE, input_signs, require_int
from elmcore.data.neuronio.pickle_io import write_neuronio_file
from elmcore.data.neuronio.soma import SOMA_BIAS_MV, SOMA_SCALE


def teacher_path():
    """Path of the packaged teacher (see ``elmcore/data/neuronio/teacher/README.md``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "teacher", "best_elm_neuron.npz")


def load_teacher(dtype="float32", device="cpu"):
    """The release's best NeuronIO ELM (54,002 parameters, MIT, Spieler et al. 2024) as an ``elmcore.ELM``."""
    from elmcore.neuron.config import ELMConfig
    from elmcore.neuron.model import ELM
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
    require_int("n_files", n_files, 1)
    require_int("sims_per_file", sims_per_file, 1)
    require_int("duration_ms", duration_ms, 1)
    require_int("seed", seed, 0)
    require_int("teacher_batch", teacher_batch, 1)
    require_int("teacher_chunk_ms", teacher_chunk_ms, 1)
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
