"""Sweeps: the budget arithmetic, point expansion, and `elm sweep --jobs 2` with a killed point."""

import csv
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from elmcore.network.config import network_parameter_count
from elmcore.errors import ELMError
from elmcore.training.sweep import budget_shapes, expand_points, point_state


# The trainable arrays of the three ELM Network oracle cases (docs/spec.md §7.4) add up to these.
@pytest.mark.parametrize("shape,count", [
    (dict(num_output=3, num_neurons=6, num_memory=4, num_branch=2, num_synapse_per_branch=3), 639),
    (dict(num_output=2, num_neurons=5, num_memory=3, num_branch=3, num_synapse_per_branch=2, mlp_num_layers=2,
          mlp_hidden_size=6, learn_memory_tau=True), 602),
    (dict(num_output=2, num_neurons=5, num_memory=3, num_branch=2, num_synapse_per_branch=2, num_layers=2,
          learn_memory_tau=True), 692),
])
def test_network_parameter_count_matches_the_oracle_cases(shape, count):
    assert network_parameter_count(**shape) == count


def test_budget_shapes_are_exactly_those_within_the_tolerance():
    lists = dict(num_neurons=[2, 4, 8, 16, 32], num_memory=[1, 2, 4, 8], num_synapse_per_branch=[1, 2, 4, 8],
                 num_branch=[2, 4])
    budgets, tol = [500, 5000], 0.2
    shapes = budget_shapes(budgets, tol, num_output=3, **lists)
    assert shapes, "the candidate lists reach both budgets"
    import itertools
    expected = set()
    for b in budgets:
        for N, d, nb, s in itertools.product(*(lists[k] for k in ("num_neurons", "num_memory", "num_branch",
                                                                  "num_synapse_per_branch"))):
            if abs(network_parameter_count(3, N, d, nb, s) - b) <= tol * b:
                expected.add((b, N, d, nb, s))
    got = {(s["budget"], s["num_neurons"], s["num_memory"], s["num_branch"], s["num_synapse_per_branch"])
           for s in shapes}
    assert got == expected
    assert all(abs(s["parameters"] - s["budget"]) <= tol * s["budget"] for s in shapes)
    assert [s["budget"] for s in shapes] == sorted(s["budget"] for s in shapes)
    with pytest.raises(ELMError, match="tolerance"):
        budget_shapes([100], 1.5, 3, [1], [1], [1])


def test_points_from_grid_list_and_budget():
    base = {"task": "adding", "model": {"num_memory": 4}}
    points = expand_points({"base": base, "grid": {"num_memory": [2, 8], "lr": [1e-3, 3e-3]}})
    assert [p.overrides for p in points] == [{"num_memory": 2, "lr": 1e-3}, {"num_memory": 2, "lr": 3e-3},
                                             {"num_memory": 8, "lr": 1e-3}, {"num_memory": 8, "lr": 3e-3}]
    assert points[3].settings == {"task": "adding", "model": {"num_memory": 8}, "lr": 3e-3}
    assert points[3].name == "p003-num_memory=8-lr=0.003"
    listed = expand_points({"base": base, "points": [{"model.num_memory": 3, "task_options.length": 50}],
                            "grid": {"seed": [0, 1]}})
    assert listed[1].settings == {"task": "adding", "model": {"num_memory": 3}, "task_options": {"length": 50},
                                  "seed": 1}
    budget = expand_points({"base": {"task": "shd-adding", "model": {"num_output": 1}},
                            "budget": {"budgets": [1000], "tolerance": 0.3, "num_neurons": [4, 8],
                                       "num_memory": [2, 4], "num_synapse_per_branch": [2, 4]}})
    assert budget and all(p.settings["model"]["version"] == "elm_network" for p in budget)
    assert all("budget" not in p.settings for p in budget) and all(p.overrides["budget"] == 1000 for p in budget)


@pytest.mark.parametrize("spec,message", [
    ({"grid": {"nonsense_field": [1]}}, "nonsense_field"),
    ({"grid": {"lr": []}}, "non-empty"),
    ({"grid": {"model": [1]}}, "model"),
    ({"points": [], "base": {}}, "points"),
    ({"extra": 1}, "unknown sweep section"),
    ({"budget": {"budgets": [10]}, "base": {"model": {"num_output": 1}}}, "num_neurons"),
])
def test_bad_sweep_files_name_the_problem(spec, message):
    with pytest.raises(ELMError, match=message):
        expand_points(spec)


SWEEP = """
sweep_dir = "{dir}"
[base]
task = "adding"
task_options = {{length = 30, n = 150}}
epochs = 3
batch_size = 16
checkpoint_every = 2
dtype = "float64"
model = {{mlp_hidden_size = 8}}
"""
# The victim point trains for long enough (hundreds of epochs at ~10 ms) that the test's
# kill lands while it trains: a worker that finished it would already be on the next point.
SWEEP_WITH_A_LONG_POINT = SWEEP + """
[[points]]
num_memory = 2
[[points]]
num_memory = 4
epochs = 300
[[points]]
num_memory = 6
"""
VICTIM = "p001-num_memory=4-epochs=300"


def _point_pid(point_dir):
    """The process training the point, as its train.log names it."""
    with open(os.path.join(point_dir, "train.log")) as f:
        lines = [line for line in f if "training in process" in line]
    return int(lines[-1].split("training in process")[1].split()[0]) if lines else None


@pytest.mark.slow
def test_sweep_with_two_jobs_survives_a_killed_point_and_resumes_it(tmp_path):
    sweep_dir = str(tmp_path / "sw")
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP_WITH_A_LONG_POINT.format(dir=sweep_dir))
    cmd = [sys.executable, "-m", "elm_cli.launch", "sweep", str(path), "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    victim = os.path.join(sweep_dir, VICTIM)
    killed, deadline = None, time.time() + 300
    while killed is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        if point_state(victim) == "interrupted":  # checkpointed, not finished
            killed = _point_pid(victim)
            if killed:
                os.kill(killed, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert killed, "the point's process was not found while it trained"
    assert proc.returncode == 1, err
    assert f"{VICTIM} was killed by signal 9" in err
    with open(os.path.join(sweep_dir, "summary.csv")) as f:
        status = {r["point"]: r["status"] for r in csv.DictReader(f)}
    assert status == {"p000-num_memory=2": "done", VICTIM: "interrupted", "p002-num_memory=6": "done"}
    finished = os.path.getmtime(os.path.join(sweep_dir, "p000-num_memory=2", "summary.json"))

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    assert "3 points, 2 already done" in again.stderr
    assert os.path.getmtime(os.path.join(sweep_dir, "p000-num_memory=2", "summary.json")) == finished
    assert "resuming from last.npz" in open(os.path.join(victim, "train.log")).read()
    with open(os.path.join(sweep_dir, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done"] * 3
    assert [int(r["parameters"]) for r in rows] == sorted(int(r["parameters"]) for r in rows)
    assert all(float(r["best_valid"]) > 0 and r["test"] and r["metric"] == "mse" for r in rows)
    with open(os.path.join(sweep_dir, "report-fields.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = open(os.path.join(sweep_dir, "report.md")).read()
    assert all(f"| {name} |" in report for name in status)
    assert re.search(rf"point {VICTIM} done: valid mse [0-9.e+-]+, test mse [0-9.e+-]+, [0-9.]+ s", again.stderr)


def test_an_impossible_point_fails_the_sweep_before_anything_trains(tmp_path):
    from click.testing import CliRunner
    from elm_cli.main import cli
    path = tmp_path / "s.toml"
    path.write_text(f'sweep_dir = "{tmp_path / "sw"}"\n[base]\ntask = "adding"\n[grid]\nlr = [1e-3, -1.0]\n')
    result = CliRunner().invoke(cli, ["sweep", str(path)])
    assert result.exit_code == 2
    assert "sweep point p001-lr=-1" in result.output and "'lr'" in result.output
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_sweep_points_spread_over_mpi_ranks(tmp_path):
    from test_distributed import MPIEXEC, _env
    if MPIEXEC is None:
        pytest.skip("no mpiexec: install the [mpi] extra to run sweeps over MPI ranks")
    sweep_dir = str(tmp_path / "sw")
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.format(dir=sweep_dir).replace("epochs = 3", "epochs = 1") + "[grid]\nnum_memory = [2, 4]\n")
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "elm_cli.launch", "sweep", str(path)],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=_env())
    assert r.returncode == 0, r.stderr
    assert "rank 0: point p000-num_memory=2" in r.stderr and "rank 1: point p001-num_memory=4" in r.stderr
    assert r.stdout.count("sweep: 2/2 points done") == 1  # rank 0 alone reports
    with open(os.path.join(sweep_dir, "summary.csv")) as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["done", "done"]


@pytest.mark.parametrize("seed", range(4))
def test_budget_count_matches_the_network_model(seed):
    """Once the ELM Network model is in the package, its own count must equal the budget arithmetic."""
    from elmcore.engine import factory as models
    from elmcore.network.config import NetworkConfig
    rng = np.random.default_rng(seed)
    shape = dict(num_output=int(rng.integers(1, 5)), num_neurons=int(rng.integers(1, 9)),
                 num_memory=int(rng.integers(1, 7)), num_branch=int(rng.integers(1, 5)),
                 num_synapse_per_branch=int(rng.integers(1, 4)), mlp_num_layers=int(rng.integers(0, 3)),
                 mlp_hidden_size=int(rng.integers(1, 9)), learn_memory_tau=bool(seed % 2),
                 num_layers=int(rng.integers(1, 3)))
    cfg = NetworkConfig.from_dict({"num_input": int(rng.integers(1, 6)), **shape})
    model = models.build_model(cfg, seed=0, dtype="float64")
    assert model.num_parameters == network_parameter_count(**shape)


def test_budget_mode_trains_networks_near_each_budget(tmp_path):
    from click.testing import CliRunner
    from elm_cli.main import cli
    path = tmp_path / "budget.toml"
    path.write_text(f'''sweep_dir = "{tmp_path / 'out'}"
[base]
task = "adding"
epochs = 1
batch_size = 16
task_options = {{n = 120, length = 8}}
model = {{version = "elm_network"}}
[budget]
budgets = [300, 800]
tolerance = 0.15
num_neurons = [2, 4, 8]
num_memory = [2, 4, 6]
num_synapse_per_branch = [2, 4]
''')
    result = CliRunner().invoke(cli, ["sweep", str(path)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert rows and all(r["status"] == "done" for r in rows)
    for r in rows:
        budget, parameters = float(r["budget"]), int(r["parameters"])
        assert abs(parameters - budget) <= 0.15 * budget
        assert math.isfinite(float(r["best_valid"])) and math.isfinite(float(r["test"]))
        run = json.loads((pathlib.Path(r["run_dir"]) / "run.json").read_text())
        assert run["model"]["version"] == "elm_network"
        assert run["model"]["num_neurons"] == int(r["model.num_neurons"])
    assert {float(r["budget"]) for r in rows} == {300.0, 800.0}
    assert (tmp_path / "out" / "report-budget.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Optimum per budget" in report and "## Power law across budgets" in report


def test_sweep_workers_get_their_own_gpu_slot(tmp_path, monkeypatch):
    # On cuda a worker uses GPU slot % device count (elmcore.engine.cuda_backend); a replacement for a
    # worker that died takes over its slot. The workers here are stand-ins that record their slot.
    from elmcore.training import sweep
    worker = tmp_path / "worker.sh"
    worker.write_text('#!/bin/sh\nwhile read -r dir; do\n  echo "$ELMCORE_GPU_SLOT" > "$dir/slot"\n'
                      '  case "$dir" in *die*) exit 3;; esac\n  echo "ok $dir"\ndone\n')
    worker.chmod(0o755)
    monkeypatch.setattr(sweep.sys, "executable", str(worker))
    dirs = []
    for name in ("a", "b", "c_die", "d", "e"):
        (tmp_path / name).mkdir()
        dirs.append(str(tmp_path / name))
    lines = []
    sweep._train_in_processes(dirs, 2, lines.append)
    slots = {os.path.basename(d): (pathlib.Path(d) / "slot").read_text().strip() for d in dirs}
    assert set(slots.values()) == {"0", "1"} and slots["a"] == "0" and slots["b"] == "1", slots
    assert any("c_die" in line and "exit code 3" in line for line in lines), lines
