"""kernels/simd.py: the register-blocked product of the single neuron's recurrence (broadcast_product),
the row vectors of the network walks' recurrent synapses, and non-temporal copies."""

from fractions import Fraction

import numpy as np
import pytest
from numba import njit

from elmcore.kernels import network_cpu, simd


@njit(cache=False)
def _product(A, W, out):
    simd.broadcast_product(A, W, out)


def _case(n, K, N, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, K)).astype(dtype), rng.normal(size=(K, N)).astype(dtype),
            rng.normal(size=(n, N)).astype(dtype))


# Widths around each vector width (16, 8, 4 float32 lanes; 8, 4, 2 float64 lanes) and the
# recurrence's 100 and 200; row counts around the 4-row blocks.
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n, K, N", [(1, 1, 1), (3, 5, 7), (4, 9, 8), (5, 3, 17), (7, 13, 33), (16, 100, 200),
                                     (16, 200, 100), (9, 2, 4), (6, 31, 21)])
def test_adds_the_product_to_out(n, K, N, dtype):
    A, W, out = _case(n, K, N, dtype)
    expected = out.astype(np.float64) + A.astype(np.float64) @ W.astype(np.float64)
    _product(A, W, out)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    assert np.abs(out - expected).max() <= tol * (1 + np.abs(expected).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_each_row_gets_the_same_bits_in_any_tile(dtype):
    """A row's sums do not depend on the rows beside it: tiles (set by the thread count) may cut
    the batch anywhere, and the recurrence's results must not change with them."""
    A, W, out = _case(11, 37, 45, dtype, seed=1)
    whole = out.copy()
    _product(A, W, whole)
    for cut in (1, 3, 4, 5, 8):
        first, rest = out[:cut].copy(), out[cut:].copy()
        _product(np.ascontiguousarray(A[:cut]), W, first)
        _product(np.ascontiguousarray(A[cut:]), W, rest)
        assert np.array_equal(np.concatenate([first, rest]), whole)


def test_sums_k_in_ascending_order_one_fused_multiply_add_at_a_time():
    """The order the CUDA twins' dot loops use: acc = fma(A[r,k], W[k,j], acc), k = 0, 1, …"""
    A, W, out = _case(5, 23, 19, np.float64, seed=2)
    expected = out.copy()
    for k in range(A.shape[1]):
        expected = np.array([[_fma(A[r, k], W[k, j], expected[r, j]) for j in range(W.shape[1])]
                             for r in range(A.shape[0])])
    _product(A, W, out)
    assert np.array_equal(out, expected)


def _fma(a, b, c):
    """a·b + c rounded once to float64 (exact rational arithmetic, then one rounding)."""
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def test_refuses_strided_operands():
    A, W, out = _case(4, 6, 8, np.float64)
    with pytest.raises(Exception, match="(?i)broadcast_product|No implementation|Invalid use"):
        _product(A[:, ::2], W[::2], out)


@njit(cache=False)
def _stream_copy(src, dst):
    network_cpu._stream_copy(src, dst)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("offset", range(9))
@pytest.mark.parametrize("count", [0, 1, 3, 8, 17, 64, 101])
def test_a_streamed_copy_writes_every_item_and_nothing_else(offset, count, dtype):
    """Non-temporal stores only for whole aligned vectors: the items before the first aligned one
    and after the last whole vector are copied one by one, wherever the destination starts."""
    rng = np.random.default_rng(count)
    src = rng.normal(size=count).astype(dtype)
    buffer = np.full(count + 20, -7.0, dtype)
    _stream_copy(src, buffer[offset:offset + count])
    assert np.array_equal(buffer[offset:offset + count], src)
    assert (buffer[:offset] == -7).all() and (buffer[offset + count:] == -7).all()


@njit(cache=False)
def _row_run(acc, acc_off, src, src_rows, weights, start, stop):
    simd.add_scaled_row_run(acc, acc_off, src, src_rows, weights, start, stop)


@njit(cache=False)
def _row_product(acc, acc_off, a, a_off, b, b_off):
    simd.add_product_row_vector(acc, acc_off, a, a_off, b, b_off)


def _fma_lanes(a, b, c):
    """Item by item a·b + c rounded once to c's dtype (exact rational arithmetic; for float32 the
    float64 rounding of the exact value is exact too, so one rounding to float32 follows)."""
    return np.array([_fma(float(x), float(y), float(z)) for x, y, z in zip(a, b, c)]).astype(c.dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("start, stop", [(0, 0), (2, 3), (1, 6), (0, 7)])
def test_a_row_run_adds_its_entries_in_order_one_fused_multiply_add_each(start, stop, dtype):
    """acc[row] += Σ_e w[e]·src[src_rows[e]] over the run's entries, e ascending, each item
    fused-multiply-added in turn (the bits of adding the entries into memory one by one, and of
    the CUDA twins' loops); the other rows of acc untouched."""
    L = simd.ROW_LANES
    rng = np.random.default_rng(stop)
    src = rng.normal(size=5 * L).astype(dtype)
    src_rows = np.array([3, 1, 4, 0, 2, 2, 4], np.int64)
    weights = rng.normal(size=7).astype(dtype)
    acc = rng.normal(size=3 * L).astype(dtype)
    expected = acc.copy()
    for e in range(start, stop):
        row = src[src_rows[e] * L:(src_rows[e] + 1) * L]
        expected[L:2 * L] = _fma_lanes(np.full(L, weights[e]), row, expected[L:2 * L])
    _row_run(acc, L, src, src_rows, weights, start, stop)
    assert np.array_equal(acc, expected)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_row_product_adds_the_item_products_with_one_rounding_each(dtype):
    L = simd.ROW_LANES
    rng = np.random.default_rng(4)
    a, b, acc = (rng.normal(size=3 * L).astype(dtype) for _ in range(3))
    expected = acc.copy()
    expected[2 * L:] = _fma_lanes(a[L:2 * L], b[:L], acc[2 * L:])
    _row_product(acc, 2 * L, a, L, b, 0)
    assert np.array_equal(acc, expected)


def test_the_row_vectors_refuse_strided_or_mixed_operands():
    x = np.zeros(4 * simd.ROW_LANES)
    with pytest.raises(Exception, match="(?i)add_product_row_vector|No implementation|Invalid use"):
        _row_product(x[::2], 0, x, 0, x, 0)
    with pytest.raises(Exception, match="(?i)add_scaled_row_run|No implementation|Invalid use"):
        _row_run(x, 0, x.astype(np.float32), np.zeros(1, np.int64), x, 0, 1)


@njit(cache=False)
def _transpose(src, src_off, src_stride, dst, dst_off, dst_stride):
    simd.transpose_rows(src, src_off, src_stride, dst, dst_off, dst_stride)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("src_off, src_stride, dst_off, dst_stride", [(0, 8, 0, 8), (3, 20, 5, 11), (1, 9, 0, 64)])
def test_a_block_transposed_in_registers_moves_every_item_and_nothing_else(src_off, src_stride, dst_off, dst_stride,
                                                                           dtype):
    L = simd.ROW_LANES
    src = np.arange(src_off + L * src_stride, dtype=dtype) * 0.5 - 3
    dst = np.full(dst_off + L * dst_stride, -7.0, dtype)
    _transpose(src, src_off, src_stride, dst, dst_off, dst_stride)
    expected = np.full_like(dst, -7.0)
    for i in range(L):
        for j in range(L):
            expected[dst_off + j * dst_stride + i] = src[src_off + i * src_stride + j]
    assert np.array_equal(dst, expected)
