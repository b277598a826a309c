"""The examples in examples/ run as a user would run them, at tiny sizes, and do what they say."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _run_script(name, *args, tmp_path):
    env = {**os.environ, "ELM_EXAMPLES_TINY": "1"}
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_train_own_arrays_learns_saves_and_reloads(tmp_path):
    out = tmp_path / "out"
    stdout = _run_script("train_own_arrays.py", "--out", str(out), "--tiny", tmp_path=tmp_path)
    results = json.loads((out / "results.json").read_text())
    losses = results["train_loss_per_epoch"]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    assert results["reloaded_predictions_identical"] is True
    # The task is learnable from the counts alone; even the tiny run beats chance clearly.
    assert results["test_accuracy"] > 0.6, results
    assert os.path.exists(results["model_path"])
    assert "test accuracy of the reloaded model" in stdout


def test_predict_neuronio_input_signs(tmp_path):
    sys.path.insert(0, EXAMPLES)
    try:
        import predict_neuronio as example
    finally:
        sys.path.remove(EXAMPLES)
    result = example.main(["--out", str(tmp_path), "--duration", "300"])
    X = np.load(tmp_path / "X.npy")
    assert X.shape == (300, 1278) and X.dtype == np.int8
    # Excitatory spikes (+1) only in the first 639 columns, inhibitory (-1) only in the last 639.
    assert set(np.unique(X[:, :639])) <= {0, 1} and set(np.unique(X[:, 639:])) <= {-1, 0}
    assert (X[:, :639] == 1).any() and (X[:, 639:] == -1).any()
    Y = result["Y"]
    assert Y.shape == (300, 2) and np.all((Y[:, 0] >= 0) & (Y[:, 0] <= 1))
    summary = result["summary"]
    # Inhibition, given as -1, lowers the predicted soma; given as +1 it is read as excitation
    # and the model predicts far more output spikes than with the correct sign.
    assert summary["inhibition as -1"]["soma_mV"] < summary["without inhibition"]["soma_mV"]
    assert summary["inhibition wrongly as +1"]["expected_spikes"] > \
        10 * (summary["inhibition as -1"]["expected_spikes"] + 1)


def _notebook_code(path):
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and isinstance(nb["cells"], list)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and "execution_count" in cell
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_custom_loop_notebook_runs_and_learns(tmp_path, monkeypatch):
    monkeypatch.setenv("ELM_EXAMPLES_TINY", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace = {"__name__": "__main__"}
    for i, source in enumerate(_notebook_code(os.path.join(EXAMPLES, "custom_loop.ipynb"))):
        exec(compile(source, f"custom_loop.ipynb cell {i}", "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == namespace["STEPS"]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert namespace["final_test_loss"] < 0.5 * namespace["initial_test_loss"]
    assert namespace["stream_difference"] < 1e-5
    assert os.path.dirname(namespace["path"]).startswith(str(tmp_path))


def test_gradient_walkthrough_notebook_runs_and_agrees(tmp_path, monkeypatch):
    monkeypatch.setenv("ELM_EXAMPLES_TINY", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace = {"__name__": "__main__"}
    for i, source in enumerate(_notebook_code(os.path.join(EXAMPLES, "gradient_walkthrough.ipynb"))):
        exec(compile(source, f"gradient_walkthrough.ipynb cell {i}", "exec"), namespace)
    assert namespace["forward_difference"] < 1e-12
    # Steps (a)-(f) by hand give the reference's adjoints, the kernels give its gradients.
    assert namespace["step_difference"] < 1e-12
    assert namespace["kernel_difference"] < 1e-10
    analytic, numeric = namespace["analytic"], namespace["finite_difference"]
    assert analytic != 0 and abs(analytic - numeric) < 1e-6 * max(abs(analytic), 1e-3)
    # The short-tau_m model's adjoint decays far faster with distance from the loss step.
    decay = namespace["decay"]
    assert decay["short"][-1] < 1e-3 * decay["long"][-1]
    assert all(os.path.exists(os.path.join(namespace["out_dir"], f"gradflow_{n}.png")) for n in ("short", "long"))
