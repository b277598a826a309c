"""The release's NeuronIO evaluation (``neuronio_eval_utils``): full simulations cut into
overlapping windows, each run from the zero state, stitched, then scored file by file."""

import numpy as np

from elmcore.errors import ELMError
from elmcore.training.metrics import neuronio_metrics
from elmcore.data.neuronio.soma import SOMA_SCALE

# Simulations with more output spikes than this are left out, and the first
# 500 ms of every simulation too (the release's evaluation).
NEURONIO_MAX_SPIKES_PER_SIM = 24
NEURONIO_IGNORE_MS = 500


def _host(model, a):
    return model.backend.to_host(a)


def window_plan(T, window, burn_in):
    """Window starts and the (destination, source-offset) of what each window contributes.

    As the release: ``int(2 + (T − window) / (window − burn_in))`` windows advancing by
    ``window − burn_in``; the first is kept whole, later ones lose their first
    ``burn_in`` steps; the input is zero-padded past T.
    """
    if not 0 <= burn_in < window:
        raise ELMError(f"burn-in must lie in [0, window={window}), got {burn_in}")
    count = max(1, int(2 + (T - window) / (window - burn_in)))
    plan = []
    for k in range(count):
        start = k * (window - burn_in)
        skip = 0 if k == 0 else burn_in
        lo, hi = start + skip, min(start + window, T)
        if lo < hi:
            plan.append((start, skip, lo, hi))
    return plan


def neuronio_head(Y):
    """The release's eval head on outputs (..., ≥2): sigmoid spike probability, soma in mV (bias-subtracted)."""
    Y = np.asarray(Y)
    return np.stack([1 / (1 + np.exp(-Y[..., 0].astype(np.float64))), Y[..., 1] / SOMA_SCALE], axis=-1)


def neuronio_predict(model, X, window=500, burn_in=150, batch_size=64):
    """Spike probability and soma (mV, bias-subtracted) for full simulations X (S, T, D).

    Every window runs from the zero state, as in the release.
    """
    S, T, D = X.shape
    plan = window_plan(T, window, burn_in)
    windows = np.zeros((S * len(plan), window, D), np.float32)
    for w, (start, _, _, _) in enumerate(plan):
        part = X[:, start:start + window]
        windows[w * S:(w + 1) * S, :part.shape[1]] = part
    outs = []
    for i in range(0, len(windows), batch_size):
        outs.append(_host(model, model.forward(windows[i:i + batch_size])).astype(np.float64))
    Y = neuronio_head(np.concatenate(outs))
    spike = np.zeros((S, T))
    soma = np.zeros((S, T))
    for w, (start, skip, lo, hi) in enumerate(plan):
        part = Y[w * S:(w + 1) * S, skip:skip + hi - lo]
        spike[:, lo:hi] = part[..., 0]
        soma[:, lo:hi] = part[..., 1]
    return spike, soma


def align_soma(pred, true):
    """The release z-scores the soma prediction onto the target's mean and std, per file."""
    s = pred.std()
    return (pred - pred.mean()) / (s if s > 0 else 1.0) * true.std() + true.mean()


def evaluate_neuronio(model, task, split="test", window=500, burn_in=150, align=True, max_files=None,
                      sims_per_chunk=4, batch_size=64):
    """The release's NeuronIO metrics (AUC, TP/AUC at FP, soma RMSE/MAE/explained variance in mV).

    ``task`` provides ``simulation_groups(split)`` (see ``NeuronIOTask``).
    """
    spikes_all, prob_all, soma_all, pred_all = [], [], [], []
    for f, sims in enumerate(task.simulation_groups(split)):
        if max_files is not None and f >= max_files:
            break
        spk, prob, soma, pred = [], [], [], []
        chunk = []
        for item in list(sims) + [None]:
            if item is not None:
                chunk.append(item)
            if chunk and (item is None or len(chunk) == sims_per_chunk):
                X = np.stack([c[0] for c in chunk])
                p, v = neuronio_predict(model, X, window, burn_in, batch_size)
                prob.append(p)
                pred.append(v)
                spk.append(np.stack([c[1] for c in chunk]))
                soma.append(np.stack([c[2] for c in chunk]))
                chunk = []
        if not spk:
            continue
        spk, prob, soma, pred = (np.concatenate(a) for a in (spk, prob, soma, pred))
        if align:
            pred = align_soma(pred, soma)
        spikes_all.append(spk)
        prob_all.append(prob)
        soma_all.append(soma)
        pred_all.append(pred)
    if not spikes_all:
        raise ELMError(f"task '{task.name}' has no '{split}' simulations to evaluate")
    spk, prob, soma, pred = (np.concatenate(a) for a in (spikes_all, prob_all, soma_all, pred_all))
    keep = spk.sum(axis=1) <= NEURONIO_MAX_SPIKES_PER_SIM
    ignore = NEURONIO_IGNORE_MS if spk.shape[1] > NEURONIO_IGNORE_MS else 0
    sl = (keep, slice(ignore, None))
    out = neuronio_metrics(spk[sl], prob[sl], soma[sl], pred[sl])
    out["simulations"] = int(keep.sum())
    out["auc"] = out["AUC"]
    return out
