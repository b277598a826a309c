"""Learning-curve plots of a run directory (matplotlib is an optional extra).

The figure a scientist keeps: the training loss per step (raw and a running
mean), and the model-selection metric per epoch on the split that measured it,
on a log scale where the metric is an error, with integer epoch ticks, the best
epoch marked, the test score of the selected model beside it, chance drawn for
accuracy and AUC, and the task's reference levels (a text's unigram entropy, a
generated corpus's entropy rate) with the units the run recorded in run.json.
"""

import json
import math
import os

from elmcore.errors import ELMError

# Metrics where lower is better and which span decades while a model learns: plotted on a log axis.
ERROR_METRICS = ("mse", "loss", "bpc", "rmse")
# The metric an epoch record is read for when it does not name one (logs written before it did).
_METRIC_ORDER = ("accuracy", "auc", "mse", "bpc", "loss")


def import_pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or an ELMError saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from elmcore.engine.optional import install_command
        raise ELMError(f"plotting needs matplotlib: {install_command('plot')} (or pip install matplotlib)") from None
    return plt


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(run_dir):
    """(step records, epoch records) of ``run_dir/metrics.jsonl``.

    A last line torn by a kill is skipped; any other line that is not a JSON
    object with the fields a plot needs is an error naming the file and line.
    Epoch records written before they named their split read as split "valid"; epochs are
    numbered from 1 whichever way the log counted them.
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise ELMError(f"run directory not found: {run_dir}")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ELMError(f"no metrics log in {run_dir} (looked for {path})")
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as e:
        raise ELMError(f"cannot read {path}: {e.strerror or e}") from None
    steps, epochs = [], []
    for number, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        where = f"{path} line {number}"
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ELMError(f"{where} is not UTF-8 text: the log is damaged") from None
        except json.JSONDecodeError:
            if number == len(raw_lines):
                continue  # the last line, torn by a kill
            raise ELMError(f"{where} is not JSON: the log is damaged") from None
        except (ValueError, RecursionError):  # an integer of thousands of digits, or absurd nesting
            raise ELMError(f"{where} holds no readable record (a number too long or nesting too deep): "
                           "the log is damaged") from None
        if not isinstance(rec, dict):
            raise ELMError(f"{where} is not a JSON object: the log is damaged")
        if rec.get("type") == "step":
            if not (_number(rec.get("step")) and _number(rec.get("loss"))):
                raise ELMError(f"{where}: a step record needs numeric 'step' and 'loss'")
            steps.append(rec)
        elif rec.get("type") == "epoch":
            metrics = rec.get("metrics", rec.get("valid"))
            if not _number(rec.get("epoch")) or not isinstance(metrics, dict):
                raise ELMError(f"{where}: an epoch record needs a numeric 'epoch' and a 'metrics' object")
            epochs.append({**rec, "metrics": metrics, "split": rec.get("split", "valid")})
    if not steps:
        raise ELMError(f"{path} holds no training steps yet")
    from elmcore.training.runlog import epochs_from_one
    records = epochs_from_one(steps + epochs)  # a log written before counted epochs from 0
    return records[:len(steps)], records[len(steps):]


def _read_optional_json(path):
    """A JSON object from ``path``, or None when the file is absent or unreadable (plots go without it)."""
    from elmcore.storage.fileio import read_json
    try:
        value = read_json(path, regular_only=True)
    except ELMError:
        return None
    return value if isinstance(value, dict) else None


def _epoch_metric(epochs, summary):
    named = (summary or {}).get("metric") or epochs[-1].get("metric")
    if named and all(_number(r["metrics"].get(named)) for r in epochs):
        return named
    for key in _METRIC_ORDER:
        if all(_number(r["metrics"].get(key)) for r in epochs):
            return key
    return None


def _chance(metric, run_dir, epochs=()):
    """(level, label) to beat: the task's reference level as the run recorded it (the adding problem's MSE of
    always answering the mean, a text's unigram entropy), else the chance level of an accuracy (1 / classes,
    from the run's model) or an AUC (0.5)."""
    reference = epochs[-1].get("reference") if epochs else None
    if isinstance(reference, dict) and _number(reference.get("value")):
        return float(reference["value"]), f"{reference.get('label', 'reference')}: {reference['value']:.4g}"
    if metric == "auc":
        return 0.5, "chance (AUC 0.5)"
    if metric == "accuracy":
        from elmcore.training.checkpoint import load_file
        for name in ("best.npz", "last.npz"):
            try:
                classes = int(load_file(os.path.join(run_dir, name)).config.num_output)
            except Exception:  # chance is decoration: a damaged model file must not stop the plot
                continue
            if classes >= 2:
                return 1.0 / classes, f"chance (1/{classes})"
    return None


def _loss_unit(epochs):
    """What the training loss is measured in, from the run's record of its loss function."""
    name = epochs[-1].get("loss_function") if epochs else None
    if not isinstance(name, str):
        return ""
    if name.startswith("cross_entropy"):
        return " (cross-entropy, nats" + (" per character)" if epochs[-1].get("metric") == "bpc" else ")")
    if name.startswith("mse"):
        return " (MSE)"
    return f" ({name})"


def _log_axis(ax, values):
    """A log y axis labelled in plain numbers (0.2, not 2×10⁻¹), minor ticks too when it spans under a decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if max(values) < 10 * min(values) else NullFormatter())


def _running_mean(values, width):
    import numpy as np
    if width < 3 or len(values) < 2 * width:
        return None
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def _recorded_units(settings):
    """(loss unit, metric unit, {label: reference level}) from run.json's "task_info"; empty where absent."""
    info = (settings or {}).get("task_info")
    if not isinstance(info, dict):
        return None, None, {}
    def text(key):
        return info.get(key) if isinstance(info.get(key), str) else None

    levels = info.get("references")
    levels = {str(k): float(v) for k, v in levels.items() if _number(v)} if isinstance(levels, dict) else {}
    return text("loss_unit"), text("metric_unit"), levels


def plot_run(run_dir, output=None):
    """Write the learning curves of ``run_dir`` to ``output`` (default ``run_dir/curves.png``)."""
    steps, epochs = read_metrics(run_dir)
    plt = import_pyplot()
    import warnings

    import numpy as np
    # Values near the float range (a loss of 1e308) overflow inside matplotlib's scaling: the
    # curve is still drawn, and those internal warnings are not the user's to read.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _plot_run(plt, run_dir, steps, epochs, output)


def _plot_run(plt, run_dir, steps, epochs, output):
    from matplotlib.ticker import MaxNLocator
    summary = _read_optional_json(os.path.join(run_dir, "summary.json"))
    settings = _read_optional_json(os.path.join(run_dir, "run.json"))
    output = output or os.path.join(run_dir, "curves.png")
    loss_unit, metric_unit, references = _recorded_units(settings)

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [r["step"] for r in steps]
    loss = [r["loss"] for r in steps]
    width = max(1, len(loss) // 50)
    smooth = _running_mean(loss, width)
    ax_loss.plot(x, loss, lw=0.6 if smooth is not None else 1.0, alpha=0.35 if smooth is not None else 1.0,
                 color="C0", label="per step")
    if smooth is not None:
        ax_loss.plot(x[width - 1:], smooth, lw=1.6, color="C0", label=f"running mean ({width} steps)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"training loss ({loss_unit})" if loss_unit else f"training loss{_loss_unit(epochs)}")
    if min(loss) > 0 and max(loss) > 10 * min(loss):  # a log axis only once the loss spans a decade
        _log_axis(ax_loss, loss)
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.grid(alpha=0.3, which="both")
    ax_loss.legend(fontsize=8)
    ax_loss.set_title("training loss", fontsize=10)

    metric = _epoch_metric(epochs, summary) if epochs else None
    if metric is None:
        ax_metric.text(0.5, 0.5, "no epoch finished yet" if not epochs else "epochs record no metric",
                       ha="center", va="center", transform=ax_metric.transAxes)
        ax_metric.set_xlabel("epoch")
    else:
        split = epochs[-1]["split"]
        ep = [int(r["epoch"]) for r in epochs]
        val = [float(r["metrics"][metric]) for r in epochs]
        lower_better = metric in ERROR_METRICS
        ax_metric.plot(ep, val, "o-", color="C1", ms=4, label=f"{split} {metric}")
        best_i = min(range(len(val)), key=val.__getitem__) if lower_better else \
            max(range(len(val)), key=val.__getitem__)
        ax_metric.plot([ep[best_i]], [val[best_i]], marker="*", ms=15, color="C3", ls="none",
                       label=f"best: {val[best_i]:.4g} (epoch {ep[best_i]})", zorder=5)
        test = (summary or {}).get("test")
        if isinstance(test, dict) and _number(test.get(metric)):
            ax_metric.plot([ep[best_i]], [test[metric]], marker="D", ms=7, color="C2", ls="none",
                           label=f"test of the selected model: {test[metric]:.4g}", zorder=5)
        # The run's recorded reference levels (a corpus's unigram entropy, a generator's entropy rate)
        # are the lines to beat where it has them; otherwise the task's chance level.
        chance = None if references else _chance(metric, run_dir, epochs)
        if chance is not None:
            ax_metric.axhline(chance[0], color="0.4", ls="--", lw=1, label=chance[1])
        for (label, level), style in zip(references.items(), ("--", ":", "-.")):
            ax_metric.axhline(level, color="0.4", ls=style, lw=1,
                              label=f"{label}: {level:.3g}" + (f" {metric_unit}" if metric_unit else ""))
        if lower_better and min(val) > 0:
            shown = val + ([test[metric]] if isinstance(test, dict) and _number(test.get(metric)) else [])
            _log_axis(ax_metric, shown + ([chance[0]] if chance and chance[0] > 0 else [])
                      + [v for v in references.values() if v > 0])
        if metric in ("accuracy", "auc"):
            ax_metric.set_ylim(min(min(val), chance[0] if chance else 1) - 0.05, 1.01)
        if metric_unit:
            ax_metric.set_ylabel(f"{split} {metric} ({metric_unit})" + (", lower is better" if lower_better else ""))
        else:
            ax_metric.set_ylabel(f"{split} {'bits per character' if metric == 'bpc' else metric}"
                                 + (" (lower is better)" if lower_better else ""))
        ax_metric.set_xlabel("epoch")
        ax_metric.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_metric.grid(alpha=0.3, which="both")
        ax_metric.legend(fontsize=8)
        ax_metric.set_title(f"model selection on the {split} split", fontsize=10)

    title = os.path.basename(os.path.abspath(run_dir))
    if settings and isinstance(settings.get("task"), str):
        title += f" - task {settings['task']}"
    fig.suptitle(title)
    fig.tight_layout()
    from elmcore.storage.fileio import atomic_output
    run_files = [os.path.join(run_dir, name) for name in
                 ("metrics.jsonl", "run.json", "last.npz", "best.npz", "summary.json")]
    try:
        with atomic_output(output, inputs=run_files) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return output


# ---- data previews (`elm data info --preview`) ------------------------------------------------

def _first_split(task):
    from elmcore.data.base import SPLITS
    for split in SPLITS:
        if task.num_examples(split):
            return split
    raise ELMError(f"task {task.name} has no examples to preview")


def first_example(task, split):
    """(X, target) of the first example of ``split``, as host arrays."""
    batches = task.batches(split, 1)
    try:
        batch = next(iter(batches))
    finally:
        if hasattr(batches, "close"):
            batches.close()  # stops any prefetching worker of a streaming task
    import numpy as np
    return np.asarray(batch.X[0]), np.asarray(batch.target[0])


def _preview_images(plt, task, split, max_images):
    import numpy as np
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
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols + 0.8, 2 * rows + 0.4), squeeze=False,
                             layout="constrained")  # leaves room for the shared colour bar
    for ax in axes.ravel():
        ax.axis("off")
    shown = None
    names = getattr(task, "label_names", {})
    for ax, image, label in zip(axes.ravel(), pixels, labels):
        shown = ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        ax.set_title(f"label {label}" + (f" ({names[int(label)]})" if int(label) in names else ""), fontsize=8)
    if shown is not None and pixels.ndim == 3:
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label="pixel value")
    meaning = getattr(task, "label_meaning", None)
    fig.suptitle(f"{task.name} ({split}, first {count} images, as stored before encoding)"
                 + (f"\n{meaning}" if meaning else ""))
    return fig


def _preview_sequence(plt, task, split):
    """Any other sequence task: the input values over time (heatmap, or a raster when wide) and its target."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator
    x, target = first_example(task, split)
    step_ms = task.step_ms
    scale = step_ms or 1.0
    if x.shape[1] <= 4:  # few channels: their values as curves, one panel each
        fig, axes = plt.subplots(x.shape[1], 1, figsize=(10, 1.4 + 1.6 * x.shape[1]), sharex=True, squeeze=False)
        for c, ax in enumerate(axes[:, 0]):
            ax.step(np.arange(len(x)) * scale, x[:, c], where="mid", color=f"C{c}", lw=1)
            ax.set_ylabel(f"input {c}")
            ax.grid(alpha=0.3)
        ax = axes[-1, 0]
    else:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        ax.set_ylabel("input channel")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if 4 < x.shape[1] <= 64:
        shown = ax.imshow(x.T, aspect="auto", interpolation="nearest", origin="lower", cmap="viridis",
                          extent=(-0.5 * scale, (len(x) - 0.5) * scale, -0.5, x.shape[1] - 0.5))
        fig.colorbar(shown, ax=ax, label="input value")
    elif x.shape[1] > 64:
        steps, channels = np.nonzero(x)
        values = x[steps, channels]
        shown = ax.scatter(steps * scale, channels, s=2, c=values, cmap="viridis", marker="|")
        if values.size and values.min() != values.max():
            fig.colorbar(shown, ax=ax, label="input value")
        ax.set_xlim(-0.5 * scale, (len(x) - 0.5) * scale)
        ax.set_ylim(-0.5, x.shape[1] - 0.5)
    ax.set_xlabel("time (ms)" if step_ms else "time step")
    if target.ndim == 0 and np.issubdtype(target.dtype, np.integer):
        what = f"label {int(target)}"
    else:
        flat = target.ravel()
        what = "target " + (", ".join(f"{v:.4g}" for v in flat) if flat.size <= 4 else f"{target.shape} array")
    fig.suptitle(f"{task.name} ({split}, example 0): {len(x)} steps, {what}")
    return fig


def write_data_preview(task, path, max_images=16, inputs=()):
    """Save a PNG of ``task``'s first examples to ``path`` (atomically; never over one of ``inputs``)."""
    plt = import_pyplot()
    split = _first_split(task)
    if hasattr(task, "images"):
        fig = _preview_images(plt, task, split, max_images)
    else:
        # A task that knows what its inputs mean draws them itself; any other gets the generic view.
        fig = task.preview_figure(plt, split) or _preview_sequence(plt, task, split)
        fig.tight_layout()
    from elmcore.storage.fileio import atomic_output
    try:
        with atomic_output(path, inputs=inputs) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
