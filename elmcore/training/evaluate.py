"""Evaluation of a model on a task split, batch by batch.

Tasks with an evaluation protocol of their own (full sequences in windows, say) override
``Task.evaluate``; :func:`evaluate` always goes through that hook.
"""

import math

import numpy as np

from elmcore.errors import ELMError
from elmcore.training.metrics import accuracy, roc_auc


def _host(model, a):
    return model.backend.to_host(a)


def evaluate_batches(model, task, split, batch_size=64, max_batches=None, comm=None):
    """Mean loss and the task metric over a split, batch by batch (no windows stitched).

    Metrics: ``accuracy`` of the last step's logits against class labels; ``auc``
    of output 0 against target ``[..., 0]`` at every step; ``mse`` the loss itself.
    With a data-parallel ``comm`` (``elmcore.training.distributed``) each rank evaluates every
    K-th batch and the sums and metric inputs are combined, so every rank gets the
    whole split's figures.
    """
    total_loss, count = 0.0, 0
    logits, labels, spike_true, spike_score = [], [], [], []
    for i, batch in enumerate(task.batches(split, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        if comm is not None and i % comm.size != comm.rank:
            continue
        Y = model.forward(batch.X)
        loss, _ = task.loss_and_grad(Y, model.xp.asarray(batch.target))
        n = len(batch.X)
        total_loss += float(loss) * n
        count += n
        Yh = _host(model, Y)
        if task.metric == "accuracy":
            logits.append(Yh[:, -1])
            labels.append(np.asarray(batch.target))
        elif task.metric == "auc":
            spike_true.append(np.asarray(batch.target)[..., 0].ravel())
            spike_score.append(Yh[..., 0].ravel())
    if comm is not None and comm.size > 1:
        summed = comm.allreduce_sum([total_loss, count])
        total_loss, count = float(summed[0]), int(summed[1])
        logits, labels, spike_true, spike_score = (
            [a for rank_part in comm.allgather(part) for a in rank_part]
            for part in (logits, labels, spike_true, spike_score))
    if count == 0:
        raise ELMError(f"task '{task.name}' has no '{split}' examples to evaluate")
    out = {"loss": total_loss / count, "examples": count}
    if task.metric == "accuracy":
        out["accuracy"] = accuracy(np.concatenate(logits), np.concatenate(labels))
    elif task.metric == "auc":
        out["auc"] = roc_auc(np.concatenate(spike_true), np.concatenate(spike_score))
    elif task.metric == "mse":
        out["mse"] = out["loss"]
    elif task.metric == "bpc":
        # Every window has the same length, so the per-window mean is the per-character mean.
        out["bpc"] = out["loss"] / math.log(2)
    return out


def metric_value(task, metrics):
    return metrics[task.metric]


def evaluate(model, task, split, batch_size=64, **options):
    """The task's metrics on a split, by its own protocol (``Task.evaluate``; options as it names them)."""
    return task.evaluate(model, split, batch_size=batch_size, **options)
