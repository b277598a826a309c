"""Parameter sweeps: many normal training runs under one sweep directory.

A sweep file (TOML or JSON) holds a base run (the keys of ``elm train --config``)
and the points to train, from any of:

* ``[grid]``: field = [values…]; every combination (cartesian product);
* ``[[points]]``: an explicit list of overrides;
* ``[budget]``: ELM Network shapes whose parameter count lies within a tolerance
  of each budget (:func:`budget_shapes`).

``grid`` combines with the other two (e.g. every budget shape × three seeds).
Field names are training settings (``lr``, ``seed``, ``epochs`` …), model fields
(``num_memory`` or ``model.num_memory``) or ``task_options.NAME``.

A point's settings are resolved exactly as ``elm train --config`` resolves the same
table (``elmcore.training.resolve``): the task's default run for the point's model
family, then ``[base]``, then the point's overrides. So a point trains the run
``elm train --config`` would train from its ``point.json`` settings.

Each point is a normal run directory ``SWEEP_DIR/pNNN-field=value…`` holding also
``point.json`` (its overrides). Re-running a sweep skips points with a
``summary.json``, resumes points with a ``last.npz`` and starts the rest. At the
end ``summary.csv`` (one row per point) and the report (``report.md`` and its
figures, ``elmcore.reporting.sweep_report``) are written; ``elm report SWEEP_DIR``
redraws the report at any time.
Points run one after another, over ``jobs`` local processes, or — under
``mpiexec -n K`` — round-robin over the K ranks, each rank training its points
alone (not data-parallel).
"""

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import subprocess
import sys

from elmcore.engine.cuda_backend import GPU_SLOT_ENV
from elmcore.engine.fields import NETWORK_VERSION, shown
from elmcore.network.config import NetworkConfig, network_parameter_count
from elmcore.errors import ELMError, did_you_mean
from elmcore.storage.fileio import atomic_write_text, describe_os_error, read_json, refuse_inputs

POINT_FILE = "point.json"
SUMMARY_CSV = "summary.csv"
# What the report writes into the sweep directory (elmcore.reporting.sweep_report).
REPORT_FILES = ("report.md", "report-fields.png", "report-budget.png")
LOG = "train.log"
# ELM Network fields (docs/spec.md §7.1) that ELMConfig does not have.
NETWORK_FIELDS = ("num_neurons", "num_layers", "recurrent_fraction")
BUDGET_FIELDS = ("num_neurons", "num_memory", "num_synapse_per_branch", "num_branch")
NETWORK_DEFAULT_BRANCHES = next(f.default for f in dataclasses.fields(NetworkConfig) if f.name == "num_branch")
# Override keys that only label a point (its column in summary.csv), not run settings.
LABELS = ("budget",)
MAX_POINTS = 10000
# Shapes a [budget] table may ask to count: each is a few microseconds of arithmetic.
MAX_BUDGET_CANDIDATES = 10 ** 6
# Candidate sizes and budgets past these describe no network elmcore could build.
MAX_CANDIDATE = 1 << 31
MAX_BUDGET = 1e15


# ---- the budget mode: pure parameter arithmetic ----------------------------------------------------

def budget_shapes(budgets, tolerance, num_output, num_neurons, num_memory, num_synapse_per_branch,
                  num_branch=(4,), **fixed):
    """Every (N, d_m, n_b, synapses per branch) from the candidate lists within ``tolerance`` of a budget.

    Returns dicts with the four fields plus ``budget`` and ``parameters``, ordered by
    budget, then parameter count. A shape near two budgets appears under each.
    ``fixed`` passes the other count inputs (mlp_num_layers, mlp_hidden_size,
    learn_memory_tau, num_layers). Every input is checked, and the candidates are
    counted, before any shape is looked at.
    """
    budgets = _budget_list(budgets)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ELMError(f"sweep [budget] tolerance must be a number in [0, 1), got {shown(tolerance)}")
    _check_count("num_output", num_output, 1)
    lists = {name: _candidate_list(name, values) for name, values in
             (("num_neurons", num_neurons), ("num_memory", num_memory), ("num_branch", num_branch),
              ("num_synapse_per_branch", num_synapse_per_branch))}
    for name, value in fixed.items():
        if name == "learn_memory_tau":
            if not isinstance(value, bool):
                raise ELMError(f"budget mode: model.learn_memory_tau must be true or false, got {shown(value)}")
        elif not (name == "mlp_hidden_size" and value is None):
            _check_count(f"model.{name}", value, 0 if name == "mlp_num_layers" else 1)
    candidates = len(budgets) * math.prod(len(v) for v in lists.values())
    if candidates > MAX_BUDGET_CANDIDATES:
        sizes = " x ".join([f"{len(budgets)} budgets"] + [f"{len(v)} {k}" for k, v in lists.items()])
        raise ELMError(f"sweep [budget] asks to count {candidates:,} candidate shapes ({sizes}); at most "
                       f"{MAX_BUDGET_CANDIDATES:,}: shorten the candidate lists")
    out = []
    for budget in budgets:
        found = []
        for N, d_m, n_b, spb in itertools.product(*lists.values()):
            p = network_parameter_count(num_output, N, d_m, n_b, spb, **fixed)
            if abs(p - budget) <= tolerance * budget:
                found.append({"budget": budget, "num_neurons": N, "num_memory": d_m, "num_branch": n_b,
                              "num_synapse_per_branch": spb, "parameters": p})
        out += sorted(found, key=lambda s: (s["parameters"], s["num_neurons"], s["num_memory"]))
    return out


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(name, value, minimum):
    if not _is_int(value) or not minimum <= value <= MAX_CANDIDATE:
        raise ELMError(f"budget mode: {name} must be an integer in [{minimum}, {MAX_CANDIDATE:,}], "
                       f"got {shown(value)}")


def _budget_list(budgets):
    if not isinstance(budgets, (list, tuple)) or not budgets:
        raise ELMError(f"sweep [budget] budgets must be a non-empty list of parameter counts, got {shown(budgets)}")
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= MAX_BUDGET:
            raise ELMError(f"sweep [budget] budgets: a parameter budget must be a number in (0, {MAX_BUDGET:.0e}], "
                           f"got {shown(budget)}")
    return list(budgets)


def _candidate_list(name, values):
    if not isinstance(values, (list, tuple)) or not values or \
            not all(_is_int(v) and 1 <= v <= MAX_CANDIDATE for v in values):
        raise ELMError(f"sweep [budget] {name} must be a non-empty list of integers in [1, {MAX_CANDIDATE:,}], "
                       f"got {shown(values)}")
    return list(values)


# ---- reading a sweep file --------------------------------------------------------------------------

@dataclasses.dataclass
class Point:
    name: str
    overrides: dict      # {field path: value}, as written in the sweep file
    settings: dict       # the full run settings (TrainSettings fields)


def _field_path(key):
    from elmcore.neuron.config import ELMConfig
    from elmcore.training.train import TrainSettings
    if "." in key:
        head, _, tail = key.partition(".")
        if head not in ("model", "task_options") or not tail:
            raise ELMError(f"sweep field '{key}': dotted names must start with 'model.' or 'task_options.'")
        return head, tail
    if key in {f.name for f in dataclasses.fields(TrainSettings)} - {"model", "task_options", "run_dir"}:
        return (key,)
    if key in {f.name for f in dataclasses.fields(ELMConfig)} or key in NETWORK_FIELDS:
        return "model", key
    names = {f.name for f in dataclasses.fields(TrainSettings)} | {f.name for f in dataclasses.fields(ELMConfig)}
    raise ELMError(f"sweep field '{key}' is neither a training setting nor a model field"
                   f"{did_you_mean(key, names | set(NETWORK_FIELDS))} "
                   "(write model.NAME or task_options.NAME to be explicit)")


def _apply(base, overrides):
    settings = json.loads(json.dumps(base))  # a deep copy of plain data
    for key, value in overrides.items():
        if key in LABELS:
            continue
        path = _field_path(key)
        if len(path) == 1:
            settings[key] = value
        else:
            section = settings.setdefault(path[0], {})
            if not isinstance(section, dict):
                raise ELMError(f"sweep [base] {path[0]} must be a table of fields (the sweep sets {key}), "
                               f"got {shown(section)}")
            section[path[1]] = value
    return settings


def point_layers(settings, overrides, name="sweep point"):
    """The settings layers of a point: the sweep file's table, then the point's own overrides."""
    return [("sweep file", settings), (name, _apply({}, overrides))]


def resolve_point(settings, overrides, name="sweep point"):
    """The point's :class:`~elmcore.training.resolve.ResolvedSettings`: ``elm train --config``'s resolution of
    the same table (``settings`` already hold the overrides; the layers only name their source)."""
    from elmcore.training.resolve import resolve_layers
    return resolve_layers(point_layers(settings, overrides, name), source=name)


_TASKS = {}


def _task_of(settings):
    """The task a run of ``settings`` trains on (built once per task, data and options)."""
    from elmcore.data.registry import get_task
    key = json.dumps([settings.task, settings.data_dir, settings.seed, settings.task_options], sort_keys=True)
    if key not in _TASKS:
        _TASKS[key] = get_task(settings.task, data_dir=settings.data_dir, seed=settings.seed,
                               **settings.task_options)
    return _TASKS[key]


def point_parameters(point):
    """Trainable parameters of ``point``'s model, counted from its config (the task gives its inputs/outputs)."""
    from elmcore.engine.factory import parameter_module
    from elmcore.training.train import run_model_config
    settings = resolve_point(point.settings, point.overrides, point.name).settings
    config = run_model_config(_task_of(settings), settings.model)
    return parameter_module(config).count_trainable(config)


def _slug(value):
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in ".+-" else "_" for c in text)[:24]


def expand_points(spec):
    """The list of :class:`Point` of a parsed sweep file (``dict``)."""
    unknown = sorted(set(spec) - {"base", "grid", "points", "budget", "sweep_dir"})
    if unknown:
        raise ELMError(f"unknown sweep section(s): {', '.join(unknown)}"
                       f"{did_you_mean(unknown[0], ('base', 'grid', 'points', 'budget', 'sweep_dir'))} "
                       "(known: base, grid, points, budget, sweep_dir)")
    base = spec.get("base", {})
    if not isinstance(base, dict):
        raise ELMError("sweep [base] must be a table of run settings")
    if "sweep_dir" in spec:
        _check_sweep_dir(spec["sweep_dir"], "sweep_dir")
    if "points" in spec and "budget" in spec:
        raise ELMError("a sweep takes [[points]] or [budget], not both (a [grid] combines with either)")
    firsts = [{}]
    if "points" in spec:
        firsts = spec["points"]
        if not isinstance(firsts, list) or not firsts or not all(isinstance(p, dict) for p in firsts):
            raise ELMError("sweep [[points]] must be a non-empty list of tables of overrides")
    elif "budget" in spec:
        firsts = _budget_points(spec["budget"], base)
    grid = spec.get("grid", {})
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ELMError("sweep [grid] must map each field to a non-empty list of values")
    count = len(firsts) * math.prod(len(v) for v in grid.values())
    if count > MAX_POINTS:
        raise ELMError(f"the sweep has {count:,} points; split it (at most {MAX_POINTS:,})")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    all_overrides = [{**first, **combo} for first in firsts for combo in combos]
    # Directory names show only what differs between points (a budget sweep's version does not).
    varying = [k for k in dict.fromkeys(k for o in all_overrides for k in o)
               if len({json.dumps(o.get(k), sort_keys=True) for o in all_overrides}) > 1]
    points = []
    for i, overrides in enumerate(all_overrides):
        label = "-".join(f"{k.rpartition('.')[2]}={_slug(overrides[k])}" for k in varying if k in overrides)
        points.append(Point(f"p{i:03d}" + (f"-{label}" if label else ""), overrides, _apply(base, overrides)))
    return points


def _budget_points(budget, base):
    if not isinstance(budget, dict):
        raise ELMError("sweep [budget] must be a table")
    options = dict(budget)
    try:
        budgets = options.pop("budgets")
        tolerance = options.pop("tolerance", 0.1)
        lists = {k: options.pop(k) for k in ("num_neurons", "num_memory", "num_synapse_per_branch")}
    except KeyError as e:
        raise ELMError(f"sweep [budget] needs {e.args[0]} (and budgets, num_neurons, num_memory, "
                       "num_synapse_per_branch)") from None
    model = base.get("model", {})
    if not isinstance(model, dict):
        raise ELMError(f"sweep [base] model must be a table of model fields, got {shown(model)}")
    branches = options.pop("num_branch", None)
    if options:
        raise ELMError(f"unknown [budget] option(s): {', '.join(sorted(options))}")
    # The shapes are counted as the points will be built: on the resolved network settings.
    settings = resolve_point(base, {"model.version": NETWORK_VERSION}, "the budget's networks").settings
    model = settings.model
    lists["num_branch"] = [model.get("num_branch", NETWORK_DEFAULT_BRANCHES)] if branches is None else branches
    fixed = {k: model[k] for k in ("mlp_num_layers", "mlp_hidden_size", "learn_memory_tau", "num_layers")
             if k in model}
    num_output = model["num_output"] if "num_output" in model else _task_of(settings).num_output
    shapes = budget_shapes(budgets, tolerance, num_output, **lists, **fixed)
    if not shapes:
        raise ELMError(f"no shape from the candidate lists lies within {tolerance:g} of any budget")
    return [{"model.version": NETWORK_VERSION, **{f"model.{k}": s[k] for k in BUDGET_FIELDS}, "budget": s["budget"]}
            for s in shapes]


def _check_sweep_dir(value, what):
    if not isinstance(value, str) or not value or "\0" in value:
        raise ELMError(f"{what} must be a directory name (a non-empty string without NUL characters), "
                       f"got {shown(value)}")


def sweep_directory(spec, path):
    """Where the sweep's points go: ``sweep_dir`` of the file, else ``sweeps/<file name>``."""
    directory = spec.get("sweep_dir") or os.path.join("sweeps", os.path.splitext(os.path.basename(path))[0])
    _check_sweep_dir(directory, "sweep_dir")
    return directory


# ---- running the points ------------------------------------------------------------------------------

def sweep_outputs(points, sweep_dir):
    """Every file a sweep (and its points' training) may write."""
    from elmcore.training.train import LOCK, RUN_FILES
    yield os.path.join(sweep_dir, SUMMARY_CSV)
    for name in REPORT_FILES:
        yield os.path.join(sweep_dir, name)
    for p in points:
        for name in (POINT_FILE, LOG, LOCK, *RUN_FILES):
            yield os.path.join(sweep_dir, p.name, name)


def check_outputs(points, sweep_dir, inputs=()):
    """Refuse a sweep that would write over one of ``inputs`` (the sweep file) or a data file a point reads."""
    from elmcore.training.train import data_inputs
    read = list(inputs)
    for p in points:
        read += [f for f in data_inputs(p.settings.get("task"), p.settings.get("data_dir")) if f not in read]
    for output in sweep_outputs(points, sweep_dir):
        refuse_inputs(output, read)


def check_point_settings(points):
    """Refuse a sweep with an impossible setting in any point, before any point trains (or is listed)."""
    for p in points:
        try:
            resolve_point(p.settings, p.overrides, p.name).settings.validate()
        except ELMError as e:
            raise ELMError(f"sweep point {p.name}: {e}") from None


def point_dirs(points, sweep_dir, inputs=()):
    """Create the point directories (or check they hold the same points as before); their paths.

    Checked before anything is written: every point's settings, that no file the sweep
    writes is one of ``inputs`` or of the points' data files, and that the points
    already there are the sweep's own and their finished summaries are readable.
    """
    check_point_settings(points)
    check_outputs(points, sweep_dir, inputs)
    dirs = [os.path.join(sweep_dir, p.name) for p in points]
    for p, d in zip(points, dirs):
        path = os.path.join(d, POINT_FILE)
        if os.path.lexists(path):
            old = read_json(path, "sweep point file", regular_only=True)
            if not isinstance(old, dict) or old.get("settings") != json.loads(json.dumps(p.settings)):
                raise ELMError(f"{d} holds another point than the sweep file now makes ({path} differs); "
                               "give the sweep another sweep_dir or remove the old one")
            if point_state(d) == "done":
                read_point_summary(d)
            elif point_state(d) == "interrupted":
                _check_checkpoint(d)
    for d in [sweep_dir] + dirs:
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise ELMError(f"cannot create the sweep directory {d}: {describe_os_error(e)}") from None
    for p, d in zip(points, dirs):
        path = os.path.join(d, POINT_FILE)
        if not os.path.lexists(path):
            record = {"name": p.name, "overrides": p.overrides, "settings": p.settings}
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return dirs


def point_state(point_dir):
    if os.path.exists(os.path.join(point_dir, "summary.json")):
        return "done"
    return "interrupted" if os.path.exists(os.path.join(point_dir, "last.npz")) else "new"


def read_point_summary(point_dir):
    """A finished point's summary.json, checked (:func:`elmcore.training.train.read_summary`)."""
    from elmcore.training.train import read_summary
    try:
        return read_summary(point_dir)
    except ELMError as e:
        raise ELMError(f"{e} (remove it to retrain the point)") from None


def _check_checkpoint(point_dir):
    """An interrupted point's last.npz is readable, so its resume cannot fail the sweep halfway."""
    from elmcore.training.checkpoint import load_file
    path = os.path.join(point_dir, "last.npz")
    try:
        load_file(path)
    except ELMError as e:
        raise ELMError(f"{e} (remove {path} to restart the point)") from None


def train_point(point_dir):
    """Train (or resume) one point in this process; the trainer logs to the point's ``train.log``."""
    from elmcore.training import distributed as distributed
    from elmcore.training.resolve import describe_sources
    from elmcore.training.train import Trainer
    if point_state(point_dir) == "done":
        return

    def log(message):  # the trainer itself keeps every line in train.log
        pass

    with distributed.alone():
        if point_state(point_dir) == "interrupted":
            trainer = Trainer.resume(point_dir, progress=False, log=log)
        else:
            record = read_json(os.path.join(point_dir, POINT_FILE), "sweep point file", regular_only=True)
            if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
                raise ELMError(f"{os.path.join(point_dir, POINT_FILE)}: not a sweep point file (no settings)")
            name = record.get("name") if isinstance(record.get("name"), str) else os.path.basename(point_dir)
            overrides = record.get("overrides") if isinstance(record.get("overrides"), dict) else {}
            resolved = resolve_point(dict(record["settings"], run_dir=point_dir), overrides, f"sweep point {name}")
            trainer = Trainer(resolved.settings, progress=False, log=log, sources_line=describe_sources(resolved))
        trainer.run()


def _train_in_process(point_dir, log):
    try:
        train_point(point_dir)
        return True
    except Exception as e:  # one broken point must not end a long sweep; the log keeps the reason
        import traceback
        try:
            with open(os.path.join(point_dir, LOG), "a") as f:
                f.write(f"error: {e}\n" if isinstance(e, ELMError) else traceback.format_exc())
        except OSError as log_error:  # the log itself cannot be written: say so here instead
            log(f"point {os.path.basename(point_dir)} failed: {e} (and its log cannot be written: "
                f"{describe_os_error(log_error)})")
            return False
        log(f"point {os.path.basename(point_dir)} failed: {e} (see {os.path.join(point_dir, LOG)})")
        return False


def _job_environment(jobs):
    """Each of ``jobs`` local processes gets an equal share of the cores (a value the user set wins)."""
    env = dict(os.environ)
    threads = str(max(1, len(os.sched_getaffinity(0)) // jobs) if hasattr(os, "sched_getaffinity")
                  else max(1, (os.cpu_count() or 1) // jobs))
    for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, threads)
    return env


def _train_in_processes(todo, jobs, log):
    """Train the points in ``todo`` over ``jobs`` long-lived worker processes, next point to the first free.

    A worker is one interpreter that trains point after point (its imports and compiled
    kernels are paid once); it reads a point directory per line on stdin and answers
    ``ok DIR`` or ``failed DIR``. A worker that dies takes only its current point with
    it (a re-run resumes that point) and is replaced while points remain.
    """
    import selectors
    env, queue, current, slots = _job_environment(jobs), list(todo), {}, {}
    selector = selectors.DefaultSelector()

    def spawn(slot):
        # Worker ``slot`` trains on GPU slot % device count (on cuda), a replacement on its predecessor's.
        worker = subprocess.Popen([sys.executable, "-m", "elmcore.training.sweep", "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=dict(env, **{GPU_SLOT_ENV: str(slot)}))
        selector.register(worker.stdout, selectors.EVENT_READ, worker)
        slots[worker] = slot
        return worker

    def assign(worker):
        if queue:
            current[worker] = queue.pop(0)
            worker.stdin.write(current[worker] + "\n")
            worker.stdin.flush()
        else:  # nothing left: let it finish
            current.pop(worker, None)
            selector.unregister(worker.stdout)
            worker.stdin.close()
            worker.wait()

    try:
        for slot in range(min(jobs, len(queue))):
            assign(spawn(slot))
        while selector.get_map():
            for key, _ in selector.select():
                worker = key.data
                answer = worker.stdout.readline()
                name = os.path.basename(current[worker])
                if answer:
                    log(done_line(current[worker]) if answer.startswith("ok ") else f"point {name} failed")
                    assign(worker)
                    continue
                selector.unregister(worker.stdout)
                code = worker.wait()
                how = f"was killed by signal {-code}" if code < 0 else f"ended with exit code {code}"
                log(f"point {name} {how} (its process, pid {worker.pid}); running the sweep again resumes it")
                del current[worker]
                if queue:
                    assign(spawn(slots[worker]))
    finally:
        for worker in current:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def run_sweep(points, sweep_dir, jobs=1, log=print, inputs=()):
    """Train every unfinished point; write summary.csv and the report; return the summary rows.

    ``inputs``: the files the sweep was read from; nothing the sweep writes may be one of them.
    Under an MPI launcher with K > 1 ranks, rank r trains points r, r+K, … and
    rank 0 writes the summary once all ranks are through.
    """
    from elmcore.training.distributed import communicator
    comm = communicator()
    if comm.size > 1 and jobs > 1:
        raise ELMError("use either mpiexec (points over ranks) or --jobs (local processes), not both")
    dirs = comm.on_root(point_dirs, points, sweep_dir, inputs)
    if comm.size > 1:
        log = _prefixed(log, f"rank {comm.rank}: ")
    todo = [d for i, d in enumerate(dirs) if i % comm.size == comm.rank and point_state(d) != "done"]
    done_before = sum(point_state(d) == "done" for d in dirs)
    if comm.is_root:
        log(f"sweep {sweep_dir}: {len(points)} points, {done_before} already done, "
            f"{'%d MPI ranks' % comm.size if comm.size > 1 else '%d job(s)' % jobs}")
    if jobs > 1:
        _train_in_processes(todo, jobs, log)
    else:
        for d in todo:
            log(f"point {os.path.basename(d)}: {point_state(d)}, training")
            if _train_in_process(d, log):
                log(done_line(d))
    comm.allgather(None)  # every rank is through its points
    if not comm.is_root:
        return None
    rows = summarize(points, dirs)
    write_summary(rows, os.path.join(sweep_dir, SUMMARY_CSV), inputs=inputs)
    from elmcore.reporting.sweep_report import write_report
    try:
        written = write_report(sweep_dir, inputs=inputs)
        log(f"report: {', '.join(written)}")
    except ELMError as e:
        log(f"no report: {e}")
    return rows


def done_line(point_dir):
    """``point NAME done: valid mse 0.0123, test mse 0.013, 41.2 s``: a finished point's figures."""
    name = os.path.basename(point_dir)
    try:
        summary = read_point_summary(point_dir)
    except ELMError:
        return f"point {name} done"
    metric, best = summary.get("metric"), summary.get("best_metric")
    test = (summary.get("test") or {}).get(metric) if isinstance(summary.get("test"), dict) else None
    parts = [f"{summary.get('selection_split', 'valid')} {metric} "
             + (format(best, ".4g") if _finite(best) else "none")]
    if _finite(test):
        parts.append(f"test {metric} {test:.4g}")
    if _finite(summary.get("seconds")):
        from elmcore.reporting.sweep_report import format_seconds
        parts.append(f"{format_seconds(summary['seconds'])} s")
    return f"point {name} done: {', '.join(parts)}"


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _prefixed(log, prefix):
    return lambda message: log(prefix + message)


# ---- summary -----------------------------------------------------------------------------------------

def point_row(name, overrides, point_dir):
    """One point's row: its overrides, status, and once finished its figures (its checked summary.json)."""
    row = {"point": name, "status": "pending"}
    row.update(overrides)
    state = point_state(point_dir)
    if state == "done":
        s = read_point_summary(point_dir)
        metric = s.get("metric")
        row.update(status="done", parameters=s.get("parameters"), metric=metric,
                   selection_split=s.get("selection_split"), best_valid=s.get("best_metric"),
                   test=(s.get("test") or {}).get(metric), seconds=s.get("seconds"), steps=s.get("steps"))
    elif state == "interrupted":
        row["status"] = "interrupted"
    elif os.path.exists(os.path.join(point_dir, "run.json")):
        row["status"] = "training"
    row["run_dir"] = point_dir
    return row


def summarize(points, dirs):
    return [point_row(p.name, p.overrides, d) for p, d in zip(points, dirs)]


def _listing(directory):
    try:
        return sorted(os.listdir(directory))
    except OSError as e:
        raise ELMError(f"cannot read the directory {directory}: {describe_os_error(e)}") from None


def read_sweep(sweep_dir):
    """The rows of every point under ``sweep_dir`` (its ``point.json`` files), finished or not, in order."""
    sweep_dir = os.fspath(sweep_dir)
    if not os.path.isdir(sweep_dir):
        raise ELMError(f"sweep directory not found: {sweep_dir}")
    rows = []
    for name in _listing(sweep_dir):
        path = os.path.join(sweep_dir, name, POINT_FILE)
        if not os.path.lexists(path):
            continue
        record = read_json(path, "sweep point file", regular_only=True)
        overrides = record.get("overrides") if isinstance(record, dict) else None
        if not isinstance(overrides, dict):
            raise ELMError(f"{path}: not a sweep point file (no table of overrides)")
        rows.append(point_row(name, overrides, os.path.join(sweep_dir, name)))
    if not rows:
        raise ELMError(f"{sweep_dir} is not a sweep directory (no sub-directory holds a {POINT_FILE})")
    return rows


def is_sweep_dir(path):
    """Whether ``path`` is a sweep directory (its sub-directories hold point.json files), not a run directory."""
    path = os.fspath(path)
    if not os.path.isdir(path) or os.path.lexists(os.path.join(path, "run.json")):
        return False
    return any(os.path.lexists(os.path.join(path, name, POINT_FILE)) for name in _listing(path))


def write_summary(rows, path, inputs=()):
    fields = list(dict.fromkeys(["point", "status"] + [k for r in rows for k in r if k != "run_dir"]
                                + ["parameters", "metric", "selection_split", "best_valid", "test", "seconds",
                                   "run_dir"]))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    atomic_write_text(path, text.getvalue(), inputs=inputs)


def _worker():
    """``python -m elmcore.training.sweep --worker``: train the point directories named on stdin, one per line."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the training prints must not mix with the answers

    def log(message):
        print(message, file=sys.stderr, flush=True)

    try:
        for line in sys.stdin:
            point_dir = line.rstrip("\n")
            ok = _train_in_process(point_dir, log)
            answers.write(f"{'ok' if ok else 'failed'} {point_dir}\n")
            answers.flush()
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too: the sweep's own process says what to do
        return 130
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        sys.exit("usage: python -m elmcore.training.sweep --worker (started by `elm sweep --jobs N`)")
    sys.exit(_worker())
