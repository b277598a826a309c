"""The ``elm`` command line."""

import json
import os
import sys

import click
import numpy as np

from elm_cli.common import ELMGroup, FiniteFloat, TaskChoice, UserError, parse_assignments
from elm_cli.data_cmd import data
from elm_cli.sweep_cmd import sweep
from elmcore.data.registry import output_heads
from elmcore.errors import ELMError
from elmcore.training.predict import head_names

DEFAULT_GRADCHECK_CONFIG = {
    "num_input": 7, "num_output": 3, "num_memory": 4, "mlp_num_layers": 2, "mlp_hidden_size": 5,
    "mlp_activation": "silu", "num_branch": 3, "num_synapse_per_branch": 3,
    "input_to_synapse_routing": "neuronio_routing", "learn_memory_tau": True, "memory_tau_max": 50.0,
}


@click.group(cls=ELMGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="elmcore")
def cli():
    """Train, evaluate and check ELM neurons, Branch-ELMs (Spieler et al., ICLR 2024) and ELM Networks
    (recurrent layers of Branch-ELM neurons: --set version=elm_network).

    `elm tasks` lists the tasks, `elm info --fields` the model fields. Shell completion
    (bash): eval "$(_ELM_COMPLETE=bash_source elm)"; zsh: zsh_source; fish: fish_source.
    """


device_option = click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu",
                             show_default=True, help="Where to compute.")


# ---- verify -----------------------------------------------------------------------

@cli.command()
@click.argument("oracle", type=click.Path(dir_okay=False))
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True)
@device_option
def verify(oracle, dtype, device):
    """Check the engine against an oracle file from the official release.

    Prints every array's error max|got − ref| / max|ref| and exits 0 only if all
    are within tolerance (float64: 1e-9, float32: 1e-3).
    """
    from elmcore.verification.oracle import TOLERANCE, load_oracle, verify_case
    case = load_oracle(oracle)
    tol = TOLERANCE[dtype]
    click.echo(f"verify {oracle}: {case.config.version} ({case.config.num_input} inputs, {case.config.num_output} "
               f"outputs), B={case.X.shape[0]}, T={case.X.shape[1]}, {dtype} on {device}; tolerance {tol:g} on "
               "max|got - ref| / max|ref|")
    results = verify_case(case, dtype=dtype, device=device)
    width = max(len(n) for n, _ in results)
    for name, err in results:
        click.echo(f"  {name:<{width}}  {err:9.2e}  {'ok' if err <= tol else 'FAIL'}")
    passed = sum(err <= tol for _, err in results)
    worst_name, worst = max(results, key=lambda r: r[1])
    click.echo(f"verify: {passed}/{len(results)} arrays within tolerance "
               f"(worst {worst:.1e}: {worst_name})")
    sys.exit(0 if passed == len(results) else 1)


# ---- info -------------------------------------------------------------------------

@cli.command()
@click.argument("path", required=False, type=click.Path())
@click.option("--fields", is_flag=True,
              help="List the model config fields (what `elm train --set FIELD=VALUE` accepts) with defaults.")
def info(path, fields):
    """Summarise a run directory, a sweep directory, a model config (JSON) or a checkpoint / model (.npz).

    For a run directory: its task, task options and settings (run.json), the split that
    selected the model and its scores (summary.json), then the selected model (best.npz).
    For a sweep directory: its points by status, the best point, each budget's optimum and
    the power-law fit across budgets.
    """
    from elmcore.reporting.overview import describe_fields, describe_run
    from elmcore.reporting.summary import describe_path
    from elmcore.training.sweep import is_sweep_dir
    if fields:
        lines = describe_fields()
    elif path is None:
        raise UserError("elm info needs a PATH (run directory, sweep directory, config .json or model .npz) "
                        "or --fields")
    elif is_sweep_dir(path):
        from elmcore.reporting.sweep_report import describe_sweep
        lines = describe_sweep(path)
    else:
        lines = describe_run(path) if os.path.isdir(path) else describe_path(path)
    for line in lines:
        click.echo(line)


# ---- tasks -----------------------------------------------------------------------

@cli.command()
@click.argument("name", required=False, type=TaskChoice())
def tasks(name):
    """List the tasks (or one task): what each is, its --task-option options with their defaults,
    where its data comes from and the settings of its default experiment (`elm train --task NAME`)."""
    from elmcore.reporting.overview import describe_tasks
    for line in describe_tasks([name] if name else None):
        click.echo(line)


# ---- warmup -------------------------------------------------------------------------

@cli.command()
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
def warmup(dtype):
    """Compile the CPU kernels ahead of a first run: those of bare `elm train` (a Branch-ELM on the adding
    problem) and of an ELM Network. They are cached on disk; `elm train` compiles what it needs anyway."""
    import time

    from elmcore.data.registry import get_task
    from elmcore.engine.factory import build_model
    from elmcore.neuron.config import ELMConfig
    from elmcore.training.train import resolve_settings
    from elmcore.training.warmup import warm_up
    default = resolve_settings({})
    task = get_task(default.task, n=10, length=8)
    X = next(iter(task.batches("train", 2))).X
    models = (("the default run's Branch-ELM", {**task.model_defaults(), **default.model}),
              ("an ELM Network", {**task.model_defaults(), "version": "elm_network", "num_neurons": 4}))
    start = time.perf_counter()
    for name, fields in models:
        model = build_model(ELMConfig.from_dict(fields), seed=0, dtype=dtype)
        click.echo(f"{name} ({model.config.version}, {dtype}): compiling kernels (cached ones load in seconds) …")
        seconds, compiled = warm_up(model, X, log=lambda message: None)
        click.echo(f"  {compiled} kernel versions compiled in {seconds:.1f} s" if compiled else
                   f"  already compiled: loaded from the disk cache in {seconds:.1f} s")
    click.echo(f"warmup: done in {time.perf_counter() - start:.1f} s; the kernels are cached on disk for later runs")


# ---- gradcheck ----------------------------------------------------------------------

@cli.command()
@click.option("--config", "config_path", type=click.Path(),
              help="The model to check: a model config JSON, a model or checkpoint .npz, a run directory or its "
                   "run.json, whose configuration is checked with parameters drawn from --seed (default: a small "
                   "elm_v1 with 2 SiLU hidden layers, neuronio routing, learned tau_m).")
@click.option("--version", "version", type=click.Choice(["elm_v1", "branch_elm_v2", "elm_network"]), default=None,
              help="Override the config's version (elm_network without --config: a small 2-layer network).")
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=6, show_default=True, type=click.IntRange(min=1))
@click.option("--eps", default=1e-6, show_default=True, type=FiniteFloat(min=0, min_open=True))
@click.option("--entries", default=12, show_default=True, type=click.IntRange(min=1),
              help="Entries checked per tensor (all when the tensor is smaller).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--tolerance", default=1e-6, show_default=True, type=FiniteFloat(min=0, min_open=True))
def gradcheck(config_path, version, batch, steps, eps, entries, seed, tolerance):
    """Compare analytic gradients with central differences in float64, tensor by tensor."""
    from elmcore.neuron.config import ELMConfig
    from elmcore.verification.gradcheck import gradcheck as run_gradcheck, passes
    from elmcore.verification.gradcheck import DEFAULT_NETWORK_CONFIG
    if version == "elm_network" and not config_path:
        cfg = ELMConfig.from_dict(DEFAULT_NETWORK_CONFIG)
    else:
        cfg = _model_config(config_path) if config_path else ELMConfig.from_dict(DEFAULT_GRADCHECK_CONFIG)
    if version and version != cfg.version:
        if cfg.is_network or version == "elm_network":
            raise UserError(f"--version {version} cannot convert a {cfg.version} config")
        cfg = ELMConfig.from_dict(_switch_version(cfg, version))
    rows = run_gradcheck(cfg, batch=batch, steps=steps, seed=seed, eps=eps, max_entries=entries)
    click.echo(f"gradcheck {cfg.version}, B={batch}, T={steps}, eps={eps:g}, float64 "
               f"(difference-quotient noise {rows[0].noise:.1e}: smaller errors pass)")
    width = max(len(r.name) for r in rows)
    click.echo(f"  {'tensor':<{width}}  {'shape':<14} {'n':>3}  {'max|a-n|':>9}  {'max|n|':>9}  {'rel':>9}")
    bad = 0
    for row in rows:
        ok = passes(row, tolerance)
        bad += not ok
        click.echo(f"  {row.name:<{width}}  {str(row.shape):<14} {row.entries:>3}  {row.max_abs_diff:9.2e}  "
                   f"{row.max_numeric:9.2e}  {row.relative:9.2e}  {'ok' if ok else 'FAIL'}")
    worst = max(rows, key=lambda r: r.relative)
    click.echo(f"gradcheck: {len(rows) - bad}/{len(rows)} tensors within {tolerance:g} "
               f"(worst {worst.relative:.1e}: {worst.name})")
    sys.exit(0 if bad == 0 else 1)


def _model_config(path):
    """The model config in ``path``: a config JSON, a model or checkpoint file, a run directory or its run.json."""
    from elmcore.neuron.config import ELMConfig
    from elmcore.storage.fileio import read_json
    from elmcore.training.checkpoint import load_file
    run_dir = path if os.path.isdir(path) else None
    if run_dir is None and not path.endswith(".npz"):
        settings = read_json(path, "config file")
        if not (isinstance(settings, dict) and "task" in settings):
            return ELMConfig.from_dict(settings)
        run_dir = os.path.dirname(os.path.abspath(path))  # a run.json: the run's model file says the rest
    if run_dir is not None:
        found = [os.path.join(run_dir, f) for f in ("best.npz", "last.npz") if os.path.exists(os.path.join(run_dir, f))]
        if not found:
            raise ELMError(f"{path}: a run's model config is in its best.npz or last.npz, and {run_dir} has "
                           "neither yet (give a model config JSON instead)")
        path = found[0]
    return load_file(path).config


def _switch_version(cfg, version):
    d = cfg.to_dict()
    tau = d.pop("tau_s_value", None) or d.pop("tau_b_value", None)
    d["version"] = version
    d["tau_b_value" if version == "branch_elm_v2" else "tau_s_value"] = tau
    return d


# ---- train ----------------------------------------------------------------------------

# Task options that are run settings of their own (--seed, --data-dir).
TASK_RESERVED = ("name", "data_dir", "seed")


def _load_run_file(path):
    """The run settings in a JSON or TOML file, as a dict (types are checked by TrainSettings)."""
    from elmcore.storage.fileio import read_json, read_toml
    data = read_toml(path, "run config") if path.endswith(".toml") else read_json(path, "run config")
    if not isinstance(data, dict):
        raise ELMError(f"{path}: a run config must be a JSON object or TOML table of settings, "
                       f"got {type(data).__name__}")
    return data


def _data_files(settings):
    """The data files a run will read (``data_files`` of its task), or none where the task is not known yet."""
    from elmcore.training.train import data_inputs
    return data_inputs(settings.get("task"), settings.get("data_dir"))


def _setting_default(name):
    """TrainSettings' default of ``name``, shown in --help, after the tasks whose default run sets another
    (the single-neuron runs, which a run without ``--set version=elm_network`` starts from)."""
    import dataclasses

    from elmcore.data.registry import DEFAULT_FAMILY, TASKS, find_default_run
    from elmcore.training.train import TrainSettings
    field = {f.name: f for f in dataclasses.fields(TrainSettings)}[name]
    value = "none" if field.default is None else str(field.default)
    runs = {task: find_default_run(task, DEFAULT_FAMILY) for task in TASKS}
    by_task = [f"{task} {run.settings[name]:g}" if isinstance(run.settings[name], float) else
               f"{task} {run.settings[name]}" for task, run in runs.items() if run and name in run.settings]
    return f"task default: {', '.join(by_task)}; else {value}" if by_task else value


def _setting(*decls, name, **kw):
    """A train flag: unset unless given (a run file or the task's default run may set it)."""
    return click.option(*decls, name, default=None, show_default=_setting_default(name), **kw)


@cli.command()
@click.option("--task", type=TaskChoice(), default=None, show_default="adding",
              help="Task to train on (all of them: `elm tasks`).")
@click.option("--data-dir", type=click.Path(),
              help="Where the task's data files are (adding / delayed-recall: generated in memory without one); "
                   "for a task that reads one file (text, enwik8, adding, delayed-recall), the file itself.")
@click.option("--config", "run_config", type=click.Path(dir_okay=False),
              help="Run settings from JSON or TOML; flags given here override it.")
@click.option("--model-config", type=click.Path(dir_okay=False), help="ELM config JSON for the model.")
@click.option("--set", "model_sets", multiple=True, metavar="FIELD=VALUE",
              help="Model config field, e.g. --set num_memory=50 --set version=branch_elm_v2 "
                   "(all fields: `elm info --fields`).")
@click.option("--task-option", "task_sets", multiple=True, metavar="KEY=VALUE",
              help="Task option, e.g. --task-option length=100 (each task's: `elm tasks`).")
@click.option("--run-dir", type=click.Path(file_okay=False), show_default="runs/TASK-DATE-TIME",
              help="Where to write checkpoints and logs.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the run in this directory from its last checkpoint (a finished run: says so, "
                   "exit 0).")
@click.option("--extend", is_flag=True,
              help="With --resume and --epochs N: train a finished run on to N epochs, on a new cosine cycle "
                   "of the learning rate from its lr (recorded in run.json as lr_restarts).")
@_setting("--epochs", name="epochs", type=click.IntRange(min=1))
@_setting("--batch-size", name="batch_size", type=click.IntRange(min=1))
@_setting("--batches-per-epoch", name="batches_per_epoch", type=click.IntRange(min=1),
          help="At most this many batches per epoch (none: the whole training split).")
@_setting("--optimizer", name="optimizer", type=click.Choice(["adam", "adamw", "adamax"]))
@_setting("--lr", name="lr", type=FiniteFloat(min=0, min_open=True),
          help="Peak learning rate (cosine decay to --min-lr).")
@_setting("--min-lr", name="min_lr", type=FiniteFloat(min=0))
@_setting("--warmup-steps", name="warmup_steps", type=click.IntRange(min=0))
@_setting("--weight-decay", name="weight_decay", type=FiniteFloat(min=0))
@_setting("--clip-norm", name="clip_norm", type=FiniteFloat(min=0, min_open=True),
          help="Global gradient-norm clip (none: no clipping).")
@_setting("--input-dropout", name="input_dropout", type=FiniteFloat())
@_setting("--loss-skip-steps", name="burn_in", type=click.IntRange(min=0),
          help="NeuronIO: steps at the start of each training window left out of the loss (the release "
               "uses 0). Run-file setting: burn_in.")
@click.option("--burn-in", "legacy_burn_in", type=click.IntRange(min=0), hidden=True,
              help="Old name of --loss-skip-steps.")
@_setting("--seed", name="seed", type=click.IntRange(min=0))
@_setting("--dtype", name="dtype", type=click.Choice(["float32", "float64"]))
@_setting("--device", name="device", type=click.Choice(["cpu", "cuda", "auto"]))
@_setting("--checkpoint-every", name="checkpoint_every", type=click.IntRange(min=1), help="Steps between checkpoints.")
@_setting("--eval-batch-size", name="eval_batch_size", type=click.IntRange(min=1))
@_setting("--recompute-segment", name="recompute_segment", type=click.IntRange(min=1),
          help="Keep the state every this many steps and recompute each segment's cache in the backward "
               "(long sequences in bounded memory; rounded up to whole time blocks of 1024 steps; the "
               "gradients are the same bit for bit). none: only when a batch's whole cache would not fit.")
@click.option("--log-every", type=click.IntRange(min=1), default=None, show_default="100",
              help="When stderr is not a terminal (a log file): a progress line every this many batches, "
                   "instead of a progress bar.")
@click.option("--quiet", is_flag=True, help="No progress bar or progress lines; the epoch lines and final lines stay.")
@click.pass_context
def train(ctx, run_config, model_config, model_sets, task_sets, resume_dir, extend, legacy_burn_in, log_every,
          quiet, **flags):
    """Train an ELM on a task; with no options, a Branch-ELM on the adding problem (no download).

    Every task has a default experiment (`elm tasks` lists them): bare `elm train` is
    `elm train --task adding`; a network (--set version=elm_network) starts from the task's
    network run instead. A run file (--config) and then flags override it; the first line
    says where each setting came from; the defaults shown are those of settings neither
    sets (and of the single-neuron runs). On a terminal a progress bar
    shows each epoch; in a log file, one line every --log-every batches. The console lines
    are kept in RUN_DIR/train.log. Ctrl-C stops the run (exit 130) and prints how to resume it.
    """
    from elmcore.training.resolve import describe_sources, resolve_layers
    from elmcore.training.train import RunFinished, Trainer
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    given = {k: v for k, v in flags.items()
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    if legacy_burn_in is not None:
        if "burn_in" in given and given["burn_in"] != legacy_burn_in:
            raise UserError("--burn-in is the old name of --loss-skip-steps: give one of them")
        given["burn_in"] = legacy_burn_in
    progress = False if quiet else "auto"
    if extend and not resume_dir:
        raise UserError("--extend continues a finished run: give it with --resume RUN_DIR and --epochs N")
    if resume_dir:
        extra = set(given) - {"epochs", "device", "recompute_segment"}
        if extra or run_config or model_config or model_sets or task_sets:
            raise UserError("--resume continues a run with its saved settings; only --device and "
                            "--recompute-segment may change (and --epochs, with --extend)")
        try:
            trainer = Trainer.resume(resume_dir, progress=progress, log=log, log_every=log_every, extend=extend,
                                     **given)
        except RunFinished as e:
            click.echo(str(e))
            return
    else:
        # Layers over the task's default run, each later one winning: the run file, the model config, flags.
        layers = [(f"config file {run_config}", _load_run_file(run_config))] if run_config else []
        if model_config:
            from elmcore.neuron.config import ELMConfig
            layers.append((f"model config {model_config}", {"model": ELMConfig.load(model_config).to_dict()}))
        flags = dict(given)
        if model_sets:
            flags["model"] = parse_assignments(model_sets, "--set")
        if task_sets:
            flags["task_options"] = parse_assignments(task_sets, "--task-option", TASK_RESERVED)
        layers.append(("flags", flags))
        resolved = resolve_layers(layers, source=run_config or "command line")
        settings = resolved.settings
        trainer = Trainer(settings, progress=progress, log=log, log_every=log_every,
                          inputs=[run_config, model_config, *_data_files({"task": settings.task,
                                                                          "data_dir": settings.data_dir})],
                          sources_line=describe_sources(resolved))
    try:
        summary = trainer.run()
    except KeyboardInterrupt:  # the trainer said where its last checkpoint is
        if trainer.comm.size > 1:
            # Not through MPI_Finalize at exit: it can wait for ranks still in a collective.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        raise SystemExit(130) from None
    best, metric, split = summary["best_metric"], summary["metric"], summary["selection_split"]
    test = summary.get("test", {}).get(metric)
    best_path = os.path.join(summary["run_dir"], "best.npz")
    kept = (f"model: {best_path}" if os.path.exists(best_path) else
            f"no model improved on the {split} split, so no best.npz; last checkpoint: "
            f"{os.path.join(summary['run_dir'], 'last.npz')}")
    done = (f"done: {summary['steps']} steps in {summary['seconds']:.1f} s, best {split} "
            f"{metric} {best if best is None else format(best, '.4g')}"
            + ("" if test is None else f", test {metric} {test:.4g}")
            + f"; {kept}")
    click.echo(done)
    trainer.append_to_log(done)


# ---- eval / predict / convert / plot ---------------------------------------------------------

def _read_run_settings(run_dir):
    """The settings a run was trained with (its run.json), as a dict, every field checked."""
    import dataclasses

    from elmcore.storage.fileio import read_json
    from elmcore.training.train import RUN_FILE, TrainSettings
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.lexists(path):
        raise ELMError(f"{run_dir} is not a run directory (no run.json)")
    settings = read_json(path, "run settings", regular_only=True)
    if not isinstance(settings, dict) or not isinstance(settings.get("task"), str) \
            or not isinstance(settings.get("task_options", {}), dict):
        raise ELMError(f"{path} is not a run settings file (no task / task_options)")
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    TrainSettings.from_dict({k: v for k, v in settings.items() if k in known}, source=path)
    return settings


def _eval_target(model_path, checkpoint):
    """(model file, the run's settings or None, the run directory or None): a run directory gives its
    best.npz (or last.npz) and run.json; a model file inside a run directory gives that directory's run.json."""
    if os.path.isdir(model_path):
        run = _read_run_settings(model_path)
        path = os.path.join(model_path, f"{checkpoint}.npz")
        if not os.path.exists(path):
            raise ELMError(f"run directory {model_path} has no {checkpoint}.npz yet")
        return path, run, model_path
    run_dir = os.path.dirname(os.path.abspath(model_path))
    if os.path.exists(os.path.join(run_dir, "run.json")):
        return model_path, _read_run_settings(run_dir), run_dir
    return model_path, None, None


def _eval_settings(model_path, run, task, data_dir, task_sets, seed):
    """(task, data_dir, task options, seed) a model is evaluated on: a run's own, unless --task names another."""
    from elmcore.data.registry import task_spec
    task_options = parse_assignments(task_sets, "--task-option", TASK_RESERVED)
    if run is not None and (task is None or task_spec(task).name == task_spec(run["task"]).name):
        task = run["task"]
        data_dir = run.get("data_dir") if data_dir is None else data_dir
        if not (task_spec(task).in_memory and data_dir is not None):  # a read data set has its own sizes
            task_options = {**run["task_options"], **task_options}
        seed = run.get("seed", 0) if seed is None else seed
    elif task is None:
        raise UserError(f"{model_path} is not in a run directory: name its task with --task")
    return task, data_dir, task_options, 0 if seed is None else seed


def _eval_task(model, run, task, data_dir, task_options, seed):
    """The task object of ``_eval_settings``, with the run's own splits, checked against the model's sizes."""
    from elmcore.data.registry import get_task
    from elmcore.training.train import CARVED_VALID_FRACTION, carve_validation
    t = get_task(task, data_dir=data_dir, seed=seed, **task_options)
    if run is not None:
        carve_validation(t, CARVED_VALID_FRACTION, seed)  # the run's own splits, if it had to carve one
    if (t.num_input, t.num_output) != (model.config.num_input, model.config.num_output):
        raise UserError(f"model has {model.config.num_input} inputs / {model.config.num_output} outputs, "
                        f"task '{task}' needs {t.num_input} / {t.num_output}")
    return t


@cli.command(name="eval")
@click.argument("model_path", metavar="MODEL|RUN_DIR", type=click.Path())
@click.option("--task", type=TaskChoice(), default=None, show_default="the run's task",
              help="Task to evaluate on. A run directory (or a model file inside one) brings its own task, "
                   "data directory, task options and seed; --task naming another task drops them.")
@click.option("--data-dir", type=click.Path(), show_default="the run's",
              help="The task's data directory (or, for a task that reads one file, that file).")
@click.option("--task-option", "task_sets", multiple=True, metavar="KEY=VALUE",
              help="Task option, on top of the run's own.")
@click.option("--seed", type=int, default=None, show_default="the run's, else 0",
              help="Seed of the task's data (in-memory generation, split draws).")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="test")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best",
              help="Which model of a run directory: best.npz (selected on the validation split) or last.npz.")
@click.option("--batch-size", default=64, type=click.IntRange(min=1))
@click.option("--window", default=None, type=click.IntRange(min=1), show_default="the task's (NeuronIO: 500)",
              help="NeuronIO: evaluation window (ms).")
@click.option("--window-burn-in-ms", "burn_in", default=None, type=click.IntRange(min=0),
              show_default="the task's (NeuronIO: 150)",
              help="NeuronIO: ms dropped at the start of every window but the first.")
@click.option("--burn-in", "legacy_burn_in", type=click.IntRange(min=0), hidden=True,
              help="Old name of --window-burn-in-ms.")
@click.option("--no-align-soma", is_flag=True, help="NeuronIO: skip the release's per-file z-scoring of the "
              "soma prediction onto the target.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, show_default="as stored")
@device_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the metrics here.")
def eval_cmd(model_path, task, data_dir, task_sets, seed, split, checkpoint, batch_size, window, burn_in,
             legacy_burn_in, no_align_soma, dtype, device, json_out):
    """Evaluate a model, a checkpoint or a run directory's best model on a task split; print its metrics.

    `elm eval RUN_DIR` evaluates RUN_DIR/best.npz on the task, options and seed the run
    was trained with.
    """
    from elmcore.training.checkpoint import load_model
    from elmcore.data.registry import data_files
    from elmcore.training.evaluate import evaluate
    model_path, run, run_dir = _eval_target(model_path, checkpoint)
    task, data_dir, task_options, seed = _eval_settings(model_path, run, task, data_dir, task_sets, seed)
    read = [model_path, *data_files(task, data_dir), *_run_files(run_dir)]
    if json_out:
        from elmcore.storage.fileio import refuse_inputs
        refuse_inputs(json_out, read)  # before the evaluation, which may take long
    model = load_model(model_path, dtype=dtype, device=device)
    t = _eval_task(model, run, task, data_dir, task_options, seed)
    described = ", ".join(f"{k}={v}" for k, v in task_options.items())
    click.echo(f"model: {model_path}")
    click.echo(f"task: {t.name}{f' ({described})' if described else ''}, seed {seed}"
               + (f", data {data_dir}" if data_dir else ""))
    click.echo(f"split: {split}")
    # Evaluation options reach the task only when given: it owns their defaults, and one without them refuses them.
    given = click.get_current_context().get_parameter_source
    options = {name: value for name, param, value in (("window", "window", window), ("burn_in", "burn_in", burn_in),
                                                      ("align", "no_align_soma", not no_align_soma))
               if given(param) == click.core.ParameterSource.COMMANDLINE}
    if legacy_burn_in is not None:
        options["burn_in"] = legacy_burn_in
    metrics = evaluate(model, t, split, batch_size=batch_size, **options)
    for key, value in metrics.items():
        click.echo(f"{split} {key}: {value:.6g}" if isinstance(value, float) else f"{split} {key}: {value}")
    if json_out:
        from elmcore.storage.fileio import atomic_write_text
        atomic_write_text(json_out, json.dumps({"model": model_path, "task": t.name, "task_options": task_options,
                                                "seed": seed, "data_dir": data_dir, "split": split,
                                                "metrics": metrics}, indent=2) + "\n",
                          inputs=read)


def _run_files(run_dir):
    """The files of a run directory (what a command that read the run must not write over)."""
    from elmcore.training.train import RUN_FILES
    return [] if run_dir is None else [os.path.join(run_dir, name) for name in RUN_FILES]


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="Input .npy of shape (batch, time, inputs) or (time, inputs); for a character model "
                   "(one with a vocabulary) also a text file (any name not ending in .npy), encoded with "
                   "the model's vocabulary.")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="Output .npy; for a character model also a .txt: the most likely next character after "
                   "each input character, decoded with its vocabulary.")
@click.option("--head", type=click.Choice(head_names()), default="raw", show_default=True,
              help="; ".join(["raw: the model's outputs"] + [f"{h.name}: {h.summary}" for h in output_heads().values()])
              + ".")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, show_default="as stored")
@device_option
def predict(model_path, input_path, output_path, head, batch_size, dtype, device):
    """Apply a model to an input array exactly as given (no sign flips, no scaling).

    A character model (trained on a text task: its file holds the vocabulary) also reads
    text and writes, to a .txt output, the most likely next character after each input one.
    """
    from elmcore.training.checkpoint import load_file
    from elmcore.training.predict import most_likely_next, predict_array, read_input_array, read_input_text
    loaded = load_file(model_path)
    model = loaded.build_model(dtype=dtype, device=device)
    vocab = _model_vocabulary(loaded, model_path)
    text_in, text_out = not input_path.endswith(".npy"), output_path.endswith(".txt")
    if (text_in or text_out) and vocab is None:
        raise UserError(f"{model_path} has no vocabulary (it was not trained on a text task): --input must be a "
                        ".npy array and --output a .npy file")
    if text_out and head != "raw":
        raise UserError("a .txt --output decodes the model's raw outputs: leave out --head")
    X, squeeze = read_input_text(input_path, vocab) if text_in else read_input_array(input_path,
                                                                                     model.config.num_input)
    if text_out and len(X) != 1:
        raise UserError(f"a .txt --output decodes one sequence, the input holds {len(X)}: write a .npy")
    Y = predict_array(model, X, head=head, batch_size=batch_size)
    from elmcore.storage.fileio import atomic_output
    with atomic_output(output_path, inputs=[model_path, input_path]) as tmp:
        with open(tmp, "wb") as f:
            if text_out:
                f.write(most_likely_next(Y[0], vocab))
            else:
                np.save(f, Y[0] if squeeze else Y)
    if text_out:
        click.echo(f"wrote {output_path}: the most likely next character after each of the {Y.shape[1]} input "
                   "characters")
    else:
        click.echo(f"wrote {output_path}: {Y[0].shape if squeeze else Y.shape} ({head} head)")


def _model_vocabulary(loaded, model_path, run=None):
    """A character model's Vocabulary: from its file, else from its run's run.json (task_info), else None."""
    if loaded.vocab is not None:
        return loaded.vocab
    if run is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(model_path)), "run.json")
        run = _read_run_settings(os.path.dirname(beside)) if os.path.exists(beside) else None
    info = (run or {}).get("task_info")
    stored = info.get("vocab") if isinstance(info, dict) else None
    if stored is None:
        return None
    from elmcore.data.vocab import Vocabulary
    vocab = Vocabulary.from_stored(stored, "run.json task_info.vocab")
    if len(vocab) != loaded.config.num_input or len(vocab) != loaded.config.num_output:
        raise UserError(f"the run's vocabulary has {len(vocab)} symbols, the model {loaded.config.num_input} "
                        f"inputs and {loaded.config.num_output} outputs")
    return vocab


@cli.command()
@click.argument("model_path", metavar="RUN_DIR|MODEL", type=click.Path())
@click.option("--prompt", default=None, show_default="a newline",
              help="Text the model reads before it samples; every character must be in its vocabulary.")
@click.option("--length", default=200, show_default=True, type=click.IntRange(min=1),
              help="Characters (bytes) to sample after the prompt.")
@click.option("--temperature", default=1.0, show_default=True, type=FiniteFloat(min=0),
              help="Softmax temperature: 1 samples the model's own distribution, lower is more conservative, "
                   "0 always takes the most likely character.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the draws: the same seed gives the same text.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best",
              help="Which model of a run directory: best.npz or last.npz.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, show_default="as stored")
@device_option
def sample(model_path, prompt, length, temperature, seed, checkpoint, dtype, device):
    """Sample text from a character model (a run on a text task, or its model file).

    The model reads the prompt and then its own samples one character per step (the
    streaming step API), so LENGTH characters cost LENGTH steps. Prints the prompt and
    the sample; bytes that are not UTF-8 print as U+FFFD.
    """
    from elmcore.training.checkpoint import load_file
    from elmcore.training.predict import sample_text
    path, run, _ = _eval_target(model_path, checkpoint)
    loaded = load_file(path)
    vocab = _model_vocabulary(loaded, path, run)
    if vocab is None:
        raise UserError(f"{path} has no vocabulary: elm sample needs a character model (trained on a text task)")
    shown_prompt = prompt
    if prompt is None:
        if vocab.index_of[ord("\n")] < 0:
            raise UserError("the model's vocabulary has no newline to start from: give --prompt")
        prompt, shown_prompt = "\n", ""
    model = loaded.build_model(dtype=dtype, device=device)
    text = sample_text(model, vocab, prompt, length, temperature=temperature, seed=seed)
    click.echo(shown_prompt + text.decode("utf-8", errors="replace"))


@cli.command()
@click.argument("pt_path", metavar="PATH.pt", type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="The release's model_config.json (default: the one beside PATH.pt).")
@click.option("--version", type=click.Choice(["elm_v1", "branch_elm_v2"]), default="elm_v1", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model .npz to write.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
def convert(pt_path, config_path, version, output, dtype):
    """Convert a release PyTorch checkpoint to an elmcore model file, without PyTorch."""
    from elmcore.training.checkpoint import save_model
    from elmcore.verification.torch_checkpoint import load_release_model
    cfg, params = load_release_model(pt_path, config_path=config_path, version=version)
    from elmcore.neuron.model import ELM
    model = ELM(cfg, params=params, dtype=dtype)
    save_model(output, cfg, model.state_dict(), dtype=dtype,
               inputs=[pt_path, config_path, os.path.join(os.path.dirname(os.path.abspath(pt_path)),
                                                          "model_config.json")])
    click.echo(f"wrote {output}: {cfg.version}, {model.num_parameters} parameters")


@cli.command()
@click.argument("run_dir", metavar="RUN_DIR|SWEEP_DIR", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="PNG path (default RUN_DIR/curves.png).")
def plot(run_dir, output):
    """Plot a run's learning curves (loss per step, validation metric per epoch) to PNG.

    For a sweep directory: its report figures (see `elm report`), written into it.
    """
    from elmcore.training.sweep import is_sweep_dir
    if is_sweep_dir(run_dir):
        if output:
            raise UserError("a sweep's figures are written into its directory; -o applies to a run directory")
        from elmcore.reporting.sweep_report import draw_figures
        paths = draw_figures(run_dir)
    else:
        from elmcore.reporting.plotting import plot_run
        paths = [plot_run(run_dir, output)]
    for path in paths:
        click.echo(f"wrote {path}")


@cli.command()
@click.argument("sweep_dir", metavar="SWEEP_DIR", type=click.Path(file_okay=False))
def report(sweep_dir):
    """Write a sweep's report into SWEEP_DIR: report.md and its figures (also while the sweep runs).

    \b
    report-fields.png  per swept field: the metric against its values, mean ± sd over seeds,
                       one line per combination of the other fields
    report-budget.png  budget mode: the metric against N, k_e, k_c per budget (optimum starred);
                       the best metric against parameters, Pareto frontier, fitted power law
    report.md          every point (metric, parameters, time), the optimum per budget, the fit
    """
    from elmcore.reporting.sweep_report import write_report
    from elmcore.training.sweep import is_sweep_dir
    if not is_sweep_dir(sweep_dir):
        raise UserError(f"{sweep_dir} is not a sweep directory (no sub-directory holds a point.json)")
    for path in write_report(sweep_dir):
        click.echo(f"wrote {path}")


# ---- gradflow ----------------------------------------------------------------------------

@cli.command()
@click.argument("model_path", metavar="RUN_DIR|MODEL", type=click.Path())
@click.option("--task", type=TaskChoice(), default=None, show_default="the run's task",
              help="Task whose data and loss to use; a run directory brings its own (as in `elm eval`).")
@click.option("--data-dir", type=click.Path(file_okay=False), show_default="the run's")
@click.option("--task-option", "task_sets", multiple=True, metavar="KEY=VALUE",
              help="Task option, on top of the run's.")
@click.option("--seed", type=int, default=None, show_default="the run's, else 0", help="Seed of the task's data.")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="test")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", help="Which model of a run.")
@click.option("--batch-size", default=8, type=click.IntRange(min=1),
              help="Sequences in the batch (the reference keeps their whole walk in float64).")
@click.option("--out", "prefix", metavar="PREFIX", default=None,
              show_default="RUN_DIR/gradflow, or MODEL's name + .gradflow", help="Writes PREFIX.png and PREFIX.csv.")
def gradflow(model_path, task, data_dir, task_sets, seed, split, checkpoint, batch_size, prefix):
    """Plot how the task's loss gradient flows back through time: the norm over a batch of the adjoint
    dL/dm_t of every memory unit (ordered by tau_m) at every step (and of dL/do_t per neuron in a network),
    from the plain NumPy reference walk. Writes a heat map, the decay with distance from the loss step,
    and the numbers as CSV (adjoint, t, unit, tau_m, norm)."""
    from elmcore.data.registry import data_files
    from elmcore.reporting.gradflow import gradient_flow, write_gradient_flow
    from elmcore.training.checkpoint import load_model
    model_path, run, run_dir = _eval_target(model_path, checkpoint)
    task, data_dir, task_options, seed = _eval_settings(model_path, run, task, data_dir, task_sets, seed)
    model = load_model(model_path, dtype="float64")
    t = _eval_task(model, run, task, data_dir, task_options, seed)
    batch = next(iter(t.batches(split, batch_size)), None)
    if batch is None:
        raise UserError(f"task '{t.name}' has no {split} examples")
    burn_in = (run or {}).get("burn_in", 0)
    flow = gradient_flow(model, batch.X, target=batch.target,
                         loss_fn=lambda Y, target: t.loss_and_grad(Y, target, burn_in=burn_in))
    if prefix is None:
        prefix = (os.path.join(run_dir, "gradflow") if run_dir is not None
                  else os.path.splitext(model_path)[0] + ".gradflow")
    inputs = [model_path, *data_files(t.name, data_dir), *_run_files(run_dir)]
    title = f"{os.path.basename(model_path)} on {t.name} {split}: loss {flow.loss:.4g}, batch {flow.batch}"
    png, csv_path = write_gradient_flow(flow, prefix, inputs=inputs, title=f"{title}, {flow.steps} steps")
    for field in flow.fields:
        distance, norms = flow.decay(field)
        far = norms[-1] / norms[0] if norms[0] > 0 else float("nan")
        click.echo(f"{field.label}: norm {norms[0]:.3g} at the loss step (t = {flow.last_loss_step}), "
                   f"{far:.3g} of it {distance[-1]} steps back")
    click.echo(f"wrote {png} and {csv_path}")


cli.add_command(data)
cli.add_command(sweep)


def main():
    cli(prog_name="elm")


if __name__ == "__main__":
    main()
