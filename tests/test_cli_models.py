"""elm convert / info / predict / eval on the release checkpoints, and bad input handled cleanly."""

import glob
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from elm_cli.main import cli
from elmcore.training.checkpoint import load_model
from elmcore.verification.oracle import load_oracle, relative_error
from helpers import GOLDEN_DIR, REFERENCE_DIR

CHECKPOINTS = sorted(glob.glob(os.path.join(REFERENCE_DIR, "*", "neuronio_best_model_state.pt")))


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    paths = {}
    for pt in CHECKPOINTS:
        name = os.path.basename(os.path.dirname(pt))
        dest = out / f"{name}.npz"
        result = invoke("convert", pt, "-o", dest, "--dtype", "float64")
        assert result.exit_code == 0, result.output
        paths[name] = dest
    return paths


def test_all_release_checkpoints_convert_with_spec_counts(converted):
    assert len(converted) == 15
    for name, path in converted.items():
        with open(os.path.join(REFERENCE_DIR, name, "model_stats.json")) as f:
            expected = json.load(f)["model_param_count"]
        result = invoke("info", path)
        assert result.exit_code == 0, result.output
        assert f"parameters: {expected}" in result.output.splitlines()


def test_predict_with_converted_best_model_reproduces_the_release(converted, tmp_path):
    case = load_oracle(os.path.join(GOLDEN_DIR, "official_best_elm_neuron.npz"))
    np.save(tmp_path / "x.npy", case.X)
    result = invoke("predict", converted["best_elm_neuron"], "--input", tmp_path / "x.npy",
                    "--output", tmp_path / "y.npy", "--dtype", "float64")
    assert result.exit_code == 0, result.output
    Y = np.load(tmp_path / "y.npy")
    assert relative_error(Y, case.Y) < 1e-10
    # The eval head: sigmoid spike probability, soma in mV.
    result = invoke("predict", converted["best_elm_neuron"], "--input", tmp_path / "x.npy",
                    "--output", tmp_path / "h.npy", "--head", "neuronio", "--dtype", "float64")
    assert result.exit_code == 0
    H = np.load(tmp_path / "h.npy")
    np.testing.assert_allclose(H[..., 0], 1 / (1 + np.exp(-case.Y[..., 0])), rtol=1e-9)
    np.testing.assert_allclose(H[..., 1], case.Y[..., 1] / 0.1, rtol=1e-9)


def test_predict_accepts_a_single_sequence(converted, tmp_path):
    rng = np.random.default_rng(0)
    X = (rng.random((30, 1278)) < 0.02).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    result = invoke("predict", converted["num_memory_5"], "--input", tmp_path / "x.npy",
                    "--output", tmp_path / "y.npy")
    assert result.exit_code == 0, result.output
    Y = np.load(tmp_path / "y.npy")
    model = load_model(converted["num_memory_5"])
    assert Y.shape == (30, 2)
    np.testing.assert_allclose(Y, model.forward(X[None])[0], rtol=1e-6, atol=1e-6)


def test_convert_then_hidden_input_matches_loading_the_pt_directly(converted):
    from elmcore import ELM
    from elmcore.verification.torch_checkpoint import load_release_model
    rng = np.random.default_rng(1)
    X = (rng.random((2, 40, 1278)) < 0.02) * np.where(np.arange(1278) < 639, 1.0, -1.0)
    for pt in CHECKPOINTS:
        name = os.path.basename(os.path.dirname(pt))
        cfg, params = load_release_model(pt)
        direct = ELM(cfg, params=params, dtype="float64").forward(X)
        via_file = load_model(converted[name], dtype="float64").forward(X)
        assert np.array_equal(direct, via_file)


@pytest.mark.parametrize("problem", ["wrong_shape", "nan", "missing", "not_npy"])
def test_predict_bad_input_exits_2(converted, tmp_path, problem):
    path = tmp_path / "x.npy"
    if problem == "wrong_shape":
        np.save(path, np.zeros((2, 5, 100)))
    elif problem == "nan":
        X = np.zeros((1, 5, 1278))
        X[0, 3, 7] = np.nan
        np.save(path, X)
    elif problem == "not_npy":
        path.write_text("hello")
    out = tmp_path / "y.npy"
    out.write_bytes(b"precious")
    result = invoke("predict", converted["num_memory_1"], "--input", path, "--output", out)
    assert result.exit_code == 2
    assert result.output.startswith("error: ")
    assert {"wrong_shape": "shape", "nan": "step 3, input 7", "missing": "not found",
            "not_npy": "not a readable"}[problem] in result.output
    assert out.read_bytes() == b"precious"  # the user's file is untouched


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing_param", "wrong_format"])
def test_damaged_model_files_exit_2(converted, tmp_path, damage):
    src = converted["num_memory_2"]
    bad = tmp_path / "bad.npz"
    data = src.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00" * 100)
    else:
        with np.load(src) as d:
            arrays = {k: d[k] for k in d.files}
        if damage == "missing_param":
            del arrays["param/w_y.bias"]
        else:
            arrays["format"] = np.array("something-else")
        np.savez(bad, **arrays)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 1278)))
    for args in (["info", bad], ["predict", bad, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "bad.npz" in result.output
    assert not (tmp_path / "y.npy").exists()


def test_convert_refuses_a_malicious_checkpoint(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pt = tmp_path / "evil.pt"
    with zipfile.ZipFile(pt, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
        z.writestr("archive/version", "3\n")
    (tmp_path / "model_config.json").write_text(json.dumps({"num_input": 2, "num_output": 1}))
    result = invoke("convert", pt, "-o", tmp_path / "m.npz")
    assert result.exit_code == 2
    assert "system" in result.output
    assert not marker.exists() and not (tmp_path / "m.npz").exists()


def test_convert_missing_config_is_clear(tmp_path):
    pt = tmp_path / "lonely.pt"
    pt.write_bytes(open(CHECKPOINTS[0], "rb").read())
    result = invoke("convert", pt, "-o", tmp_path / "m.npz")
    assert result.exit_code == 2 and "model_config.json" in result.output
