"""The kernels' pointwise math, written once: the MLP activations with their slopes, and φ with φ′.

Every kernel module evaluates these through this file, each function in two forms, forward beside
its derivative: a CPU form for the Numba ``@njit`` kernels (inlined, straight-line arithmetic that
LLVM vectorises, in the precision of its arguments; exp and tanh come from ``vecmath``), and a CUDA
device form built per float type by ``cuda_functions`` (its constants have that type, so float32
kernels stay float32). The derivations are in docs/gradients.md §3 (c) and (d).

The activation reaches the kernels as an integer code from ``ACTIVATION_CODES``, never by name; the
configs accept exactly the names of that table (``ACTIVATIONS``). Adding an activation touches
this file only (its code, its CPU and CUDA forms and a branch in each dispatcher below), plus its
reference in tests/test_pointwise.py and the docs. A code without a branch yields NaN, never
another activation's values.
"""

import functools
import math
import types

import numpy as np
from numba import njit

from ..errors import ELMError
from . import vecmath as vm

ACT_RELU = 0
ACT_SILU = 1
ACT_TANH = 2
# mlp_activation name -> the code the kernels take.
ACTIVATION_CODES = {"relu": ACT_RELU, "silu": ACT_SILU, "tanh": ACT_TANH}
ACTIVATIONS = tuple(ACTIVATION_CODES)


def activation_code(name):
    """The kernels' code for the activation called ``name`` in a config."""
    try:
        return ACTIVATION_CODES[name]
    except KeyError:
        raise ELMError(f"unknown MLP activation {name!r}: one of {', '.join(ACTIVATIONS)}") from None


_INLINE = dict(inline="always", cache=True, error_model="numpy", fastmath={"contract"})


# ---- CPU forms ------------------------------------------------------------------------------
#
# Per activation: the forward and, from the stored pre-activation z, the pair (act(z), da·act′(z))
# the backward walk needs (it writes act(z) for the weight gradients while it has what act′ shares).

@njit(**_INLINE)
def relu(z):
    return max(z, 0)


@njit(**_INLINE)
def relu_backward(z, da):
    """(relu(z), da·relu′(z)); relu′(0) = 0, as torch's threshold_backward."""
    return max(z, 0), (da if z > 0 else 0)


@njit(**_INLINE)
def silu(z):
    return vm.silu(z)


@njit(**_INLINE)
def silu_backward(z, da):
    """(silu(z), da·silu′(z)) with silu′(z) = σ(z)(1 + z(1 − σ(z))): one σ serves both."""
    a, slope = vm.silu_with_slope(z)
    return a, da * slope


@njit(**_INLINE)
def tanh(z):
    return vm.tanh(z)


@njit(**_INLINE)
def tanh_backward(z, da):
    """(tanh(z), da·tanh′(z)) with tanh′(z) = 1 − tanh²(z): one tanh serves both."""
    a = vm.tanh(z)
    return a, da * (vm.one(a) - a * a)


@njit(**_INLINE)
def activate_all(z, a, count, activation):
    """a[x] = act(z[x]) for x < count (z, a 1-D).

    The code is tested outside the loops, so that each loop vectorises.
    """
    if activation == ACT_RELU:
        for x in range(count):
            a[x] = relu(z[x])
    elif activation == ACT_SILU:
        for x in range(count):
            a[x] = silu(z[x])
    elif activation == ACT_TANH:
        for x in range(count):
            a[x] = tanh(z[x])
    else:
        for x in range(count):
            a[x] = np.nan


@njit(**_INLINE)
def activation_backward_all(z, da, dz, a, count, activation):
    """dz[x] = da[x]·act′(z[x]) and a[x] = act(z[x]) for x < count (all 1-D; dz may be da)."""
    if activation == ACT_RELU:
        for x in range(count):
            a[x], dz[x] = relu_backward(z[x], da[x])
    elif activation == ACT_SILU:
        for x in range(count):
            a[x], dz[x] = silu_backward(z[x], da[x])
    elif activation == ACT_TANH:
        for x in range(count):
            a[x], dz[x] = tanh_backward(z[x], da[x])
    else:
        for x in range(count):
            a[x] = np.nan
            dz[x] = np.nan


@njit(**_INLINE)
def phi(x, phi_scale, phi_slope):
    """Δm = φ(x) = s·tanh(k·x), s = phi_scale, k = phi_slope."""
    return phi_scale * vm.tanh(phi_slope * x)


@njit(**_INLINE)
def phi_backward(g, dm, phi_scale, phi_slope):
    """g·φ′(x) from the stored Δm = φ(x): φ′(x) = s·k·(1 − tanh²(k·x)) = s·k·(1 − (Δm/s)²)."""
    q = dm / phi_scale
    return g * (phi_scale * phi_slope) * (vm.one(q) - q * q)


# ---- NumPy forms (the plain reference walk, elmcore.verification.reference) -------------------
#
# Per activation: act(z) and act′(z) over whole arrays, from the pre-activation z (silu is not
# injective, so act′ cannot be read from act(z)). The same formulas as the CPU forms above.

def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _silu_slope(z):
    s = _sigmoid(z)
    return s * (1 + z * (1 - s))


NUMPY_FORMS = {
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype)),  # relu′(0) = 0
    "silu": (lambda z: z * _sigmoid(z), _silu_slope),
    "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
}


def numpy_forms(name):
    """(act, act′) of the activation called ``name``, as NumPy functions of whole arrays."""
    activation_code(name)  # one message for an unknown name
    return NUMPY_FORMS[name]


# ---- CUDA device forms ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cuda_functions(np_dtype):
    """The device forms for one float type (float32 or float64), as attributes of a namespace:
    activate(z, activation), activation_slope(z, activation), phi(x, phi_scale, phi_slope) and
    phi_backward(g, dm, phi_scale, phi_slope), with the CPU forms' meaning."""
    from numba import cuda  # numba-cuda is optional: imported when a CUDA kernel is built

    ZERO, ONE, NAN = np_dtype(0), np_dtype(1), np_dtype(np.nan)

    @cuda.jit(device=True)
    def relu_device(z):
        return z if z > ZERO else ZERO

    @cuda.jit(device=True)
    def relu_slope_device(z):
        return ONE if z > ZERO else ZERO

    @cuda.jit(device=True)
    def silu_device(z):
        return z / (ONE + math.exp(-z))

    @cuda.jit(device=True)
    def silu_slope_device(z):
        s = ONE / (ONE + math.exp(-z))
        return s * (ONE + z * (ONE - s))

    @cuda.jit(device=True)
    def tanh_device(z):
        return math.tanh(z)

    @cuda.jit(device=True)
    def tanh_slope_device(z):
        a = math.tanh(z)
        return ONE - a * a

    @cuda.jit(device=True)
    def activate(z, activation):
        if activation == ACT_RELU:
            return relu_device(z)
        if activation == ACT_SILU:
            return silu_device(z)
        if activation == ACT_TANH:
            return tanh_device(z)
        return NAN

    @cuda.jit(device=True)
    def activation_slope(z, activation):
        if activation == ACT_RELU:
            return relu_slope_device(z)
        if activation == ACT_SILU:
            return silu_slope_device(z)
        if activation == ACT_TANH:
            return tanh_slope_device(z)
        return NAN

    @cuda.jit(device=True)
    def phi_device(x, phi_scale, phi_slope):
        return phi_scale * math.tanh(phi_slope * x)

    @cuda.jit(device=True, inline=True)
    def phi_backward_device(g, dm, phi_scale, phi_slope):
        q = dm / phi_scale
        return g * (phi_scale * phi_slope) * (ONE - q * q)

    return types.SimpleNamespace(activate=activate, activation_slope=activation_slope, phi=phi_device,
                                 phi_backward=phi_backward_device)
