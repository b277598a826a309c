"""The pieces both model families share, each with its derivative next to it.

Everything here works elementwise on NumPy arrays of any shape. The conventions at the
kinks are the release's (docs/gradients.md "Conventions at the kinks"): relu'(0) = 0, and
no gradient passes the floor of max(τ, 1e-6).
"""

import numpy as np

from elmcore.errors import ELMError

from elmcore.engine.time_constants import TAU_FLOOR
from elmcore.kernels.pointwise import numpy_forms
from elmcore.neuron.params import PHI_SCALE, PHI_SLOPE


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# ---- φ, the "custom tanh" of the memory update ------------------------------------------

def phi(o):
    """Δm = φ(o) = s·tanh(k·o), s = 1.7159, k = 2/3."""
    return PHI_SCALE * np.tanh(PHI_SLOPE * o)


def phi_slope_from_output(dm):
    """φ'(o) = s·k·(1 − tanh²(k·o)) = s·k·(1 − (Δm/s)²), read from the stored Δm = φ(o)."""
    q = dm / PHI_SCALE
    return PHI_SCALE * PHI_SLOPE * (1 - q * q)


# ---- the MLP's activation ----------------------------------------------------------------

def activate(z, name):
    """act(z): the NumPy form of kernels/pointwise.py, where every activation is written once."""
    return numpy_forms(name)[0](z)


def activation_slope(z, name):
    """act'(z), from the pre-activation z (silu is not injective, so a = act(z) would not do)."""
    return numpy_forms(name)[1](z)


# ---- time constants (docs/spec.md §2 transforms, docs/gradients.md §5) --------------------

def decay(tau, delta_t):
    """κ = exp(−Δt / max(τ, 1e-6))."""
    return np.exp(-delta_t / np.maximum(tau, TAU_FLOOR))


def memory_constants(config, proto_tau_m, version_1):
    """τ_m, κ_m, κ_λ (None in v1) and the write gain c_m from _proto_tau_m (any shape)."""
    span = config.effective_tau_max - config.memory_tau_min
    tau_m = span * sigmoid(proto_tau_m) + config.memory_tau_min       # τ_m = span·σ(p) + τ_min
    kappa_m = decay(tau_m, config.delta_t)                             # κ_m = exp(−Δt / max(τ_m, 1e-6))
    if version_1:
        kappa_lambda = None
        c_m = config.lambda_value * (1 - kappa_m)                      # v1: c_m = λ(1 − κ_m)
    else:
        # v2: κ_λ = exp(−Δt·λ / max(τ_m, 1e-6)), c_m = 1 − κ_λ
        kappa_lambda = np.exp(-config.delta_t * config.lambda_value / np.maximum(tau_m, TAU_FLOOR))
        c_m = 1 - kappa_lambda
    return dict(tau_m=tau_m, kappa_m=kappa_m, kappa_lambda=kappa_lambda, c_m=c_m)


def proto_tau_m_grad(config, proto_tau_m, constants, g_kappa, g_c, version_1):
    """§5: chain ∂loss/∂κ_m (explicit uses, ``g_kappa``) and ∂loss/∂c_m (``g_c``) down to _proto_tau_m."""
    dt, lam = config.delta_t, config.lambda_value
    tau, kappa_m = constants["tau_m"], constants["kappa_m"]
    live = (tau >= TAU_FLOOR).astype(tau.dtype)                       # no gradient below the floor
    dkappa_dtau = kappa_m * dt / (tau * tau) * live                   # dκ_m/dτ_m = κ_m·Δt/τ_m²
    if version_1:
        dc_dtau = -lam * dkappa_dtau                                  # v1: ∂c_m/∂κ_m = −λ
    else:
        dc_dtau = -constants["kappa_lambda"] * dt * lam / (tau * tau) * live   # v2: ∂c_m/∂τ_m = −κ_λ·Δt·λ/τ_m²
    g_tau = g_kappa * dkappa_dtau + g_c * dc_dtau
    span = config.effective_tau_max - config.memory_tau_min
    sig = sigmoid(proto_tau_m)
    return g_tau * span * sig * (1 - sig)                             # dτ_m/dp = span·σ(p)(1 − σ(p))


# ---- the state before step 0 ----------------------------------------------------------------

def check_inputs(config, X, dtype):
    """X [B,T,num_input] as ``dtype``; one message for either family."""
    X = np.asarray(X)
    if X.ndim != 3 or X.shape[2] != config.num_input:
        raise ELMError(f"X must have shape (batch, time, {config.num_input}), got {X.shape}")
    return X.astype(dtype)


def check_output_grad(config, dY, X):
    """dY = ∂loss/∂Y checked against the shape of Y for inputs ``X``, as X's dtype."""
    B, T, _ = X.shape
    dY = np.asarray(dY, dtype=X.dtype)
    if dY.shape != (B, T, config.num_output):
        raise ELMError(f"dY must have shape {(B, T, config.num_output)}, got {dY.shape}")
    return dY


def check_state(state, expected):
    """``state`` checked against ``expected`` (the zero state: its keys, shapes and dtype); the zero state when None."""
    if state is None:
        return expected
    if not isinstance(state, dict) or set(state) != set(expected):
        raise ELMError(f"the initial state must be a dict with the keys {sorted(expected)}")
    out = {}
    for key, zero in expected.items():
        arr = np.asarray(state[key], dtype=zero.dtype)
        if arr.shape != zero.shape:
            raise ELMError(f"initial state '{key}' must have shape {zero.shape}, got {arr.shape}")
        out[key] = arr
    return out
