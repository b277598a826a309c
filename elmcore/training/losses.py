"""Task losses with their gradients w.r.t. the model output Y (B, T, num_output).

Each returns ``(loss, dY)`` with ``dY`` an array shaped like Y, so
``model.backward(dY, cache)`` gives ∂loss/∂θ, and ``loss`` a float64 scalar on Y's device:
a NumPy float64 (a Python float) for NumPy arrays, a 0-d array for CuPy ones, which a
training step reads to the host with its other scalars in one copy (``float(loss)`` reads it
alone). Targets are checked where they are: host targets (as batches hold them) before they
are copied to the device, so that checking them reads nothing back. All are
numerically stable for any finite logits (log-sum-exp and softplus written
so that no exp can overflow). A task with a loss of its own provides it
through ``Task.loss_and_grad`` instead of a name here.
"""

import numpy as np

from elmcore.engine.backend import array_module
from elmcore.errors import DataError
from elmcore.kernels.softmax import softmax_cross_entropy


def _softplus(x, xp):
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def _sigmoid(x, xp):
    # Two branches so exp never sees a large positive argument.
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def mean_as_float64(values):
    """The mean of ``values`` in their own dtype, widened exactly to float64 on their device (what
    ``float(values.mean())`` is, without reading it to the host)."""
    return values.mean().astype(np.float64)


def _where_they_are(values):
    """``values`` as an array of the module that holds them (a list becomes a NumPy array; nothing is copied)."""
    return array_module(values).asarray(values)


def cross_entropy_last(Y, labels):
    """Mean cross-entropy of the last step's logits against integer labels (B,)."""
    xp = array_module(Y)
    B, _, K = Y.shape
    labels = _where_they_are(labels)
    if labels.shape != (B,):
        raise DataError(f"class labels must have shape ({B},), got {tuple(labels.shape)}")
    labels = labels.astype(np.int64)
    if B and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise DataError(f"class labels must lie in [0, {K}), got range [{int(labels.min())}, {int(labels.max())}]")
    labels = xp.asarray(labels)
    logits = Y[:, -1, :]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    rows = xp.arange(B)
    loss = -mean_as_float64(log_p[rows, labels])
    dY = xp.zeros_like(Y)
    d_last = xp.exp(log_p)
    d_last[rows, labels] -= 1
    dY[:, -1, :] = d_last / B
    return loss, dY


def cross_entropy_all(Y, targets):
    """Mean next-token cross-entropy (nats) over every step: targets (B, T) integer tokens.

    Divided by ln 2 it is the bits per character of character-level language
    modelling. dY = (softmax(Y) − onehot(targets)) / (B·T).
    """
    xp = array_module(Y)
    B, T, K = Y.shape
    targets = _where_they_are(targets)
    if targets.shape != (B, T):
        raise DataError(f"next-token targets must have shape {(B, T)}, got {tuple(targets.shape)}")
    if targets.dtype.kind not in "iu":
        raise DataError(f"next-token targets must be integers, got dtype {targets.dtype}")
    targets = targets.astype(np.int64)
    if targets.size and (int(targets.min()) < 0 or int(targets.max()) >= K):
        raise DataError(f"next-token targets must lie in [0, {K}), got range "
                        f"[{int(targets.min())}, {int(targets.max())}]")
    if xp is np and Y.dtype in (np.float32, np.float64) and K:
        # One pass per row in a kernel (kernels/softmax.py): the same formulas, 5x faster on a char-LM step.
        dY = np.empty(Y.shape, Y.dtype)
        picked = np.empty(B * T, Y.dtype)
        softmax_cross_entropy(np.ascontiguousarray(Y).reshape(B * T, K), targets.reshape(-1), Y.dtype.type(B * T),
                              dY.reshape(B * T, K), picked)
        return -mean_as_float64(picked), dY
    return _cross_entropy_all_arrays(xp, Y, xp.asarray(targets))


def _cross_entropy_all_arrays(xp, Y, targets):
    """``cross_entropy_all`` in array operations of ``xp`` (CuPy's, or NumPy's for other dtypes)."""
    B, T, _ = Y.shape
    shifted = Y - Y.max(axis=2, keepdims=True)
    log_p = shifted - xp.log(xp.exp(shifted).sum(axis=2, keepdims=True))
    rows, steps = xp.arange(B)[:, None], xp.arange(T)[None, :]
    loss = -mean_as_float64(log_p[rows, steps, targets])
    dY = xp.exp(log_p)
    dY[rows, steps, targets] -= 1
    dY /= B * T
    return loss, dY


def mse(Y, target):
    """Mean squared error over every step and output."""
    xp = array_module(Y)
    target = xp.asarray(target)
    if target.shape != Y.shape:
        raise DataError(f"regression targets must have shape {tuple(Y.shape)}, got {tuple(target.shape)}")
    diff = Y - target.astype(Y.dtype)
    return mean_as_float64(diff * diff), 2 * diff / diff.size


def mse_last(Y, target):
    """Mean squared error of the last step's outputs against target (B, num_output)."""
    xp = array_module(Y)
    B, _, K = Y.shape
    target = xp.asarray(target)
    if target.shape != (B, K):
        raise DataError(f"regression targets must have shape {(B, K)}, got {tuple(target.shape)}")
    diff = Y[:, -1, :] - target.astype(Y.dtype)
    dY = xp.zeros_like(Y)
    dY[:, -1, :] = 2 * diff / diff.size
    return mean_as_float64(diff * diff), dY


LOSS_FUNCTIONS = {
    "cross_entropy_last": cross_entropy_last,
    "cross_entropy_all": cross_entropy_all,
    "mse": mse,
    "mse_last": mse_last,
}

