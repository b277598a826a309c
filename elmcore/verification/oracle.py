"""Oracle files from the official release (docs/spec.md §6) and checking the engine against them."""

import dataclasses
import os

import numpy as np

from elmcore.neuron.config import ELMConfig
from elmcore.errors import ELMError
from elmcore.storage.fileio import parse_json, read_npz

# An array's error is max|got − ref| / max|ref|; these bound it per precision.
TOLERANCE = {"float64": 1e-9, "float32": 1e-3}


@dataclasses.dataclass
class OracleCase:
    name: str
    config: ELMConfig
    X: np.ndarray
    G: np.ndarray
    Y: np.ndarray
    loss: float
    params: dict
    grads: dict    # trainable key (and "X") -> ∂loss/∂·
    traces: dict   # "m", "s" or "b"


def load_oracle(path):
    """Read an oracle ``.npz`` without pickle; every problem becomes one ELMError naming the file."""
    path = os.fspath(path)
    data = read_npz(path, "an oracle file")
    if "format" in data and "X" not in data:
        raise ELMError(f"{path} is a model file, not an oracle file: an oracle file holds a model with its inputs, "
                       "outputs and gradients (tests/data/golden/); `elm info` describes a model file")
    for key in ("config", "version", "X", "G", "Y", "loss"):
        if key not in data:
            raise ELMError(f"{path}: oracle file lacks the array '{key}'")
    for key in ("config", "version"):
        if data[key].shape != () or data[key].dtype.kind != "U":
            raise ELMError(f"{path}: oracle entry '{key}' must be a text scalar, got {data[key].dtype} "
                           f"{data[key].shape}")
    cfg_dict = parse_json(str(data["config"]), f"{path}: config")
    try:
        config = ELMConfig.from_dict(cfg_dict, version=str(data["version"]))
    except ELMError as e:
        raise ELMError(f"{path}: {e}") from None
    # Absent routing tensors are stored as empty arrays.
    params = {k[6:]: v for k, v in data.items() if k.startswith("param/") and v.size}
    grads = {k[5:]: v for k, v in data.items() if k.startswith("grad/")}
    traces = {k[6:]: v for k, v in data.items() if k.startswith("trace/")}
    for key, array in [("X", data["X"]), ("G", data["G"]), ("Y", data["Y"]), ("loss", data["loss"])] + \
            [(f"grad/{k}", v) for k, v in grads.items()] + [(f"trace/{k}", v) for k, v in traces.items()]:
        if array.dtype.kind not in "fiu":
            raise ELMError(f"{path}: oracle entry '{key}' must be numeric, got {array.dtype}")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            # An expected value that is not a number checks nothing: the file is damaged, not the engine.
            raise ELMError(f"{path}: oracle entry '{key}' holds NaN or infinite values (a damaged oracle file)")
    X, G, Y = data["X"], data["G"], data["Y"]
    if X.ndim != 3 or X.shape[2] != config.num_input:
        raise ELMError(f"{path}: X must have shape (batch, time, {config.num_input}), got {X.shape}")
    if Y.shape != X.shape[:2] + (config.num_output,) or G.shape != Y.shape:
        raise ELMError(f"{path}: Y and G must have shape {X.shape[:2] + (config.num_output,)}, got "
                       f"{Y.shape} and {G.shape}")
    if data["loss"].size != 1:
        raise ELMError(f"{path}: 'loss' must be one number, got shape {data['loss'].shape}")
    return OracleCase(os.path.splitext(os.path.basename(path))[0], config, X, G, Y,
                      float(data["loss"].reshape(())), params, grads, traces)


def relative_error(got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return float("inf")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def verify_case(case, dtype="float64", device="cpu"):
    """Run forward, backward and traces; return [(array name, error)] in a stable order."""
    from elmcore.engine.factory import build_model
    model = build_model(case.config, params=case.params, dtype=dtype, device=device)
    host = model.backend.to_host
    Y, cache = model.forward(case.X, return_cache=True)
    grads = model.backward(case.G, cache, input_grad="X" in case.grads)
    results = [("Y", relative_error(host(Y), case.Y)),
               ("loss", relative_error(float((host(Y).astype(np.float64) * case.G).sum()), case.loss))]
    for key in sorted(case.grads):
        if key not in grads:
            results.append((f"grad/{key}", float("inf")))
            continue
        results.append((f"grad/{key}", relative_error(host(grads[key]), case.grads[key])))
    if case.traces:
        _, traces = model.traces(case.X)
        for key in sorted(case.traces):
            got = traces.get(key)
            results.append((f"trace/{key}", float("inf") if got is None else
                            relative_error(host(got), case.traces[key])))
    return results
