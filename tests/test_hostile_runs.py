"""Damaged run directories and outputs that are a run's own files: `elm eval`, `elm info`, `elm plot`,
`elm train --resume` and `elm predict` answer with one `error:` line and exit 2, and change no file."""

import json
import os
import shutil
import zipfile

import numpy as np
import pytest

from hostile import assert_refused, assert_unchanged, invoke, snapshot

TINY_ADDING = ["--task", "adding", "--task-option", "n=40", "--task-option", "length=6", "--set", "num_memory=3",
               "--batch-size", "8", "--quiet", "--epochs", "1"]
RUN_FILES = ("run.json", "summary.json", "metrics.jsonl", "last.npz", "best.npz")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = invoke("train", *TINY_ADDING, "--run-dir", run_dir, seconds=900)
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture
def run(trained, tmp_path):
    """A copy of a finished tiny run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def edit_json(path, **changes):
    with open(path) as f:
        value = json.load(f)
    value.update(changes)
    with open(path, "w") as f:
        json.dump(value, f)


# ---- outputs that are the run's own files ------------------------------------------------------

@pytest.mark.parametrize("name", RUN_FILES)
def test_eval_json_onto_a_file_of_the_run_is_refused(run, name):
    before = snapshot(run)
    assert_refused(invoke("eval", run, "--json", run / name), name)
    assert_refused(invoke("eval", run / "best.npz", "--json", run / name), name)
    assert_unchanged(before, run)


@pytest.mark.parametrize("name", RUN_FILES)
def test_plot_onto_a_file_of_the_run_is_refused(run, name):
    before = snapshot(run)
    assert_refused(invoke("plot", run, "-o", run / name), name)
    assert_unchanged(before, run)


def test_predict_onto_its_model_or_input_is_refused(run, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 4, 2), np.float32))
    before = snapshot(run, x)
    assert_refused(invoke("predict", run / "best.npz", "--input", x, "--output", run / "best.npz"), "best.npz")
    assert_refused(invoke("predict", run / "best.npz", "--input", x, "--output", x), "x.npy")
    assert_unchanged(before, run, x)


@pytest.mark.parametrize("name", ["metrics.jsonl", "run.json", ".lock"])
def test_train_config_inside_its_run_directory_is_refused(tmp_path, name):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    config = run_dir / name
    config.write_text(json.dumps({"task": "adding", "task_options": {"n": 40, "length": 6}, "epochs": 1}))
    before = snapshot(run_dir)
    assert_refused(invoke("train", "--config", config, "--run-dir", run_dir, "--quiet"), name)
    assert_unchanged(before, run_dir)


def test_resume_of_a_run_whose_data_is_a_file_of_the_run_is_refused(run):
    # A text corpus that is the run's own metrics log: resuming would append to the data.
    edit_json(run / "run.json", task="text", data_dir=str(run / "metrics.jsonl"), task_options={})
    before = snapshot(run)
    assert_refused(invoke("train", "--resume", run), "metrics.jsonl")
    assert_unchanged(before, run)


# ---- damaged run directories -------------------------------------------------------------------

@pytest.mark.parametrize("changes,fragment", [
    ({"data_dir": 5}, "data_dir"),
    ({"data_dir": ["x"]}, "data_dir"),
    ({"seed": "x"}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": 10 ** 4000}, "seed"),
    ({"task_options": {"n": "x"}}, "n"),
    ({"task_options": {"length": 10 ** 4000}}, "length"),
    ({"task": 5}, "run.json"),
])
def test_eval_of_a_run_with_damaged_settings_names_them(run, changes, fragment):
    edit_json(run / "run.json", **changes)
    before = snapshot(run)
    assert_refused(invoke("eval", run), fragment)
    assert_unchanged(before, run)


@pytest.mark.parametrize("name", ["run.json", "summary.json"])
@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe", b'{"seed": ' + b"9" * 5000 + b"}", b"[]"])
def test_info_and_eval_of_an_unreadable_run_file_name_it(run, name, text):
    (run / name).write_bytes(text)
    before = snapshot(run)
    assert_refused(invoke("info", run), name)
    if name == "run.json":
        assert_refused(invoke("eval", run), name)
    assert_unchanged(before, run)


@pytest.mark.parametrize("changes,fragment", [
    ({"seconds": "x"}, "seconds"),
    ({"steps": {"a": 1}}, "steps"),
    ({"best_metric": "x"}, "best_metric"),
    ({"test": {"mse": "x"}}, "test"),
    ({"test": 5}, "test"),
])
def test_info_of_a_run_with_a_damaged_summary_names_the_field(run, changes, fragment):
    edit_json(run / "summary.json", **changes)
    assert_refused(invoke("info", run), fragment)


def test_info_of_a_run_whose_data_dir_is_a_number_still_describes_it(run):
    edit_json(run / "run.json", data_dir=5)
    result = invoke("info", run)
    assert result.exit_code == 0, result.output
    assert not result.stderr


@pytest.mark.parametrize("line,fragment", [
    ('{"type": "step", "step": 1, "epoch": 0, "loss": 1e308}', None),
    ('{"type": "step", "step": 1, "epoch": 0, "loss": ' + "9" * 5000 + "}", "metrics.jsonl"),
    ('{"type": "step", "step": 1e308, "epoch": 0, "loss": 1.0}', None),
    ('{"type": "epoch", "step": 1, "epoch": 1e308, "metrics": {"mse": 1.0}}', None),
    ('{"type": "epoch", "step": 1, "epoch": 0, "metrics": {"mse": 1e308}}', None),
    ('{"type": "epoch", "step": 1, "epoch": 0, "metrics": {"mse": -1e308}}', None),
])
def test_plot_of_a_log_with_extreme_values_draws_or_names_the_line(run, tmp_path, line, fragment):
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line + "\n" + '{"type": "step", "step": 2, "epoch": 0, "loss": 0.5}\n')
    before = snapshot(run)
    out = tmp_path / "curves.png"
    result = invoke("plot", run, "-o", out)
    if fragment is None:  # a value a plot can show: drawn, and nothing said on stderr
        assert result.exit_code == 0 and not result.stderr and not result.caught_warnings, \
            (result.output, result.caught_warnings)
        assert out.read_bytes()[:4] == b"\x89PNG"
    else:
        assert_refused(result, fragment)
    assert_unchanged(before, run)


# ---- resume of a run whose checkpoint does not match it ----------------------------------------

def test_resume_refuses_a_checkpoint_of_another_model_than_the_run(run):
    # The run says elm_network; its last.npz holds the branch_elm_v2 model that was trained.
    edit_json(run / "run.json", model={"version": "elm_network", "num_memory": 3, "num_neurons": 2})
    before = snapshot(run)
    assert_refused(invoke("train", "--resume", run), "last.npz")
    assert_unchanged(before, run)


def _rewrite_meta(path, **position):
    with zipfile.ZipFile(path) as z:
        arrays = {name[:-4]: np.lib.format.read_array(z.open(name)) for name in z.namelist()}
    meta = json.loads(str(arrays["meta"]))
    meta["position"].update(position)
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("position,fragment", [
    ({"batch": 10 ** 30}, "batch"),
    ({"batch": 1e30}, "batch"),
    ({"batch": 5}, "batch"),  # an epoch of this run has 4 batches
    ({"step": 10 ** 30}, "step"),
    ({"epoch": 10 ** 30}, "epoch"),
    ({"step": 3}, "step"),  # epoch 0, batch 4 is step 4
    ({"epoch_examples": 10 ** 30}, "epoch_examples"),
    ({"best_step": 10 ** 30}, "best_step"),
])
def test_resume_refuses_an_impossible_saved_position(run, position, fragment):
    _rewrite_meta(run / "last.npz", **{"epoch": 0, **position})
    before = snapshot(run)
    assert_refused(invoke("train", "--resume", run), fragment)
    assert_unchanged(before, run)


@pytest.mark.parametrize("name,command", [("summary.json", "info"), ("run.json", "info"), ("run.json", "eval"),
                                          ("metrics.jsonl", "resume"), ("run.json", "resume"),
                                          ("summary.json", "plot"), ("run.json", "plot")])
def test_a_run_file_that_is_a_fifo_is_answered_at_once(run, tmp_path, name, command):
    os.unlink(run / name)
    os.mkfifo(run / name)
    args = {"info": ["info", run], "eval": ["eval", run], "resume": ["train", "--resume", run],
            "plot": ["plot", run, "-o", tmp_path / "c.png"]}[command]
    result = invoke(*args, seconds=30)
    if command == "plot":  # the plot goes on without the optional summary and settings
        assert result.exit_code == 0, result.output
    else:
        assert_refused(result, name)
