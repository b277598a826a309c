"""Task losses with their gradients w.r.t. the model output Y (B, T, num_output).

Each returns ``(loss, dY)`` with ``loss`` a Python float and ``dY`` an array
shaped like Y, so ``model.backward(dY, cache)`` gives ∂loss/∂θ. All are
numerically stable for any finite logits (log-sum-exp and softplus written
so that no exp can overflow).
"""

from .backend import array_module
from .errors import DataError

# NeuronIO target preparation (ELM_SPEC §5).
SOMA_CAP_MV = -55.0
SOMA_BIAS_MV = -67.7
SOMA_SCALE = 0.1


def _softplus(x, xp):
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def _sigmoid(x, xp):
    # Two branches so exp never sees a large positive argument.
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def cross_entropy_last(Y, labels):
    """Mean cross-entropy of the last step's logits against integer labels (B,)."""
    xp = array_module(Y)
    B, _, K = Y.shape
    labels = xp.asarray(labels)
    if labels.shape != (B,):
        raise DataError(f"class labels must have shape ({B},), got {tuple(labels.shape)}")
    labels = labels.astype(xp.int64)
    if B and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise DataError(f"class labels must lie in [0, {K}), got range [{int(labels.min())}, {int(labels.max())}]")
    logits = Y[:, -1, :]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    rows = xp.arange(B)
    loss = -float(log_p[rows, labels].mean())
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
    targets = xp.asarray(targets)
    if targets.shape != (B, T):
        raise DataError(f"next-token targets must have shape {(B, T)}, got {tuple(targets.shape)}")
    if targets.dtype.kind not in "iu":
        raise DataError(f"next-token targets must be integers, got dtype {targets.dtype}")
    targets = targets.astype(xp.int64)
    if targets.size and (int(targets.min()) < 0 or int(targets.max()) >= K):
        raise DataError(f"next-token targets must lie in [0, {K}), got range "
                        f"[{int(targets.min())}, {int(targets.max())}]")
    shifted = Y - Y.max(axis=2, keepdims=True)
    log_p = shifted - xp.log(xp.exp(shifted).sum(axis=2, keepdims=True))
    rows, steps = xp.arange(B)[:, None], xp.arange(T)[None, :]
    loss = -float(log_p[rows, steps, targets].mean())
    dY = xp.exp(log_p)
    dY[rows, steps, targets] -= 1
    dY /= B * T
    return loss, dY


def neuronio_loss(Y, target, burn_in=0, spike_weight=0.5, soma_weight=0.5):
    """0.5·BCEWithLogits(spike) + 0.5·MSE(soma), each a mean over batch and (post-burn-in) time.

    target (B, T, 2): [..., 0] spike 0/1, [..., 1] prepared soma (see ``prepare_soma``).
    ``burn_in`` steps at the start of each window do not count (0, as in the release).
    """
    xp = array_module(Y)
    B, T, _ = Y.shape
    target = xp.asarray(target)
    if target.shape != (B, T, 2):
        raise DataError(f"NeuronIO targets must have shape {(B, T, 2)}, got {tuple(target.shape)}")
    if not 0 <= burn_in < T:
        raise DataError(f"burn-in must lie in [0, {T}) for windows of {T} steps, got {burn_in}")
    x = Y[:, burn_in:, 0]
    s = target[:, burn_in:, 0].astype(Y.dtype)
    v = Y[:, burn_in:, 1]
    soma = target[:, burn_in:, 1].astype(Y.dtype)
    n = x.size
    bce = float((_softplus(x, xp) - x * s).mean())
    diff = v - soma
    mse = float((diff * diff).mean())
    dY = xp.zeros_like(Y)
    dY[:, burn_in:, 0] = spike_weight * (_sigmoid(x, xp) - s) / n
    dY[:, burn_in:, 1] = soma_weight * 2 * diff / n
    return spike_weight * bce + soma_weight * mse, dY


def mse(Y, target):
    """Mean squared error over every step and output."""
    xp = array_module(Y)
    target = xp.asarray(target)
    if target.shape != Y.shape:
        raise DataError(f"regression targets must have shape {tuple(Y.shape)}, got {tuple(target.shape)}")
    diff = Y - target.astype(Y.dtype)
    return float((diff * diff).mean()), 2 * diff / diff.size


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
    return float((diff * diff).mean()), dY


LOSS_FUNCTIONS = {
    "cross_entropy_last": cross_entropy_last,
    "cross_entropy_all": cross_entropy_all,
    "neuronio": neuronio_loss,
    "mse": mse,
    "mse_last": mse_last,
}


def prepare_soma(soma_mv, scale=SOMA_SCALE):
    """Release target prep: cap at −55 mV, subtract −67.7 mV, multiply by ``scale`` (1 for eval, in mV)."""
    xp = array_module(soma_mv)
    return (xp.minimum(soma_mv, SOMA_CAP_MV) - SOMA_BIAS_MV) * scale
