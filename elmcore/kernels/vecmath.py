"""exp, sigmoid, silu and tanh that LLVM can vectorise inside Numba loops, in the caller's precision.

Numba lowers ``np.exp`` / ``np.tanh`` on scalars to libm calls, one element at
a time (no SVML in the pip builds): in the recurrence that made the
activations cost more than the matrix products. These versions are straight-
line arithmetic, so loops over them become SIMD code.

Each function has a float64 and a float32 form, and ``sigmoid``, ``silu``, ``silu_with_slope``,
``tanh`` and ``one`` pick the form by their argument's type: a float32 kernel stays in float32
lanes (eight per AVX2 register instead of four, and a shorter polynomial).

- float64: Cody–Waite range reduction, a degree-13 Taylor polynomial on |r| ≤ ln2/2, the power of
  two built in the exponent bits; within 2 ulp of libm's exp over the clamped range.
- float32: the same reduction with Cephes' expf polynomial (degree 7), and tanh through
  e^{−2|y|} − 1 from that reduction (accurate near 0, where 1 − e^{−2|y|} would cancel). Within a
  few float32 ulp of the float64 functions (tests/test_vecmath.py): PyTorch's float32 accuracy.
  No branches: a branch inside an inlined function kept LLVM from vectorising the loop around it.
"""

import math

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
# exp overflows float64 above ~709.78 and is 0 (to float64) below ~-745; the
# callers only need values well inside that, so clamp instead of special-casing.
_EXP_MIN = -708.0
_EXP_MAX = 708.0

_F32 = np.float32
_LOG2E_32 = _F32(1.44269504088896341)
_HALF_32 = _F32(0.5)
_ONE_32 = _F32(1.0)
_TWO_32 = _F32(2.0)
_LN2_HI_32 = _F32(0.693359375)       # Cephes' split of ln 2: n·_LN2_HI_32 is exact for |n| ≤ 2^8
_LN2_LO_32 = _F32(-2.12194440e-4)
# 2^n must stay a normal float32 for n = round(x·log2 e): n ∈ [−125, 127].
_EXP_MIN_32 = _F32(-87.0)
_EXP_MAX_32 = _F32(88.0)
_EXPF = tuple(_F32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                1.6666665459e-1, 5.0000001201e-1))

_OPTIONS = dict(inline="always", cache=True, error_model="numpy", fastmath={"contract"})


@intrinsic
def _int64_bits_as_float64(typingctx, bits):
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return sig, codegen


@intrinsic
def _pow2_float32(typingctx, n):
    """2^n for an integral float32 n in [−126, 127], built in the exponent bits in 32-bit lanes."""
    if n != types.float32:
        return None
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        i32 = ir.IntType(32)
        biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())

    return sig, codegen


@njit(**_OPTIONS)
def exp64(x):
    """e**x for a float64 argument clamped to [-708, 708]."""
    x = min(max(x, _EXP_MIN), _EXP_MAX)
    n = np.floor(x * _LOG2E + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _int64_bits_as_float64((np.int64(n) + 1023) << 52)


@njit(**_OPTIONS)
def _expm1_parts32(x):
    """(2^n, p) with e**x − 1 = (2^n − 1) + 2^n·p for a float32 x clamped to [−87, 88].

    With n = 0 (|x| ≤ ln2/2) the sum is p alone, so e**x − 1 keeps its relative accuracy near 0.
    """
    x = min(max(x, _EXP_MIN_32), _EXP_MAX_32)
    n = np.floor(x * _LOG2E_32 + _HALF_32)
    r = (x - n * _LN2_HI_32) - n * _LN2_LO_32
    c0, c1, c2, c3, c4, c5 = _EXPF
    p = c0 * r + c1
    p = p * r + c2
    p = p * r + c3
    p = p * r + c4
    p = p * r + c5
    return _pow2_float32(n), p * (r * r) + r


@njit(**_OPTIONS)
def exp32(x):
    """e**x for a float32 argument clamped to [-87, 88], in float32 arithmetic."""
    scale, p = _expm1_parts32(x)
    return scale * (p + _ONE_32)


@njit(**_OPTIONS)
def expm1_32(x):
    """e**x − 1 in float32, accurate relative to its value also for small |x|."""
    scale, p = _expm1_parts32(x)
    return (scale - _ONE_32) + scale * p


@njit(**_OPTIONS)
def _sigmoid64(z):
    return 1.0 / (1.0 + exp64(-np.float64(z)))


@njit(**_OPTIONS)
def _sigmoid32(z):
    return _ONE_32 / (_ONE_32 + exp32(-z))


@njit(**_OPTIONS)
def _tanh64(y):
    """tanh through exp of a non-positive argument, so nothing overflows; absolute error ~1 ulp."""
    y = np.float64(y)
    e = exp64(-2.0 * abs(y))
    # copysign, not a branch: inlined through the dispatching ``tanh``, a branch here broke
    # Numba's SSA pass (NumbaIRAssumptionWarning) and kept the loop around it scalar.
    return math.copysign((1.0 - e) / (1.0 + e), y)


@njit(**_OPTIONS)
def _tanh32(y):
    """tanh(|y|) = −em / (2 + em) with em = e^{−2|y|} − 1: no cancellation near 0, no branch."""
    em = expm1_32(-_TWO_32 * abs(y))
    return math.copysign(-em / (_TWO_32 + em), y)


# ---- one name, either precision: the form is chosen when Numba types the call --------------

def _by_precision(stub, form32, form64):
    """Make ``stub`` call ``form32`` on a float32 argument and ``form64`` on anything else."""
    options = dict(cache=True, error_model="numpy", fastmath={"contract"})

    @overload(stub, inline="always", jit_options=options)
    def choose(x):
        return form32 if x == types.float32 else form64

    return stub


def _stub(name, doc):
    def stub(x):
        raise NotImplementedError(f"{name} runs inside Numba kernels only")
    stub.__name__, stub.__doc__ = name, doc
    return stub


# The implementations' argument is named x, as the stubs' (Numba matches them by name).
def _silu_with_slope64(x):
    s = _sigmoid64(x)
    return np.float64(x) * s, s * (1.0 + x * (1.0 - s))


def _silu_with_slope32(x):
    s = _sigmoid32(x)
    return x * s, s * (_ONE_32 + x * (_ONE_32 - s))


sigmoid = _by_precision(_stub("sigmoid", "σ(z) = 1 / (1 + e^{−z}) in z's precision."),
                        lambda x: _sigmoid32(x), lambda x: _sigmoid64(x))
silu = _by_precision(_stub("silu", "z·σ(z) in z's precision."),
                     lambda x: x * _sigmoid32(x), lambda x: np.float64(x) * _sigmoid64(x))
silu_with_slope = _by_precision(
    _stub("silu_with_slope", "(silu(z), silu′(z)) in z's precision: silu′ = σ(z)(1 + z(1 − σ(z))), one σ for both."),
    _silu_with_slope32, _silu_with_slope64)
tanh = _by_precision(_stub("tanh", "tanh(y) in y's precision."), lambda x: _tanh32(x), lambda x: _tanh64(x))
one = _by_precision(_stub("one", "1 in x's float type, so that one(x) − x·x stays in x's precision."),
                    lambda x: _ONE_32, lambda x: 1.0)
exp = _by_precision(_stub("exp", "e**x in x's precision, x clamped to the form's range (exp32, exp64)."),
                    lambda x: exp32(x), lambda x: exp64(np.float64(x)))
