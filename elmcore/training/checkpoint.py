"""Model and training-checkpoint files: one ``.npz`` each, no pickle.

Layout (every entry a plain array; strings are 0-d unicode arrays):
  format            "elmcore-model" or "elmcore-checkpoint"
  config            ELMConfig JSON (release key names plus "version")
  dtype             "float32" or "float64"
  param/<key>       every state_dict entry, release keys
  vocab             (character models) uint8 byte value of each input / output channel
                    (elmcore.data.vocab); absent for other models
  -- checkpoints only --
  optim/<key>       optimiser state (``Optimizer.state_dict``)
  meta              JSON: step, epoch, RNG state, run options, best metric, ...
  state/<key>       (stateful training, mid-epoch) the model state the next batch starts from
Files are written to a temporary name and renamed, so a crash never leaves a
torn file where a good one was.
"""

import json
import os

import numpy as np

from elmcore.neuron.config import ELMConfig
from elmcore.data.vocab import Vocabulary
from elmcore.errors import CheckpointError, ELMError
from elmcore.storage.fileio import atomic_output, parse_json, read_npz

MODEL_FORMAT = "elmcore-model"
CHECKPOINT_FORMAT = "elmcore-checkpoint"


def _write_npz(path, arrays, inputs=()):
    with atomic_output(path, inputs=inputs) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _vocab_entry(vocab, config):
    if vocab is None:
        return {}
    if len(vocab) != config.num_input or len(vocab) != config.num_output:
        raise ELMError(f"a vocabulary of {len(vocab)} symbols does not fit a model with {config.num_input} "
                       f"inputs and {config.num_output} outputs")
    return {"vocab": np.asarray(vocab.symbols, np.uint8)}


def save_model(path, config: ELMConfig, params, dtype="float32", inputs=(), vocab: Vocabulary = None):
    """Write a model file; ``inputs`` (the files the caller read) may not be overwritten."""
    arrays = {"format": np.array(MODEL_FORMAT), "config": np.array(config.to_json()), "dtype": np.array(dtype)}
    arrays.update(_vocab_entry(vocab, config))
    arrays.update({f"param/{k}": np.asarray(v) for k, v in params.items()})
    _write_npz(path, arrays, inputs)


def save_checkpoint(path, config: ELMConfig, params, optim_state, meta, dtype="float32", inputs=(),
                    vocab: Vocabulary = None, state=None):
    """Write a training checkpoint; ``state`` is a stateful run's carried model state (host arrays)."""
    arrays = {"format": np.array(CHECKPOINT_FORMAT), "config": np.array(config.to_json()),
              "dtype": np.array(dtype), "meta": np.array(json.dumps(meta))}
    arrays.update(_vocab_entry(vocab, config))
    arrays.update({f"param/{k}": np.asarray(v) for k, v in params.items()})
    arrays.update({f"optim/{k}": np.asarray(v) for k, v in optim_state.items()})
    arrays.update({f"state/{k}": np.asarray(v) for k, v in (state or {}).items()})
    _write_npz(path, arrays, inputs)


class LoadedFile:
    """The contents of a model or checkpoint file; ``vocab`` is a Vocabulary or None."""

    def __init__(self, path, kind, config, dtype, params, optim_state=None, meta=None, vocab=None, state=None):
        self.path, self.kind, self.config, self.dtype = path, kind, config, dtype
        self.params, self.optim_state, self.meta = params, optim_state or {}, meta or {}
        self.vocab, self.state = vocab, state or {}

    def build_model(self, dtype=None, device="cpu"):
        """An ``ELM`` or ``ELMNetwork`` with these parameters, validated against the config (errors name the file)."""
        from elmcore.engine.backend import get_backend
        from elmcore.engine.factory import build_model
        get_backend(device)  # a missing GPU is not the file's fault: let that error through unprefixed
        try:
            return build_model(self.config, params=self.params, dtype=dtype or self.dtype, device=device)
        except ELMError as e:
            raise CheckpointError(f"{self.path}: {e}") from None


def load_file(path):
    """Read a model or checkpoint ``.npz``; any damage becomes one CheckpointError naming the file."""
    path = os.fspath(path)
    try:
        data = read_npz(path, "an elmcore model or checkpoint")
    except ELMError as e:
        raise CheckpointError(str(e)) from None
    kind = _text_entry(data, "format", path, "")
    if kind not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path}: not an elmcore model or checkpoint (no 'format' entry of "
                              f"{MODEL_FORMAT!r} or {CHECKPOINT_FORMAT!r})")
    if "config" not in data:
        raise CheckpointError(f"{path}: lacks its model config")
    try:
        config = ELMConfig.from_json(_text_entry(data, "config", path), source=f"{path}: config")
    except ELMError as e:
        raise CheckpointError(f"{path}: {e}") from None
    params = {k[6:]: v for k, v in data.items() if k.startswith("param/")}
    optim = {k[6:]: v for k, v in data.items() if k.startswith("optim/")}
    state = {k[6:]: v for k, v in data.items() if k.startswith("state/")}
    for key, value in state.items():
        if value.dtype.kind != "f" or not np.all(np.isfinite(value)):
            raise CheckpointError(f"{path}: model state '{key}' must hold finite floats")
    vocab = None
    if "vocab" in data:
        value = data["vocab"]
        if value.dtype != np.uint8:
            raise CheckpointError(f"{path}: entry 'vocab' must be uint8 byte values, got {value.dtype}")
        try:
            vocab = Vocabulary(value, f"{path}: vocab")
        except ELMError as e:
            raise CheckpointError(str(e)) from None
        if len(vocab) != config.num_input or len(vocab) != config.num_output:
            raise CheckpointError(f"{path}: its vocabulary has {len(vocab)} symbols, but the model has "
                                  f"{config.num_input} inputs and {config.num_output} outputs")
    meta = {}
    if kind == CHECKPOINT_FORMAT:
        if "meta" not in data:
            raise CheckpointError(f"{path}: checkpoint metadata missing")
        try:
            meta = parse_json(_text_entry(data, "meta", path), f"{path}: meta")
        except ELMError as e:
            raise CheckpointError(f"checkpoint metadata corrupt: {e}") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: checkpoint metadata must be a JSON object, got {type(meta).__name__}")
    dtype = _text_entry(data, "dtype", path, "float32")
    if dtype not in ("float32", "float64"):
        raise CheckpointError(f"{path}: stored dtype must be float32 or float64, got {dtype[:40]!r}")
    return LoadedFile(path, kind, config, dtype, params, optim, meta, vocab, state)


def _text_entry(data, key, path, default=None):
    """A 0-d text entry as ``str``; any other array there is damage, named as such."""
    if key not in data:
        return default
    value = data[key]
    if value.shape != () or value.dtype.kind != "U":
        raise CheckpointError(f"{path}: entry '{key}' must be a text scalar, got {value.dtype} {value.shape}")
    return str(value)


def load_model(path, dtype=None, device="cpu"):
    """An ``ELM`` from a model or checkpoint file, its parameters validated against its config."""
    return load_file(path).build_model(dtype=dtype, device=device)
