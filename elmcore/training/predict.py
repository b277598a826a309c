"""Applying a model to user arrays (``elm predict``)."""

import numpy as np

from elmcore.errors import DataError, ELMError
from elmcore.storage.fileio import read_npy

RAW_HEAD = "raw"


def head_names():
    """``raw`` (the model's outputs) and every head a task declares in the registry."""
    from elmcore.data.registry import output_heads
    return (RAW_HEAD, *output_heads())


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

    ``head``: ``"raw"``, or a head a task declares (``elmcore.data.registry.output_heads``),
    applied to the outputs.
    """
    from elmcore.data.registry import load_head, output_heads
    heads = output_heads()
    if head != RAW_HEAD and head not in heads:
        raise DataError(f"head must be one of {', '.join(head_names())}, got {head!r}")
    spec = heads.get(head)
    if spec is not None and model.config.num_output < spec.min_outputs:
        raise DataError(f"the {head} head needs a model with at least {spec.min_outputs} outputs, this one has "
                        f"{model.config.num_output}")
    outs = [model.backend.to_host(model.forward(X[i:i + batch_size])) for i in range(0, len(X), batch_size)]
    Y = np.concatenate(outs)
    if spec is not None:
        Y = np.asarray(load_head(spec)(Y)).astype(Y.dtype)
    return Y
