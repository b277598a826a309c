"""elm train / eval / plot end to end through the command line, including a real kill and resume."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from elm_cli.main import cli
from elmcore.training.checkpoint import load_file

SMALL = ["--task", "delayed-recall", "--task-option", "n=600", "--task-option", "length=20",
         "--set", "num_memory=8", "--set", "version=branch_elm_v2", "--batch-size", "16", "--quiet"]


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.mark.slow
def test_train_eval_plot(tmp_path):
    rd = tmp_path / "run"
    result = invoke("train", *SMALL, "--epochs", "8", "--lr", "1e-2", "--run-dir", rd)
    assert result.exit_code == 0, result.output
    assert "best valid accuracy" in result.output
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["steps"] == 8 * 30
    assert summary["test"]["accuracy"] >= 0.5  # chance is 1/8
    result = invoke("eval", rd / "best.npz", "--task", "delayed-recall", "--task-option", "n=600",
                    "--task-option", "length=20", "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert metrics["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    result = invoke("info", rd / "last.npz")
    assert result.exit_code == 0 and "elmcore-checkpoint" in result.output and "step 240" in result.output
    pytest.importorskip("matplotlib")
    result = invoke("plot", rd)
    assert result.exit_code == 0, result.output
    assert (rd / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_file_with_flag_overrides(tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text('task = "delayed-recall"\nepochs = 5\nbatch_size = 16\nlr = 0.01\n'
                        '[task_options]\nn = 200\nlength = 10\n[model]\nnum_memory = 6\n')
    rd = tmp_path / "run"
    result = invoke("train", "--config", run_file, "--epochs", "1", "--run-dir", rd, "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads((rd / "run.json").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.01 and saved["model"] == {"num_memory": 6}
    assert load_file(rd / "best.npz").config.num_memory == 6


@pytest.mark.parametrize("args, message", [
    (["--task", "nosuchtask"], "nosuchtask"),
    (["--task", "neuronio", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--set", "num_memory=0"], "num_memory"),
    (["--set", "mlp_activation=softmax"], "mlp_activation"),
    (["--input-dropout", "1.5"], "input_dropout"),
    (["--config", "/nonexistent/run.json"], "not found"),
    (["--resume", "/nonexistent/run"], "cannot resume"),
])
def test_train_bad_settings_exit_2(tmp_path, args, message):
    run_dir = [] if "--resume" in args else ["--run-dir", tmp_path / "r"]
    result = invoke("train", *args, *run_dir, "--quiet")
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_train_rejects_nan_data(tmp_path):
    from elmcore.data.synthetic import make_synthetic
    task = make_synthetic("adding", n=60, length=8)
    task.splits["train"][0][3, 2, 0] = np.nan
    task.save(tmp_path / "adding.npz")
    result = invoke("train", "--task", "adding", "--data-dir", tmp_path, "--run-dir", tmp_path / "r", "--quiet")
    assert result.exit_code == 2 and "NaN" in result.output


def _train_cmd(rd, extra=()):
    return [sys.executable, "-m", "elm_cli.main", "train", "--task", "delayed-recall", "--task-option", "n=1000",
            "--task-option", "length=60", "--set", "num_memory=40", "--batch-size", "16", "--epochs", "3",
            "--checkpoint-every", "7", "--input-dropout", "0.2", "--run-dir", str(rd), "--quiet", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"type": "step"') >= 40:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = load_file(killed / "last.npz").meta["step"]
    assert 0 < steps_done < 3 * 50, "the kill must land mid-run for this test to mean anything"
    result = subprocess.run([sys.executable, "-m", "elm_cli.main", "train", "--resume", str(killed), "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    a, b = load_file(full / "last.npz"), load_file(killed / "last.npz")
    assert a.meta["step"] == b.meta["step"] == 3 * 50
    for key in a.params:
        assert np.array_equal(a.params[key], b.params[key]), key
    for key in a.optim_state:
        assert np.array_equal(a.optim_state[key], b.optim_state[key]), key
