"""NeuronIO reader, task and surrogate generator against hand-computed expectations."""

import io
import os
import pickle
import pickletools

import numpy as np
import pytest

from elmcore.data import neuronio as N
from elmcore.data.neuronio.pickle_io import _AllocationBudget, _NeuronIOUnpickler
from elmcore.data.neuronio.surrogate import _run_teacher
from elmcore.data.base import Task
from elmcore.errors import DataError, ELMError

# A tiny file in the published layout: 3 segments, 10 ms, 2 simulations.
SEG = 3
T = 10


def tiny_params(num_segments=SEG, duration_ms=T):
    return {"allSegmentsType": ["basal"] * num_segments,
            "totalSimDurationInSec": duration_ms / 1000.0,
            "allSegments_DistFromSoma": [float(i) for i in range(num_segments)]}


def tiny_sims():
    """Published types: int64 segment keys, int64 spike times, float16 arrays."""
    i64 = np.int64
    sim0 = {"exInputSpikeTimes": {i64(0): [i64(0), i64(5)], i64(2): [i64(9)]},
            "inhInputSpikeTimes": {i64(1): [i64(5)]},
            "outputSpikeTimes": np.array([0.4, 3.5, 9.375], dtype=np.float16),
            "somaVoltageLowRes": np.array([-70, -55, -50, -67.7, -60, -80, -54.9, -55.1, -67, -66],
                                          dtype=np.float16)}
    # Float times (5.0 and 5.7 share bin 5); a repeat counts once, as in a binary matrix.
    sim1 = {"exInputSpikeTimes": {1: [3, 3]},
            "inhInputSpikeTimes": {0: [5.0, 5.7], 2: [0.2]},
            "outputSpikeTimes": np.array([], dtype=np.float16),
            "somaVoltageLowRes": np.full(T, -67.7, dtype=np.float16)}
    return [sim0, sim1]


def expected_X():
    X = np.zeros((2, T, 2 * SEG), np.float32)
    X[0, 0, 0] = X[0, 5, 0] = X[0, 9, 2] = 1
    X[0, 5, SEG + 1] = -1
    X[1, 3, 1] = 1
    X[1, 5, SEG + 0] = -1
    X[1, 0, SEG + 2] = -1
    return X


@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "exBas_0_800__sim__tiny.p"
    N.write_neuronio_file(path, tiny_params(), tiny_sims())
    return path


def test_reader_matches_hand_computed_input_spikes_and_soma(tiny_file):
    f = N.read_neuronio_file(tiny_file)
    assert (f.num_sims, f.duration_ms, f.num_segments, f.num_input) == (2, T, SEG, 2 * SEG)
    X = expected_X()
    for s in range(2):
        np.testing.assert_array_equal(f.input(s), X[s])
        np.testing.assert_array_equal(f.input_window(s, 4, 3), X[s, 4:7])
    # output spike at t -> bin int(t - 0.5): 0.4 -> 0, 3.5 -> 3, 9.375 -> 8
    spikes = np.zeros((2, T), np.float32)
    spikes[0, [0, 3, 8]] = 1
    np.testing.assert_array_equal(f.spikes, spikes)
    soma = np.array([-70, -55, -50, -67.7, -60, -80, -54.9, -55.1, -67, -66], dtype=np.float16).astype(np.float32)
    np.testing.assert_array_equal(f.soma_mV[0], soma)


def test_soma_targets_cap_subtract_and_scale():
    v = np.array([-70.0, -55.0, -50.0, -67.7, -40.0])
    np.testing.assert_allclose(N.soma_eval_target(v), [-2.3, 12.7, 12.7, 0.0, 12.7], atol=1e-5)
    np.testing.assert_allclose(N.soma_training_target(v), [-0.23, 1.27, 1.27, 0.0, 1.27], atol=1e-6)


def test_input_signs_excitatory_then_inhibitory():
    s = N.input_signs()
    assert s.shape == (1278,)
    assert np.all(s[:639] == 1) and np.all(s[639:] == -1)


def test_python3_protocol2_pickle_reads_the_same(tmp_path, tiny_file):
    """Files re-saved by Python 3 carry _codecs.encode / numpy._core names; both are allowed."""
    obj = {"Params": tiny_params(), "Results": {"listOfSingleSimulationDicts": tiny_sims()}}
    py3 = tmp_path / "py3_sim__a.p"
    py3.write_bytes(pickle.dumps(obj, protocol=2))
    assert b"_codecs" in py3.read_bytes()
    a, b = N.read_neuronio_file(tiny_file), N.read_neuronio_file(py3)
    for s in range(2):
        np.testing.assert_array_equal(a.input(s), b.input(s))
    np.testing.assert_array_equal(a.spikes, b.spikes)
    np.testing.assert_array_equal(a.soma_mV, b.soma_mV)


def test_written_files_use_python2_opcodes_and_need_the_latin1_fallback(tiny_file):
    data = tiny_file.read_bytes()
    globals_ = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype",
                        "numpy.core.multiarray scalar"}
    with pytest.raises(UnicodeDecodeError):  # float16 payloads are not ASCII, as in the published files
        data = tiny_file.read_bytes()
        _NeuronIOUnpickler(io.BytesIO(data), _AllocationBudget(len(data)), encoding="ASCII").load()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_sim__1.p"
    path.write_bytes(pickle.dumps({"Params": _Evil(marker)}, protocol=2))
    with pytest.raises(DataError, match=r"system") as info:
        N.read_neuronio_file(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_other_globals_are_refused(tmp_path):
    path = tmp_path / "x_sim__1.p"
    path.write_bytes(pickle.dumps({"a": np.random.default_rng(0)}, protocol=2))
    with pytest.raises(DataError, match="refused to load pickled global"):
        N.load_neuronio_pickle(path)


def test_corrupt_and_malformed_files_raise_data_error(tmp_path, tiny_file):
    truncated = tmp_path / "t_sim__1.p"
    truncated.write_bytes(tiny_file.read_bytes()[:200])
    with pytest.raises(DataError, match="not a readable pickle"):
        N.read_neuronio_file(truncated)

    def write(sims, params=None, name="m_sim__1.p"):
        p = tmp_path / name
        N.write_neuronio_file(p, params or tiny_params(), sims)
        return p

    bad = tiny_sims()
    bad[1]["inhInputSpikeTimes"] = {2: [10]}  # == duration: outside [0, 10)
    with pytest.raises(DataError, match=r"simulation 1 inhInputSpikeTimes\[2\]"):
        N.read_neuronio_file(write(bad))
    bad = tiny_sims()
    bad[0]["exInputSpikeTimes"] = {3: [1]}  # segment 3 of 3
    with pytest.raises(DataError, match="segment key 3"):
        N.read_neuronio_file(write(bad))
    bad = tiny_sims()
    bad[0]["somaVoltageLowRes"] = np.zeros(T - 1)
    with pytest.raises(DataError, match="somaVoltageLowRes has 9 samples"):
        N.read_neuronio_file(write(bad))
    bad = tiny_sims()
    bad[0]["somaVoltageLowRes"] = np.full(T, np.nan)
    with pytest.raises(DataError, match="NaN"):
        N.read_neuronio_file(write(bad))
    bad = tiny_sims()
    bad[0]["outputSpikeTimes"] = np.array([10.6])  # bin 10 of 10
    with pytest.raises(DataError, match="outputSpikeTimes"):
        N.read_neuronio_file(write(bad))
    bad = tiny_sims()
    del bad[0]["exInputSpikeTimes"]
    with pytest.raises(DataError, match="exInputSpikeTimes"):
        N.read_neuronio_file(write(bad))


# ---- the task -------------------------------------------------------------------

def random_sims(rng, n_sims, duration_ms, num_segments=SEG):
    sims = []
    for _ in range(n_sims):
        def spikes():
            return {np.int64(s): sorted(rng.choice(duration_ms, size=3, replace=False).tolist())
                    for s in range(num_segments) if rng.random() < 0.8}
        sims.append({"exInputSpikeTimes": spikes(), "inhInputSpikeTimes": spikes(),
                     "outputSpikeTimes": np.sort(rng.uniform(0.5, duration_ms + 0.49, size=2)).astype(np.float32),
                     "somaVoltageLowRes": rng.uniform(-80, -45, size=duration_ms).astype(np.float32)})
    return sims


def make_dir(root, names, n_sims=4, duration_ms=40, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        N.write_neuronio_file(path, tiny_params(duration_ms=duration_ms), random_sims(rng, n_sims, duration_ms))
    return root


def test_split_rule_without_subfolders_is_by_name_and_seed_free(tmp_path):
    names = [f"sim__f_{k}.p" for k in (1, 2, 10, 3, 4)]
    make_dir(tmp_path, names)
    splits = N.discover_splits(tmp_path, valid_fraction=0.2, test_fraction=0.2)
    base = [os.path.basename(p) for p in splits["train"] + splits["valid"] + splits["test"]]
    assert base == ["sim__f_1.p", "sim__f_2.p", "sim__f_3.p", "sim__f_4.p", "sim__f_10.p"]
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [3, 1, 1]
    task_a = N.NeuronIOTask(tmp_path, window=20, burn_in=5, seed=1)
    task_b = N.NeuronIOTask(tmp_path, window=20, burn_in=5, seed=2)
    assert task_a.files == task_b.files


def test_split_subfolders_and_missing_data_messages(tmp_path):
    make_dir(tmp_path, ["train/batch_2/sim__a.p", "train/sim__b.p", "valid/sim__c.p"])
    (tmp_path / "ignored_sim__z.p").write_bytes(b"not read")
    splits = N.discover_splits(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in splits["train"]] == ["train/batch_2/sim__a.p", "train/sim__b.p"]
    assert [os.path.basename(p) for p in splits["valid"]] == ["sim__c.p"] and splits["test"] == []

    with pytest.raises(DataError) as info:
        N.NeuronIOTask(tmp_path / "nowhere")
    msg = str(info.value)
    assert "*sim__*.p" in msg and str(tmp_path / "nowhere") in msg and "kaggle" in msg.lower()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"\*sim__\*\.p.*empty"):
        N.NeuronIOTask(empty)


def test_train_batches_are_windows_of_the_files_with_targets(tmp_path):
    make_dir(tmp_path, ["train/sim__a.p", "train/sim__b.p"], n_sims=4, duration_ms=40)
    task = N.NeuronIOTask(tmp_path, window=16, burn_in=4, file_load_fraction=0.5, ignore_time_from_start=5)
    assert isinstance(task, Task) and (task.loss, task.metric) == ("neuronio", "auc")
    assert (task.num_input, task.num_output, task.sims_per_file, task.duration_ms) == (6, 2, 4, 40)
    assert task.windows_per_file == int(0.5 * 4 * 40 / 16)  # 5
    assert task.num_examples("train") == 10 and task.num_examples("test") == 0
    decoded = {p: N.read_neuronio_file(p) for p in task.files["train"]}

    batches = list(task.batches("train", 3, rng=np.random.default_rng(7), shuffle=True))
    assert [b.X.shape[0] for b in batches] == [3, 3, 3, 1]
    for b in batches:
        assert b.X.dtype == np.int8 and b.X.shape[1:] == (16, 6) and b.target.shape[1:] == (16, 2)
        for x, y in zip(b.X, b.target):
            # find the (file, sim, start) this window came from
            hits = [(f, s, t0) for f in decoded.values() for s in range(4) for t0 in range(5, 40 - 16 + 1)
                    if np.array_equal(f.input_window(s, t0, 16), x)
                    and np.array_equal(f.spikes[s, t0:t0 + 16], y[:, 0])
                    and np.allclose(N.soma_training_target(f.soma_mV[s, t0:t0 + 16]), y[:, 1])]
            assert hits, "a batch window matches no window of the data"

    again = list(task.batches("train", 3, rng=np.random.default_rng(7), shuffle=True))
    assert all(np.array_equal(a.X, b.X) and np.array_equal(a.target, b.target) for a, b in zip(batches, again))
    other = list(task.batches("train", 3, rng=np.random.default_rng(8), shuffle=True))
    assert not all(np.array_equal(a.X, b.X) for a, b in zip(batches, other))


def test_eval_batches_cover_every_window_and_simulations_give_eval_targets(tmp_path):
    make_dir(tmp_path, ["train/sim__a.p", "valid/sim__v1.p", "valid/sim__v2.p"], n_sims=2, duration_ms=40)
    task = N.NeuronIOTask(tmp_path, window=16, burn_in=4, windows_per_epoch=7)
    assert task.num_examples("train") == 7
    assert sum(b.X.shape[0] for b in task.batches("train", 4)) == 7
    assert task.num_examples("valid") == 2 * 2 * 2  # files × sims × (40 // 16)
    batches = list(task.batches("valid", 3))
    X = np.concatenate([b.X for b in batches])
    Y = np.concatenate([b.target for b in batches])
    expected_X, expected_Y = [], []
    for path in task.files["valid"]:
        f = N.read_neuronio_file(path)
        for s in range(2):
            for t0 in (0, 16):
                expected_X.append(f.input_window(s, t0, 16))
                expected_Y.append(np.stack([f.spikes[s, t0:t0 + 16],
                                            N.soma_training_target(f.soma_mV[s, t0:t0 + 16])], -1))
    np.testing.assert_array_equal(X, np.stack(expected_X))
    np.testing.assert_array_equal(Y, np.stack(expected_Y))

    sims = list(task.simulations("valid"))
    assert len(sims) == 4
    f = N.read_neuronio_file(task.files["valid"][0])
    x, spk, soma = sims[1]
    assert x.shape == (40, 6) and x.dtype == np.float32
    np.testing.assert_array_equal(x, f.input(1))
    np.testing.assert_array_equal(spk, f.spikes[1])
    np.testing.assert_allclose(soma, np.minimum(f.soma_mV[1], -55.0) + 67.7, atol=1e-5)


def test_prefetch_thread_stops_when_the_consumer_does(tmp_path):
    make_dir(tmp_path, ["train/sim__a.p"], n_sims=4, duration_ms=40)
    task = N.NeuronIOTask(tmp_path, window=8, burn_in=2, windows_per_epoch=400, prefetch_batches=2)
    gen = task.batches("train", 2, rng=np.random.default_rng(0))
    next(gen)
    gen.close()
    import threading
    assert not any(t.name == "neuronio-prefetch" for t in threading.enumerate())


def test_bad_file_in_stream_and_layout_mismatch_are_data_errors(tmp_path):
    make_dir(tmp_path, ["train/sim__a.p"], n_sims=4, duration_ms=40)
    make_dir(tmp_path, ["valid/sim__b.p"], n_sims=3, duration_ms=40)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "sim__c.p").write_bytes(b"\x80\x02garbage")
    task = N.NeuronIOTask(tmp_path, window=8, burn_in=2)
    with pytest.raises(DataError, match="3 simulations"):
        list(task.batches("valid", 4))
    with pytest.raises(DataError, match="sim__c.p"):
        list(task.batches("test", 4))


def test_impossible_options_are_rejected(tmp_path):
    make_dir(tmp_path, ["sim__a.p"], n_sims=2, duration_ms=40)
    with pytest.raises(ELMError, match="window"):
        N.NeuronIOTask(tmp_path, window=41, burn_in=5)
    with pytest.raises(ELMError, match="ignore_time_from_start"):
        N.NeuronIOTask(tmp_path, window=30, burn_in=5, ignore_time_from_start=11)
    with pytest.raises(ELMError, match="burn_in"):
        N.NeuronIOTask(tmp_path, window=10, burn_in=10)
    task = N.NeuronIOTask(tmp_path, window=30, burn_in=5)
    assert task.ignore_time_from_start == 10  # the release's 500 ms, cut to what 40 ms allows
    with pytest.raises(ELMError, match="batch_size"):
        next(task.batches("train", 0))


# ---- teacher and surrogate ----------------------------------------------------------

@pytest.fixture(scope="module")
def teacher():
    return N.load_teacher()


def test_teacher_is_the_release_checkpoint(teacher):
    assert teacher.num_parameters == 54002
    golden = np.load(os.path.join(os.path.dirname(__file__), "data", "golden", "official_best_elm_neuron.npz"))
    Y = teacher.forward(golden["X"].astype(np.float32))
    np.testing.assert_allclose(Y, golden["Y"], rtol=1e-4, atol=1e-4)


def test_surrogate_is_reproducible_and_reads_like_real_data(tmp_path, teacher):
    kw = dict(n_files=1, sims_per_file=2, duration_ms=600, teacher=teacher, progress=False)
    (a,) = N.generate_neuronio_surrogate(tmp_path / "a", seed=5, **kw)
    (b,) = N.generate_neuronio_surrogate(tmp_path / "b", seed=5, **kw)
    (c,) = N.generate_neuronio_surrogate(tmp_path / "c", seed=6, **kw)
    assert os.path.basename(a) == "sim__surrogate_seed5_0.p"
    assert open(a, "rb").read() == open(b, "rb").read()
    assert open(a, "rb").read() != open(c, "rb").read()
    assert os.listdir(tmp_path / "a") == ["sim__surrogate_seed5_0.p"]  # no temporary left behind

    raw = N.load_neuronio_pickle(a)
    assert len(raw["Params"]["allSegmentsType"]) == 639
    assert raw["Params"]["totalSimDurationInSec"] == 0.6
    assert len(raw["Params"]["allSegments_DistFromSoma"]) == 639

    f = N.read_neuronio_file(a)
    assert (f.num_sims, f.duration_ms, f.num_input) == (2, 600, 1278)
    X = np.stack([f.input(s) for s in range(2)])
    assert set(np.unique(X[:, :, :639])) == {0.0, 1.0} and set(np.unique(X[:, :, 639:])) == {-1.0, 0.0}
    # The labels are the teacher's outputs on exactly the input the reader rebuilds.
    Y = teacher.forward(X).astype(np.float64)
    np.testing.assert_allclose(f.soma_mV, Y[:, :, 1] / 0.1 - 67.7, atol=1e-3)
    for s in range(2):
        u = np.random.default_rng([5, 0, s, 1]).random(600)
        np.testing.assert_array_equal(f.spikes[s], (u < 1 / (1 + np.exp(-Y[s, :, 0]))).astype(np.float32))

    task = N.NeuronIOTask(tmp_path / "a", window=500, windows_per_epoch=2)
    batch = next(task.batches("train", 2, rng=np.random.default_rng(0)))
    assert batch.X.shape == (2, 500, 1278) and batch.target.shape == (2, 500, 2)


def test_surrogate_teacher_gives_plausible_spike_rates_and_soma(teacher):
    """The input statistics put the teacher in its trained regime: a few Hz, soma moving by mV."""
    T = 2000
    spikes = [N.surrogate_input(np.random.default_rng([11, 0, i]), T) for i in range(8)]
    ex_hz = np.mean([e.mean() for e, _ in spikes]) * 1000
    inh_hz = np.mean([i.mean() for _, i in spikes]) * 1000
    assert 5 < ex_hz < 30 and 3 < inh_hz < 25
    Y = _run_teacher(teacher, spikes, N.input_signs(), T, 1000).astype(np.float64)
    rate_hz = (1 / (1 + np.exp(-Y[:, 200:, 0]))).sum(1).mean() / ((T - 200) / 1000)
    soma = Y[:, 200:, 1] / 0.1 - 67.7
    assert 0.3 < rate_hz < 8, rate_hz
    assert 1.5 < soma.std(axis=1).mean() < 8 and -75 < soma.mean() < -60
