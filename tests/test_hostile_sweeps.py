"""Hostile sweep files and sweep directories: `elm sweep` answers with one `error:` line and exit 2,
writes over none of the files it reads, and refuses huge sweeps before enumerating them."""

import json
import os

import pytest

from elmcore.training.sweep import expand_points, point_dirs
from hostile import assert_refused, assert_unchanged, invoke, snapshot

BASE = {"task": "adding", "task_options": {"n": 40, "length": 6}, "model": {"num_memory": 3},
        "batch_size": 8, "epochs": 1}


def write_sweep(path, spec):
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(spec) if not path.endswith(".toml") else spec)
    return path


# ---- outputs that are inputs ------------------------------------------------------------------

@pytest.mark.parametrize("inside", ["summary.csv", "report.md", "report-fields.png", "p000/train.log", "p000/run.json",
                                    "p000/metrics.jsonl", "p000/point.json"])
def test_a_sweep_file_inside_its_own_sweep_directory_is_refused_and_kept(tmp_path, inside):
    directory = tmp_path / "sw"
    sweep_file = write_sweep(directory / inside, {"base": BASE, "sweep_dir": str(directory)})
    before = snapshot(tmp_path)
    for extra in ([], ["--dry-run"]):
        line = assert_refused(invoke("sweep", sweep_file, *extra))
        assert sweep_file in line or os.path.basename(sweep_file) in line, line
    assert_unchanged(before, tmp_path)


def test_a_sweep_dir_option_that_holds_the_sweep_file_as_summary_is_refused(tmp_path):
    sweep_file = write_sweep(tmp_path / "summary.csv", {"base": BASE})
    before = snapshot(tmp_path)
    assert_refused(invoke("sweep", sweep_file, "--sweep-dir", tmp_path), "summary.csv")
    assert_unchanged(before, tmp_path)


def test_a_data_file_that_a_point_would_write_over_is_refused(tmp_path):
    directory = tmp_path / "sw"
    corpus = directory / "p000" / "metrics.jsonl"
    corpus.parent.mkdir(parents=True)
    corpus.write_text("some words of text to model, some words of text to model\n" * 20)
    base = {"task": "text", "data_dir": str(corpus), "task_options": {"length": 4}, "epochs": 1}
    sweep_file = write_sweep(tmp_path / "s.json", {"base": base, "sweep_dir": str(directory)})
    before = snapshot(tmp_path)
    assert_refused(invoke("sweep", sweep_file), "metrics.jsonl")
    assert_unchanged(before, tmp_path)


# ---- wrong types and damaged files: one error line, not a traceback ----------------------------

NETWORK_BASE = {"task": "adding", "model": {"num_output": 1}}
BUDGET = {"budgets": [500], "tolerance": 0.3, "num_neurons": [4, 8], "num_memory": [2, 4],
          "num_synapse_per_branch": [2, 4]}


@pytest.mark.parametrize("change,fragment", [
    ({"budgets": "500"}, "budgets"),
    ({"budgets": 500}, "budgets"),
    ({"budgets": [True]}, "budget"),
    ({"budgets": [float("inf")]}, "budget"),
    ({"budgets": ["big"]}, "budget"),
    ({"num_neurons": 4}, "num_neurons"),
    ({"num_neurons": "4"}, "num_neurons"),
    ({"num_neurons": [0, 4]}, "num_neurons"),
    ({"num_neurons": [4.5]}, "num_neurons"),
    ({"num_memory": [2, "x"]}, "num_memory"),
    ({"num_synapse_per_branch": [-1]}, "num_synapse_per_branch"),
    ({"num_branch": "x"}, "num_branch"),
    ({"num_branch": [0]}, "num_branch"),
    ({"tolerance": "x"}, "tolerance"),
    ({"tolerance": [0.1]}, "tolerance"),
    ({"tolerance": float("nan")}, "tolerance"),
])
def test_wrong_budget_tables_are_refused(tmp_path, change, fragment):
    spec = {"base": NETWORK_BASE, "budget": {**BUDGET, **change}, "sweep_dir": str(tmp_path / "sw")}
    # JSON has no inf or NaN literals; Python's json writes (and reads) Infinity and NaN.
    sweep_file = write_sweep(tmp_path / "s.json", spec)
    assert_refused(invoke("sweep", sweep_file, "--dry-run"), fragment)
    assert not (tmp_path / "sw").exists()


def test_an_infinite_budget_from_toml_is_refused(tmp_path):
    sweep_file = write_sweep(tmp_path / "s.toml", """
[base]
task = "adding"
model = {num_output = 1}
[budget]
budgets = [inf]
num_neurons = [4]
num_memory = [2]
num_synapse_per_branch = [2]
""")
    assert_refused(invoke("sweep", sweep_file, "--dry-run"), "budget")


@pytest.mark.parametrize("field, value", [("lr", 0), ("recompute_segment", 0), ("recompute_segment", -4),
                                          ("recompute_segment", "x"), ("recompute_segment", 10 ** 30)])
def test_an_impossible_point_setting_is_refused_by_the_dry_run_as_by_the_sweep(tmp_path, field, value):
    spec = {"base": BASE, "grid": {field: [value, 8]}, "sweep_dir": str(tmp_path / "sw")}
    sweep_file = write_sweep(tmp_path / "s.json", spec)
    for extra in (["--dry-run"], []):
        assert_refused(invoke("sweep", sweep_file, *extra), "sweep point", field)
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("sweep_dir,fragment", [(5, "sweep_dir"), ("a\0b", "sweep_dir"), (["x"], "sweep_dir"),
                                                ({"a": 1}, "sweep_dir")])
def test_a_sweep_dir_of_the_wrong_kind_is_refused(tmp_path, sweep_dir, fragment):
    sweep_file = write_sweep(tmp_path / "s.json", {"base": BASE, "sweep_dir": sweep_dir})
    assert_refused(invoke("sweep", sweep_file, "--dry-run"), fragment)
    assert_refused(invoke("sweep", sweep_file), fragment)


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_an_integer_with_thousands_of_digits_is_refused(tmp_path, suffix):
    huge = "9" * 5000
    text = (f'{{"base": {{"task": "adding", "epochs": {huge}}}}}' if suffix == ".json" else
            f'[base]\ntask = "adding"\nepochs = {huge}\n')
    sweep_file = write_sweep(tmp_path / f"s{suffix}", text if suffix == ".toml" else {})
    with open(sweep_file, "w") as f:
        f.write(text)
    assert_refused(invoke("sweep", sweep_file, "--dry-run"), os.path.basename(sweep_file))


def test_a_large_integer_setting_is_refused_by_name(tmp_path):
    sweep_file = write_sweep(tmp_path / "s.json", {"base": {**BASE, "epochs": 10 ** 4000},
                                                   "sweep_dir": str(tmp_path / "sw")})
    assert_refused(invoke("sweep", sweep_file), "epochs")


def _finished_sweep(tmp_path, summary_text=None, point_text=None):
    """A sweep of one point whose directory claims it is done, with its summary.json / point.json as given."""
    spec = {"base": BASE, "sweep_dir": str(tmp_path / "sw")}
    sweep_file = write_sweep(tmp_path / "s.json", spec)
    (point_dir,) = point_dirs(expand_points(spec), spec["sweep_dir"])
    summary = {"metric": "mse", "best_metric": 0.5, "parameters": 63, "selection_split": "valid",
               "seconds": 1.0, "test": {"mse": 0.7}}
    with open(os.path.join(point_dir, "summary.json"), "wb") as f:
        f.write(summary_text if summary_text is not None else json.dumps(summary).encode())
    if point_text is not None:
        with open(os.path.join(point_dir, "point.json"), "wb") as f:
            f.write(point_text)
    return sweep_file, point_dir


@pytest.mark.parametrize("summary_text", [b"{not json", b"\xff\xfe{}", b"[1, 2]",
                                          b'{"metric": "mse", "best_metric": "low", "parameters": 63}',
                                          b'{"metric": "mse", "best_metric": 0.5, "parameters": "many"}',
                                          b'{"metric": "mse", "best_metric": 0.5, "parameters": 63, "seconds": "x"}',
                                          b'{"metric": "mse", "best_metric": 0.5, "parameters": 63, '
                                          b'"test": {"mse": "x"}}',
                                          b'{"metric": 5, "best_metric": 0.5, "parameters": 63}',
                                          b'{"best_metric": ' + b"9" * 5000 + b"}"])
def test_a_damaged_point_summary_is_named(tmp_path, summary_text):
    sweep_file, point_dir = _finished_sweep(tmp_path, summary_text=summary_text)
    before = snapshot(tmp_path / "sw" / os.path.basename(point_dir))
    assert_refused(invoke("sweep", sweep_file), os.path.join(point_dir, "summary.json"))
    assert_unchanged(before, tmp_path / "sw" / os.path.basename(point_dir))


@pytest.mark.parametrize("point_text", [b"{not json", b"\xff\xfe{}", b"[1]", b'{"settings": ' + b"9" * 5000 + b"}"])
def test_a_damaged_point_file_is_named(tmp_path, point_text):
    sweep_file, point_dir = _finished_sweep(tmp_path, point_text=point_text)
    assert_refused(invoke("sweep", sweep_file), os.path.join(point_dir, "point.json"))


# ---- huge sweeps are refused before they are enumerated ---------------------------------------

def test_a_grid_of_ten_billion_points_is_refused_at_once(tmp_path):
    grid = {name: list(range(10)) for name in ("seed", "epochs", "batch_size", "lr", "warmup_steps",
                                               "eval_batch_size", "checkpoint_every", "num_memory",
                                               "mlp_hidden_size", "mlp_num_layers")}
    sweep_file = write_sweep(tmp_path / "s.json", {"base": BASE, "grid": grid})
    assert_refused(invoke("sweep", sweep_file, "--dry-run", seconds=20), "10,000,000,000")


def test_a_budget_table_of_400_million_candidates_is_refused_at_once(tmp_path):
    budget = {"budgets": [10 ** 6], "num_neurons": list(range(1, 1001)), "num_memory": list(range(1, 1001)),
              "num_synapse_per_branch": list(range(1, 401))}
    sweep_file = write_sweep(tmp_path / "s.json", {"base": NETWORK_BASE, "budget": budget})
    assert_refused(invoke("sweep", sweep_file, "--dry-run", seconds=20), "400,000,000")


@pytest.mark.parametrize("section", ["model", "task_options"])
def test_a_base_section_that_is_not_a_table_is_refused(tmp_path, section):
    field = "num_memory" if section == "model" else "task_options.length"
    spec = {"base": {**BASE, section: "x"}, "grid": {field: [2, 3]}}
    assert_refused(invoke("sweep", write_sweep(tmp_path / "s.json", spec), "--dry-run"), section)


def test_a_point_directory_that_is_a_file_is_named(tmp_path):
    spec = {"base": BASE, "sweep_dir": str(tmp_path / "sw")}
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "p000").write_text("in the way")
    before = snapshot(tmp_path / "sw")
    assert_refused(invoke("sweep", write_sweep(tmp_path / "s.json", spec)), str(tmp_path / "sw" / "p000"))
    assert_unchanged(before, tmp_path / "sw")


def test_an_interrupted_point_with_a_damaged_checkpoint_is_refused_before_training(tmp_path):
    spec = {"base": BASE, "sweep_dir": str(tmp_path / "sw"), "grid": {"seed": [0, 1]}}
    sweep_file = write_sweep(tmp_path / "s.json", spec)
    dirs = point_dirs(expand_points(spec), spec["sweep_dir"])
    with open(os.path.join(dirs[1], "last.npz"), "wb") as f:
        f.write(b"PK\x03\x04 torn")
    before = snapshot(tmp_path / "sw")
    assert_refused(invoke("sweep", sweep_file), os.path.join(dirs[1], "last.npz"))
    assert_unchanged(before, tmp_path / "sw")
    assert not os.path.exists(os.path.join(dirs[0], "run.json"))  # no point trained


def test_a_point_summary_that_is_a_fifo_is_refused_at_once(tmp_path):
    sweep_file, point_dir = _finished_sweep(tmp_path)
    os.unlink(os.path.join(point_dir, "summary.json"))
    os.mkfifo(os.path.join(point_dir, "summary.json"))
    assert_refused(invoke("sweep", sweep_file, seconds=20), "summary.json")


def test_many_budgets_times_the_candidates_are_counted_too(tmp_path):
    budget = {"budgets": list(range(1000, 1000 + 10 ** 4)), "num_neurons": list(range(1, 101)),
              "num_memory": list(range(1, 11)), "num_synapse_per_branch": list(range(1, 11))}
    sweep_file = write_sweep(tmp_path / "s.json", {"base": NETWORK_BASE, "budget": budget})
    assert_refused(invoke("sweep", sweep_file, "--dry-run", seconds=20), "10000 budgets")


# ---- sweep directories read by elm report, elm info and elm plot --------------------------------

def finished_sweep(root):
    """A finished two-point sweep directory, written by hand (nothing trains)."""
    directory = root / "sw"
    for i, lr in enumerate((0.01, 0.1)):
        point = directory / f"p{i:03d}-lr={lr}"
        point.mkdir(parents=True)
        settings = {**BASE, "lr": lr}
        (point / "point.json").write_text(json.dumps({"name": point.name, "overrides": {"lr": lr},
                                                      "settings": settings}))
        (point / "run.json").write_text(json.dumps(settings))
        (point / "summary.json").write_text(json.dumps({"metric": "mse", "selection_split": "valid",
                                                        "best_metric": 0.1 + lr, "parameters": 50, "steps": 5,
                                                        "seconds": 1.0}))
    return directory


def test_elm_report_reads_the_hand_written_sweep(tmp_path):
    # The baseline the hostile cases below damage: it works as it stands.
    directory = finished_sweep(tmp_path)
    result = invoke("report", directory)
    assert result.exit_code == 0, result.output
    assert "| p001-lr=0.1 |" in (directory / "report.md").read_text()


@pytest.mark.parametrize("target,fragment", [("missing", "not a sweep directory"), ("empty", "not a sweep directory"),
                                             ("run directory", "not a sweep directory"), ("a file", "is a file")])
def test_elm_report_on_what_is_not_a_sweep_directory_is_refused(tmp_path, target, fragment):
    path = tmp_path / "x"
    if target == "empty":
        path.mkdir()
    elif target == "run directory":  # a run directory is never taken for a sweep, even holding point dirs
        finished_sweep(tmp_path)
        path = tmp_path / "sw"
        (path / "run.json").write_text("{}")
    elif target == "a file":
        path.write_text("x")
    before = snapshot(tmp_path)
    assert_refused(invoke("report", path), fragment)
    assert_unchanged(before, tmp_path)


def _damage(point, damage):
    if damage == "fifo point.json":
        (point / "point.json").unlink()
        os.mkfifo(point / "point.json")
    elif damage == "huge point.json":
        with open(point / "point.json", "w") as f:
            f.truncate((64 << 20) + 1)
    elif damage == "point.json to /dev/zero":
        (point / "point.json").unlink()
        os.symlink("/dev/zero", point / "point.json")
    elif damage == "corrupt point.json":
        (point / "point.json").write_text('{"overrides": ')
    elif damage == "point.json not a point":
        (point / "point.json").write_text("[1, 2]")
    elif damage == "damaged summary.json":
        (point / "summary.json").write_text(json.dumps({"metric": 5}))
    elif damage == "fifo summary.json":
        (point / "summary.json").unlink()
        os.mkfifo(point / "summary.json")


@pytest.mark.parametrize("command", ["report", "info", "plot"])
@pytest.mark.parametrize("damage,fragment", [
    ("fifo point.json", "not a regular file"),
    ("huge point.json", "larger than"),
    ("point.json to /dev/zero", "not a regular file"),
    ("corrupt point.json", "not valid JSON"),
    ("point.json not a point", "not a sweep point file"),
    ("damaged summary.json", "summary.json"),
    ("fifo summary.json", "not a regular file"),
])
def test_damaged_point_files_are_refused_by_every_sweep_reader(tmp_path, command, damage, fragment):
    directory = finished_sweep(tmp_path)
    _damage(directory / "p001-lr=0.1", damage)
    before = {p: h for p, h in snapshot(directory / "p000-lr=0.01").items()}
    line = assert_refused(invoke(command, directory), fragment)
    assert "p001-lr=0.1" in line, line
    assert_unchanged(before, directory / "p000-lr=0.01")
    assert not any((directory / name).exists() for name in ("report.md", "report-fields.png"))


@pytest.mark.parametrize("command,output,link", [("report", "report.md", "symlink"),
                                                 ("report", "report-fields.png", "hard link"),
                                                 ("plot", "report-fields.png", "symlink"),
                                                 ("plot", "report-fields.png", "hard link")])
def test_a_report_output_that_is_one_of_its_inputs_is_refused(tmp_path, command, output, link):
    directory = finished_sweep(tmp_path)
    victim = directory / "p000-lr=0.01" / "summary.json"
    (os.symlink if link == "symlink" else os.link)(victim, directory / output)
    before = snapshot(directory)
    assert_refused(invoke(command, directory), output, "summary.json")
    assert_unchanged(before, directory)
    assert not (directory / ("report-fields.png" if output == "report.md" else "report.md")).exists()
