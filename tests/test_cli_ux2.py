"""The command line, round two: finished runs that refuse to be silently extended, run directories
that work from anywhere and keep their console log, Ctrl-C that says how to resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from elm_cli.main import cli
from elmcore.training.checkpoint import load_file
from elmcore.training.optim import cosine_lr
from elmcore.training.runlog import epochs_from_one
from elmcore.training.train import TrainSettings, scheduled_lr

TINY_ADDING = ["--task", "adding", "--task-option", "n=120", "--task-option", "length=12", "--seed", "3",
               "--set", "num_memory=6", "--epochs", "2", "--batch-size", "16"]
PER_EPOCH = 6  # 96 training examples (80 % of n=120) in batches of 16


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def _records(rd, kind):
    return [r for r in map(json.loads, (rd / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    rd = tmp_path_factory.mktemp("runs") / "done"
    result = invoke("train", *TINY_ADDING, "--run-dir", rd, "--quiet")
    assert result.exit_code == 0, result.output
    return rd


def _copy(rd, tmp_path):
    import shutil
    shutil.copytree(rd, tmp_path / "copy")
    return tmp_path / "copy"


# ---- a run directory after a run ------------------------------------------------------------

def test_run_directory_keeps_absolute_paths_its_log_and_no_lock(finished):
    saved = json.loads((finished / "run.json").read_text())
    assert saved["run_dir"] == str(finished) and os.path.isabs(saved["run_dir"])
    assert not (finished / ".lock").exists()
    log = (finished / "train.log").read_text()
    assert "training in process" in log and "epoch 2/2: train loss" in log and "\ndone: 12 steps" in log
    assert [r["epoch"] for r in _records(finished, "epoch")] == [1, 2]  # as the console counts
    assert {r["epoch"] for r in _records(finished, "step")} == {1, 2}


def test_data_dir_is_stored_absolute_so_eval_works_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("data", "generate", "adding", "--out", "data", "--n", "100", "--length", "10").exit_code == 0
    result = invoke("train", "--task", "adding", "--data-dir", "data", "--set", "num_memory=4", "--epochs", "1",
                    "--run-dir", "run", "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["data_dir"] == str(tmp_path / "data") and saved["run_dir"] == str(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("eval", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "test mse" in result.output


def test_a_failed_run_leaves_no_lock_file(tmp_path):
    rd = tmp_path / "r"
    rd.mkdir()
    (rd / "keep.txt").write_text("mine")  # so the directory itself stays
    result = invoke("train", *TINY_ADDING, "--lr", "1e9", "--run-dir", rd, "--quiet")
    assert result.exit_code == 2, result.output
    assert not (rd / ".lock").exists()


# ---- resuming a finished run --------------------------------------------------------------------

def test_resume_of_a_finished_run_says_so_and_changes_nothing(finished):
    before = {p.name: p.read_bytes() for p in finished.iterdir() if p.name != "train.log"}
    result = invoke("train", "--resume", finished)
    assert result.exit_code == 0, result.output
    assert f"run {finished} is finished (2 of 2 epochs)" in result.output and "--extend" in result.output
    more = invoke("train", "--resume", finished, "--epochs", "4")
    assert more.exit_code == 2 and "is finished" in more.output and "--extend --epochs 4" in more.output
    assert {p.name: p.read_bytes() for p in finished.iterdir() if p.name != "train.log"} == before


@pytest.mark.parametrize("args, words", [
    (["--extend", "--epochs", "4"], "--extend continues a finished run"),           # no --resume
    (["--resume", "{rd}", "--extend"], "--extend needs --epochs N"),
    (["--resume", "{rd}", "--extend", "--epochs", "2"], "above the run's 2 epochs"),
])
def test_extend_needs_a_resume_and_more_epochs(finished, args, words):
    result = invoke("train", *[a.format(rd=finished) for a in args], "--quiet")
    assert result.exit_code == 2 and words in result.output, result.output


def test_extend_continues_on_a_new_cosine_cycle_recorded_in_run_json(finished, tmp_path):
    rd = _copy(finished, tmp_path)
    result = invoke("train", "--resume", rd, "--extend", "--epochs", "4")
    assert result.exit_code == 0, result.output
    assert "extending the finished run from 2 to 4 epochs: a new cosine cycle of the learning rate from 0.005" \
        in result.output
    saved = json.loads((rd / "run.json").read_text())
    assert saved["epochs"] == 4 and saved["lr_restarts"] == [2]
    assert json.loads((rd / "summary.json").read_text())["epochs"] == 4
    steps = _records(rd, "step")
    assert [r["step"] for r in steps] == list(range(1, 4 * PER_EPOCH + 1))
    lrs = [r["lr"] for r in steps]
    assert lrs[2 * PER_EPOCH] == pytest.approx(5e-3)  # the new cycle starts at the run's lr
    assert lrs[2 * PER_EPOCH:] == pytest.approx(lrs[:2 * PER_EPOCH])  # and runs the same course again
    assert "extending the finished run" in (rd / "train.log").read_text()
    # The extended run is finished in turn.
    again = invoke("train", "--resume", rd)
    assert again.exit_code == 0 and "(4 of 4 epochs)" in again.output


def test_epochs_cannot_change_while_an_unfinished_run_resumes(finished, tmp_path):
    rd = _copy(finished, tmp_path)
    (rd / "summary.json").unlink()
    saved = json.loads((rd / "run.json").read_text())
    (rd / "run.json").write_text(json.dumps({**saved, "epochs": 3}))  # as if it were killed in epoch 3
    result = invoke("train", "--resume", rd, "--epochs", "5", "--quiet")
    assert result.exit_code == 2 and "--epochs cannot change while resuming" in result.output
    result = invoke("train", "--resume", rd, "--extend", "--epochs", "5", "--quiet")
    assert result.exit_code == 2 and "has not finished (2 of 3 epochs)" in result.output


def test_lr_schedule_with_restarts():
    s = TrainSettings(epochs=5, lr=1e-2, min_lr=1e-4, warmup_steps=3)
    assert [scheduled_lr(s, k, 4) for k in range(20)] == [cosine_lr(k, 20, 1e-2, 1e-4, 3) for k in range(20)]
    r = TrainSettings(epochs=5, lr=1e-2, min_lr=1e-4, warmup_steps=3, lr_restarts=[3])
    assert [scheduled_lr(r, k, 4) for k in range(12)] == [cosine_lr(k, 12, 1e-2, 1e-4, 3) for k in range(12)]
    assert [scheduled_lr(r, k, 4) for k in range(12, 20)] == [cosine_lr(k, 8, 1e-2, 1e-4) for k in range(8)]
    for bad in ([5], [0], [3, 2], ["3"]):
        with pytest.raises(Exception, match="lr_restarts"):
            TrainSettings.from_dict({"epochs": 5, "lr_restarts": bad})


def test_old_logs_counted_epochs_from_zero_and_still_read():
    old = [{"type": "step", "step": 1, "epoch": 0, "loss": 1.0}, {"type": "epoch", "epoch": 0, "step": 1,
                                                                      "metrics": {}}]
    assert [r["epoch"] for r in epochs_from_one(old)] == [1, 1]
    new = [{**r, "epoch": 1} for r in old]
    assert epochs_from_one(new) == new


def test_resume_rewrites_an_old_log_counted_from_one(finished, tmp_path):
    rd = _copy(finished, tmp_path)
    lines = (rd / "metrics.jsonl").read_text().splitlines()
    old = [json.dumps({**json.loads(line), "epoch": json.loads(line)["epoch"] - 1}) for line in lines]
    (rd / "metrics.jsonl").write_text("\n".join(old) + "\n")
    assert invoke("train", "--resume", rd, "--extend", "--epochs", "3", "--quiet").exit_code == 0
    assert [r["epoch"] for r in _records(rd, "epoch")] == [1, 2, 3]


# ---- Ctrl-C -----------------------------------------------------------------------------------

def _interrupt(cmd, path, count, tmp_path):
    """Start ``cmd``, send SIGINT once ``path`` holds ``count`` step records; (exit code, stdout, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            stdin=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and open(path).read().count('"type": "step"') >= count:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


LONG_ADDING = ["--task", "adding", "--task-option", "n=4000", "--task-option", "length=30", "--set", "num_memory=6",
               "--epochs", "50", "--batch-size", "16", "--checkpoint-every", "10", "--quiet"]


@pytest.mark.slow
def test_ctrl_c_on_train_names_the_last_checkpoint_and_the_resume_command(tmp_path):
    rd = tmp_path / "run"
    code, out, err = _interrupt([sys.executable, "-m", "elm_cli.main", "train", *LONG_ADDING, "--run-dir", "run"],
                                rd / "metrics.jsonl", 25, tmp_path)
    assert code == 130, err
    assert "Aborted" not in err and "Traceback" not in err
    last = load_file(rd / "last.npz").meta["step"]
    assert last >= 20 and f"the last checkpoint is {os.path.join('run', 'last.npz')} (step {last})" in err
    assert "Continue with: elm train --resume run" in err
    assert "Continue with: elm train --resume run" in (rd / "train.log").read_text()
    assert not (rd / ".lock").exists()


@pytest.mark.slow
def test_ctrl_c_on_sweep_says_how_to_go_on(tmp_path):
    (tmp_path / "s.toml").write_text('sweep_dir = "sw"\n[base]\ntask = "adding"\nepochs = 50\nbatch_size = 16\n'
                                     'checkpoint_every = 10\n[base.task_options]\nn = 4000\nlength = 30\n'
                                     '[grid]\nnum_memory = [6, 7]\n')
    code, out, err = _interrupt([sys.executable, "-m", "elm_cli.main", "sweep", "s.toml"],
                                tmp_path / "sw" / "p000-num_memory=6" / "metrics.jsonl", 25, tmp_path)
    assert code == 130, err
    assert "Aborted" not in err and "Traceback" not in err
    assert "run `elm sweep s.toml` again" in err
    assert "Continue with: elm train --resume" in (tmp_path / "sw" / "p000-num_memory=6" / "train.log").read_text()


# ---- names and help ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, suggestion", [
    (["--set", "num_neuron=8"], "did you mean num_neurons (a field of version elm_network)?"),
    (["--set", "version=elm_network", "--set", "num_neuron=8"], "did you mean num_neurons?"),
    (["--set", "num_memroy=8"], "did you mean num_memory?"),
    (["--task-option", "lenght=8"], "did you mean length?"),
])
def test_unknown_names_get_a_suggestion(tmp_path, args, suggestion):
    result = invoke("train", "--task", "adding", *args, "--run-dir", tmp_path / "r", "--quiet")
    assert result.exit_code == 2 and suggestion in result.output, result.output


def test_unknown_names_in_files_get_a_suggestion(tmp_path):
    (tmp_path / "run.toml").write_text("epoch = 3\n")
    result = invoke("train", "--config", tmp_path / "run.toml", "--quiet")
    assert result.exit_code == 2 and "epoch; did you mean epochs?" in result.output, result.output
    (tmp_path / "model.json").write_text(json.dumps({"num_input": 2, "num_output": 1, "num_memroy": 4}))
    result = invoke("info", tmp_path / "model.json")
    assert result.exit_code == 2 and "did you mean num_memory?" in result.output, result.output


def test_adding_has_no_num_tokens_option():
    listing = invoke("tasks", "adding").output
    assert "options: n=1000, length=100" in listing and "num_tokens" not in listing
    assert "num_tokens=8" in invoke("tasks", "delayed-recall").output
    result = invoke("train", "--task", "adding", "--task-option", "num_tokens=3", "--quiet")
    assert result.exit_code == 2 and "unknown option(s) num_tokens" in result.output


def test_top_level_help_and_readme_name_elm_networks():
    assert "ELM Networks" in " ".join(invoke("--help").output.split())
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8") as f:
        opening = f.read().split("```")[0]
    assert "ELM Network" in opening


def test_gradcheck_help_and_output_name_the_same_default_model(finished):
    help_text = " ".join(invoke("gradcheck", "--help").output.split())
    assert "default: a small elm_v1" in help_text
    result = invoke("gradcheck", "--steps", "2", "--entries", "2")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("gradcheck elm_v1,")
    for config in (finished, finished / "run.json", finished / "best.npz"):
        result = invoke("gradcheck", "--config", config, "--steps", "2", "--entries", "2")
        assert result.exit_code == 0, result.output
        assert result.output.startswith("gradcheck branch_elm_v2,")  # the run's model: TINY_ADDING's default
    empty = finished.parent / "empty-run"
    empty.mkdir(exist_ok=True)
    result = invoke("gradcheck", "--config", empty)
    assert result.exit_code == 2 and "has neither yet" in result.output


def test_verify_prints_a_header_and_knows_a_model_file(finished):
    oracle = os.path.join(os.path.dirname(__file__), "data", "golden", "v1_basic.npz")
    result = invoke("verify", oracle)
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    assert header.startswith(f"verify {oracle}: elm_v1 (") and "float64 on cpu; tolerance 1e-09" in header
    result = invoke("verify", finished / "best.npz")
    assert result.exit_code == 2 and "is a model file, not an oracle file" in result.output


def test_install_hint_follows_how_elmcore_was_installed(monkeypatch):
    from elmcore.engine import optional
    checkout = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
    assert optional.install_command("plot") == f"pip install -e '{checkout}[plot]'"
    monkeypatch.setattr(optional.os.path, "isfile", lambda path: False)  # as from a wheel in site-packages
    assert optional.install_command("plot") == "pip install 'elmcore[plot]'"


# ---- threads and compiling ------------------------------------------------------------------

def test_thread_rule_gives_small_steps_one_thread():
    from elmcore.training.threads import WORK_PER_THREAD, choose_threads
    env = {}
    assert choose_threads(WORK_PER_THREAD, 2, env)[0] == 1
    assert choose_threads(2 * WORK_PER_THREAD - 1, 2, env)[0] == 1
    assert choose_threads(2 * WORK_PER_THREAD, 2, env) == (2, "2 threads")
    assert choose_threads(100 * WORK_PER_THREAD, 16, env)[0] == 16
    assert choose_threads(5 * WORK_PER_THREAD, 16, env)[0] == 5
    threads, why = choose_threads(1000, 2, env)
    assert threads == 1 and why.startswith("1 of 2 threads: ")
    assert choose_threads(1000, 2, {"NUMBA_NUM_THREADS": "2"}) == (2, "2 threads (NUMBA_NUM_THREADS)")


def test_a_small_run_says_it_uses_one_thread_and_restores_the_count(tmp_path, monkeypatch):
    import numba
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    before = numba.get_num_threads()
    result = invoke("train", *TINY_ADDING, "--run-dir", tmp_path / "r", "--quiet")
    assert result.exit_code == 0, result.output
    available = numba.config.NUMBA_NUM_THREADS
    expected = f"(cpu, 1 of {available} threads: " if available > 1 else "(cpu, 1 thread, float32)"
    lines = result.output.splitlines()
    assert lines[0].startswith("settings: ")  # where each setting came from, then the run's start-up line
    assert expected in lines[1] and lines[1].startswith("run "), result.output
    assert numba.get_num_threads() == before


def test_warm_up_says_compiling_only_when_it_takes_long(tmp_path, monkeypatch):
    import importlib
    import time as clock

    from elmcore.training import warmup

    class Slow:
        xp = np

        def forward(self, X, return_cache=False):
            clock.sleep(0.3)
            return (X, None) if return_cache else X

        def backward(self, dY, cache):
            return {}

    said = []
    warmup.warm_up(Slow(), np.zeros((1, 2, 1)), said.append, notice_after=0.05)
    assert said[0] == warmup.NOTICE and said[1].startswith("kernels loaded from the disk cache")
    said.clear()
    warmup.warm_up(Slow(), np.zeros((1, 2, 1)), said.append, notice_after=10)
    assert said == []
    # A kernel Numba had to compile is counted (its cache, beside its fresh module, is empty).
    (tmp_path / "probe_kernel.py").write_text("from numba import njit\n\n@njit(cache=True)\ndef twice(x):\n"
                                              "    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("probe_kernel")
    monkeypatch.setitem(sys.modules, "elmcore.kernels._probe", probe)
    before = warmup.compiled_kernels()
    assert probe.twice(3) == 6
    assert warmup.compiled_kernels() == before + 1


def test_elm_warmup_names_both_families():
    result = invoke("warmup")
    assert result.exit_code == 0, result.output
    assert "the default run's Branch-ELM (branch_elm_v2, float32)" in result.output
    assert "an ELM Network (elm_network, float32)" in result.output and "warmup: done in" in result.output


# ---- plots: a line to beat for every task, loss units ------------------------------------------

def test_adding_run_records_the_mse_of_always_answering_the_mean(finished):
    from elmcore.data.registry import get_task
    epoch = _records(finished, "epoch")[-1]
    task = get_task("adding", n=120, length=12, seed=3)
    mean = task.splits["train"][1].astype(np.float64).mean(axis=0)
    expected = float(np.mean((task.splits["valid"][1] - mean) ** 2))
    assert epoch["reference"] == {"value": pytest.approx(expected), "label": "always answering the mean"}
    assert epoch["loss_function"] == "mse_last"


def test_plot_draws_the_reference_and_names_loss_units(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from elmcore.reporting import plotting
    epochs = [{"epoch": 1, "metric": "bpc", "loss_function": "cross_entropy_all",
               "reference": {"value": 3.52, "label": "unigram entropy"}}]
    assert plotting._chance("bpc", tmp_path, epochs) == (3.52, "unigram entropy: 3.52")
    assert plotting._loss_unit(epochs) == " (cross-entropy, nats per character)"
    assert plotting._loss_unit([{"loss_function": "mse_last"}]) == " (MSE)"
    assert plotting._chance("auc", tmp_path, [{}]) == (0.5, "chance (AUC 0.5)")  # logs without a reference
    import matplotlib.axes
    drawn, real_axhline = [], matplotlib.axes.Axes.axhline

    def spy(self, y=0, *args, **kwargs):
        drawn.append((y, kwargs.get("label")))
        return real_axhline(self, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", spy)
    rd = tmp_path / "run"
    rd.mkdir()
    lines = [{"type": "step", "step": s, "epoch": 1 + (s - 1) // 2, "loss": 2.5 - 0.1 * s} for s in range(1, 5)]
    lines += [{"type": "epoch", "epoch": e, "step": 2 * e, "split": "valid", "metric": "bpc",
               "metrics": {"bpc": 3.0 - 0.2 * e}, **epochs[0]} for e in (1, 2)]
    (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert invoke("plot", rd).exit_code == 0
    assert drawn == [(3.52, "unigram entropy: 3.52")]


def test_text_reference_is_its_unigram_entropy(tmp_path):
    from elmcore.data.registry import generate, get_task
    generate("text", tmp_path, n=20000)
    task = get_task("text", tmp_path, length=32)
    reference = task.reference_level("valid")
    assert reference["value"] == task.unigram_entropy("train") and "unigram entropy" in reference["label"]
