"""Applying a model to user arrays (``elm predict``)."""

import numpy as np

from .errors import DataError, ELMError
from .fileio import read_npy
from .losses import SOMA_SCALE

HEADS = ("raw", "neuronio")


def read_input_array(path, num_input):
    """(X (B, T, num_input), squeezed) from a ``.npy`` file; ``squeezed`` when the file held (T, num_input)."""
    try:
        X = read_npy(path, "input")
    except ELMError as e:
        raise DataError(str(e)) from None
    if X.dtype.kind not in "fiub":
        raise DataError(f"{path}: input must be numeric, got dtype {X.dtype}")
    squeezed = X.ndim == 2
    if squeezed:
        X = X[None]
    if X.ndim != 3 or X.shape[2] != num_input:
        raise DataError(f"{path}: input must have shape (batch, time, {num_input}) or (time, {num_input}), "
                        f"got {X.shape if not squeezed else X.shape[1:]}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{path}: input is empty {X.shape}")
    if X.dtype.kind == "f":
        bad = np.argwhere(~np.isfinite(X))
        if len(bad):
            b, t, i = bad[0]
            raise DataError(f"{path}: input holds NaN or infinite values (first at batch {b}, step {t}, input {i})")
    return X, squeezed


def predict_array(model, X, head="raw", batch_size=64):
    """Model outputs for X (B, T, D), batch by batch, as a host float array.

    ``head="neuronio"``: the release's eval head, sigmoid of output 0 (spike
    probability) and output 1 / 0.1 (soma in mV relative to −67.7 mV).
    """
    if head not in HEADS:
        raise DataError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if head == "neuronio" and model.config.num_output < 2:
        raise DataError("the neuronio head needs a model with 2 outputs (spike logit, soma)")
    outs = [model.backend.to_host(model.forward(X[i:i + batch_size])) for i in range(0, len(X), batch_size)]
    Y = np.concatenate(outs)
    if head == "neuronio":
        Y = np.stack([1 / (1 + np.exp(-Y[..., 0].astype(np.float64))), Y[..., 1] / SOMA_SCALE],
                     axis=-1).astype(Y.dtype)
    return Y
