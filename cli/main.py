"""The ``elm`` command line."""

import json
import os
import sys

import click
import numpy as np

from elm_cli.common import ELMGroup, UserError, parse_assignments
from elmcore.errors import ELMError

DEFAULT_GRADCHECK_CONFIG = {
    "num_input": 7, "num_output": 3, "num_memory": 4, "mlp_num_layers": 2, "mlp_hidden_size": 5,
    "mlp_activation": "silu", "num_branch": 3, "num_synapse_per_branch": 3,
    "input_to_synapse_routing": "neuronio_routing", "learn_memory_tau": True, "memory_tau_max": 50.0,
}


@click.group(cls=ELMGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="elmcore")
def cli():
    """Train, evaluate and check ELM neurons and Branch-ELMs (Spieler et al., ICLR 2024)."""


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
    from elmcore.oracle import TOLERANCE, load_oracle, verify_case
    case = load_oracle(oracle)
    tol = TOLERANCE[dtype]
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
@click.argument("path", type=click.Path(dir_okay=False))
def info(path):
    """Summarise a model config (JSON) or a checkpoint / converted model (.npz)."""
    from elmcore.inspect import describe_path
    for line in describe_path(path):
        click.echo(line)


# ---- gradcheck ----------------------------------------------------------------------

@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Model config JSON (default: a small 2-layer SiLU Branch-ELM with neuronio routing).")
@click.option("--version", "version", type=click.Choice(["elm_v1", "branch_elm_v2", "elm_network"]), default=None,
              help="Override the config's version (elm_network without --config: a small 2-layer network).")
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=6, show_default=True, type=click.IntRange(min=1))
@click.option("--eps", default=1e-6, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--entries", default=12, show_default=True, type=click.IntRange(min=1),
              help="Entries checked per tensor (all when the tensor is smaller).")
@click.option("--seed", default=0, show_default=True)
@click.option("--tolerance", default=1e-6, show_default=True, type=float)
def gradcheck(config_path, version, batch, steps, eps, entries, seed, tolerance):
    """Compare analytic gradients with central differences in float64, tensor by tensor."""
    from elmcore.config import ELMConfig
    from elmcore.gradcheck import gradcheck as run_gradcheck, passes
    from elmcore.gradcheck import DEFAULT_NETWORK_CONFIG
    if version == "elm_network" and not config_path:
        cfg = ELMConfig.from_dict(DEFAULT_NETWORK_CONFIG)
    else:
        cfg = ELMConfig.load(config_path) if config_path else ELMConfig.from_dict(DEFAULT_GRADCHECK_CONFIG)
    if version and version != cfg.version:
        if cfg.is_network or version == "elm_network":
            raise UserError(f"--version {version} cannot convert a {cfg.version} config")
        cfg = ELMConfig.from_dict(_switch_version(cfg, version))
    rows = run_gradcheck(cfg, batch=batch, steps=steps, seed=seed, eps=eps, max_entries=entries)
    click.echo(f"gradcheck {cfg.version}, B={batch}, T={steps}, eps={eps:g}, float64 "
               f"(difference-quotient noise {rows[0][6]:.1e}: smaller errors pass)")
    width = max(len(r[0]) for r in rows)
    click.echo(f"  {'tensor':<{width}}  {'shape':<14} {'n':>3}  {'max|a-n|':>9}  {'max|n|':>9}  {'rel':>9}")
    bad = 0
    for row in rows:
        name, shape, n, diff, scale, rel, _ = row
        ok = passes(row, tolerance)
        bad += not ok
        click.echo(f"  {name:<{width}}  {str(shape):<14} {n:>3}  {diff:9.2e}  {scale:9.2e}  {rel:9.2e}"
                   f"  {'ok' if ok else 'FAIL'}")
    worst = max(rows, key=lambda r: r[5])
    click.echo(f"gradcheck: {len(rows) - bad}/{len(rows)} tensors within {tolerance:g} "
               f"(worst {worst[5]:.1e}: {worst[0]})")
    sys.exit(0 if bad == 0 else 1)


def _switch_version(cfg, version):
    d = cfg.to_dict()
    tau = d.pop("tau_s_value", None) or d.pop("tau_b_value", None)
    d["version"] = version
    d["tau_b_value" if version == "branch_elm_v2" else "tau_s_value"] = tau
    return d


# ---- train ----------------------------------------------------------------------------

def _load_run_file(path):
    if not os.path.exists(path):
        raise ELMError(f"run config not found: {path}")
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ImportError:  # Python < 3.11
                import tomli as tomllib
            with open(path, "rb") as f:
                return tomllib.load(f)
        with open(path) as f:
            return json.load(f)
    except ImportError:
        raise ELMError("reading TOML needs Python 3.11+ or the 'tomli' package") from None
    except Exception as e:  # json / toml decode errors carry the line and column
        raise ELMError(f"{path}: cannot parse run config ({e})") from None


TRAIN_FLAGS = ("task", "data_dir", "epochs", "batch_size", "batches_per_epoch", "optimizer", "lr", "min_lr",
               "warmup_steps", "weight_decay", "clip_norm", "input_dropout", "burn_in", "seed", "dtype",
               "device", "checkpoint_every", "run_dir", "eval_batch_size")


@cli.command()
@click.option("--task", help="Task name (adding, delayed-recall, neuronio, shd, shd-adding, listops, pathfinder, "
              "pathfinder64, pathx, scifar). Without one: a Branch-ELM on the adding problem at length 200.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the task's data files are.")
@click.option("--config", "run_config", type=click.Path(dir_okay=False),
              help="Run settings from JSON or TOML; flags given here override it.")
@click.option("--model-config", type=click.Path(dir_okay=False), help="ELM config JSON for the model.")
@click.option("--set", "model_sets", multiple=True, metavar="FIELD=VALUE",
              help="Model config field, e.g. --set num_memory=50 --set version=branch_elm_v2.")
@click.option("--task-option", "task_sets", multiple=True, metavar="KEY=VALUE", help="Task option.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Where to write checkpoints and logs.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--batches-per-epoch", type=click.IntRange(min=1))
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "adamax"]))
@click.option("--lr", type=float)
@click.option("--min-lr", type=float)
@click.option("--warmup-steps", type=click.IntRange(min=0))
@click.option("--weight-decay", type=float)
@click.option("--clip-norm", type=float)
@click.option("--input-dropout", type=float)
@click.option("--burn-in", type=click.IntRange(min=0), help="NeuronIO: steps at the start of each window "
              "left out of the loss (the release uses 0).")
@click.option("--seed", type=int)
@click.option("--dtype", type=click.Choice(["float32", "float64"]))
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]))
@click.option("--checkpoint-every", type=click.IntRange(min=1))
@click.option("--eval-batch-size", type=click.IntRange(min=1))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train(ctx, run_config, model_config, model_sets, task_sets, resume_dir, quiet, **flags):
    """Train an ELM on a task; with no options, a Branch-ELM on a generated task (no download)."""
    from elmcore.train import Trainer, TrainSettings
    log = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    given = {k: v for k, v in flags.items()
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    if resume_dir:
        extra = set(given) - {"epochs", "device"}
        if extra or run_config or model_config or model_sets or task_sets:
            raise UserError("--resume continues a run with its saved settings; only --epochs and --device "
                            "may change")
        trainer = Trainer.resume(resume_dir, progress=not quiet, log=log, **given)
    else:
        settings = dict(_load_run_file(run_config)) if run_config else {}
        settings.update(given)
        if "task" not in settings:
            from elmcore.train import DEFAULT_RUN
            settings = {**DEFAULT_RUN, **settings}
        if model_config:
            from elmcore.config import ELMConfig
            settings["model"] = {**settings.get("model", {}), **ELMConfig.load(model_config).to_dict()}
        if model_sets:
            settings["model"] = {**settings.get("model", {}), **parse_assignments(model_sets, "--set")}
        if task_sets:
            settings["task_options"] = {**settings.get("task_options", {}),
                                        **parse_assignments(task_sets, "--task-option")}
        trainer = Trainer(TrainSettings.from_dict(settings), progress=not quiet, log=log)
    summary = trainer.run()
    best = summary["best_valid_metric"]
    click.echo(f"done: {summary['steps']} steps in {summary['seconds']:.1f} s, best valid {summary['metric']} "
               f"{best if best is None else format(best, '.4g')}; model: {os.path.join(summary['run_dir'], 'best.npz')}")


# ---- eval / predict / convert / plot ---------------------------------------------------------

@cli.command(name="eval")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--task", required=True, help="Task name.")
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--task-option", "task_sets", multiple=True, metavar="KEY=VALUE")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="test", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--window", default=500, show_default=True, type=click.IntRange(min=1),
              help="NeuronIO: evaluation window (ms).")
@click.option("--burn-in", default=150, show_default=True, type=click.IntRange(min=0),
              help="NeuronIO: ms dropped at the start of every window but the first.")
@click.option("--no-align-soma", is_flag=True, help="NeuronIO: skip the release's per-file z-scoring of the "
              "soma prediction onto the target.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None)
@device_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the metrics here.")
def eval_cmd(model_path, task, data_dir, task_sets, split, batch_size, window, burn_in, no_align_soma,
             dtype, device, json_out):
    """Evaluate a model or checkpoint on a task split and print its metrics."""
    from elmcore.checkpoint import load_model
    from elmcore.data.registry import get_task
    from elmcore.evaluate import evaluate
    model = load_model(model_path, dtype=dtype, device=device)
    t = get_task(task, data_dir=data_dir, **parse_assignments(task_sets, "--task-option"))
    if (t.num_input, t.num_output) != (model.config.num_input, model.config.num_output):
        raise UserError(f"model has {model.config.num_input} inputs / {model.config.num_output} outputs, "
                        f"task '{task}' needs {t.num_input} / {t.num_output}")
    options = {}
    if t.loss == "neuronio" and hasattr(t, "simulation_groups"):
        options = dict(window=window, burn_in=burn_in, align=not no_align_soma)
    metrics = evaluate(model, t, split, batch_size=batch_size, **options)
    for key, value in metrics.items():
        click.echo(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    if json_out:
        from elmcore.fileio import atomic_write_text
        atomic_write_text(json_out, json.dumps({"model": model_path, "task": task, "split": split,
                                                "metrics": metrics}, indent=2) + "\n")


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="Input .npy of shape (batch, time, inputs) or (time, inputs).")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False), help="Output .npy.")
@click.option("--head", type=click.Choice(["raw", "neuronio"]), default="raw", show_default=True,
              help="raw: the model's outputs; neuronio: sigmoid spike probability and soma in mV "
                   "(bias-subtracted), as the release's eval head.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None)
@device_option
def predict(model_path, input_path, output_path, head, batch_size, dtype, device):
    """Apply a model to an input array exactly as given (no sign flips, no scaling)."""
    from elmcore.checkpoint import load_model
    from elmcore.predict import predict_array, read_input_array
    model = load_model(model_path, dtype=dtype, device=device)
    X, squeeze = read_input_array(input_path, model.config.num_input)
    Y = predict_array(model, X, head=head, batch_size=batch_size)
    from elmcore.fileio import atomic_output
    with atomic_output(output_path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, Y[0] if squeeze else Y)
    click.echo(f"wrote {output_path}: {Y[0].shape if squeeze else Y.shape} ({head} head)")


@cli.command()
@click.argument("pt_path", metavar="PATH.pt", type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="The release's model_config.json (default: the one beside PATH.pt).")
@click.option("--version", type=click.Choice(["elm_v1", "branch_elm_v2"]), default="elm_v1", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model .npz to write.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
def convert(pt_path, config_path, version, output, dtype):
    """Convert a release PyTorch checkpoint to an elmcore model file, without PyTorch."""
    from elmcore.checkpoint import save_model
    from elmcore.torch_checkpoint import load_release_model
    cfg, params = load_release_model(pt_path, config_path=config_path, version=version)
    from elmcore.model import ELM
    model = ELM(cfg, params=params, dtype=dtype)
    save_model(output, cfg, model.state_dict(), dtype=dtype)
    click.echo(f"wrote {output}: {cfg.version}, {model.num_parameters} parameters")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="PNG path (default RUN_DIR/curves.png).")
def plot(run_dir, output):
    """Plot a run's learning curves (loss per step, validation metric per epoch) to PNG."""
    from elmcore.plotting import plot_run
    path = plot_run(run_dir, output)
    click.echo(f"wrote {path}")


def _register_optional_commands():
    """Command groups that live in their own modules."""
    try:
        from elm_cli.data_cmd import data
    except ImportError:  # pragma: no cover - the data group ships with the package
        return
    cli.add_command(data)


_register_optional_commands()


def main():
    cli(prog_name="elm")


if __name__ == "__main__":
    main()
