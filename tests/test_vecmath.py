"""The vectorisable transcendental functions used inside the recurrence kernels."""

import numpy as np
import pytest
from numba import njit

from elmcore.kernels import vecmath as vm


@njit
def _apply(fn_id, x, out):
    for i in range(x.size):
        if fn_id == 0:
            out[i] = vm.exp64(x[i])
        elif fn_id == 1:
            out[i] = vm.tanh(x[i])
        else:
            out[i] = vm.silu(x[i])


def _run(fn_id, x):
    out = np.empty_like(x)
    _apply(fn_id, x, out)
    return out


def test_exp_within_two_ulp_of_libm():
    x = np.concatenate([np.linspace(-700, 700, 200001), np.random.default_rng(0).normal(0, 3, 100000),
                        [0.0, -0.0, 1e-300, -1e-300, 0.5 * np.log(2), -0.5 * np.log(2)]])
    got, ref = _run(0, x), np.exp(x)
    ulps = np.abs(got - ref) / np.spacing(ref)
    assert ulps.max() <= 2, ulps.max()


def test_exp_clamps_instead_of_overflowing():
    got = _run(0, np.array([-1e6, 1e6, -800.0]))
    assert np.all(np.isfinite(got)) and got[0] < 1e-300 and got[1] > 1e300


def test_tanh_and_silu_against_numpy():
    x = np.concatenate([np.linspace(-40, 40, 100001), [0.0, 1e-12, -1e-12, 400.0, -400.0]])
    assert np.abs(_run(1, x) - np.tanh(x)).max() < 4e-16
    sig = 1 / (1 + np.exp(-x))
    assert np.abs(_run(2, x) - x * sig).max() <= 4e-16 * np.abs(x * sig).max() + 1e-300
    assert _run(1, np.array([1e-12]))[0] > 0 and _run(1, np.array([-1e-12]))[0] < 0


# ---- the float32 forms ------------------------------------------------------------------------

@njit
def _apply_any(fn_id, x, out):
    """The precision-dispatching names, in the argument's precision."""
    for i in range(x.size):
        if fn_id == 0:
            out[i] = vm.exp(x[i])
        elif fn_id == 1:
            out[i] = vm.tanh(x[i])
        elif fn_id == 2:
            out[i] = vm.sigmoid(x[i])
        elif fn_id == 3:
            out[i] = vm.silu(x[i])
        else:
            out[i] = vm.silu_with_slope(x[i])[1]


def _float32_ulps(got, ref):
    """|got − ref| in units of the float32 spacing at ref (ref in float64)."""
    spacing = np.spacing(np.maximum(np.abs(ref), np.finfo(np.float32).tiny).astype(np.float32))
    return np.abs(got.astype(np.float64) - ref) / spacing.astype(np.float64)


X32 = np.concatenate([np.linspace(-20, 20, 400001), np.random.default_rng(3).normal(0, 3, 100000),
                      [0.0, 1e-7, -1e-7, 1e-30, -1e-30, 0.3466, -0.3466, 0.625]]).astype(np.float32)


def _sigmoid64(x):
    return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("fn_id, reference, max_ulps", [
    (0, np.exp, 1),
    (1, np.tanh, 3),
    (2, _sigmoid64, 3),
    (3, lambda x: x * _sigmoid64(x), 3),
])
def test_float32_forms_within_a_few_float32_ulp(fn_id, reference, max_ulps):
    x = np.clip(X32, -80, 80) if fn_id == 0 else X32
    out = np.empty_like(x)
    _apply_any(fn_id, x, out)
    assert out.dtype == np.float32
    ulps = _float32_ulps(out, reference(x.astype(np.float64)))
    assert ulps.max() <= max_ulps, (ulps.max(), x[ulps.argmax()])


def test_float32_silu_slope_within_float32_rounding_of_float64():
    out = np.empty_like(X32)
    _apply_any(4, X32, out)
    x = X32.astype(np.float64)
    ref = _sigmoid64(x) * (1 + x * (1 - _sigmoid64(x)))
    # silu′ crosses zero near −1.28, where no precision keeps relative accuracy, and 1 − σ(x)
    # holds float32's absolute rounding of σ, which x multiplies: the bound grows with |x|.
    assert np.all(np.abs(out - ref) <= 4 * np.finfo(np.float32).eps * np.maximum(1, np.abs(x)))


def test_float32_tanh_keeps_its_sign_and_saturates():
    x = np.array([1e-30, -1e-30, 1e-7, -1e-7, 50, -50, 1e30, -1e30], np.float32)
    out = np.empty_like(x)
    _apply_any(1, x, out)
    assert np.array_equal(np.sign(out), np.sign(x))
    assert np.array_equal(out[4:], np.array([1, -1, 1, -1], np.float32))
    assert np.all(np.abs(out[:4] - x[:4]) <= np.spacing(np.abs(x[:4])))  # tanh(y) = y to float32 precision


def test_float32_exp_clamps_instead_of_overflowing():
    out = np.empty(3, np.float32)
    _apply_any(0, np.array([-1e6, 1e6, 88.0], np.float32), out)
    assert np.all(np.isfinite(out)) and out[0] < 1e-37 and out[1] > 1e38


@njit
def _float64_forms(fn_id, x, out):
    for i in range(x.size):
        if fn_id == 0:
            out[i] = vm.exp64(x[i])
        elif fn_id == 1:
            out[i] = vm._tanh64(x[i])
        elif fn_id == 2:
            out[i] = vm._sigmoid64(x[i])
        else:
            out[i] = x[i] * vm._sigmoid64(x[i])


@pytest.mark.parametrize("fn_id", [0, 1, 2, 3])
def test_float64_arguments_take_the_float64_forms(fn_id):
    """The dispatching names give the float64 forms' bits for float64 arguments."""
    x = np.linspace(-30, 30, 20001)
    got, ref = np.empty_like(x), np.empty_like(x)
    _apply_any(fn_id, x, got)
    _float64_forms(fn_id, x, ref)
    assert np.array_equal(got, ref)
