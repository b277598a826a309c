"""The release's NeuronIO training loss and its gradient w.r.t. the model output."""

from elmcore.engine.backend import array_module
from elmcore.errors import DataError
from elmcore.training.losses import _sigmoid, _softplus, mean_as_float64


def neuronio_loss(Y, target, burn_in=0, spike_weight=0.5, soma_weight=0.5):
    """0.5·BCEWithLogits(spike) + 0.5·MSE(soma), each a mean over batch and (post-burn-in) time.

    target (B, T, 2): [..., 0] spike 0/1, [..., 1] prepared soma (see ``soma.prepare_soma``).
    ``burn_in`` steps at the start of each window do not count (0, as in the release).
    Returns ``(loss, dY)`` like every loss in :mod:`elmcore.training.losses`.
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
    bce = mean_as_float64(_softplus(x, xp) - x * s)
    diff = v - soma
    mse = mean_as_float64(diff * diff)
    dY = xp.zeros_like(Y)
    dY[:, burn_in:, 0] = spike_weight * (_sigmoid(x, xp) - s) / n
    dY[:, burn_in:, 1] = soma_weight * 2 * diff / n
    return spike_weight * bce + soma_weight * mse, dY
