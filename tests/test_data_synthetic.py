"""Adding problem and delayed recall: content, determinism, .npz round trip, bad files."""

import json
import zipfile

import numpy as np
import pytest

from elmcore.data.synthetic import generate_synthetic, load_synthetic, make_synthetic
from elmcore.errors import DataError


def all_arrays(task):
    return {f"{s}/{i}": a for s, pair in task.splits.items() for i, a in enumerate(pair)}


@pytest.mark.parametrize("length", [2, 3, 57, 4000])
def test_adding_problem_markers_and_target(length):
    task = make_synthetic("adding", n=30, seed=1, length=length)
    assert (task.num_input, task.num_output, task.seq_len) == (2, 1, length)
    assert (task.loss, task.metric, task.higher_is_better) == ("mse_last", "mse", False)
    for split in ("train", "valid", "test"):
        X, target = task.splits[split]
        assert X.dtype == np.float32 and target.shape == (len(X), 1)
        values, marks = X[:, :, 0], X[:, :, 1]
        assert ((values >= 0) & (values <= 1)).all()
        assert set(np.unique(marks)) <= {0.0, 1.0} and (marks.sum(axis=1) == 2).all()
        half = length // 2
        assert (marks[:, :half].sum(axis=1) == 1).all()    # one marker in each half
        expected = (values * marks).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(target, expected, rtol=1e-6)
    assert [task.num_examples(s) for s in ("train", "valid", "test")] == [24, 3, 3]


def test_adding_problem_is_deterministic_by_seed():
    a, b, c = (make_synthetic("adding", n=20, seed=s, length=40) for s in (7, 7, 8))
    for key, value in all_arrays(a).items():
        np.testing.assert_array_equal(value, all_arrays(b)[key])
    assert not np.array_equal(all_arrays(a)["train/0"], all_arrays(c)["train/0"])


@pytest.mark.parametrize("length", [2, 10, 3000])
def test_delayed_recall_cue_delay_and_recall(length):
    task = make_synthetic("delayed-recall", n=40, seed=0, length=length, num_tokens=5)
    assert (task.num_input, task.num_output, task.loss) == (6, 5, "cross_entropy_last")
    X, cue = task.splits["train"]
    assert X.shape == (32, length, 6) and cue.dtype == np.int64
    np.testing.assert_array_equal(np.argmax(X[:, 0, :5], axis=1), cue)
    assert (X[:, 0].sum(axis=1) == 1).all() and (X[:, 0, 5] == 0).all()
    assert not X[:, 1:length - 1].any()                       # the delay is silent
    assert (X[:, -1, 5] == 1).all() and not X[:, -1, :5].any()  # recall signal only
    counts = np.bincount(cue, minlength=5)
    assert counts.max() - counts.min() <= 1                   # stated: balanced to within one
    batches = list(task.batches("train", 10, rng=np.random.default_rng(0), shuffle=True))
    assert [len(b.target) for b in batches] == [10, 10, 10, 2]
    assert sorted(np.concatenate([b.target for b in batches]).tolist()) == sorted(cue.tolist())


def test_npz_round_trip_without_pickle(tmp_path):
    for name in ("adding", "delayed-recall"):
        path = generate_synthetic(tmp_path, name, n=12, seed=3, length=25)
        assert path.endswith(f"{name}.npz")
        with np.load(path, allow_pickle=False) as z:   # readable with pickling refused
            assert "train/X" in z.files and json.loads(str(z["meta"]))["task"] == name
        loaded, made = load_synthetic(path), make_synthetic(name, n=12, seed=3, length=25)
        assert loaded.name == name and loaded.meta == made.meta
        for key, value in all_arrays(made).items():
            np.testing.assert_array_equal(all_arrays(loaded)[key], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adding.npz", "delayed-recall.npz"]


def test_load_rejects_bad_files(tmp_path):
    good = make_synthetic("adding", n=6, seed=0, length=8)
    X = good.splits["train"][0].copy()
    X[0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", meta=np.array(json.dumps({"task": "adding", "length": 8})),
             **{"train/X": X, "train/target": good.splits["train"][1]})
    with pytest.raises(DataError, match="train/X holds NaN"):
        load_synthetic(tmp_path / "nan.npz")
    np.savez(tmp_path / "shape.npz", meta=np.array(json.dumps({"task": "adding"})),
             **{"train/X": X[:, :, :1], "train/target": good.splits["train"][1]})
    with pytest.raises(DataError, match=r"train/X must be a float array \(N, T, 2\)"):
        load_synthetic(tmp_path / "shape.npz")
    np.savez(tmp_path / "obj.npz", meta=np.array([{"task": "adding"}], dtype=object))
    with pytest.raises(DataError, match="cannot read synthetic task file"):
        load_synthetic(tmp_path / "obj.npz")   # an object array would need pickle: refused
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "nan.npz").read_bytes()[:100])
    with pytest.raises(DataError, match="trunc.npz"):
        load_synthetic(tmp_path / "trunc.npz")
    good.save(tmp_path / "adding.npz")
    with pytest.raises(DataError, match="holds task 'adding', not 'delayed-recall'"):
        load_synthetic(tmp_path / "adding.npz", expected="delayed-recall")
    with zipfile.ZipFile(tmp_path / "adding.npz") as z:
        assert all(not n.endswith(".pkl") for n in z.namelist())
    with pytest.raises(DataError, match="not found"):
        load_synthetic(tmp_path / "missing.npz")


@pytest.mark.parametrize("name, options, message", [
    ("adding", {"length": 1}, "length must be >= 2"),
    ("delayed-recall", {"length": 1}, "length must be >= 2"),
    ("delayed-recall", {"num_tokens": 1}, "num_tokens >= 2"),
    ("adding", {"n": 2}, "n >= 3"),
])
def test_impossible_options(name, options, message):
    with pytest.raises(DataError, match=message):
        make_synthetic(name, **{"n": 10, **options})
