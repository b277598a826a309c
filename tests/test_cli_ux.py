"""The command line as a user meets it: one error style, discoverable tasks and fields, one
experiment per task name, run directories that carry their own task, named selection splits,
logs without carriage returns, plots that refuse damaged run directories."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from elm_cli.main import cli
from elmcore.neuron.config import ELMConfig
from elmcore.network.config import NetworkConfig
from elmcore.data import registry
from elmcore.data.base import ArrayTask, Task
from elmcore.training.train import Trainer, TrainSettings, resolve_settings

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
TINY_ADDING = ["--task", "adding", "--task-option", "n=120", "--task-option", "length=12", "--seed", "3",
               "--set", "num_memory=6", "--epochs", "2", "--batch-size", "16"]


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


# ---- one error style ---------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["train", "--no-such-flag"],
    ["train", "--task", "mnist"],
    ["train", "--epochs", "zero"],
    ["eval"],
    ["nosuchcommand"],
    ["data", "generate", "adding"],          # --out missing
    ["data", "generate", "shd", "--out", "x"],  # not generatable
])
def test_click_usage_errors_print_one_error_line_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Error:" not in result.output and "Usage:" not in result.output


# ---- discoverable options -------------------------------------------------------------------

def test_task_choices_come_from_the_registry():
    help_text = invoke("train", "--help").output
    for name in registry.TASKS:
        assert name in help_text
    assert invoke("train", "--task", "Delayed_Recall", "--help").exit_code == 0  # case and _ tolerated
    listing = invoke("tasks").output
    for name, spec in registry.TASKS.items():
        assert f"{name}: {spec.summary}" in listing
    assert "n=1000, length=100" in listing  # the adding task's --task-option defaults
    assert "listops: LRA ListOps" in invoke("tasks", "listops").output


def test_shell_completion_offers_task_names():
    env = {"_ELM_COMPLETE": "bash_complete", "COMP_WORDS": "elm train --task de", "COMP_CWORD": "3"}
    result = CliRunner().invoke(cli, [], env=env, prog_name="elm")
    assert result.exit_code == 0 and result.output.split() == ["plain,delayed-recall"]


def test_readme_names_every_task_and_documents_completion():
    text = open(README, encoding="utf-8").read()
    for name in registry.TASKS:
        assert f"`{name}`" in text, name
    assert "_ELM_COMPLETE" in text


def test_info_fields_lists_every_model_config_field():
    result = invoke("info", "--fields")
    assert result.exit_code == 0
    for field in dataclasses.fields(ELMConfig):
        assert re.search(rf"^\s+{field.name}\s", result.output, re.M), field.name
    assert "one of elm_v1, branch_elm_v2" in result.output
    network_part = result.output.split("--set version=elm_network")[1]
    for field in dataclasses.fields(NetworkConfig):
        assert re.search(rf"^\s+{field.name}\s", network_part, re.M), field.name


def test_help_shows_defaults():
    train = invoke("train", "--help").output
    # Bare `elm train` runs the adding task's default run: its 20 epochs, not TrainSettings' 10, are shown too.
    flat = " ".join(train.split())
    assert "--epochs INTEGER RANGE [default: (task default: adding 20; else 10)" in flat
    lr_help = flat.split("--lr FLOAT")[1].split("--min-lr FLOAT")[0]
    assert "[default: (task default: adding 0.005; else 0.001)]" in lr_help
    assert re.search(r"--dtype.*default: \(as stored\)", invoke("predict", "--help").output)
    assert "--loss-skip-steps" in train and "--burn-in" not in train
    evaluate = invoke("eval", "--help").output
    assert "--window-burn-in-ms" in evaluate and "default: test" in evaluate
    assert "default: 0" in invoke("data", "generate", "--help").output  # --seed


# ---- one experiment per name ------------------------------------------------------------------

def test_bare_train_is_the_adding_tasks_default_run():
    bare, named = resolve_settings({}), resolve_settings({"task": "adding"})
    assert bare == named
    assert bare.task == "adding" and bare.epochs == 20 and bare.model["version"] == "branch_elm_v2"
    assert bare.task_options == {"length": 200, "n": 10000}
    tweaked = resolve_settings({"task": "adding", "model": {"num_memory": 8}, "task_options": {"n": 50}})
    assert tweaked.model == {**bare.model, "num_memory": 8}  # merged field by field
    assert tweaked.task_options == {"length": 200, "n": 50}
    # A read data set carries its own sizes: the default run's in-memory options do not apply.
    assert resolve_settings({"task": "adding", "data_dir": "somewhere"}).task_options == {}
    assert resolve_settings({"task": "delayed-recall"}).epochs == TrainSettings().epochs


def test_eval_of_a_run_dir_uses_the_runs_task_options_and_seed(tmp_path):
    rd = tmp_path / "run"
    result = invoke("train", *TINY_ADDING, "--run-dir", rd, "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((rd / "summary.json").read_text())
    result = invoke("eval", rd, "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["model"] == str(rd / "best.npz") and written["split"] == "test"
    assert written["task_options"] == {"n": 120, "length": 12} and written["seed"] == 3
    assert written["metrics"]["examples"] == 12  # 10 % of n=120, not of the task's default n
    assert written["metrics"]["mse"] == pytest.approx(summary["test"]["mse"], rel=1e-6)
    # A model file inside the run directory brings the run's options too.
    result = invoke("eval", rd / "best.npz", "--split", "valid")
    assert result.exit_code == 0 and "split: valid" in result.output and "valid examples: 12" in result.output
    # Without a run directory the task must be named.
    lone = tmp_path / "lone.npz"
    lone.write_bytes((rd / "best.npz").read_bytes())
    result = invoke("eval", lone)
    assert result.exit_code == 2 and "--task" in result.output
    info = invoke("info", rd).output
    assert "task: adding (length=12, n=120), seed 3" in info and "selected on the valid split" in info
    assert "parameters:" in info


# ---- which split selected the model ---------------------------------------------------------

def _sign_arrays(n=80, T=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, T, 2)).astype(np.float32)
    return X, (X[:, :, 0].sum(1) > 0).astype(np.int64)


class _StreamOnly(Task):
    """A task that keeps its examples out of reach (like a streaming reader): nothing to carve."""

    def __init__(self, inner):
        self.inner, self.name, self.num_input, self.num_output = inner, "stream", inner.num_input, 2

    def batches(self, split, batch_size, rng=None, shuffle=False):
        return self.inner.batches(split, batch_size, rng, shuffle)

    def num_examples(self, split):
        return self.inner.num_examples(split)


def _train(tmp_path, task, name):
    messages = []
    settings = TrainSettings(task=task.name, epochs=2, batch_size=16, model={"num_memory": 4},
                             run_dir=str(tmp_path / name), seed=5)
    summary = Trainer(settings, task=task, progress=False, log=messages.append).run()
    epochs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "epoch"]
    return summary, epochs, "\n".join(messages)


def test_a_task_without_validation_split_gets_one_carved_from_train(tmp_path):
    X, y = _sign_arrays()
    task = ArrayTask("sign", {"train": (X[:60], y[:60]), "test": (X[60:], y[60:])}, num_output=2)
    summary, epochs, log = _train(tmp_path, task, "carved")
    assert task.num_examples("valid") == 6 and task.num_examples("train") == 54
    assert "6 training examples (drawn from seed 5) are held out" in log
    assert summary["selection_split"] == "valid" and all(r["split"] == "valid" for r in epochs)
    assert "epoch 1/2: train loss" in log and "valid accuracy" in log
    # Deterministic from the seed: the same examples again.
    again = ArrayTask("sign", {"train": (X[:60], y[:60]), "test": (X[60:], y[60:])}, num_output=2)
    from elmcore.training.train import carve_validation
    carve_validation(again, 0.1, 5)
    assert np.array_equal(again.splits["valid"][0], task.splits["valid"][0])


def test_selection_on_train_is_said_never_test(tmp_path):
    X, y = _sign_arrays()
    task = _StreamOnly(ArrayTask("sign", {"train": (X[:60], y[:60]), "test": (X[60:], y[60:])}, num_output=2))
    summary, epochs, log = _train(tmp_path, task, "train-selected")
    assert summary["selection_split"] == "train" and all(r["split"] == "train" for r in epochs)
    assert "selected on the TRAINING split" in log and "train accuracy" in log
    assert "test" in summary  # the test split still scores the selected model, untouched by selection


def test_neuronio_default_file_count_gives_three_splits(tmp_path):
    from elmcore.data.neuronio import discover_splits
    assert registry.TASKS["neuronio"].default_n == 3
    for k in range(registry.TASKS["neuronio"].default_n):
        (tmp_path / f"sim__{k}.p").write_bytes(b"")
    splits = discover_splits(tmp_path)
    assert all(len(splits[s]) == 1 for s in ("train", "valid", "test"))


# ---- logs that read well in a file ------------------------------------------------------------

@pytest.mark.slow
def test_piped_training_log_has_lines_not_a_bar(tmp_path):
    cmd = [sys.executable, "-m", "elm_cli.main", "train", *TINY_ADDING, "--log-every", "2",
           "--run-dir", str(tmp_path / "piped")]
    result = subprocess.run(cmd, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr
    err = result.stderr.decode()
    assert "\r" not in err and "\r" not in result.stdout.decode()
    assert "epoch 1/2 batch 2/6: loss" in err and "epoch 2/2: train loss" in err
    assert "best valid mse" in result.stdout.decode()
    quiet = invoke("train", *TINY_ADDING, "--log-every", "2", "--quiet", "--run-dir", tmp_path / "quiet")
    assert quiet.exit_code == 0 and "\r" not in quiet.output
    assert "batch 2/6" not in quiet.output and "epoch 2/2: train loss" in quiet.output
    assert "done:" in quiet.output


# ---- plots ------------------------------------------------------------------------------------

def _fake_run(rd, epoch_metric="mse", values=(0.5, 0.05, 0.01)):
    rd.mkdir()
    lines = [json.dumps({"type": "step", "step": s, "epoch": s // 4, "batch": s % 4, "loss": 1.0 / s})
             for s in range(1, 13)]
    lines += [json.dumps({"type": "epoch", "epoch": e, "step": 4 * (e + 1), "split": "valid",
                          "metric": epoch_metric, "metrics": {epoch_metric: v}}) for e, v in enumerate(values)]
    (rd / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return lines


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    _fake_run(tmp_path / "ok")
    result = invoke("plot", tmp_path / "ok", "-o", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("damage, message", [
    (b"[1, 2]\n", "not a JSON object"),
    (b"\xff\xfe\x00garbage\n", "not UTF-8"),
    (b'{"type": "step", "step": "x", "loss": 1}\n', "numeric"),
    (b"{broken\n", "not JSON"),
])
def test_plot_of_a_damaged_run_dir_is_one_error_line(tmp_path, damage, message):
    pytest.importorskip("matplotlib")
    rd = tmp_path / "damaged"
    lines = _fake_run(rd)
    (rd / "metrics.jsonl").write_bytes(damage + ("\n".join(lines) + "\n").encode())
    result = invoke("plot", rd)
    assert result.exit_code == 2, result.output
    out = result.output.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: ") and message in out[0], result.output
    assert not (rd / "curves.png").exists()


def test_plot_of_missing_things_is_one_error_line(tmp_path):
    for target in (tmp_path / "absent", tmp_path):
        result = invoke("plot", target)
        assert result.exit_code == 2 and result.output.startswith("error: "), result.output
    rd = tmp_path / "torn"
    lines = _fake_run(rd)
    (rd / "metrics.jsonl").write_text("\n".join(lines) + '\n{"type": "st')  # a kill mid-line: still plots
    pytest.importorskip("matplotlib")
    assert invoke("plot", rd).exit_code == 0


def test_chance_level_comes_from_the_runs_model(tmp_path):
    from elmcore import ELM
    from elmcore.training.checkpoint import save_model
    from elmcore.reporting.plotting import _chance
    cfg = ELMConfig(num_input=3, num_output=4, num_memory=2)
    save_model(tmp_path / "best.npz", cfg, ELM(cfg).state_dict())
    assert _chance("accuracy", str(tmp_path)) == (0.25, "chance (1/4)")
    assert _chance("auc", str(tmp_path))[0] == 0.5
    assert _chance("mse", str(tmp_path)) is None


def test_previews_of_a_wide_spiking_task_and_of_listops(tmp_path):
    pytest.importorskip("matplotlib")
    from elmcore.reporting.plotting import write_data_preview
    rng = np.random.default_rng(0)
    X = (rng.random((4, 30, 100)) < 0.05).astype(np.float32)
    task = ArrayTask("spikes", {"train": (X, np.arange(4) % 2)}, num_output=2)
    task.bin_size = 10  # a clock: the raster's time axis is in ms
    write_data_preview(task, tmp_path / "raster.png")
    assert (tmp_path / "raster.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = invoke("data", "generate", "listops", "--out", tmp_path / "lo", "--n", "12", "--min-length", "5",
                    "--max-length", "30")
    assert result.exit_code == 0 and "\r" not in result.output  # no progress bar when not on a terminal
    result = invoke("data", "info", tmp_path / "lo", "--preview", tmp_path / "lo.png")
    assert result.exit_code == 0 and (tmp_path / "lo.png").exists()
