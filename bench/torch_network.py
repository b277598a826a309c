"""A plain PyTorch-autograd ELM Network, written from docs/spec.md §7, as a benchmark baseline.

Each layer walks time step by step: gather every synapse's source from
[x_t ; o_{t−1}], sum the weighted synapses per branch, update the branch traces,
run every neuron's own MLP (one batched matmul over neurons), update the memory
and each neuron's output; autograd records it all. Its timings stand for "the
network written the obvious way in PyTorch" and its numbers are an independent
check of elmcore's hand-derived network backward (it reproduces the oracle
files, tests/test_torch_network.py). PyTorch is not an elmcore dependency: this
module imports without it and ``torch_available()`` says whether it can run.

    params = init_network_params(cfg, seed=0)          # or ELMNetwork.state_dict()
    model = TorchELMNetwork(cfg, params)
    Y = model(X)                                       # (B, T, K)
"""

import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torch_baseline import (PHI_SCALE, PHI_SLOPE, TAU_FLOOR, V2_MIN_TAU_SPAN, _torch,  # noqa: E402
                            time_inference, time_training_step, torch_activation, torch_available)

from elmcore.engine.fields import ACTIVATIONS  # noqa: E402
from elmcore.errors import ConfigError, DataError, ELMError  # noqa: E402

__all__ = ["NETWORK_DEFAULTS", "resolve_network_config", "init_network_params", "TorchELMNetwork",
           "all_steps_cross_entropy_fn", "time_training_step", "time_inference", "torch_available"]

VERSION = "elm_network"
# docs/spec.md §7.1 defaults; None means "derived from another field".
NETWORK_DEFAULTS = {
    "num_neurons": 8,
    "num_layers": 1,
    "num_memory": 10,
    "mlp_num_layers": 1,
    "mlp_hidden_size": None,
    "mlp_activation": "relu",
    "num_branch": 4,
    "num_synapse_per_branch": 4,
    "recurrent_fraction": 0.5,
    "lambda_value": 5.0,
    "tau_b_value": 5.0,
    "memory_tau_min": 1.0,
    "memory_tau_max": 1000.0,
    "learn_memory_tau": False,
    "delta_t": 1.0,
}
REQUIRED_FIELDS = ("num_input", "num_output")


def resolve_network_config(config_dict):
    """The §7.1 fields of ``config_dict`` with defaults filled in and derived sizes added."""
    if not isinstance(config_dict, dict):
        raise ELMError(f"a network config must be a dict, got {type(config_dict).__name__}")
    cfg = dict(NETWORK_DEFAULTS)
    for key, value in config_dict.items():
        if key == "version":
            if value != VERSION:
                raise ConfigError("version", f"must be {VERSION!r} for the network baseline, got {value!r}")
            continue
        if key not in cfg and key not in REQUIRED_FIELDS:
            raise ConfigError(key, "unknown field")
        cfg[key] = value
    for key in REQUIRED_FIELDS:
        if key not in cfg:
            raise ConfigError(key, "is required")
    for key in ("num_input", "num_output", "num_neurons", "num_layers", "num_memory", "num_branch",
                "num_synapse_per_branch"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(key, f"must be an integer >= 1, got {cfg[key]!r}")
    if cfg["mlp_activation"] not in ACTIVATIONS:
        raise ConfigError("mlp_activation", f"must be one of {', '.join(ACTIVATIONS)}, got {cfg['mlp_activation']!r}")
    if not 0.0 <= float(cfg["recurrent_fraction"]) <= 1.0:
        raise ConfigError("recurrent_fraction", f"must lie in [0, 1], got {cfg['recurrent_fraction']!r}")
    cfg["mlp_hidden_size"] = cfg["mlp_hidden_size"] or 2 * cfg["num_memory"]
    cfg["num_synapse"] = cfg["num_branch"] * cfg["num_synapse_per_branch"]
    cfg["memory_tau_max"] = max(cfg["memory_tau_min"] + V2_MIN_TAU_SPAN, cfg["memory_tau_max"])
    return cfg


def _mlp_shapes(cfg):
    """[(out_j, in_j)] of each neuron's MLP, j = 0 … L."""
    widths = [cfg["num_branch"] + cfg["num_memory"]] + [cfg["mlp_hidden_size"]] * cfg["mlp_num_layers"] \
        + [cfg["num_memory"]]
    return list(zip(widths[1:], widths[:-1]))


def _proto_tau_m_init(cfg):
    """The single neuron's log-spaced τ_m init (docs/spec.md §2) as _proto_tau_m values."""
    lo, hi = cfg["memory_tau_min"], cfg["memory_tau_max"]
    x = np.logspace(math.log10(lo + 1e-6), math.log10(hi - 1e-6), cfg["num_memory"])
    x = np.clip(x, lo + 1e-6, hi - 1e-6)
    return np.log((x - lo) / (hi - x))


def init_network_params(config_dict, seed=0):
    """Parameters under the §7.2 keys, drawn as §7.2 says (float64 NumPy; the baseline's own
    init, for benchmarking without elmcore's network; elmcore's draws differ)."""
    cfg = resolve_network_config(config_dict)
    rng = np.random.default_rng(seed)
    N, k_c, d_m = cfg["num_neurons"], cfg["num_synapse"], cfg["num_memory"]
    params = {}
    for layer in range(cfg["num_layers"]):
        p = f"layers.{layer}."
        D = cfg["num_input"] if layer == 0 else N
        recurrent = int(round(cfg["recurrent_fraction"] * k_c))
        sources = np.empty((N, k_c), np.int64)
        for i in range(N):
            row = np.concatenate([D + rng.integers(0, N, recurrent), rng.integers(0, D, k_c - recurrent)])
            sources[i] = rng.permutation(row)
        params[p + "synapse_source"] = sources
        params[p + "w_s"] = rng.uniform(-1, 1, (N, k_c)) / math.sqrt(k_c)
        params[p + "tau_b"] = np.full((N, cfg["num_branch"]), float(cfg["tau_b_value"]))
        for j, (out, inp) in enumerate(_mlp_shapes(cfg)):
            bound = 1 / math.sqrt(inp)
            params[p + f"mlp.{j}.weight"] = rng.uniform(-bound, bound, (N, out, inp))
            params[p + f"mlp.{j}.bias"] = rng.uniform(-bound, bound, (N, out))
        params[p + "_proto_tau_m"] = np.tile(_proto_tau_m_init(cfg), (N, 1))
        params[p + "w_o.weight"] = rng.uniform(-1, 1, (N, d_m)) / math.sqrt(d_m)
        params[p + "w_o.bias"] = rng.uniform(-1, 1, N) / math.sqrt(d_m)
    params["readout.weight"] = rng.uniform(-1, 1, (cfg["num_output"], N)) / math.sqrt(N)
    params["readout.bias"] = rng.uniform(-1, 1, cfg["num_output"]) / math.sqrt(N)
    return params


def _build_module_classes():
    torch = _torch()
    nn = torch.nn

    class PerNeuron(nn.Module):
        """``weight`` and ``bias`` of one linear map per neuron (keys ``.weight``, ``.bias``)."""

        def __init__(self, *weight_shape):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(*weight_shape))
            self.bias = nn.Parameter(torch.empty(*weight_shape[:-1]))

    class Layer(nn.Module):
        def __init__(self, cfg, num_input):
            super().__init__()
            N, k_c, d_m = cfg["num_neurons"], cfg["num_synapse"], cfg["num_memory"]
            self.cfg, self.num_input = cfg, num_input
            self.register_buffer("synapse_source", torch.empty(N, k_c, dtype=torch.int64))
            self.w_s = nn.Parameter(torch.empty(N, k_c))
            self.register_buffer("tau_b", torch.empty(N, cfg["num_branch"]))
            self.mlp = nn.ModuleList(PerNeuron(N, out, inp) for out, inp in _mlp_shapes(cfg))
            self._proto_tau_m = nn.Parameter(torch.empty(N, d_m), requires_grad=bool(cfg["learn_memory_tau"]))
            self.w_o = PerNeuron(N, d_m)
            self.activation = torch_activation(torch, cfg["mlp_activation"])

        def forward(self, X):
            """(B, T, D_ℓ) → this layer's outputs o (B, T, N)."""
            cfg = self.cfg
            B, T, _ = X.shape
            N, n_b, spb, d_m = cfg["num_neurons"], cfg["num_branch"], cfg["num_synapse_per_branch"], \
                cfg["num_memory"]
            dt = cfg["delta_t"]
            lo, hi = cfg["memory_tau_min"], cfg["memory_tau_max"]
            tau_m = torch.clamp((hi - lo) * torch.sigmoid(self._proto_tau_m) + lo, min=TAU_FLOOR)
            kappa_m = torch.exp(-dt / tau_m)[:, None, :]                           # (N, 1, d_m)
            gain = (1 - torch.exp(-dt * cfg["lambda_value"] / tau_m))[:, None, :]  # 1 − κ_λ
            kappa_b = torch.exp(-dt / torch.clamp(self.tau_b, min=TAU_FLOOR))[:, None, :]
            sources = self.synapse_source.reshape(-1)
            w_s = self.w_s.view(1, N, n_b, spb)
            weights_t = [layer.weight.transpose(1, 2) for layer in self.mlp]       # (N, in, out)
            biases = [layer.bias[:, None, :] for layer in self.mlp]
            w_o, c_o = self.w_o.weight[:, None, :], self.w_o.bias[:, None]
            b = X.new_zeros(N, B, n_b)
            m = X.new_zeros(N, B, d_m)
            o = X.new_zeros(B, N)
            outputs = []
            for t in range(T):
                pool = torch.cat([X[:, t], o], dim=1)                                # [x_t ; o_{t−1}]
                z = torch.index_select(pool, 1, sources).view(B, N, n_b, spb)
                b = kappa_b * b + (w_s * z).sum(-1).transpose(0, 1)
                decayed = kappa_m * m
                a = torch.cat([b, decayed], dim=-1)                                  # (N, B, n_b + d_m)
                for j, (W, c) in enumerate(zip(weights_t, biases)):
                    a = torch.baddbmm(c, a, W)
                    if j < len(weights_t) - 1:
                        a = self.activation(a)
                m = decayed + gain * (PHI_SCALE * torch.tanh(PHI_SLOPE * a))
                o = ((m * w_o).sum(-1) + c_o).transpose(0, 1)                        # (B, N)
                outputs.append(o)
            return torch.stack(outputs, dim=1)

    class TorchELMNetworkModule(nn.Module):
        def __init__(self, config_dict, params, dtype, device):
            super().__init__()
            cfg = resolve_network_config(config_dict)
            self.cfg = cfg
            self.layers = nn.ModuleList(
                Layer(cfg, cfg["num_input"] if i == 0 else cfg["num_neurons"]) for i in range(cfg["num_layers"]))
            self.readout = nn.Linear(cfg["num_neurons"], cfg["num_output"])
            self.to(dtype=dtype, device=device)  # floats only: synapse_source stays int64
            self._load(params)

        def _load(self, params):
            own = self.state_dict()
            for key, slot in own.items():
                if key not in params:
                    raise ELMError(f"parameters: missing '{key}' (expected shape {tuple(slot.shape)})")
                arr = np.asarray(params[key])
                if arr.shape != tuple(slot.shape):
                    raise ELMError(f"parameters: '{key}' has shape {arr.shape}, the config needs "
                                   f"{tuple(slot.shape)}")
                if key.endswith("synapse_source"):
                    layer = self.layers[int(key.split(".")[1])]
                    limit = layer.num_input + self.cfg["num_neurons"]
                    if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= limit)):
                        raise ELMError(f"parameters: '{key}' must hold integers in [0, {limit})")
                elif not np.all(np.isfinite(arr.astype(np.float64))):
                    raise ELMError(f"parameters: '{key}' holds NaN or infinite values")
            unexpected = sorted(set(params) - set(own))
            if unexpected:
                raise ELMError(f"parameters: unexpected '{unexpected[0]}' for this config")
            with torch.no_grad():
                for key, slot in own.items():
                    source = np.asarray(params[key])
                    source = source.astype(np.int64 if key.endswith("synapse_source") else np.float64)
                    slot.copy_(torch.as_tensor(source, device=slot.device))

        def forward(self, X):
            cfg = self.cfg
            if X.dim() != 3 or X.shape[2] != cfg["num_input"] or X.shape[0] < 1 or X.shape[1] < 1:
                raise DataError(f"input must have shape (batch, time, {cfg['num_input']}), got {tuple(X.shape)}")
            for layer in self.layers:
                X = layer(X)
            return self.readout(X)

    return TorchELMNetworkModule


_MODULE_CLASS = None


def TorchELMNetwork(config_dict, params, dtype=None, device="cpu"):
    """An ``nn.Module`` ELM Network whose ``state_dict`` keys are the §7.2 keys.

    ``params``: arrays under those keys (``init_network_params``, an oracle file's
    ``param/*`` arrays, or elmcore's network ``state_dict()``). ``dtype`` defaults to
    ``torch.float32``. ``forward(X)`` maps (B, T, num_input) to (B, T, num_output).
    """
    global _MODULE_CLASS
    torch = _torch()
    if _MODULE_CLASS is None:
        _MODULE_CLASS = _build_module_classes()
    return _MODULE_CLASS(config_dict, params, torch.float32 if dtype is None else dtype, device)


def all_steps_cross_entropy_fn(targets):
    """``Y -> mean cross-entropy of Y[b, t] against targets[b, t]`` (char-level language modelling)."""
    torch = _torch()
    F = torch.nn.functional
    cached = {}

    def loss_fn(Y):
        if "targets" not in cached:
            cached["targets"] = torch.as_tensor(np.asarray(targets), dtype=torch.int64,
                                                device=Y.device).reshape(-1)
        return F.cross_entropy(Y.reshape(-1, Y.shape[-1]), cached["targets"])
    return loss_fn
