"""The vectorisable transcendental functions used inside the recurrence kernels."""

import numpy as np
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
