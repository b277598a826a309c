"""The task registry and the ``elm data`` command group."""

import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from elm_cli.data_cmd import data
from elmcore.data import registry
from elmcore.data.base import Task
from elmcore.errors import DataError, ELMError

ALL_TASKS = ["neuronio", "shd", "shd-adding", "listops", "pathfinder", "pathfinder64", "pathx",
             "scifar", "adding", "delayed-recall", "enwik8", "text"]
SMALL_LISTOPS = ["--min-length", "6", "--max-length", "30", "--max-depth", "4", "--max-args", "4"]


def run(args):
    return CliRunner().invoke(data, args)


# ---- registry -------------------------------------------------------------------------

def test_registry_names():
    assert list(registry.TASKS) == ALL_TASKS
    assert set(registry.GENERATABLE) == {"neuronio", "listops", "pathfinder", "pathfinder64", "pathx",
                                         "adding", "delayed-recall", "text"}


def test_unknown_task_lists_valid_names():
    with pytest.raises(ELMError) as e:
        registry.get_task("pathfinder256")
    assert "pathfinder256" in str(e.value) and all(name in str(e.value) for name in ALL_TASKS)


def test_registry_imports_neuronio_and_shd_only_on_request():
    code = ("import sys, elmcore.data.registry as r; r.get_task('adding', n=6, length=4); "
            "print(sorted(m for m in ('elmcore.data.neuronio', 'elmcore.data.shd') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name, files, where", [
    ("listops", ["basic_train.tsv", "basic_val.tsv", "basic_test.tsv"], "lra_release.gz"),
    ("shd", ["shd_train.h5", "shd_test.h5"], "zenkelab.org"),
    ("neuronio", ["sim__"], "elm data generate neuronio"),
    ("adding", ["adding.npz"], "elm data generate adding --out DIR"),
])
def test_missing_data_names_files_directory_and_source(tmp_path, name, files, where):
    with pytest.raises(DataError) as e:
        registry.get_task(name, tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and where in msg
    assert all(f in msg for f in files)
    with pytest.raises(DataError, match="does not exist|not found|no Pathfinder"):
        registry.get_task(name, tmp_path / "absent")


def test_missing_pathfinder_says_where_to_get_it(tmp_path):
    for name in ("pathfinder", "pathx"):
        with pytest.raises(DataError) as e:
            registry.get_task(name, tmp_path)
        msg = str(e.value)
        assert "metadata" in msg and str(tmp_path) in msg and "lra_release.gz" in msg
        assert f"elm data generate {name} --out DIR" in msg


def test_data_tasks_need_a_directory():
    with pytest.raises(DataError, match="listops.*basic_train.tsv.*pass a data directory"):
        registry.get_task("listops")


def test_generate_then_get_task_round_trip(tmp_path):
    out = registry.generate("listops", tmp_path / "lo", n=30, seed=1, min_length=6, max_length=30,
                            max_depth=4, max_args=4)
    task = registry.get_task("listops", out)
    assert isinstance(task, Task) and task.num_input == 16 and task.num_examples("train") == 24
    assert registry.detect_task(out) == "listops"
    out = registry.generate("pathx", tmp_path / "px", n=4, seed=0)
    task = registry.get_task("pathx", out)
    assert (task.num_input, task.seq_len, task.num_examples("train")) == (8, 128 * 128, 4)  # 10 % of 4 rounds to 0
    assert registry.detect_task(out) == "pathx"
    out = registry.generate("pathfinder", tmp_path / "pf64", n=4, seed=0, size=64)
    assert registry.detect_task(out) == "pathfinder64"
    assert registry.get_task("pathfinder64", out).seq_len == 64 * 64
    with pytest.raises(ELMError, match="size=128.*'pathfinder' with size=32"):
        registry.generate("pathx", tmp_path / "bad", n=2, size=32)
    in_memory = registry.get_task("delayed-recall", seed=4, n=10, length=7, num_tokens=3)
    on_disk = registry.get_task("delayed-recall",
                                registry.generate("delayed-recall", tmp_path / "dr", n=10, seed=4,
                                                  length=7, num_tokens=3))
    np.testing.assert_array_equal(in_memory.splits["train"][0], on_disk.splits["train"][0])


def test_unknown_options_are_named(tmp_path):
    with pytest.raises(ELMError, match=r"unknown option\(s\) colour.*accepted:.*path_length"):
        registry.generate("pathfinder", tmp_path, n=2, colour="red")
    registry.generate("adding", tmp_path, n=6, length=5)
    with pytest.raises(ELMError, match="length.*only when generating"):
        registry.get_task("adding", tmp_path, length=9)
    with pytest.raises(ELMError, match="cannot be generated"):
        registry.generate("shd", tmp_path)


# ---- CLI ------------------------------------------------------------------------------

def test_cli_generate_and_info_listops(tmp_path):
    result = run(["generate", "listops", "--out", str(tmp_path), "--n", "40", "--seed", "2"] + SMALL_LISTOPS)
    assert result.exit_code == 0, result.output
    assert f"wrote listops (seed 2) to {tmp_path}" in result.stdout
    assert (tmp_path / "basic_train.tsv").read_text().startswith("Source\tTarget\n")
    result = run(["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "n_train: 32" in result.stdout and "n_valid: 4" in result.stdout
    assert "class_counts_train: [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]" in result.stdout
    preview = tmp_path / "raster.png"
    result = run(["info", str(tmp_path), "--task", "listops", "--preview", str(preview)])
    assert result.exit_code == 0, result.output
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_pathfinder_preview_grid(tmp_path):
    result = run(["generate", "pathfinder", "--out", str(tmp_path), "--n", "10", "--path-length", "6",
                  "--distractors", "2", "--dash-spacing", "1.5", "-O", "clearance=3.5"])
    assert result.exit_code == 0, result.output
    from elmcore.data.pathfinder import read_record
    record = read_record(tmp_path / "curv_contour_length_14")
    assert (record["path_length"], record["distractors"], record["clearance"]) == (6, 2, 3.5)
    preview = tmp_path / "grid.png"
    result = run(["info", str(tmp_path), "--preview", str(preview)])
    assert result.exit_code == 0, result.output
    assert "pathfinder:" in result.stdout and "seq_len: 1024" in result.stdout
    from PIL import Image
    with Image.open(preview) as img:
        assert img.format == "PNG" and img.size[0] >= 200


def test_cli_missing_directory_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    result = run(["info", str(missing), "--task", "listops"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]
    assert "lra_release.gz" in lines[0]
    result = run(["info", str(missing)])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_cli_unknown_task_and_bad_option_exit_2(tmp_path):
    result = run(["generate", "mnist", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "'mnist' is not one of" in result.stderr
    assert result.stderr.startswith("error: ") and "Error:" not in result.stderr
    result = run(["generate", "adding", "--out", str(tmp_path), "-O", "nonsense"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.stderr


def test_cli_preview_without_matplotlib(tmp_path, monkeypatch):
    assert run(["generate", "adding", "--out", str(tmp_path), "--n", "6", "--length", "5"]).exit_code == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # makes `import matplotlib` fail
    result = run(["info", str(tmp_path), "--preview", str(tmp_path / "p.png")])
    assert result.exit_code == 2
    assert "pip install matplotlib" in result.stderr
    assert not os.path.exists(tmp_path / "p.png")


def test_cli_registered_under_elm(tmp_path):
    from elm_cli.main import cli
    result = CliRunner().invoke(cli, ["data", "generate", "delayed-recall", "--out", str(tmp_path),
                                      "--n", "9", "--length", "12", "--num-tokens", "3"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["data", "info", str(tmp_path)])
    assert result.exit_code == 0 and "seq_len: 12" in result.stdout and "num_output: 3" in result.stdout


@pytest.mark.slow
def test_cli_neuronio_surrogate_generate_info_and_raster(tmp_path):
    result = run(["generate", "neuronio", "--out", str(tmp_path), "--n", "3", "--sims-per-file", "2",
                  "--duration-ms", "300"])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*sim__*.p"))) == 3
    preview = tmp_path / "raster.png"
    result = run(["info", str(tmp_path), "--preview", str(preview), "-O", "window=100",
                  "-O", "burn_in=20"])
    assert result.exit_code == 0, result.output
    assert "neuronio:" in result.stdout and "num_input: 1278" in result.stdout
    assert preview.read_bytes()[:4] == b"\x89PNG"
    # Every count says what it counts: training windows are drawn per epoch, evaluation windows tile simulations.
    assert "windows of 100 ms drawn at random per epoch" in result.stdout
    assert "windows of 100 ms (every non-overlapping window of every simulation)" in result.stdout
    assert "simulations_valid: 2" in result.stdout
    assert "generated by: elm data generate neuronio (seed=0, n_files=3, sims_per_file=2, duration_ms=300)" \
        in result.stdout
    # The preview shows a window in which the neuron spikes, where the first windows hold one.
    task = registry.get_task("neuronio", tmp_path, window=100, burn_in=20)
    x, target, index = task._window_with_spikes("valid")
    windows = [(np.asarray(b.X), np.asarray(b.target)) for b in task.batches("valid", 64)]
    spiking = [k for k, t in enumerate(np.concatenate([t for _, t in windows])) if (t[:, 0] > 0.5).any()]
    assert index == (spiking[0] if spiking else None)
    assert (target[:, 0] > 0.5).any() == bool(spiking)


@pytest.mark.parametrize("task, args", [
    ("text", ["--n", "20000"]),
    ("adding", ["--n", "20", "--length", "5"]),
    ("pathfinder", ["--n", "10"]),
])
def test_generate_writes_a_manifest_that_info_reads(tmp_path, task, args):
    import json
    result = run(["generate", task, "--out", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "elmcore_data.json").read_text())
    assert manifest["task"] == task and manifest["seed"] == 0
    read = registry.get_task(task, tmp_path)
    assert manifest["counts"]["train"] == {"count": read.num_examples("train"), "unit": read.count_unit("train")}
    result = run(["info", str(tmp_path)])  # no --task: the manifest names it (text has no file name to go by)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{task}: {tmp_path}\n  generated by: elm data generate {task} (seed=0")
    assert f"n_train: {read.num_examples('train')} {read.count_unit('train')}" in result.stdout


def test_text_counts_windows_and_its_preview_shows_characters(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    assert run(["generate", "text", "--out", str(tmp_path), "--n", "20000"]).exit_code == 0
    task = registry.get_task("text", tmp_path, length=64)
    assert task.count_unit("valid") == "windows of 64 bytes"
    fig = task.preview_figure(plt, "train")
    try:
        ax = fig.axes[1]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        corpus = (tmp_path / "corpus.txt").read_text()
        assert "space" in labels and set(labels) - {"space"} == set(corpus[:64]) - {" "}  # characters, not channels
        assert len(fig.axes) == 2  # the text and the marks: no colour bar
        following = "space" if corpus[64] == " " else corpus[64]
        assert f"the next one: {following}" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_unknown_synthetic_option_is_named(tmp_path):
    with pytest.raises(ELMError, match=r"delayed-recall: unknown option\(s\) tokens; did you mean num_tokens\? "
                                       r"\(accepted: .*num_tokens"):
        registry.generate("delayed-recall", tmp_path, n=6, tokens=4)
    with pytest.raises(ELMError, match=r"unknown option\(s\) size"):
        registry.get_task("adding", size=3)
