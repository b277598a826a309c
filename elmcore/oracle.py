"""Oracle files from the official release (ELM_SPEC §6) and checking the engine against them."""

import dataclasses
import json
import os
import zipfile

import numpy as np

from .config import ELMConfig
from .errors import ELMError

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
    if not os.path.exists(path):
        raise ELMError(f"oracle file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as d:
            data = {k: d[k] for k in d.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ELMError(f"{path}: not a readable oracle .npz file ({e})") from None
    for key in ("config", "version", "X", "G", "Y", "loss"):
        if key not in data:
            raise ELMError(f"{path}: oracle file lacks the array '{key}'")
    try:
        cfg_dict = json.loads(str(data["config"]))
    except json.JSONDecodeError as e:
        raise ELMError(f"{path}: 'config' is not valid JSON ({e})") from None
    config = ELMConfig.from_dict(cfg_dict, version=str(data["version"]))
    # Absent routing tensors are stored as empty arrays.
    params = {k[6:]: v for k, v in data.items() if k.startswith("param/") and v.size}
    grads = {k[5:]: v for k, v in data.items() if k.startswith("grad/")}
    traces = {k[6:]: v for k, v in data.items() if k.startswith("trace/")}
    return OracleCase(os.path.splitext(os.path.basename(path))[0], config, data["X"], data["G"], data["Y"],
                      float(data["loss"]), params, grads, traces)


def relative_error(got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return float("inf")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def verify_case(case, dtype="float64", device="cpu"):
    """Run forward, backward and traces; return [(array name, error)] in a stable order."""
    from .models import build_model
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
