"""Learning-curve plots of a run directory (matplotlib is an optional extra)."""

import os

from .errors import ELMError


def read_metrics(run_dir):
    """(step records, epoch records) of a run; damaged lines are skipped (``elmcore.runlog``)."""
    from .runlog import read_records
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ELMError(f"no metrics log in {run_dir} (looked for {path})")
    records, _ = read_records(path)
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    if not steps:
        raise ELMError(f"{path} holds no training steps yet")
    return steps, epochs


def plot_run(run_dir, output=None):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ELMError("plotting needs matplotlib: pip install 'elmcore[plot]' (or pip install matplotlib)") from None
    steps, epochs = read_metrics(run_dir)
    output = output or os.path.join(run_dir, "curves.png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log" if min(r["loss"] for r in steps) > 0 else "linear")
    if epochs:
        metric = next((k for k in ("accuracy", "auc", "mse") if k in epochs[0]["valid"]), "loss")
        epochs = [r for r in epochs if isinstance(r["valid"].get(metric), (int, float))]
        axes[1].plot([r["epoch"] + 1 for r in epochs], [r["valid"][metric] for r in epochs], "o-")
        axes[1].set_ylabel(f"validation {metric}")
    axes[1].set_xlabel("epoch")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    from .fileio import atomic_output
    with atomic_output(output, inputs=[os.path.join(run_dir, name) for name in
                                       ("metrics.jsonl", "run.json", "last.npz", "best.npz", "summary.json")]) as tmp:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return output
