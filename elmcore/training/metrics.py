"""Task metrics, with the NeuronIO ones computed exactly as the release's evaluation does.

The release uses scikit-learn's ``roc_curve`` (with its default
``drop_intermediate=True``), ``auc``, ``explained_variance_score`` and the
"TP/AUC at a desired false-positive rate" helpers of Beniaguev et al.; the
functions here reproduce those definitions in NumPy so that elmcore needs no
scikit-learn and reports the same numbers.
"""

import numpy as np


def accuracy(logits_last, labels):
    return float((np.asarray(logits_last).argmax(axis=-1) == np.asarray(labels)).mean())


def roc_curve(y_true, score):
    """(fpr, tpr, thresholds) as ``sklearn.metrics.roc_curve(y_true, score)`` returns them."""
    y_true = np.asarray(y_true).ravel().astype(np.float64)
    score = np.asarray(score).ravel().astype(np.float64)
    order = np.argsort(score, kind="mergesort")[::-1]
    score, y_true = score[order], y_true[order]
    distinct = np.where(np.diff(score))[0]
    thresh_idx = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true)[thresh_idx]
    fps = 1 + thresh_idx - tps
    thresholds = score[thresh_idx]
    if len(fps) > 2:  # drop_intermediate: keep only the corners of the curve
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def roc_auc(y_true, score):
    fpr, tpr, _ = roc_curve(y_true, score)
    return float(np.trapezoid(tpr, fpr)) if np.all(np.isfinite(fpr + tpr)) else float("nan")


def tp_at_fp(y_true, score, desired_fp):
    """True-positive rate at the ROC point whose FP rate is nearest ``desired_fp`` (release helper)."""
    fpr, tpr, _ = roc_curve(y_true, score)
    idx = int(np.argmin(np.abs(fpr - desired_fp)))
    return float(tpr[max(idx, 1)])


def auc_at_fp(y_true, score, desired_fp):
    """Mean TPR over FP rates below ``desired_fp`` on a 20000-point grid (release helper)."""
    fpr, tpr, _ = roc_curve(y_true, score)
    grid = np.linspace(0, 1, num=20000)
    tpr_grid = np.interp(grid, fpr, tpr)
    idx = min(max(1, int(np.argmin(np.abs(grid - desired_fp)))), tpr_grid.shape[0] - 1)
    return float(tpr_grid[:idx].mean())


def soma_metrics(soma_true, soma_pred):
    t = np.asarray(soma_true, dtype=np.float64).ravel()
    p = np.asarray(soma_pred, dtype=np.float64).ravel()
    err = t - p
    var = t.var()
    return {"soma_explained_variance_percent": float(100 * (1 - err.var() / var)) if var > 0 else float("nan"),
            "soma_RMSE": float(np.sqrt(np.mean(err ** 2))),
            "soma_MAE": float(np.mean(np.abs(err)))}


def neuronio_metrics(spikes_true, spike_prob, soma_true, soma_pred, desired_fp=(0.0025, 0.01)):
    """The release's core results: AUC, TP/AUC at FP rates, soma explained variance, RMSE, MAE (mV)."""
    out = {}
    for fp in desired_fp:
        out[f"TP @ {fp:.4f} FP"] = tp_at_fp(spikes_true, spike_prob, fp)
        out[f"AUC @ {fp:.4f} FP"] = auc_at_fp(spikes_true, spike_prob, fp)
    out["AUC"] = roc_auc(spikes_true, spike_prob)
    out.update(soma_metrics(soma_true, soma_pred))
    return out
