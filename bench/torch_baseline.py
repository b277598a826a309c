"""A plain PyTorch-autograd ELM / Branch-ELM, written from docs/spec.md §1–§4, as a benchmark baseline.

It walks time step by step and lets autograd record every small operation, the
way the official release does, so its timings stand for "the release on this
machine" and its numbers are an independent check of elmcore's hand-derived
backward. PyTorch is not an elmcore dependency: this module imports without it,
and ``torch_available()`` says whether the baseline can run.

Typical use (the lead's benchmark script)::

    model = TorchELM(cfg_dict, "elm_v1", elm.state_dict())
    loss_fn = neuronio_loss_fn(spike_target, soma_target)
    seconds = time_training_step(model, X, loss_fn, steps=5, warmup=2)
"""

import math
import time

import numpy as np

from elmcore.engine.fields import ACTIVATIONS
from elmcore.errors import ConfigError, DataError, ELMError

VERSIONS = ("elm_v1", "branch_elm_v2")

# docs/spec.md §1 defaults; None means "derived from another field".
CONFIG_DEFAULTS = {
    "num_memory": 100,
    "lambda_value": 5.0,
    "mlp_num_layers": 1,
    "mlp_hidden_size": None,
    "mlp_activation": "relu",
    "tau_s_value": 5.0,
    "tau_b_value": 5.0,
    "memory_tau_min": 1.0,
    "memory_tau_max": 1000.0,
    "learn_memory_tau": False,
    "w_s_value": 0.5,
    "num_branch": None,
    "num_synapse_per_branch": 1,
    "input_to_synapse_routing": None,
    "delta_t": 1.0,
}
REQUIRED_FIELDS = ("num_input", "num_output")
ROUTING_KEYS = ("input_to_synapse_indices", "valid_indices_mask")

TAU_FLOOR = 1e-6          # κ = exp(−Δt / max(τ, TAU_FLOOR))
V2_MIN_TAU_SPAN = 3e-6    # v2 widens a degenerate τ_m range by this much
PHI_SCALE = 1.7159        # φ(x) = PHI_SCALE · tanh(PHI_SLOPE · x)
PHI_SLOPE = 2.0 / 3.0


def torch_available():
    """True when PyTorch can be imported (the baseline needs it, elmcore does not)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch():
    try:
        import torch
    except ImportError:
        raise ELMError("the PyTorch baseline needs PyTorch, which is not installed "
                       "(it is not an elmcore dependency)") from None
    return torch


def torch_activation(torch, name):
    """PyTorch's own function called ``name`` (torch.relu, torch.nn.functional.silu, torch.tanh, ...):
    the baselines use PyTorch's implementation of each MLP activation elmcore accepts."""
    function = getattr(torch, name, None)
    if not callable(function):
        function = getattr(torch.nn.functional, name, None)
    if not callable(function):
        raise ConfigError("mlp_activation", f"PyTorch has no function {name!r}")
    return function


def resolve_config(config_dict, version):
    """The §1 fields of ``config_dict`` with defaults filled in; raises ConfigError on unknown fields."""
    if version not in VERSIONS:
        raise ConfigError("version", f"must be one of {', '.join(VERSIONS)}, got {version!r}")
    if not isinstance(config_dict, dict):
        raise ELMError(f"a model config must be a dict, got {type(config_dict).__name__}")
    cfg = dict(CONFIG_DEFAULTS)
    for key, value in config_dict.items():
        if key == "version":
            if value != version:
                raise ConfigError("version", f"config says {value!r} but {version!r} was requested")
            continue
        if key not in cfg and key not in REQUIRED_FIELDS:
            raise ConfigError(key, "unknown field")
        cfg[key] = value
    for key in REQUIRED_FIELDS:
        if key not in cfg:
            raise ConfigError(key, "is required")
    if isinstance(cfg["input_to_synapse_routing"], str) and \
            cfg["input_to_synapse_routing"].lower() in ("none", "null", ""):
        cfg["input_to_synapse_routing"] = None
    if cfg["mlp_activation"] not in ACTIVATIONS:
        raise ConfigError("mlp_activation", f"must be one of {', '.join(ACTIVATIONS)}, got {cfg['mlp_activation']!r}")
    if cfg["input_to_synapse_routing"] not in (None, "random_routing", "neuronio_routing"):
        raise ConfigError("input_to_synapse_routing",
                          f"must be null, random_routing or neuronio_routing, got "
                          f"{cfg['input_to_synapse_routing']!r}")
    cfg["version"] = version
    cfg["num_branch"] = cfg["num_branch"] or cfg["num_input"]
    cfg["mlp_hidden_size"] = cfg["mlp_hidden_size"] or 2 * cfg["num_memory"]
    cfg["num_synapse"] = cfg["num_branch"] * cfg["num_synapse_per_branch"]
    if cfg["input_to_synapse_routing"] is None and cfg["num_synapse"] != cfg["num_input"]:
        raise ConfigError("num_synapse_per_branch",
                          f"without routing num_branch*num_synapse_per_branch = {cfg['num_synapse']} "
                          f"must equal num_input = {cfg['num_input']}")
    if version == "branch_elm_v2":
        cfg["memory_tau_max"] = max(cfg["memory_tau_min"] + V2_MIN_TAU_SPAN, cfg["memory_tau_max"])
    return cfg


def _build_module_class():
    """Define the nn.Module subclass only once torch is importable."""
    torch = _torch()
    nn = torch.nn

    class Activation(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.function = name, torch_activation(torch, name)

        def forward(self, a):
            return self.function(a)

    class MLP(nn.Module):
        """Release layout: ``network`` = Linear, act, …, Linear, so keys read ``mlp.network.{2l}``."""

        def __init__(self, in_size, hidden, out_size, num_layers, activation):
            super().__init__()
            layers, width = [], in_size
            for _ in range(num_layers):
                layers += [nn.Linear(width, hidden), Activation(activation)]
                width = hidden
            layers.append(nn.Linear(width, out_size))
            self.network = nn.Sequential(*layers)

        def forward(self, a):
            return self.network(a)

    class TorchELMModule(nn.Module):
        def __init__(self, config_dict, version, params, dtype=torch.float32, device="cpu"):
            super().__init__()
            cfg = resolve_config(config_dict, version)
            self.cfg = cfg
            self.is_v2 = version == "branch_elm_v2"
            d_m, n_b, n_s = cfg["num_memory"], cfg["num_branch"], cfg["num_synapse"]
            self.mlp = MLP(n_b + d_m, cfg["mlp_hidden_size"], d_m, cfg["mlp_num_layers"], cfg["mlp_activation"])
            self.w_y = nn.Linear(d_m, cfg["num_output"])
            self._proto_w_s = nn.Parameter(torch.empty(n_s))
            self._proto_tau_m = nn.Parameter(torch.empty(d_m), requires_grad=bool(cfg["learn_memory_tau"]))
            self.input_tau_key = "tau_b" if self.is_v2 else "tau_s"
            self.register_buffer(self.input_tau_key, torch.empty(n_b if self.is_v2 else n_s))
            self.routed = cfg["input_to_synapse_routing"] is not None
            if self.routed:
                self.register_buffer("input_to_synapse_indices", torch.empty(n_s, dtype=torch.int64))
                self.register_buffer("valid_indices_mask", torch.empty(n_s))
            # Convert before loading, so float64 parameters never pass through float32.
            # Module.to(dtype) converts only floating tensors: the routing indices stay int64.
            self.to(dtype=dtype, device=device)
            self._load_release_params(params)

        def _load_release_params(self, params):
            own = self.state_dict()
            for key, slot in own.items():
                value = params.get(key)
                if value is None:
                    raise ELMError(f"parameters: missing '{key}' (expected shape {tuple(slot.shape)})")
                arr = np.asarray(value)
                if arr.shape != tuple(slot.shape):
                    raise ELMError(f"parameters: '{key}' has shape {arr.shape}, the config needs "
                                   f"{tuple(slot.shape)}")
                if key == "input_to_synapse_indices":
                    out_of_range = arr.size and (arr.min() < 0 or arr.max() >= self.cfg["num_input"])
                    if arr.dtype.kind not in "iu" or out_of_range:
                        raise ELMError(f"parameters: '{key}' must hold integers in [0, {self.cfg['num_input']})")
                elif not np.all(np.isfinite(arr.astype(np.float64))):
                    raise ELMError(f"parameters: '{key}' holds NaN or infinite values")
            for key, value in params.items():
                # Golden files store absent routing as empty arrays.
                if key not in own and np.asarray(value).size:
                    raise ELMError(f"parameters: unexpected '{key}' for this config")
            with torch.no_grad():
                for key, slot in own.items():
                    source = np.asarray(params[key]).astype(
                        np.int64 if key == "input_to_synapse_indices" else np.float64)
                    slot.copy_(torch.as_tensor(source, device=slot.device))

        # ---- §2 transforms ------------------------------------------------
        def _decay(self, tau):
            return torch.exp(-self.cfg["delta_t"] / torch.clamp(tau, min=TAU_FLOOR))

        def _tau_m(self):
            lo, hi = self.cfg["memory_tau_min"], self.cfg["memory_tau_max"]
            return (hi - lo) * torch.sigmoid(self._proto_tau_m) + lo

        # ---- §4 dynamics ----------------------------------------------------
        def forward(self, X):
            cfg = self.cfg
            if X.dim() != 3 or X.shape[2] != cfg["num_input"] or X.shape[0] < 1 or X.shape[1] < 1:
                raise DataError(f"input must have shape (batch, time, {cfg['num_input']}), got {tuple(X.shape)}")
            B, T, _ = X.shape
            n_b, d_m = cfg["num_branch"], cfg["num_memory"]
            w_s = torch.relu(self._proto_w_s)
            tau_m = self._tau_m()
            kappa_m = self._decay(tau_m)
            kappa_in = self._decay(getattr(self, self.input_tau_key))
            if self.is_v2:
                memory_gain = 1 - torch.exp(-cfg["delta_t"] * cfg["lambda_value"] / torch.clamp(tau_m, min=TAU_FLOOR))
            else:
                memory_gain = cfg["lambda_value"] * (1 - kappa_m)
            if self.routed:
                X = torch.index_select(X, 2, self.input_to_synapse_indices) * self.valid_indices_mask
            trace = X.new_zeros(B, n_b if self.is_v2 else cfg["num_synapse"])
            m = X.new_zeros(B, d_m)
            outputs = []
            for t in range(T):
                x_t = X[:, t]
                if self.is_v2:
                    trace = kappa_in * trace + (w_s * x_t).view(B, n_b, -1).sum(-1)
                    branch_input = trace
                else:
                    trace = kappa_in * trace + w_s * x_t
                    branch_input = trace.view(B, n_b, -1).sum(-1)
                decayed = kappa_m * m
                delta_m = PHI_SCALE * torch.tanh(PHI_SLOPE * self.mlp(torch.cat([branch_input, decayed], dim=-1)))
                m = decayed + memory_gain * delta_m
                outputs.append(self.w_y(m))
            return torch.stack(outputs, dim=1)

    return TorchELMModule


_MODULE_CLASS = None


def TorchELM(config_dict, version, params, dtype=None, device="cpu"):
    """An ``nn.Module`` ELM (``elm_v1``) or Branch-ELM (``branch_elm_v2``) with release parameters.

    Parameters
    ----------
    config_dict : dict
        docs/spec.md §1 fields (release names); missing ones take the spec defaults.
    version : str
        ``elm_v1`` or ``branch_elm_v2``.
    params : dict of str to np.ndarray
        A release state_dict (e.g. ``elmcore.ELM.state_dict()`` or a golden file's
        ``param/*`` arrays); routing keys may be empty arrays when there is no routing.
    dtype : torch.dtype, optional
        Parameter and compute dtype (default ``torch.float32``).
    device : str
        A torch device.

    Returns
    -------
    torch.nn.Module
        ``forward(X)`` maps a (B, T, num_input) tensor to (B, T, num_output).
    """
    global _MODULE_CLASS
    torch = _torch()
    if _MODULE_CLASS is None:
        _MODULE_CLASS = _build_module_class()
    return _MODULE_CLASS(config_dict, version, params, dtype=torch.float32 if dtype is None else dtype,
                         device=device)


# ---- losses of the release's task heads (docs/spec.md §5) -------------------------

def neuronio_loss_fn(spike_target, soma_target):
    """``Y -> 0.5·BCEWithLogits(Y[...,0], spike) + 0.5·MSE(Y[...,1], soma)``."""
    torch = _torch()
    F = torch.nn.functional
    cached = {}

    def loss_fn(Y):
        if "t" not in cached:
            cached["t"] = (torch.as_tensor(spike_target, dtype=Y.dtype, device=Y.device),
                           torch.as_tensor(soma_target, dtype=Y.dtype, device=Y.device))
        spike, soma = cached["t"]
        return 0.5 * F.binary_cross_entropy_with_logits(Y[..., 0], spike) + 0.5 * F.mse_loss(Y[..., 1], soma)
    return loss_fn


def last_step_cross_entropy_fn(labels):
    """``Y -> cross_entropy(Y[:, -1], labels)`` (SHD, SHD-Adding, LRA heads)."""
    torch = _torch()
    F = torch.nn.functional
    cached = {}

    def loss_fn(Y):
        if "labels" not in cached:
            cached["labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=Y.device)
        return F.cross_entropy(Y[:, -1], cached["labels"])
    return loss_fn


# ---- timing helpers -------------------------------------------------------------

def _as_input(model, X):
    torch = _torch()
    ref = next(model.parameters())
    return torch.as_tensor(X, dtype=ref.dtype, device=ref.device)


def _synchronize(X):
    torch = _torch()
    if X.device.type == "cuda":
        torch.cuda.synchronize(X.device)


def time_training_step(model, X, target_fn, steps, warmup, lr=1e-3):
    """Seconds of each of ``steps`` training steps (forward, loss, backward, Adam step).

    ``target_fn(Y)`` returns the scalar loss for outputs Y (see ``neuronio_loss_fn``,
    ``last_step_cross_entropy_fn``). ``warmup`` untimed steps run first. Uses
    PyTorch's default thread count. The model's parameters are trained in place.
    """
    torch = _torch()
    _check_counts(steps, warmup)
    X = _as_input(model, X)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    seconds = []
    for i in range(warmup + steps):
        _synchronize(X)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = target_fn(model(X))
        loss.backward()
        optimizer.step()
        _synchronize(X)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
        loss_value = loss.detach().item()
        if not math.isfinite(loss_value):
            raise ELMError(f"training step {i}: the loss is not finite ({loss_value})")
    return seconds


def time_inference(model, X, steps, warmup):
    """Seconds of each of ``steps`` forward passes without autograd, after ``warmup`` untimed ones."""
    torch = _torch()
    _check_counts(steps, warmup)
    X = _as_input(model, X)
    model.eval()
    seconds = []
    with torch.no_grad():
        for i in range(warmup + steps):
            _synchronize(X)
            start = time.perf_counter()
            model(X)
            _synchronize(X)
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    return seconds


def _check_counts(steps, warmup):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ELMError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ELMError(f"warmup must be an integer >= 0, got {warmup!r}")
