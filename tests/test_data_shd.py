"""SHD / SHD-Adding reader and task against hand-computed binning and labels."""

import os

import numpy as np
import pytest

from elmcore.data import shd as S
from elmcore.data.base import Task
from elmcore.errors import DataError, ELMError


def test_bin_counts_follow_the_release_formula():
    assert S.num_time_bins(10) == 100
    assert S.num_time_bins(1) == 1000
    assert S.num_time_bins(7) == 143   # arange(0, 1.007, 0.007) has 144 edges
    assert S.num_time_bins(3) == 334   # last edge 1.002 s
    np.testing.assert_array_equal(S.time_bin_edges(250), [0, 0.25, 0.5, 0.75, 1.0])


def test_binning_by_hand_at_edges_zero_and_one_second():
    edges = S.time_bin_edges(10)
    times = [0.0, 0.0099, 0.01, 0.5, 0.5, 0.995, 0.999999, 1.0, 1.2]
    units = [1, 2, 3, 4, 4, 5, 6, 7, 8]
    X = S.bin_spikes(times, units, edges)
    expected = np.zeros((100, 700), np.float32)
    expected[0, 1] = 1   # t = 0 is in the first bin
    expected[0, 2] = 1
    expected[1, 3] = 1   # an edge belongs to the later bin
    expected[50, 4] = 2  # two spikes of one unit in one bin: a count
    expected[99, 5] = 1
    expected[99, 6] = 1
    # t = 1.0 s and later fall in the dropped last bin
    np.testing.assert_array_equal(X, expected)


def test_binning_keeps_one_second_when_the_last_edge_is_past_it():
    X = S.bin_spikes([1.0, 1.001, 1.002], [0, 1, 2], S.time_bin_edges(3))
    assert X.shape == (334, 700)
    assert X[333, 0] == 1 and X[333, 1] == 1 and X.sum() == 2  # 1.002 is the last edge: dropped


def make_samples(rng, n):
    times, units = [], []
    for _ in range(n):
        k = int(rng.integers(5, 40))
        times.append(np.sort(rng.uniform(0, 1.1, k)))
        units.append(rng.integers(0, 700, k))
    return times, units


@pytest.fixture
def shd_dir(tmp_path):
    rng = np.random.default_rng(0)
    t, u = make_samples(rng, 30)
    S.write_shd_h5(tmp_path / "shd_train.h5", t, u, np.arange(30) % 20)
    t, u = make_samples(rng, 7)
    S.write_shd_h5(tmp_path / "shd_test.h5", t, u, [19, 3, 10, 0, 5, 12, 7])
    return tmp_path


def test_writer_round_trip_in_the_published_layout(tmp_path):
    import h5py
    path = tmp_path / "shd_train.h5"
    times = [[0.0, 0.5, 0.99], [], [0.25]]
    units = [[0, 699, 3], [], [42]]
    S.write_shd_h5(path, times, units, [4, 19, 0])
    assert os.listdir(tmp_path) == ["shd_train.h5"]
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"spikes", "labels"} and set(f["spikes"].keys()) == {"times", "units"}
        assert h5py.check_vlen_dtype(f["spikes/times"].dtype) == np.float64
        assert h5py.check_vlen_dtype(f["spikes/units"].dtype) == np.uint16
    t, u, y = S.read_shd_h5(path)
    for a, b in zip(t, times):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(u, units):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(y, [4, 19, 0])


def test_shd_task_batches_and_split(shd_dir):
    task = S.SHDTask(shd_dir, bin_size=10, valid_fraction=0.2, split_seed=0)
    assert isinstance(task, Task)
    assert (task.num_input, task.num_output, task.loss, task.metric) == (700, 20, "cross_entropy_last", "accuracy")
    valid = np.random.default_rng(0).binomial(1, 0.2, size=30).astype(bool)  # the release's rule
    assert task.num_examples("valid") == valid.sum() > 0
    assert task.num_examples("train") == (~valid).sum() and task.num_examples("test") == 7
    np.testing.assert_array_equal(task.samples["valid"][2], (np.arange(30) % 20)[valid])
    assert task.model_defaults() == {"num_input": 700, "num_output": 20, "delta_t": 10.0,
                                     "memory_tau_min": 1.0, "memory_tau_max": 500.0}

    t, u, y = S.read_shd_h5(shd_dir / "shd_test.h5")
    batches = list(task.batches("test", 3))
    assert [b.X.shape for b in batches] == [(3, 100, 700), (3, 100, 700), (1, 100, 700)]
    X = np.concatenate([b.X for b in batches])
    np.testing.assert_array_equal(np.concatenate([b.target for b in batches]), y)
    assert batches[0].target.dtype == np.int64 and X.dtype == np.float32
    for i in range(7):
        np.testing.assert_array_equal(X[i], S.bin_spikes(t[i], u[i], S.time_bin_edges(10)))

    order = np.random.default_rng(3).permutation(7)
    shuffled = np.concatenate([b.target for b in task.batches("test", 4, rng=np.random.default_rng(3),
                                                               shuffle=True)])
    np.testing.assert_array_equal(shuffled, y[order])


def test_shd_adding_pairs_labels_and_concatenation(shd_dir):
    task = S.SHDTask(shd_dir, bin_size=20, adding=True, seed=4,
                     adding_examples={"train": 10, "valid": 6, "test": 5})
    assert (task.num_output, task.num_steps) == (19, 100)
    assert task.num_examples("test") == 5 and task.num_examples("train") == 10
    t, u, y = task.samples["test"]
    edges = S.time_bin_edges(20)
    pairs = task.pairs("test")
    np.testing.assert_array_equal(pairs, np.random.default_rng([4, 2]).integers(0, 7, size=(5, 2)))
    (batch,) = list(task.batches("test", 8))
    assert batch.X.shape == (5, 100, 700)
    for b, (i, j) in enumerate(pairs):
        np.testing.assert_array_equal(batch.X[b, :50], S.bin_spikes(t[i], u[i], edges))
        np.testing.assert_array_equal(batch.X[b, 50:], S.bin_spikes(t[j], u[j], edges))
        assert batch.target[b] == y[i] % 10 + y[j] % 10
    again = next(iter(task.batches("test", 8)))
    np.testing.assert_array_equal(again.X, batch.X)
    a = np.concatenate([b.target for b in task.batches("train", 4, rng=np.random.default_rng(1))])
    b = task.pairs("train", np.random.default_rng(1))
    tr_y = task.samples["train"][2]
    np.testing.assert_array_equal(a, tr_y[b[:, 0]] % 10 + tr_y[b[:, 1]] % 10)
    c = task.pairs("train", np.random.default_rng(2))
    assert not np.array_equal(b, c)


def test_missing_files_name_both_files_the_directory_and_the_source(tmp_path):
    S.write_shd_h5(tmp_path / "shd_train.h5", [[0.1]], [[1]], [0])
    with pytest.raises(DataError) as info:
        S.SHDTask(tmp_path)
    msg = str(info.value)
    assert "shd_train.h5" in msg and "shd_test.h5" in msg and str(tmp_path) in msg
    assert "zenkelab.org/datasets" in msg and "Cramer" in msg


def test_malformed_files_raise_data_error(tmp_path):
    bad_units = tmp_path / "u.h5"
    S.write_shd_h5(bad_units, [[0.1, 0.2]], [[1, 700]], [0])
    with pytest.raises(DataError, match="units"):
        S.read_shd_h5(bad_units)
    bad_label = tmp_path / "l.h5"
    S.write_shd_h5(bad_label, [[0.1]], [[1]], [20])
    with pytest.raises(DataError, match="labels"):
        S.read_shd_h5(bad_label)
    bad_time = tmp_path / "t.h5"
    S.write_shd_h5(bad_time, [[np.nan]], [[1]], [0])
    with pytest.raises(DataError, match="times"):
        S.read_shd_h5(bad_time)
    not_h5 = tmp_path / "x.h5"
    not_h5.write_bytes(b"plain text")
    with pytest.raises(DataError, match="x.h5"):
        S.read_shd_h5(not_h5)
    with pytest.raises(DataError, match="sample 0 has 2 times but 1 units"):
        S.write_shd_h5(tmp_path / "w.h5", [[0.1, 0.2]], [[1]], [0])


def test_impossible_options_are_rejected(shd_dir):
    with pytest.raises(ELMError, match="bin_size"):
        S.SHDTask(shd_dir, bin_size=0)
    with pytest.raises(ELMError, match="valid_fraction"):
        S.SHDTask(shd_dir, valid_fraction=1.0)
    with pytest.raises(ELMError, match="split"):
        next(S.SHDTask(shd_dir).batches("dev", 2))
