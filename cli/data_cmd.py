"""``elm data``: generate offline data sets and inspect data directories."""

import click

from elm_cli.common import ELMGroup, parse_assignments
from elmcore.errors import ELMError
from elmcore.data.base import SPLITS


generic_option = click.option(
    "--option", "-O", "extra", multiple=True, metavar="KEY=VALUE",
    help="Any other generator/reader option, e.g. -O clearance=3.5 -O parens=true.")


@click.group(cls=ELMGroup)
def data():
    """Generate offline data sets and inspect data directories."""


@data.command()
@click.argument("task")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write into (created if needed).")
@click.option("--n", type=click.IntRange(min=1), default=None,
              help="Examples in all splits (NeuronIO: files; text: characters). "
                   "Default: 1000 (NeuronIO: 1; text: 100000).")
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
@click.option("--dash-spacing", type=click.FloatRange(min=0, min_open=True), help="pathfinder: gap between dashes (px).")
@click.option("--sims-per-file", type=click.IntRange(min=1), help="neuronio: simulations per file.")
@click.option("--duration-ms", type=click.IntRange(min=1), help="neuronio: simulation length in ms.")
@generic_option
def generate(task, out_dir, n, seed, extra, unbalanced, **named):
    """Write an offline data set of TASK (listops, pathfinder, pathfinder64, pathx, adding,
    delayed-recall, neuronio, text) into --out; read it back with `elm data info DIR`
    (`--task text` for a text corpus)."""
    from elmcore.data.registry import generate as generate_task, task_spec
    spec = task_spec(task)
    options = {k: v for k, v in named.items() if v is not None}
    if unbalanced:
        options["balanced"] = False
    options.update(parse_assignments(extra, "--option"))
    written = generate_task(spec.name, out_dir, n=n, seed=seed, progress=True, **options)
    click.echo(f"wrote {spec.name} (seed {seed}) to {written}")


def _format(value):
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@data.command()
@click.argument("data_dir", type=click.Path())
@click.option("--task", "task_name", default=None,
              help="Task the files belong to (default: guessed from the file names).")
@click.option("--preview", type=click.Path(dir_okay=False),
              help="Write a PNG: a grid of images (pathfinder, scifar) or the input raster of one "
                   "example (spikes for neuronio / shd, tokens for listops). Needs matplotlib.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@generic_option
def info(data_dir, task_name, preview, seed, extra):
    """Counts, sequence lengths and class balance of the data set in DATA_DIR."""
    from elmcore.data.registry import detect_task, get_task, task_spec
    name = task_spec(task_name).name if task_name else detect_task(data_dir)
    task = get_task(name, data_dir, seed=seed, **parse_assignments(extra, "--option"))
    click.echo(f"{name}: {data_dir}")
    for key, value in task.describe().items():
        click.echo(f"  {key}: {_format(value)}")
    if preview:
        write_preview(task, preview)
        click.echo(f"preview written to {preview}")


def _first_split(task):
    for split in SPLITS:
        if task.num_examples(split):
            return split
    raise ELMError(f"task {task.name} has no examples to preview")


def write_preview(task, path, max_images=16):
    """Save a PNG preview of ``task`` to ``path`` (atomically)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ELMError("--preview needs matplotlib: pip install matplotlib") from None
    import numpy as np

    from elmcore.fileio import atomic_output
    split = _first_split(task)
    if hasattr(task, "images"):
        count = min(max_images, task.num_examples(split))
        indices = np.arange(count)
        pixels, labels = task.images(split, indices), task.labels[split][indices]
        shape = getattr(task, "image_shape", None)
        if shape is not None and task.encoding == "raw":
            pixels = pixels.reshape((count,) + tuple(shape))
        elif shape is not None:
            pixels = pixels.reshape((count,) + tuple(shape[:2]))
        cols = int(np.ceil(np.sqrt(count)))
        rows = int(np.ceil(count / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, image, label in zip(axes.ravel(), pixels, labels):
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
            ax.set_title(f"label {label}", fontsize=8)
        fig.suptitle(f"{task.name} ({split})")
    else:
        batches = task.batches(split, 1)
        batch = next(iter(batches))
        if hasattr(batches, "close"):
            batches.close()  # stops any prefetching worker of a streaming task
        x = batch.X[0]
        steps, channels = np.nonzero(x)
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.scatter(steps, channels, s=1, c="k", marker="|" if x.shape[1] > 50 else "s")
        ax.set_xlim(-0.5, x.shape[0] - 0.5)
        ax.set_ylim(-0.5, x.shape[1] - 0.5)
        ax.set_xlabel("time step")
        ax.set_ylabel("input channel")
        ax.set_title(f"{task.name} ({split}, example 0): {len(steps)} non-zero inputs")
    fig.tight_layout()
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
