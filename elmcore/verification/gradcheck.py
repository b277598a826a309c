"""Analytic gradients against central finite differences, in float64."""

from typing import NamedTuple

import numpy as np

from elmcore.neuron import params as P
from elmcore.neuron.config import ELMConfig
from elmcore.engine.factory import build_model, is_network


# `elm gradcheck --version elm_network` without --config: two stacked layers with every
# kind of synapse, a hidden SiLU layer and learned τ_m, small enough for finite differences.
DEFAULT_NETWORK_CONFIG = {
    "version": "elm_network", "num_input": 4, "num_output": 2, "num_neurons": 3, "num_layers": 2,
    "num_memory": 3, "mlp_num_layers": 1, "mlp_hidden_size": 4, "mlp_activation": "silu", "num_branch": 2,
    "num_synapse_per_branch": 2, "recurrent_fraction": 0.5, "learn_memory_tau": True, "memory_tau_max": 50.0,
}


def random_network_test_params(cfg, rng):
    """Network parameters away from the initialisation's symmetries: every neuron gets its
    own τ_m and τ_b, and w_s is widened so the recurrent path carries real gradient."""
    from elmcore.network import params as NP
    p = NP.init_params(cfg, seed=int(rng.integers(1 << 31)), dtype=np.float64)
    for layer in range(cfg.num_layers):
        pre = NP.layer_prefix(layer)
        p[pre + "w_s"] = rng.uniform(-1.0, 1.0, p[pre + "w_s"].shape)
        p[pre + "tau_b"] = rng.uniform(1.5, 8.0, p[pre + "tau_b"].shape)
        p[pre + "_proto_tau_m"] = p[pre + "_proto_tau_m"] + rng.normal(0, 0.3, p[pre + "_proto_tau_m"].shape)
    return p


class GradcheckRow(NamedTuple):
    """One tensor's comparison of analytic and central-difference gradients."""
    name: str
    shape: tuple
    entries: int          # entries checked (all of them when the tensor is small)
    max_abs_diff: float   # max |analytic − numeric|
    max_numeric: float    # max |numeric|: the tensor's gradient scale
    relative: float       # max_abs_diff / max_numeric
    noise: float          # rounding bound of the difference quotient itself


def random_test_params(cfg: ELMConfig, rng, nonuniform_tau_s=False):
    """Parameters away from the initialisation's symmetries and from relu's kink.

    Some _proto_w_s are negative (dead synapses: zero gradient on both sides of
    the difference); live ones stay ≥ 0.1 so ±eps never crosses 0.
    """
    p = P.init_params(cfg, seed=int(rng.integers(1 << 31)), dtype=np.float64)
    w = rng.uniform(0.1, 1.0, cfg.num_synapse)
    w[rng.random(cfg.num_synapse) < 0.15] *= -1
    p["_proto_w_s"] = w
    p["_proto_tau_m"] = p["_proto_tau_m"] + rng.normal(0, 0.3, cfg.num_memory)
    key = P.input_tau_key(cfg)
    if nonuniform_tau_s and not cfg.is_v2:
        p[key] = rng.uniform(1.5, 8.0, p[key].shape)
    elif cfg.is_v2:
        p[key] = rng.uniform(1.5, 8.0, p[key].shape)
    return p


def random_initial_state(model, batch, rng):
    """A non-zero state of every entry ``init_state`` has, as a stream's earlier windows would leave it."""
    return {key: rng.normal(0, 0.5, value.shape) for key, value in model.init_state(batch).items()}


def gradcheck(cfg: ELMConfig, params=None, batch=2, steps=5, seed=0, eps=1e-6, max_entries=12,
              input_grad=True, initial_state=False, model_kwargs=None):
    """Compare ``backward`` with central differences of loss = Σ Y ⊙ G.

    Checks up to ``max_entries`` random entries of each trainable tensor (all
    of them when it is smaller) and of X. Returns one :class:`GradcheckRow` per tensor.
    With ``initial_state`` the forward starts from a random non-zero state (as in
    stateful training, where it is a constant: no gradient flows into it).
    ``model_kwargs`` go to ``build_model`` (a ``device``, say).

    ``noise`` bounds the rounding error of the difference quotient itself,
    4·ε·Σ|Y ⊙ G| / eps (each loss evaluation carries a few
    ULPs of Σ|Y ⊙ G|): a tensor whose gradients are smaller than that cannot
    be resolved by finite differences, so it passes when its absolute error
    stays below it (see ``passes``).
    """
    rng = np.random.default_rng(seed)
    if params is None:
        params = random_network_test_params(cfg, rng) if is_network(cfg) else random_test_params(cfg, rng)
    model = build_model(cfg, params=params, dtype="float64", **(model_kwargs or {}))
    host = model.backend.to_host
    X = rng.normal(0, 1, (batch, steps, cfg.num_input))
    X[rng.random(X.shape) < 0.3] = 0  # exercise the sparse routing path
    G = rng.normal(0, 1, (batch, steps, cfg.num_output))
    state = None
    if initial_state:
        state = {k: model.xp.asarray(v) for k, v in random_initial_state(model, batch, rng).items()}
    Y, cache = model.forward(X, return_cache=True, state=state)
    Y = host(Y)
    noise = 4 * np.finfo(np.float64).eps * float(np.abs(Y * G).sum()) / eps
    grads = {k: host(v) for k, v in model.backward(model.xp.asarray(G), cache, input_grad=input_grad).items()}

    def loss():
        return float((host(model.forward(model.xp.asarray(X), state=state)) * G).sum())

    rows = []
    targets = [(k, model.params[k]) for k in model.trainable_keys]
    if input_grad:
        targets.append(("X", X))
    for name, arr in targets:
        flat = arr.reshape(-1)
        picks = np.arange(flat.size) if flat.size <= max_entries else \
            rng.choice(flat.size, max_entries, replace=False)
        analytic = grads[name].reshape(-1)[picks]
        numeric = np.empty(len(picks))
        for n, i in enumerate(picks):
            keep = flat[i]
            flat[i] = keep + eps
            up = loss()
            flat[i] = keep - eps
            down = loss()
            flat[i] = keep
            numeric[n] = (up - down) / (2 * eps)
        diff = float(np.abs(analytic - numeric).max())
        scale = float(np.abs(numeric).max())
        rows.append(GradcheckRow(name, tuple(arr.shape), len(picks), diff, scale, diff / max(scale, 1e-300), noise))
    return rows


def passes(row: GradcheckRow, tolerance=1e-6):
    """Within ``tolerance`` relative to the tensor's gradient scale, plus the difference quotient's noise."""
    return row.max_abs_diff <= tolerance * row.max_numeric + row.noise
