"""The report of a sweep directory: ``report.md`` and its figures (``elm report SWEEP_DIR``).

Written at the end of every sweep and redrawn from the point directories at any time,
also while the sweep runs (unfinished points are listed, not drawn):

* ``report-fields.png``: per swept field, the best validation metric against that
  field's values (a log axis where they span a decade or more), mean ± standard
  deviation over seeds, one line per combination of the other swept fields;
* ``report-budget.png`` (budget mode): the metric against N, k_e and k_c, one curve
  per budget through the best shape at each value, the budget's optimum starred; and
  the best metric against the parameter count with the Pareto frontier and the power
  law fitted to the budgets' optima (exponent ± its standard error);
* ``report.md``: the table of points (metric, parameters, time), the optimum per
  budget and the fit, linking the figures.

The fit is ``error ≈ a · P^b`` by least squares in log-log coordinates, where the error
is the metric itself when lower is better (mse, bpc, loss) and 1 − metric for accuracy
and AUC. Its uncertainty is the standard error of the slope, which needs three budgets
or more.
"""

import dataclasses
import math
import os
import time

from elmcore.errors import ELMError
from elmcore.reporting.plotting import ERROR_METRICS

REPORT = "report.md"
FIELDS_FIGURE = "report-fields.png"
BUDGET_FIGURE = "report-budget.png"
# Overrides that repeat a run rather than change it: averaged over, never a line of their own.
REPLICATE_FIELDS = ("seed",)
# Labels and fields a budget sweep sets for each shape (drawn in the budget figure, not per field).
BUDGET_KEYS = ("budget", "model.version", "model.num_neurons", "model.num_memory", "model.num_branch",
               "model.num_synapse_per_branch")
HIGHER_IS_BETTER = ("accuracy", "auc")
METRIC_UNITS = {"mse": "mean squared error", "bpc": "bits per character", "loss": "nats",
                "accuracy": "fraction correct", "auc": "area under the ROC curve"}
FIELD_NAMES = {"lr": "peak learning rate", "min_lr": "final learning rate", "batch_size": "batch size",
               "num_memory": "memory units per neuron (d_m)", "num_neurons": "neurons (N)",
               "weight_decay": "weight decay", "epochs": "epochs"}


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def higher_is_better(metric):
    return metric in HIGHER_IS_BETTER


def metric_label(split, metric):
    unit = METRIC_UNITS.get(metric)
    return f"best {split} {metric}" + (f" ({unit})" if unit else "")


def _short(field):
    return field.rpartition(".")[2]


def _field_label(field):
    name = _short(field)
    return FIELD_NAMES.get(name, name)


def _sort_key(value):
    return (0, value, "") if _number(value) else (1, 0, str(value))


def _spans_decades(values):
    numbers = [v for v in values if _number(v)]
    return len(numbers) == len(values) and numbers and min(numbers) > 0 and max(numbers) >= 10 * min(numbers)


# ---- reading and summarising ----------------------------------------------------------------

@dataclasses.dataclass
class Stat:
    mean: float
    spread: float      # standard deviation over seeds (0 for one seed)
    count: int


def mean_spread(values):
    n = len(values)
    mean = sum(values) / n
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stat(mean, spread, n)


def finished(rows):
    """The rows of finished points with a finite selection metric."""
    return [r for r in rows if r.get("status") == "done" and _number(r.get("best_valid"))]


def swept_fields(rows):
    """Override keys whose values differ between points, in the sweep file's order."""
    keys = dict.fromkeys(k for r in rows for k in r.get("overrides", {}))
    return [k for k in keys if len({repr(r["overrides"].get(k)) for r in rows}) > 1]


def network_shape(run_dir):
    """(N, d_m, k_c, k_e) of a point's network from its run.json, or None for a single neuron."""
    from elmcore.engine.fields import NETWORK_VERSION
    from elmcore.network.config import NetworkConfig, network_parameter_count
    from elmcore.reporting.plotting import _read_optional_json
    settings = _read_optional_json(os.path.join(run_dir, "run.json")) or {}
    model = settings.get("model") if isinstance(settings.get("model"), dict) else {}
    if model.get("version") != NETWORK_VERSION:
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(NetworkConfig)
                if f.default is not dataclasses.MISSING}
    m = {**defaults, **model}
    try:
        # k_e: a neuron's parameters but its synapse weights (the MLP, w_o, a learned τ_m): a count with k_c = 0.
        k_e = network_parameter_count(0, 1, m["num_memory"], m["num_branch"], 0, m["mlp_num_layers"],
                                      m["mlp_hidden_size"], m["learn_memory_tau"], 1)
        return {"N": m["num_neurons"], "d_m": m["num_memory"], "k_c": m["num_branch"] * m["num_synapse_per_branch"],
                "k_e": k_e}
    except TypeError:  # a hand-edited run.json: no shape, the point is still listed
        return None


def load_rows(sweep_dir):
    """The sweep's rows (``elmcore.training.sweep.read_sweep``) with their overrides and network shapes."""
    from elmcore.training.sweep import read_sweep
    rows = read_sweep(sweep_dir)
    fixed = {"point", "status", "parameters", "metric", "selection_split", "best_valid", "test", "seconds",
             "steps", "run_dir"}
    for r in rows:
        r["overrides"] = {k: v for k, v in r.items() if k not in fixed}
        r["shape"] = network_shape(r["run_dir"]) if r["status"] == "done" else None
    return rows


# ---- per swept field ------------------------------------------------------------------------------

def field_lines(rows, field, fields):
    """{label of the other fields' values: [(x, Stat)]} for ``field``, seeds averaged."""
    others = [f for f in fields if f != field and f not in REPLICATE_FIELDS]
    groups = {}
    for r in finished(rows):
        label = ", ".join(f"{_short(f)}={r['overrides'].get(f)}" for f in others)
        groups.setdefault(label, {}).setdefault(repr(r["overrides"].get(field)), (r["overrides"].get(field), []))[1] \
            .append(r["best_valid"])
    return {label: sorted(((x, mean_spread(v)) for x, v in points.values()), key=lambda p: _sort_key(p[0]))
            for label, points in groups.items()}


# ---- budget mode ---------------------------------------------------------------------------------

def shape_stats(rows):
    """One entry per (budget, shape) over its seeds: budget, N, d_m, k_c, k_e, parameters, Stat, points."""
    groups = {}
    for r in finished(rows):
        if r["shape"] is None or "budget" not in r["overrides"]:
            continue
        s = r["shape"]
        key = (r["overrides"]["budget"], s["N"], s["d_m"], s["k_c"], s["k_e"], r.get("parameters"))
        groups.setdefault(key, []).append(r)
    out = []
    for (budget, N, d_m, k_c, k_e, parameters), members in groups.items():
        out.append({"budget": budget, "N": N, "d_m": d_m, "k_c": k_c, "k_e": k_e, "parameters": parameters,
                    "stat": mean_spread([m["best_valid"] for m in members]),
                    "points": [m["point"] for m in members]})
    return sorted(out, key=lambda e: (e["budget"], e["parameters"] or 0))


def _better(a, b, metric):
    return a > b if higher_is_better(metric) else a < b


def budget_optima(shapes, metric):
    """{budget: the shape entry with the best mean metric}."""
    best = {}
    for e in shapes:
        if e["budget"] not in best or _better(e["stat"].mean, best[e["budget"]]["stat"].mean, metric):
            best[e["budget"]] = e
    return dict(sorted(best.items()))


def pareto_frontier(entries, metric):
    """The entries no other beats with at most as many parameters, by parameter count."""
    frontier = []
    sign = -1 if higher_is_better(metric) else 1
    for e in sorted(entries, key=lambda e: (e["parameters"], sign * e["stat"].mean)):
        if not frontier or _better(e["stat"].mean, frontier[-1]["stat"].mean, metric):
            frontier.append(e)
    return frontier


@dataclasses.dataclass
class PowerLaw:
    """error ≈ coefficient · P^exponent, fitted by least squares on (log P, log error)."""
    exponent: float
    exponent_se: float   # standard error of the exponent; nan with fewer than three points
    coefficient: float
    points: int

    def __call__(self, parameters):
        return self.coefficient * parameters ** self.exponent

    def describe(self, error_name):
        se = "" if math.isnan(self.exponent_se) else f" ± {self.exponent_se:.2g}"
        where = "" if self.points >= 3 else " (no uncertainty from two points)"
        return (f"{error_name} ≈ {self.coefficient:.3g} · P^b with b = {self.exponent:.3g}{se} "
                f"(standard error; {self.points} budgets' optima){where}")


def fit_power_law(parameters, errors):
    """The :class:`PowerLaw` through (parameters, errors), all positive, at least two distinct counts."""
    if len(parameters) != len(errors) or len(parameters) < 2:
        raise ELMError("a power-law fit needs at least two points")
    if any(not (_number(p) and p > 0) for p in parameters) or any(not (_number(e) and e > 0) for e in errors):
        raise ELMError("a power-law fit needs positive parameter counts and errors")
    x = [math.log(p) for p in parameters]
    y = [math.log(e) for e in errors]
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    if sxx == 0:
        raise ELMError("a power-law fit needs at least two different parameter counts")
    slope = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx
    intercept = my - slope * mx
    if n > 2:
        residual = sum((yi - intercept - slope * xi) ** 2 for xi, yi in zip(x, y))
        se = math.sqrt(residual / (n - 2) / sxx)
    else:
        se = math.nan
    return PowerLaw(slope, se, math.exp(intercept), n)


def error_of(value, metric):
    """What the power law is fitted to: the metric when lower is better, else 1 − metric."""
    return 1 - value if higher_is_better(metric) else value


def error_name(metric):
    return f"1 - {metric}" if higher_is_better(metric) else metric


# ---- the report ------------------------------------------------------------------------------------

@dataclasses.dataclass
class SweepReport:
    sweep_dir: str
    rows: list
    fields: list          # swept fields drawn one panel each (not seeds, not the budget's shape keys)
    metric: str
    split: str
    shapes: list          # budget mode: per (budget, shape) statistics
    optima: dict
    fit: object           # PowerLaw or None
    fit_note: str         # why there is no fit


def analyse(sweep_dir):
    rows = load_rows(sweep_dir)
    done = finished(rows)
    metric = next((r["metric"] for r in done if r.get("metric")), None) or "metric"
    split = next((r["selection_split"] for r in done if r.get("selection_split")), None) or "valid"
    swept = swept_fields(rows)
    fields = [f for f in swept if f not in REPLICATE_FIELDS and f not in BUDGET_KEYS]
    shapes = shape_stats(rows)
    optima = budget_optima(shapes, metric) if shapes else {}
    fit, note = None, ""
    if optima:
        points = [(e["parameters"], error_of(e["stat"].mean, metric)) for e in optima.values()]
        try:
            fit = fit_power_law([p for p, _ in points], [e for _, e in points])
        except ELMError as e:
            note = str(e)
    return SweepReport(os.fspath(sweep_dir), rows, fields, metric, split, shapes, optima, fit, note)


def format_seconds(seconds):
    """A run's seconds as people read them: tenths from one second up, two significant digits below
    (a 5-step point takes 0.012 s, not "0.0 s"); "" when there is no number."""
    if not _number(seconds):
        return ""
    return f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2g}"


def _fmt(value, spec=".4g"):
    if value is None or value == "":
        return ""
    return format(value, spec) if _number(value) else str(value)


def _status_counts(rows):
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def markdown(report, figures):
    m, split = report.metric, report.split
    lines = [f"# Sweep {os.path.basename(os.path.abspath(report.sweep_dir))}", "",
             f"{len(report.rows)} points: {_status_counts(report.rows)} (report of {time.strftime('%Y-%m-%d %H:%M')}). "
             f"Metric: the best {split} {m} of each run"
             + (f" ({METRIC_UNITS[m]})" if m in METRIC_UNITS else "")
             + f", {'higher' if higher_is_better(m) else 'lower'} is better; test: the selected model's.", ""]
    for path in figures:
        lines += [f"![{os.path.basename(path)}]({os.path.basename(path)})", ""]
    shown = [f for f in swept_fields(report.rows) if f not in ("model.version",)]
    lines += ["## Points", "",
              "| point | " + " | ".join(_short(f) for f in shown) + f" | status | parameters | {split} {m} | "
              f"test {m} | steps | seconds |",
              "|---|" + "---|" * len(shown) + "---|---:|---:|---:|---:|---:|"]
    for r in report.rows:
        lines.append(f"| {r['point']} | " + " | ".join(_fmt(r["overrides"].get(f)) for f in shown)
                     + f" | {r['status']} | {_fmt(r.get('parameters'), 'd')} | {_fmt(r.get('best_valid'))} | "
                       f"{_fmt(r.get('test'))} | {_fmt(r.get('steps'), 'd')} | {format_seconds(r.get('seconds'))} |")
    done = finished(report.rows)
    if done:
        pick = max if higher_is_better(m) else min
        best = pick(done, key=lambda r: r["best_valid"])
        lines += ["", f"Best point: {best['point']}, {split} {m} {best['best_valid']:.4g}"
                  + (f" (test {best['test']:.4g})" if _number(best.get("test")) else "")
                  + f", {best.get('parameters')} parameters."]
    if report.optima:
        lines += ["", "## Optimum per budget", "",
                  f"| budget | shapes done | best shape (N, d_m, k_c, k_e) | parameters | {split} {m} (mean ± sd, "
                  "seeds) |", "|---:|---:|---|---:|---|"]
        for budget, e in report.optima.items():
            count = sum(s["budget"] == budget for s in report.shapes)
            lines.append(f"| {_fmt(budget, 'g')} | {count} | N={e['N']}, d_m={e['d_m']}, k_c={e['k_c']}, "
                         f"k_e={e['k_e']} | {e['parameters']} | {e['stat'].mean:.4g} ± {e['stat'].spread:.2g} "
                         f"({e['stat'].count}) |")
        lines += ["", "## Power law across budgets", ""]
        lines.append(report.fit.describe(error_name(m)) + "." if report.fit else f"No fit: {report.fit_note}.")
    return "\n".join(lines) + "\n"


def describe_sweep(sweep_dir):
    """Lines for ``elm info SWEEP_DIR``: the points by status, the best point, the budgets' optima, the fit."""
    report = analyse(sweep_dir)
    m, split = report.metric, report.split
    lines = [f"sweep: {report.sweep_dir}", f"points: {len(report.rows)} ({_status_counts(report.rows)})"]
    swept = swept_fields(report.rows)
    if swept:
        lines.append("swept: " + ", ".join(
            f"{f} ({len({repr(r['overrides'].get(f)) for r in report.rows})} values)" for f in swept))
    done = finished(report.rows)
    if done:
        pick = max if higher_is_better(m) else min
        best = pick(done, key=lambda r: r["best_valid"])
        lines.append(f"best point: {best['point']}: {split} {m} {best['best_valid']:.4g}"
                     + (f", test {m} {best['test']:.4g}" if _number(best.get("test")) else "")
                     + f", {best.get('parameters')} parameters, {format_seconds(best.get('seconds'))} s")
    for budget, e in report.optima.items():
        lines.append(f"budget {_fmt(budget, 'g')}: best N={e['N']}, d_m={e['d_m']}, k_c={e['k_c']}, k_e={e['k_e']} "
                     f"({e['parameters']} parameters): {split} {m} {e['stat'].mean:.4g}")
    if report.fit:
        lines.append("fit: " + report.fit.describe(error_name(m)))
    report_path = os.path.join(report.sweep_dir, REPORT)
    lines.append(f"report: {report_path}" if os.path.exists(report_path) else
                 f"no report yet: elm report {report.sweep_dir}")
    return lines


# ---- figures ---------------------------------------------------------------------------------------

def _log_x(ax, values):
    """A log x axis labelled in plain numbers: at the values themselves when they are few."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    ax.set_xscale("log")
    distinct = sorted(set(values))
    if len(distinct) <= 8:
        ax.xaxis.set_major_locator(FixedLocator(distinct))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _axes_style(ax, metric, values, xs=None):
    from elmcore.reporting.plotting import _log_axis
    if metric in ERROR_METRICS and values and min(values) > 0:
        _log_axis(ax, values)
    if xs is not None and _spans_decades(xs):
        _log_x(ax, xs)
    ax.grid(alpha=0.3, which="both")


def draw_fields(report, path, inputs=()):
    """One panel per swept field: the metric against its values, a line per combination of the others."""
    from elmcore.reporting.plotting import import_pyplot
    plt = import_pyplot()
    n = len(report.fields)
    cols = min(n, 3)
    rows_ = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.2 * cols, 4.0 * rows_), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, field in zip(axes.ravel(), report.fields):
        lines = field_lines(report.rows, field, report.fields)
        xs_all = [x for pts in lines.values() for x, _ in pts]
        numeric = all(_number(x) for x in xs_all)
        categories = sorted({repr(x): x for x in xs_all}.values(), key=_sort_key)
        values = []
        for i, (label, pts) in enumerate(sorted(lines.items())):
            xs = [x if numeric else categories.index(x) for x, _ in pts]
            ys = [s.mean for _, s in pts]
            errs = [s.spread for _, s in pts]
            values += [y - e for y, e in zip(ys, errs) if y - e > 0] + ys
            seeds = max(s.count for _, s in pts)
            ax.errorbar(xs, ys, yerr=errs if seeds > 1 else None, fmt="o-", ms=4, capsize=3, color=f"C{i % 10}",
                        label=(label or "all points") + (f" (mean ± sd of {seeds} seeds)" if seeds > 1 else ""))
        if not numeric:
            ax.set_xticks(range(len(categories)), [str(c) for c in categories])
        _axes_style(ax, report.metric, values, xs_all if numeric else None)
        ax.set_xlabel(_field_label(field))
        ax.set_ylabel(metric_label(report.split, report.metric))
        ax.set_title(f"{report.metric} against {_short(field)}", fontsize=10)
        if len(lines) > 1 or any(lbl for lbl in lines):
            ax.legend(fontsize=7)
    fig.suptitle(f"sweep {os.path.basename(os.path.abspath(report.sweep_dir))}: "
                 f"{len(finished(report.rows))} of {len(report.rows)} points done")
    fig.tight_layout()
    _save(fig, plt, path, inputs)


def draw_budget(report, path, inputs=()):
    """The metric against N, k_e and k_c per budget (optimum starred), and the best metric against P."""
    from elmcore.reporting.plotting import import_pyplot
    plt = import_pyplot()
    m = report.metric
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.2))
    budgets = sorted({e["budget"] for e in report.shapes})
    labels = {"N": "neurons N", "k_e": "k_e: parameters per neuron besides its synapses (MLP, w_o, τ_m)",
              "k_c": "k_c: synapses per neuron"}
    for ax, key in zip([axes[0, 0], axes[0, 1], axes[1, 0]], ("N", "k_e", "k_c")):
        values, xs_all = [], []
        for i, budget in enumerate(budgets):
            entries = [e for e in report.shapes if e["budget"] == budget]
            color = f"C{i % 10}"
            xs = [e[key] for e in entries]
            ys = [e["stat"].mean for e in entries]
            errs = [e["stat"].spread for e in entries]
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, fmt="o", ms=4, capsize=2, color=color, alpha=0.5)
            # The trade-off curve: the best shape at each value of the key.
            best = {}
            for e in entries:
                if e[key] not in best or _better(e["stat"].mean, best[e[key]]["stat"].mean, m):
                    best[e[key]] = e
            curve = sorted(best.values(), key=lambda e: e[key])
            ax.plot([e[key] for e in curve], [e["stat"].mean for e in curve], "-", color=color,
                    label=f"budget {budget:g}")
            opt = report.optima[budget]
            ax.plot([opt[key]], [opt["stat"].mean], marker="*", ms=14, color=color, ls="none",
                    markeredgecolor="k", zorder=5)
            values += ys + [y - e for y, e in zip(ys, errs) if y - e > 0] + [y + e for y, e in zip(ys, errs)]
            xs_all += xs
        _axes_style(ax, m, values, xs_all)
        ax.set_xlabel(labels[key])
        ax.set_ylabel(metric_label(report.split, m))
        ax.set_title(f"{m} against {key} within each budget (★ optimum)", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[1, 1]
    ax.scatter([e["parameters"] for e in report.shapes], [e["stat"].mean for e in report.shapes], s=14,
               color="0.7", label="every shape")
    frontier = pareto_frontier(report.shapes, m)
    ax.plot([e["parameters"] for e in frontier], [e["stat"].mean for e in frontier], "-", drawstyle="steps-post",
            color="0.3", lw=1, label="Pareto frontier")
    optima = list(report.optima.values())
    ax.plot([e["parameters"] for e in optima], [e["stat"].mean for e in optima], "*", ms=12, color="C3",
            markeredgecolor="k", label="optimum per budget", zorder=5)
    values = [e["stat"].mean for e in report.shapes]
    if report.fit:
        lo = min(e["parameters"] for e in report.shapes)
        hi = max(e["parameters"] for e in report.shapes)
        grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
        fitted = [report.fit(p) for p in grid]
        shown = [1 - f for f in fitted] if higher_is_better(m) else fitted
        se = "" if math.isnan(report.fit.exponent_se) else f" ± {report.fit.exponent_se:.2g}"
        ax.plot(grid, shown, "--", color="C3", lw=1.2,
                label=f"fit: {error_name(m)} ∝ P^({report.fit.exponent:.3g}{se})")
    _log_x(ax, [e["parameters"] for e in report.shapes] if len(report.optima) > 8
           else [e["parameters"] for e in optima])
    _axes_style(ax, m, values)
    ax.set_xlabel("trainable parameters P")
    ax.set_ylabel(metric_label(report.split, m))
    ax.set_title("across budgets: best metric against parameters", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(f"sweep {os.path.basename(os.path.abspath(report.sweep_dir))}: parameter budgets "
                 f"({len(finished(report.rows))} of {len(report.rows)} points done)")
    fig.tight_layout()
    _save(fig, plt, path, inputs)


def _save(fig, plt, path, inputs):
    from elmcore.storage.fileio import atomic_output
    try:
        with atomic_output(path, inputs=inputs) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=90)
    finally:
        plt.close(fig)


def report_inputs(report):
    """The files the report reads: every point's point.json, run.json and summary.json."""
    return [os.path.join(r["run_dir"], name) for r in report.rows
            for name in ("point.json", "run.json", "summary.json")]


def _refuse_outputs_over_inputs(report, names, inputs):
    """Every file the report would write is checked against ``inputs`` before the first is written."""
    from elmcore.storage.fileio import refuse_inputs
    for name in names:
        refuse_inputs(os.path.join(report.sweep_dir, name), inputs)


def draw_figures(sweep_dir, report=None, inputs=()):
    """Draw the figures the sweep's finished points allow; their paths (an ELMError when none can be).

    ``inputs``: files besides the points' own that nothing drawn may be written over (the sweep file).
    """
    report = report or analyse(sweep_dir)
    inputs = [*inputs, *report_inputs(report)]
    _refuse_outputs_over_inputs(report, (FIELDS_FIGURE, BUDGET_FIGURE), inputs)
    written = []
    if not finished(report.rows):
        raise ELMError(f"no point of {report.sweep_dir} has finished yet: nothing to draw")
    if report.fields:
        path = os.path.join(report.sweep_dir, FIELDS_FIGURE)
        draw_fields(report, path, inputs)
        written.append(path)
    if report.shapes:
        path = os.path.join(report.sweep_dir, BUDGET_FIGURE)
        draw_budget(report, path, inputs)
        written.append(path)
    if not written:
        raise ELMError(f"{report.sweep_dir}: no swept field besides seeds, and no budget: nothing to draw "
                       f"(report.md lists the points)")
    return written


def write_report(sweep_dir, inputs=()):
    """Write the figures and ``report.md`` into ``sweep_dir``; return the paths written.

    Without matplotlib (or before any point finished) report.md is written alone and says why.
    Nothing is written over ``inputs`` (the sweep file) or the files the report reads.
    """
    report = analyse(sweep_dir)
    inputs = [*inputs, *report_inputs(report)]
    _refuse_outputs_over_inputs(report, (REPORT, FIELDS_FIGURE, BUDGET_FIGURE), inputs)
    figures, note = [], ""
    try:
        figures = draw_figures(sweep_dir, report, inputs)
    except ELMError as e:
        note = f"\nNo figures: {e}.\n"
    from elmcore.storage.fileio import atomic_write_text
    path = os.path.join(report.sweep_dir, REPORT)
    atomic_write_text(path, markdown(report, figures) + note, inputs=inputs)
    return figures + [path]
