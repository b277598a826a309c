"""Parameters of an ELM Network: state_dict keys, shapes, seeded initialisation (docs/spec.md §7.2).

Shapes follow the spec: per-neuron tensors lead with the neuron axis N
(``mlp.j.weight`` is (N, out_j, in_j)). The kernels use other layouts; the
model converts on the way in and out (``elmcore/network/model.py``).
"""

import math

import numpy as np

from elmcore.network.config import NetworkConfig
from elmcore.errors import ELMError
from elmcore.neuron.params import finite_floats, initial_proto_tau_m, present_with_shape


def layer_prefix(layer):
    return f"layers.{layer}."


def mlp_widths(cfg: NetworkConfig):
    """Widths of the per-neuron MLP, input first: n_b + d_m, then h per hidden layer, then d_m."""
    return [cfg.mlp_input_size] + [cfg.hidden_size] * cfg.mlp_num_layers + [cfg.num_memory]


def layer_shapes(cfg: NetworkConfig, layer):
    """key -> shape of every state_dict entry of one layer, in state_dict order."""
    N, pre = cfg.num_neurons, layer_prefix(layer)
    shapes = {pre + "synapse_source": (N, cfg.num_synapse), pre + "w_s": (N, cfg.num_synapse),
              pre + "tau_b": (N, cfg.num_branch)}
    widths = mlp_widths(cfg)
    for j in range(cfg.mlp_num_layers + 1):
        shapes[f"{pre}mlp.{j}.weight"] = (N, widths[j + 1], widths[j])
        shapes[f"{pre}mlp.{j}.bias"] = (N, widths[j + 1])
    shapes[pre + "_proto_tau_m"] = (N, cfg.num_memory)
    shapes[pre + "w_o.weight"] = (N, cfg.num_memory)
    shapes[pre + "w_o.bias"] = (N,)
    return shapes


def expected_shapes(cfg: NetworkConfig):
    shapes = {}
    for layer in range(cfg.num_layers):
        shapes.update(layer_shapes(cfg, layer))
    shapes["readout.weight"] = (cfg.num_output, cfg.num_neurons)
    shapes["readout.bias"] = (cfg.num_output,)
    return shapes


def ordered_keys(cfg: NetworkConfig):
    return list(expected_shapes(cfg))


def layer_trainable_keys(cfg: NetworkConfig, layer):
    pre = layer_prefix(layer)
    keys = [pre + "w_s"]
    for j in range(cfg.mlp_num_layers + 1):
        keys += [f"{pre}mlp.{j}.weight", f"{pre}mlp.{j}.bias"]
    if cfg.learn_memory_tau:
        keys.append(pre + "_proto_tau_m")
    return keys + [pre + "w_o.weight", pre + "w_o.bias"]


def trainable_keys(cfg: NetworkConfig):
    keys = []
    for layer in range(cfg.num_layers):
        keys += layer_trainable_keys(cfg, layer)
    return keys + ["readout.weight", "readout.bias"]


def count_trainable(cfg: NetworkConfig):
    shapes = expected_shapes(cfg)
    return int(sum(math.prod(shapes[k]) for k in trainable_keys(cfg)))


def parameter_split(cfg: NetworkConfig):
    """The parameter count split as in docs/spec.md §7.2: connectivity, complexity, readout.

    Returns a dict: "connectivity" (all w_s: N·k_c per layer), "complexity" (MLPs, w_o and a
    learned τ_m: N·k_e per layer), "readout" (K·(N + 1)), plus "k_c" and "k_e" per neuron.
    """
    shapes = expected_shapes(cfg)
    connectivity = complexity = 0
    for key in trainable_keys(cfg):
        size = math.prod(shapes[key])
        if key.startswith("readout."):
            continue
        if key.endswith(".w_s"):
            connectivity += size
        else:
            complexity += size
    readout = cfg.num_output * (cfg.num_neurons + 1)
    per_neuron = cfg.num_neurons * cfg.num_layers
    return {"connectivity": connectivity, "complexity": complexity, "readout": readout,
            "k_c": cfg.num_synapse, "k_e": complexity // per_neuron}


# ---- initialisation ------------------------------------------------------------

def sample_synapse_sources(cfg: NetworkConfig, layer, rng):
    """Per neuron: round(ρ·k_c) recurrent sources uniform over the N neurons (self allowed),
    the rest uniform over the layer's D_ℓ inputs, then shuffled so branches mix both kinds."""
    N, k_c, D = cfg.num_neurons, cfg.num_synapse, cfg.layer_input_size(layer)
    n_rec = cfg.num_recurrent_synapse
    src = np.empty((N, k_c), np.int64)
    for i in range(N):
        row = np.concatenate([D + rng.integers(0, N, n_rec), rng.integers(0, D, k_c - n_rec)])
        src[i] = rng.permutation(row)
    return src


def init_params(cfg: NetworkConfig, seed=0, dtype=np.float32):
    """Fresh parameters with the distributions of docs/spec.md §7.2, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    N, k_c = cfg.num_neurons, cfg.num_synapse
    params = {}
    proto_tau = initial_proto_tau_m(cfg.memory_tau_min, cfg.effective_tau_max, cfg.num_memory)
    widths = mlp_widths(cfg)
    for layer in range(cfg.num_layers):
        pre = layer_prefix(layer)
        params[pre + "synapse_source"] = sample_synapse_sources(cfg, layer, rng)
        bound = 1.0 / math.sqrt(k_c)
        params[pre + "w_s"] = rng.uniform(-bound, bound, (N, k_c)).astype(dtype)
        params[pre + "tau_b"] = np.full((N, cfg.num_branch), float(cfg.tau_b_value), dtype)
        for j in range(cfg.mlp_num_layers + 1):
            bound = 1.0 / math.sqrt(widths[j])
            params[f"{pre}mlp.{j}.weight"] = rng.uniform(-bound, bound, (N, widths[j + 1], widths[j])).astype(dtype)
            params[f"{pre}mlp.{j}.bias"] = rng.uniform(-bound, bound, (N, widths[j + 1])).astype(dtype)
        params[pre + "_proto_tau_m"] = np.tile(proto_tau, (N, 1)).astype(dtype)
        bound = 1.0 / math.sqrt(cfg.num_memory)
        params[pre + "w_o.weight"] = rng.uniform(-bound, bound, (N, cfg.num_memory)).astype(dtype)
        params[pre + "w_o.bias"] = rng.uniform(-bound, bound, (N,)).astype(dtype)
    bound = 1.0 / math.sqrt(N)
    params["readout.weight"] = rng.uniform(-bound, bound, (cfg.num_output, N)).astype(dtype)
    params["readout.bias"] = rng.uniform(-bound, bound, (cfg.num_output,)).astype(dtype)
    return {k: params[k] for k in ordered_keys(cfg)}


def check_params(cfg: NetworkConfig, params, dtype=np.float32, source="parameters"):
    """Validate a state_dict against the config; return a clean copy (floats in ``dtype``).

    Missing or surplus keys, wrong shapes, non-finite values, synapse sources out of
    range and non-positive τ_b each raise one :class:`ELMError` naming the key.
    """
    shapes = expected_shapes(cfg)
    out = {}
    for key, shape in shapes.items():
        arr = present_with_shape(params, key, shape, source)
        if key.endswith("synapse_source"):
            if arr.dtype.kind not in "iu":
                raise ELMError(f"{source}: '{key}' must hold integers, got {arr.dtype}")
            layer = int(key.split(".")[1])
            limit = cfg.layer_input_size(layer) + cfg.num_neurons
            if arr.size and (arr.min() < 0 or arr.max() >= limit):
                raise ELMError(f"{source}: '{key}' has sources outside [0, {limit}) "
                               f"(D = {cfg.layer_input_size(layer)} inputs + N = {cfg.num_neurons} neurons)")
            out[key] = arr.astype(np.int64)
            continue
        out[key] = finite_floats(key, arr, dtype, source)
        if key.endswith("tau_b") and np.any(arr <= 0):
            raise ELMError(f"{source}: '{key}' must be positive")
    for key in params:
        if key not in shapes and params[key] is not None:
            raise ELMError(f"{source}: unexpected parameter '{key}' for this network config")
    return out
