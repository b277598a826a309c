"""Applying a model to user arrays and text (``elm predict``), and sampling text from a
character model (``elm sample``)."""

import math

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


def read_input_text(path, vocab):
    """(X (1, T, V) uint8 one-hot, squeezed = True) of a text file, encoded with the model's vocabulary."""
    from elmcore.storage.fileio import describe_os_error
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"input file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {describe_os_error(e)}") from None
    if not data:
        raise DataError(f"{path}: input text is empty")
    try:
        tokens = vocab.encode_text(data.decode("utf-8"), what=path)
    except UnicodeDecodeError:
        tokens = vocab.encode_bytes(data, what=path)  # a byte model's input need not be UTF-8
    return vocab.one_hot(tokens)[None], True


def most_likely_next(Y, vocab):
    """Decode outputs (T, V) into the bytes the model finds most likely next after each step."""
    return vocab.decode(np.asarray(Y).argmax(axis=-1))


def sample_text(model, vocab, prompt, length, temperature=1.0, seed=0):
    """``length`` bytes sampled from a character model after ``prompt`` (text), as bytes.

    The streaming step API all the way (``init_state`` / ``step``): one step per prompt
    character and per sampled byte. At each step the next byte is drawn from
    softmax(logits / temperature) by ``default_rng(seed)``; temperature 0 takes the most
    likely byte. The prompt must be non-empty: the model needs an input at its first step.
    """
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise DataError(f"length must be an integer >= 1, got {length!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise DataError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not prompt:
        raise DataError("the prompt is empty: the model needs at least one character to start from")
    if (model.config.num_input, model.config.num_output) != (len(vocab), len(vocab)):
        raise DataError(f"the vocabulary has {len(vocab)} symbols, the model {model.config.num_input} inputs and "
                        f"{model.config.num_output} outputs")
    tokens = vocab.encode_text(prompt, what="the prompt")
    rng = np.random.default_rng(seed)
    eye = np.eye(len(vocab), dtype=np.uint8)
    state = model.init_state(1)
    y = None
    for token in tokens:
        y, state = model.step(state, eye[token][None])
    out = []
    for i in range(length):
        logits = np.asarray(model.backend.to_host(y[0]), np.float64)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            z = logits / temperature
            p = np.exp(z - z.max())
            cdf = np.cumsum(p)
            token = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(vocab) - 1)
        out.append(token)
        if i + 1 < length:
            y, state = model.step(state, eye[token][None])
    return vocab.decode(out)
