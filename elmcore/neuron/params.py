"""Parameters of an ELM: release ``state_dict`` names, initialisation, transforms (docs/spec.md §2, §3).

A model's parameters are an ordered ``dict`` from release key to array, in the
release's ``state_dict`` order. Float arrays carry the model dtype; routing
indices are int64 and the mask keeps the release's dtype (bool for neuronio
routing, int64 for random routing).
"""

import math

import numpy as np

from elmcore.neuron.config import TAU_INIT_MARGIN, ELMConfig
from elmcore.errors import ELMError

# The release's "custom tanh" φ(x) = PHI_SCALE · tanh(PHI_SLOPE · x).
PHI_SCALE = 1.7159
PHI_SLOPE = 2.0 / 3.0


def mlp_layer_keys(num_layers):
    """(weight, bias) keys of each Linear of the release's ``MLP``, input layer first."""
    return [(f"mlp.network.{2 * l}.weight", f"mlp.network.{2 * l}.bias") for l in range(num_layers + 1)]


def mlp_layer_shapes(cfg: ELMConfig):
    sizes = [cfg.mlp_input_size] + [cfg.hidden_size] * cfg.mlp_num_layers + [cfg.num_memory]
    return [(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)]


def input_tau_key(cfg: ELMConfig):
    return "tau_b" if cfg.is_v2 else "tau_s"


def trainable_keys(cfg: ELMConfig):
    keys = [k for pair in mlp_layer_keys(cfg.mlp_num_layers) for k in pair]
    keys += ["_proto_w_s", "w_y.weight", "w_y.bias"]
    if cfg.learn_memory_tau:
        keys.append("_proto_tau_m")
    return keys


def expected_shapes(cfg: ELMConfig):
    """Release key -> shape for every state_dict entry this config has."""
    shapes = {}
    for (wk, bk), (out, inp) in zip(mlp_layer_keys(cfg.mlp_num_layers), mlp_layer_shapes(cfg)):
        shapes[wk] = (out, inp)
        shapes[bk] = (out,)
    shapes["_proto_w_s"] = (cfg.num_synapse,)
    shapes["w_y.weight"] = (cfg.num_output, cfg.num_memory)
    shapes["w_y.bias"] = (cfg.num_output,)
    shapes[input_tau_key(cfg)] = (cfg.branches if cfg.is_v2 else cfg.num_synapse,)
    shapes["_proto_tau_m"] = (cfg.num_memory,)
    if cfg.input_to_synapse_routing is not None:
        shapes["input_to_synapse_indices"] = (cfg.num_synapse,)
        shapes["valid_indices_mask"] = (cfg.num_synapse,)
    return shapes


def count_trainable(cfg: ELMConfig):
    shapes = expected_shapes(cfg)
    return int(sum(math.prod(shapes[k]) for k in trainable_keys(cfg)))


# ---- routing (docs/spec.md §3) ---------------------------------------------------

def interlocking_indices(num_input):
    i = np.arange(num_input)
    return (i % 2) * (num_input // 2) + i // 2


def neuronio_routing(num_input, num_branch, num_synapse_per_branch):
    stride = math.ceil(num_input / num_branch)
    ov = np.arange(num_branch)[:, None] * stride + np.arange(num_synapse_per_branch)[None, :]
    mask = ov < num_input
    ov = np.minimum(ov, num_input - 1)
    return interlocking_indices(num_input)[ov].reshape(-1).astype(np.int64), mask.reshape(-1)


def make_routing(cfg: ELMConfig, rng):
    """(indices, mask) of the routed synapses, or (None, None) without routing."""
    if cfg.input_to_synapse_routing == "random_routing":
        idx = rng.integers(0, cfg.num_input, cfg.num_synapse).astype(np.int64)
        return idx, np.ones_like(idx)
    if cfg.input_to_synapse_routing == "neuronio_routing":
        return neuronio_routing(cfg.num_input, cfg.branches, cfg.num_synapse_per_branch)
    return None, None


# ---- initialisation ------------------------------------------------------------

def initial_proto_tau_m(tau_min, tau_max, num_memory):
    x = np.logspace(math.log10(tau_min + TAU_INIT_MARGIN), math.log10(tau_max - TAU_INIT_MARGIN), num_memory)
    x = np.clip(x, tau_min + TAU_INIT_MARGIN, tau_max - TAU_INIT_MARGIN)
    return np.log((x - tau_min) / (tau_max - x))


def init_params(cfg: ELMConfig, seed=0, dtype=np.float32):
    """Fresh parameters with the release's distributions, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    params = {}
    for (wk, bk), (out, inp) in zip(mlp_layer_keys(cfg.mlp_num_layers), mlp_layer_shapes(cfg)):
        bound = 1.0 / math.sqrt(inp)
        params[wk] = rng.uniform(-bound, bound, (out, inp))
        params[bk] = rng.uniform(-bound, bound, (out,))
    params["_proto_w_s"] = np.full(cfg.num_synapse, float(cfg.w_s_value))
    bound = 1.0 / math.sqrt(cfg.num_memory)
    params["w_y.weight"] = rng.uniform(-bound, bound, (cfg.num_output, cfg.num_memory))
    params["w_y.bias"] = rng.uniform(-bound, bound, (cfg.num_output,))
    n_tau = cfg.branches if cfg.is_v2 else cfg.num_synapse
    params[input_tau_key(cfg)] = np.full(n_tau, float(cfg.input_tau_value))
    params["_proto_tau_m"] = initial_proto_tau_m(cfg.memory_tau_min, cfg.effective_tau_max, cfg.num_memory)
    idx, mask = make_routing(cfg, rng)
    out = {k: v.astype(dtype) for k, v in params.items()}
    if idx is not None:
        out["input_to_synapse_indices"] = idx
        out["valid_indices_mask"] = mask
    return out


def present_with_shape(params, key, shape, source):
    """params[key] as an array, or one ELMError saying it is missing or has the wrong shape."""
    if key not in params or params[key] is None:
        raise ELMError(f"{source}: missing parameter '{key}' (expected shape {shape})")
    arr = np.asarray(params[key])
    if arr.shape != shape:
        raise ELMError(f"{source}: parameter '{key}' has shape {arr.shape}, the config needs {shape}")
    return arr


def finite_floats(key, arr, dtype, source):
    """arr in ``dtype``, or one ELMError saying it is not numeric or holds NaN / infinity."""
    if arr.dtype.kind not in "fiub":
        raise ELMError(f"{source}: parameter '{key}' is not numeric ({arr.dtype})")
    if not np.all(np.isfinite(arr)):
        raise ELMError(f"{source}: parameter '{key}' holds NaN or infinite values")
    return arr.astype(dtype)


def check_params(cfg: ELMConfig, params, dtype=np.float32, source="parameters"):
    """Validate a state_dict against the config; return a clean copy in ``dtype``.

    Missing or surplus keys, wrong shapes, non-finite values and out-of-range
    routing indices each raise one :class:`ELMError` naming the key.
    """
    shapes = expected_shapes(cfg)
    out = {}
    for key, shape in shapes.items():
        arr = present_with_shape(params, key, shape, source)
        if key == "input_to_synapse_indices":
            if arr.dtype.kind not in "iu":
                raise ELMError(f"{source}: '{key}' must hold integers, got {arr.dtype}")
            if arr.size and (arr.min() < 0 or arr.max() >= cfg.num_input):
                raise ELMError(f"{source}: '{key}' has indices outside [0, {cfg.num_input})")
            out[key] = arr.astype(np.int64)
        elif key == "valid_indices_mask":
            out[key] = arr.copy()
        else:
            out[key] = finite_floats(key, arr, dtype, source)
    for key in params:
        if key not in shapes and params[key] is not None and np.asarray(params[key]).size:
            raise ELMError(f"{source}: unexpected parameter '{key}' for this config")
    if np.any(out[input_tau_key(cfg)] <= 0):
        raise ELMError(f"{source}: '{input_tau_key(cfg)}' must be positive")
    return {k: out[k] for k in ordered_keys(cfg)}


def ordered_keys(cfg: ELMConfig):
    """The release's state_dict order."""
    keys = [k for pair in mlp_layer_keys(cfg.mlp_num_layers) for k in pair]
    keys += ["_proto_w_s", "w_y.weight", "w_y.bias", input_tau_key(cfg), "_proto_tau_m"]
    if cfg.input_to_synapse_routing is not None:
        keys += ["input_to_synapse_indices", "valid_indices_mask"]
    return keys
