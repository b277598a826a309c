"""The NeuronIO pipeline end to end, offline: surrogate files -> reader -> windows -> release metrics."""

import json

import pytest
from click.testing import CliRunner

from elm_cli.main import cli
from elmcore.training.checkpoint import save_model
from elmcore.data.neuronio import load_teacher
from elmcore.data.registry import generate

# Generates surrogate NeuronIO files and trains on them: 5-15 s a test.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory):
    root = tmp_path_factory.mktemp("nio")
    data = generate("neuronio", root / "data", n=3, seed=7, sims_per_file=6, duration_ms=1600)
    teacher = load_teacher(dtype="float64")
    save_model(root / "teacher.npz", teacher.config, teacher.state_dict(), dtype="float64")
    return root, data


def test_the_teacher_scores_near_perfectly_on_its_own_surrogate(surrogate):
    """Spikes are sampled from the teacher's own probabilities, so the windowed evaluation
    of the teacher itself must rank them well; a misaligned window, spike bin or soma
    transform anywhere in reader, window stitching or metrics would break this."""
    root, data = surrogate
    result = CliRunner().invoke(cli, ["eval", str(root / "teacher.npz"), "--task", "neuronio", "--data-dir",
                                      str(data), "--split", "test", "--json", str(root / "m.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "m.json").read_text())["metrics"]
    assert metrics["simulations"] >= 1
    assert metrics["AUC"] > 0.95
    assert metrics["soma_explained_variance_percent"] > 95
    assert metrics["soma_RMSE"] < 1.0
    # Without the release's z-scoring the teacher's soma differs from the target only
    # where the target is capped at -55 mV (the teacher's own voltage is not capped).
    result = CliRunner().invoke(cli, ["eval", str(root / "teacher.npz"), "--task", "neuronio", "--data-dir",
                                      str(data), "--no-align-soma", "--json", str(root / "raw.json")])
    assert result.exit_code == 0, result.output
    raw = json.loads((root / "raw.json").read_text())["metrics"]
    assert raw["soma_RMSE"] < 0.5 and raw["soma_RMSE"] != metrics["soma_RMSE"]
    assert raw["AUC"] == metrics["AUC"]


def test_training_on_the_surrogate_runs_and_evaluates(surrogate, tmp_path):
    _, data = surrogate
    rd = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--task", "neuronio", "--data-dir", str(data), "--set", "num_memory=4",
                                      "--task-option", "windows_per_epoch=64", "--epochs", "2", "--batch-size", "16",
                                      "--run-dir", str(rd), "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["steps"] == 8 and 0 <= summary["test"]["AUC"] <= 1
    assert {"soma_RMSE", "soma_MAE", "soma_explained_variance_percent", "TP @ 0.0025 FP"} <= set(summary["test"])
