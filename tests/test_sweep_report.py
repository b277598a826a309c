"""The sweep report: the power-law fit, the Pareto frontier, per-field statistics over seeds, and
report.md / figures / `elm info` / `elm plot` / `elm report` on a sweep directory (also mid-sweep)."""

import json
import math
import os

import numpy as np
import pytest
from click.testing import CliRunner

from elm_cli.main import cli
from elmcore.errors import ELMError
from elmcore.network.config import NetworkConfig, network_parameter_count
from elmcore.reporting import sweep_report as R


# ---- the fit --------------------------------------------------------------------------------------

def test_power_law_fit_recovers_a_known_exponent_within_its_uncertainty():
    rng = np.random.default_rng(7)
    exponent, coefficient = -0.35, 40.0
    parameters = np.logspace(3, 6, 12)
    errors = coefficient * parameters ** exponent * np.exp(rng.normal(0, 0.05, parameters.size))
    fit = R.fit_power_law(list(parameters), list(errors))
    assert 0 < fit.exponent_se < 0.05
    assert abs(fit.exponent - exponent) <= 3 * fit.exponent_se
    assert fit.coefficient == pytest.approx(coefficient, rel=0.5)
    # The standard error is honest: over many noisy draws about 68 % of fits lie within one of it.
    hits = 0
    for seed in range(200):
        noisy = coefficient * parameters ** exponent * np.exp(np.random.default_rng(seed).normal(0, 0.05, 12))
        f = R.fit_power_law(list(parameters), list(noisy))
        hits += abs(f.exponent - exponent) <= f.exponent_se
    assert 0.55 <= hits / 200 <= 0.8
    exact = R.fit_power_law([1e3, 1e4, 1e5], [2 * 1e3 ** -0.5, 2 * 1e4 ** -0.5, 2 * 1e5 ** -0.5])
    assert exact.exponent == pytest.approx(-0.5, abs=1e-12) and exact.exponent_se < 1e-9
    two = R.fit_power_law([1e3, 1e4], [1.0, 0.5])
    assert math.isnan(two.exponent_se) and "no uncertainty" in two.describe("mse")


@pytest.mark.parametrize("parameters,errors,message", [
    ([1e3], [0.1], "at least two"),
    ([1e3, 1e4], [0.1, 0.0], "positive"),
    ([1e3, 1e3], [0.1, 0.2], "different parameter counts"),
])
def test_power_law_fit_refuses_what_it_cannot_fit(parameters, errors, message):
    with pytest.raises(ELMError, match=message):
        R.fit_power_law(parameters, errors)


def _entry(parameters, mean, budget=1000):
    return {"parameters": parameters, "stat": R.mean_spread([mean]), "budget": budget}


@pytest.mark.parametrize("seconds, shown", [(41.23, "41.2"), (1.0, "1.0"), (0.01234, "0.012"), (0.0, "0"),
                                             (None, ""), (float("nan"), "")])
def test_seconds_keep_their_figures_below_one_second(seconds, shown):
    # A few-step point finishes in milliseconds: "0.0 s" would say nothing.
    assert R.format_seconds(seconds) == shown


def test_pareto_frontier_keeps_only_undominated_shapes():
    entries = [_entry(100, 0.5), _entry(200, 0.6), _entry(300, 0.3), _entry(300, 0.4), _entry(400, 0.35),
               _entry(500, 0.1)]
    assert [(e["parameters"], e["stat"].mean) for e in R.pareto_frontier(entries, "mse")] == \
        [(100, 0.5), (300, 0.3), (500, 0.1)]
    accuracy = [_entry(100, 0.5), _entry(200, 0.4), _entry(300, 0.7)]
    assert [e["parameters"] for e in R.pareto_frontier(accuracy, "accuracy")] == [100, 300]


def test_k_e_is_the_parameter_split_of_the_network():
    from elmcore.network import params as NP
    cfg = NetworkConfig(num_input=5, num_output=3, num_neurons=7, num_memory=6, num_branch=3,
                        num_synapse_per_branch=2, mlp_num_layers=2, mlp_hidden_size=9, learn_memory_tau=True)
    split = NP.parameter_split(cfg)
    k_e = network_parameter_count(0, 1, 6, 3, 0, 2, 9, True, 1)
    assert k_e == split["k_e"] and split["k_c"] == 6


# ---- a sweep directory, written by hand ------------------------------------------------------------

def _point(sweep_dir, name, overrides, model=None, summary=None, run=True):
    d = sweep_dir / name
    d.mkdir(parents=True)
    (d / "point.json").write_text(json.dumps({"name": name, "overrides": overrides, "settings": {}}))
    if run:
        (d / "run.json").write_text(json.dumps({"task": "adding", "model": model or {}}))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps({"metric": "mse", "selection_split": "valid", "steps": 10,
                                                    "seconds": 2.5, **summary}))
    return d


def _true_mse(parameters):
    return 3.0 * parameters ** -0.4


def _budget_sweep(tmp_path, running=False):
    """Three budgets x two shapes x two seeds, the larger shape of each budget the better, plus one
    point still training and one not started when ``running``."""
    sweep_dir = tmp_path / "budget"
    i = 0
    for budget, shapes in ((300, [(2, 2, 2), (4, 2, 2)]), (1000, [(4, 4, 2), (8, 4, 2)]),
                           (3000, [(8, 6, 4), (16, 6, 2)])):
        for N, d_m, spb in shapes:
            for seed in (0, 1):
                p = network_parameter_count(1, N, d_m, 4, spb)
                model = {"version": "elm_network", "num_neurons": N, "num_memory": d_m, "num_branch": 4,
                         "num_synapse_per_branch": spb}
                overrides = {"model.version": "elm_network", "model.num_neurons": N, "model.num_memory": d_m,
                             "model.num_branch": 4, "model.num_synapse_per_branch": spb, "budget": budget,
                             "seed": seed}
                mse = _true_mse(p) * (1.0 if N == shapes[1][0] else 1.3) * (1 + 0.01 * seed)
                _point(sweep_dir, f"p{i:03d}-N={N}-seed={seed}", overrides, model,
                       {"parameters": p, "best_metric": mse, "test": {"mse": mse * 1.1}})
                i += 1
    if running:
        _point(sweep_dir, f"p{i:03d}-training", {"budget": 3000, "seed": 2}, run=True)
        _point(sweep_dir, f"p{i + 1:03d}-pending", {"budget": 3000, "seed": 3}, run=False)
    return sweep_dir


def test_budget_report_finds_each_budgets_optimum_and_the_fit(tmp_path):
    sweep_dir = _budget_sweep(tmp_path, running=True)
    report = R.analyse(sweep_dir)
    assert [r["status"] for r in report.rows].count("done") == 12
    assert {r["status"] for r in report.rows} == {"done", "training", "pending"}
    assert report.fields == []  # seeds are averaged, the budget's shape keys are drawn per budget
    assert {b: e["N"] for b, e in report.optima.items()} == {300: 4, 1000: 8, 3000: 16}
    best_300 = report.optima[300]
    assert best_300["stat"].count == 2 and best_300["stat"].mean == pytest.approx(
        _true_mse(best_300["parameters"]) * 1.005)
    assert best_300["k_c"] == 8 and best_300["k_e"] == network_parameter_count(0, 1, 2, 4, 0)
    # The optima follow the true law up to the seeds' common 0.5 %: the fitted exponent is -0.4.
    assert report.fit.exponent == pytest.approx(-0.4, abs=1e-9) and report.fit.points == 3
    written = R.write_report(sweep_dir)
    assert [os.path.basename(p) for p in written] == ["report-budget.png", "report.md"]
    assert (sweep_dir / "report-budget.png").read_bytes()[:4] == b"\x89PNG"
    text = (sweep_dir / "report.md").read_text()
    assert "## Optimum per budget" in text and "N=16, d_m=6, k_c=8" in text
    assert "b = -0.4 ± " in text and "3 budgets' optima" in text
    assert "| pending |" in text and "| training |" in text and "12 done" in text
    assert "![report-budget.png](report-budget.png)" in text


def test_field_report_averages_seeds_and_draws_a_line_per_other_value(tmp_path):
    sweep_dir = tmp_path / "grid"
    i = 0
    for lr in (1e-3, 1e-2, 1e-1):
        for memory in (4, 8):
            for seed in (0, 1, 2):
                mse = (abs(math.log10(lr) + 2) + 1) / memory * (1 + 0.1 * seed)
                _point(sweep_dir, f"p{i:03d}", {"lr": lr, "num_memory": memory, "seed": seed},
                       summary={"parameters": 100 * memory, "best_metric": mse, "test": {"mse": mse}})
                i += 1
    report = R.analyse(sweep_dir)
    assert report.fields == ["lr", "num_memory"]
    lines = R.field_lines(report.rows, "lr", report.fields)
    assert sorted(lines) == ["num_memory=4", "num_memory=8"]
    xs = [x for x, _ in lines["num_memory=8"]]
    assert xs == [1e-3, 1e-2, 1e-1]
    stat = dict(lines["num_memory=8"])[1e-2]
    values = [1 / 8 * (1 + 0.1 * s) for s in range(3)]
    assert stat.count == 3 and stat.mean == pytest.approx(np.mean(values))
    assert stat.spread == pytest.approx(np.std(values, ddof=1))
    assert R._spans_decades(xs) and not R._spans_decades([4, 8])
    written = R.write_report(sweep_dir)
    assert [os.path.basename(p) for p in written] == ["report-fields.png", "report.md"]
    text = (sweep_dir / "report.md").read_text()
    assert "Best point: p009" in text  # lr 1e-2, num_memory 8, seed 0
    assert "## Optimum per budget" not in text


def test_the_cli_reads_sweep_directories(tmp_path):
    sweep_dir = _budget_sweep(tmp_path, running=True)
    runner = CliRunner()
    info = runner.invoke(cli, ["info", str(sweep_dir)])
    assert info.exit_code == 0, info.output
    assert "points: 14 (12 done, 1 training, 1 pending)" in info.output
    assert "budget 3000: best N=16" in info.output and "fit: mse" in info.output
    assert "no report yet" in info.output
    plot = runner.invoke(cli, ["plot", str(sweep_dir)])
    assert plot.exit_code == 0, plot.output
    assert "report-budget.png" in plot.output and not (sweep_dir / "report.md").exists()
    assert runner.invoke(cli, ["plot", str(sweep_dir), "-o", str(tmp_path / "x.png")]).exit_code == 2
    rep = runner.invoke(cli, ["report", str(sweep_dir)])
    assert rep.exit_code == 0 and "report.md" in rep.output
    assert "report: " in runner.invoke(cli, ["info", str(sweep_dir)]).output
    not_a_sweep = runner.invoke(cli, ["report", str(tmp_path)])
    assert not_a_sweep.exit_code == 2 and "not a sweep directory" in not_a_sweep.output


def test_a_sweep_without_finished_points_still_gets_its_table(tmp_path):
    sweep_dir = tmp_path / "fresh"
    _point(sweep_dir, "p000-lr=0.1", {"lr": 0.1}, run=False)
    _point(sweep_dir, "p001-lr=0.2", {"lr": 0.2}, run=False)
    assert [os.path.basename(p) for p in R.write_report(sweep_dir)] == ["report.md"]
    text = (sweep_dir / "report.md").read_text()
    assert "2 pending" in text and "No figures: no point" in text
    with pytest.raises(ELMError, match="nothing to draw"):
        R.draw_figures(sweep_dir)


# ---- the worked example: examples/budget_study.toml -------------------------------------------------

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "budget_study.toml")


def _example_spec():
    from elm_cli.main import _load_run_file
    return _load_run_file(EXAMPLE)


def test_the_budget_study_example_has_three_budgets_of_varied_shapes():
    from elmcore.training.sweep import expand_points, point_parameters
    spec = _example_spec()
    points = expand_points(spec)
    budgets = sorted({p.overrides["budget"] for p in points})
    assert len(budgets) == 3
    tolerance = spec["budget"]["tolerance"]
    for budget in budgets:
        mine = [p for p in points if p.overrides["budget"] == budget]
        assert len({p.overrides["model.num_neurons"] for p in mine}) >= 2, budget  # a trade-off to see
        for p in mine:  # counted on the settings the points train with, the task giving num_output
            assert abs(point_parameters(p) - budget) <= tolerance * budget


@pytest.mark.slow
def test_a_tiny_budget_study_trains_and_reports(tmp_path):
    spec = _example_spec()
    spec["sweep_dir"] = str(tmp_path / "study")
    spec["base"].update(epochs=1, task_options={"length": 8, "n": 64})
    spec["budget"]["budgets"] = spec["budget"]["budgets"][:2]  # the smallest shapes
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(spec))
    result = CliRunner().invoke(cli, ["sweep", str(path), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count(" done: valid mse ") == len(R.load_rows(tmp_path / "study"))
    text = (tmp_path / "study" / "report.md").read_text()
    assert "## Optimum per budget" in text and "2 budgets' optima" in text
    assert (tmp_path / "study" / "report-budget.png").read_bytes()[:4] == b"\x89PNG"


def test_dry_run_shows_each_points_parameter_count():
    from elmcore.training.sweep import expand_points
    result = CliRunner().invoke(cli, ["sweep", EXAMPLE, "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("p")]
    points = expand_points(_example_spec())
    assert len(lines) == len(points)
    for line, p in zip(lines, points):
        shape = [p.overrides[f"model.{k}"] for k in ("num_neurons", "num_memory", "num_branch",
                                                      "num_synapse_per_branch")]
        assert line.startswith(p.name + ": ")
        assert line.endswith(f": {network_parameter_count(1, *shape):,} parameters")  # the adding task: 1 output
