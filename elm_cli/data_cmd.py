"""``elm data``: generate offline data sets and inspect data directories."""

import os
import sys

import click

from elm_cli.common import ELMGroup, TaskChoice, parse_assignments
from elmcore.data.base import SPLITS
from elmcore.data.registry import GENERATABLE, TASKS


generic_option = click.option(
    "--option", "-O", "extra", multiple=True, metavar="KEY=VALUE",
    help="Any other generator/reader option, e.g. -O clearance=3.5 -O parens=true.")


@click.group(cls=ELMGroup)
def data():
    """Generate offline data sets and inspect data directories."""


def _default_counts():
    counts = {}
    for name in GENERATABLE:
        counts.setdefault(TASKS[name].default_n, []).append(name)
    return "; ".join(f"{', '.join(names)}: {n}" for n, names in counts.items())


@data.command(help=f"""Write an offline data set of TASK ({', '.join(GENERATABLE)}) into --out, with a
    manifest elmcore_data.json (task, options, counts) from which `elm data info DIR` knows the task.""")
@click.argument("task", type=TaskChoice(GENERATABLE))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write into (created if needed).")
@click.option("--n", type=click.IntRange(min=1), default=None, show_default=_default_counts(),
              help="Examples in all splits, split 80/10/10 (NeuronIO: files, split by the reader into "
                   "train / valid / test, so at least 3; text: characters, split 90/5/5 by position).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--length", type=click.IntRange(min=2), help="adding / delayed-recall: sequence length.")
@click.option("--num-tokens", type=click.IntRange(min=2), help="delayed-recall: number of cue tokens K.")
@click.option("--min-length", type=click.IntRange(min=1), help="listops: fewest tokens (LRA: 500).")
@click.option("--max-length", type=click.IntRange(min=1), help="listops: most tokens (LRA: 2000).")
@click.option("--max-depth", type=click.IntRange(min=1), help="listops: deepest nesting (LRA: 10).")
@click.option("--max-args", type=click.IntRange(min=2), help="listops: most operator arguments (LRA: 10).")
@click.option("--unbalanced", is_flag=True, default=None,
              help="listops: keep the grammar's skewed label distribution (LRA) instead of balancing.")
@click.option("--size", type=click.IntRange(min=16), help="pathfinder: image side in pixels.")
@click.option("--path-length", type=click.IntRange(min=1), help="pathfinder: dashes per main contour.")
@click.option("--distractors", type=click.IntRange(min=0), help="pathfinder: number of distractor contours.")
@click.option("--distractor-length", type=click.IntRange(min=1), help="pathfinder: dashes per distractor.")
@click.option("--dash-spacing", type=click.FloatRange(min=0, min_open=True),
              help="pathfinder: gap between dashes (px).")
@click.option("--sims-per-file", type=click.IntRange(min=1), help="neuronio: simulations per file.")
@click.option("--duration-ms", type=click.IntRange(min=1), help="neuronio: simulation length in ms.")
@generic_option
def generate(task, out_dir, n, seed, extra, unbalanced, **named):
    from elmcore.data.registry import generate as generate_task, task_spec
    spec = task_spec(task)
    options = {k: v for k, v in named.items() if v is not None}
    if unbalanced:
        options["balanced"] = False
    options.update(parse_assignments(extra, "--option", ("name", "out_dir", "n", "seed", "progress")))
    # A bar only on a terminal: in a log file its carriage-return redraws are noise.
    written = generate_task(spec.name, out_dir, n=n, seed=seed, progress=sys.stderr.isatty(), **options)
    click.echo(f"wrote {spec.name} (seed {seed}) to {written}")


def _format(value):
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@data.command()
@click.argument("data_dir", type=click.Path())
@click.option("--task", "task_name", type=TaskChoice(), default=None, show_default="guessed from the file names",
              help="Task the files belong to.")
@click.option("--preview", type=click.Path(dir_okay=False),
              help="Write a PNG: a grid of labelled images (pathfinder, scifar), or one example's inputs with "
                   "its label or target (listops: tokens and padding; neuronio: excitatory / inhibitory input, "
                   "soma trace and output spikes in ms). Needs matplotlib.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@generic_option
def info(data_dir, task_name, preview, seed, extra):
    """Counts, sequence lengths and class balance of the data set in DATA_DIR."""
    from elmcore.data.registry import data_files, detect_task, get_task, read_manifest, task_spec
    name = task_spec(task_name).name if task_name else detect_task(data_dir)
    task = get_task(name, data_dir, seed=seed, **parse_assignments(extra, "--option", ("name", "data_dir", "seed")))
    click.echo(f"{name}: {data_dir}")
    manifest = read_manifest(data_dir) if os.path.isdir(data_dir) else None
    if manifest is not None:
        settings = {key: value for key, value in manifest.items() if key not in ("task", "generated_by", "counts")}
        options = settings.pop("options", None) or {}
        click.echo(f"  generated by: {manifest.get('generated_by')} ("
                   + ", ".join(f"{k}={_format(v)}" for k, v in {**settings, **options}.items()) + ")")
    for key, value in task.describe().items():
        split = key[2:] if key.startswith("n_") else None
        unit = f" {task.count_unit(split)}" if split in SPLITS else ""
        click.echo(f"  {key}: {_format(value)}{unit}")
    if preview:
        write_preview(task, preview, inputs=data_files(name, data_dir))
        click.echo(f"preview written to {preview}")


def write_preview(task, path, max_images=16, inputs=()):
    """Save a PNG preview of ``task`` to ``path`` (see ``elmcore.reporting.plotting.write_data_preview``)."""
    from elmcore.reporting.plotting import write_data_preview
    return write_data_preview(task, path, max_images=max_images, inputs=inputs)
