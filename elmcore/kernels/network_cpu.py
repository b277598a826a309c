"""Numba CPU kernels of the ELM Network (docs/spec.md §7.3): the time walk and its BPTT.

Layout. Every per-neuron quantity is stored **neuron-minor**: the neuron axis N is the
last (contiguous) one, so a step's state is a few (width, N) blocks and every loop over
neurons is a unit-stride loop LLVM vectorises. Letters: B batch, T time, N neurons,
nb branches, Dm memory units, H hidden width, W0 width of the first MLP layer (H, or Dm
without hidden layers), I0 = nb + Dm its input width, L hidden layers, Lh = max(L − 1, 0),
E recurrent synapse entries (all neurons together).

Per-neuron MLP weights are stored (in, out, N): ``W[j, o, i]`` is neuron i's weight from
input j to output o. The same array serves the forward product (Σ_j W[j,o,:]·a[j,:]) and
the backward one (Σ_o W[j,o,:]·dz[o,:]) with the neuron loop innermost in both.

Recurrent synapses are a list of entries e: target neuron ``rec_i[e]``, its branch
``rec_k[e]``, source neuron ``rec_src[e]`` (whose o_{t−1} it reads) and weight ``rec_w[e]``,
grouped by target neuron (``rec_ptr`` [N+1] delimits each neuron's entries) so a GPU
thread owning a neuron finds its own. The external-input part of the synaptic sums is
not here: it is a routing over all B·T rows (``kernels.cpu.route_*``) done beforehand.

The time walks take a tile of R batch rows at a time (``batch_tile``). An entry is a scalar
gather, so the walks keep what the entries read and write **row-minor** instead: the branch
sums as [nb·N, R] (flat channel k·N + i, then row) and o_{t−1} as [N, R] forward, g_b and
the recurrent gradient reaching o_{t−1} likewise backward. One entry is then one unit-stride
vector FMA over the tile's rows, where one row at a time it was a scalar load and FMA. Each
(row, channel) still sums its entries in entry order, as the CUDA twin does.

Every kernel writes caller-owned ``*_out`` arrays and keeps no state between calls.
Float arrays of one call share the model dtype; ``phi_*`` scalars have it too.
"""

import numba
import numpy as np
from numba import njit, prange, types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

from . import pointwise as pw
from .cpu import _accumulate_product
from .simd import (ROW_LANES, STREAM_BYTES, add_product_row_vector, add_scaled_row_run, blocked_product, data_address,
                   prefetch, store_fence, stream_store, transpose_rows)
from .cpu import route_forward, route_input_grad, route_weight_grad  # noqa: F401  (the external synapses)

_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})

# Optional parts of the kernel contract (kernels/contract.py).
CAPABILITIES = frozenset({"weight_grads_in_walk", "forward_without_cache"})


# ---- per-neuron matrix products over a tile of batch rows ---------------------------------
#
# Each neuron has its own weights, so a weight is used once per (row, step): what makes the
# time walk fast is reusing every loaded weight vector W[j, o, :] for a whole tile of batch
# rows while it sits in L1 (without tiles the weights streamed from L3 once per row-step).
# Tile buffers are C-contiguous (rows, width, N); only the first n rows are used. The products
# take the tile DENSE_ROWS rows at a time, however large it is: a block of 4 rows × 4 outputs
# of neuron vectors is what ``simd.blocked_product`` keeps in registers.

DENSE_ROWS = 4


@njit(inline="always", **_JIT)
def _dense_rows(a, W, c, out, n):
    """out[r, o, :] = c[o, :] + Σ_j W[j, o, :] · a[r, j, :] for r < n.

    a [R,J,N], W [J,O,N], c [O,N], out [R,O,N] (must not alias a). The vector blocks of
    ``simd.blocked_product`` take whole vectors of neurons; a loop takes the remaining
    neurons. Either way the sum runs over j ascending, as in the CUDA twin.
    """
    J, O, N = W.shape
    for r0 in range(0, n, DENSE_ROWS):
        rows = min(n, r0 + DENSE_ROWS) - r0
        for r in range(r0, r0 + rows):
            for o in range(O):
                for i in range(N):
                    out[r, o, i] = c[o, i]
        tail = blocked_product(a, W, out, r0 * J * N, N, J * N, 0, O * N, N, r0 * O * N, O * N, N, J, rows, O, N)
        for r in range(r0, r0 + rows):
            for o in range(O):
                for j in range(J):
                    for i in range(tail, N):
                        out[r, o, i] += W[j, o, i] * a[r, j, i]


@njit(inline="always", **_JIT)
def _dense_transposed_rows(dz, W, out, n):
    """out[r, j, :] = Σ_o W[j, o, :] · dz[r, o, :] for r < n (the adjoint of ``_dense_rows``),
    summed in ascending o as in the CUDA twin."""
    J, O, N = W.shape
    for r0 in range(0, n, DENSE_ROWS):
        rows = min(n, r0 + DENSE_ROWS) - r0
        for r in range(r0, r0 + rows):
            for j in range(J):
                for i in range(N):
                    out[r, j, i] = 0
        tail = blocked_product(dz, W, out, r0 * O * N, N, O * N, 0, N, O * N, r0 * J * N, J * N, N, O, rows, J, N)
        for r in range(r0, r0 + rows):
            for j in range(J):
                for o in range(O):
                    for i in range(tail, N):
                        out[r, j, i] += W[j, o, i] * dz[r, o, i]


@intrinsic
def _flat(typingctx, arr):
    """A C-contiguous array as a 1-D view of its items.

    ``arr.reshape(-1)`` calls a C helper that LLVM cannot see into; the walks flatten a few
    arrays per batch row and step, and with few neurons those calls were a large part of a
    step's time.
    """
    if not (isinstance(arr, types.Array) and arr.layout == "C"):
        return None
    flat_type = arr.copy(ndim=1, layout="C")

    def codegen(context, builder, signature, args):
        src = make_array(signature.args[0])(context, builder, args[0])
        dst = make_array(flat_type)(context, builder)
        populate_array(dst, data=src.data, shape=[src.nitems], strides=[src.itemsize], itemsize=src.itemsize,
                       meminfo=src.meminfo, parent=src.parent)
        return impl_ret_borrowed(context, builder, flat_type, dst._getvalue())

    return flat_type(arr), codegen


@njit(inline="always", **_JIT)
def _copy(src, dst):
    """dst[...] = src[...] for two C-contiguous arrays of one size, as one unit-stride loop
    (Numba's generic slice assignment did not vectorise: a third of the forward's time)."""
    s = _flat(src)
    d = _flat(dst)
    for x in range(s.shape[0]):
        d[x] = s[x]


@njit(inline="always", **_JIT)
def _stream_copy(src, dst):
    """``_copy`` with non-temporal stores (``simd.stream_store``) for dst's aligned whole vectors:
    for a cache read back only much later, by the backward. The writing thread must
    ``store_fence`` before another thread reads dst."""
    s = _flat(src)
    d = _flat(dst)
    n = s.shape[0]
    lanes = STREAM_BYTES // d.itemsize
    head = min(n, ((-data_address(d)) % STREAM_BYTES) // d.itemsize)
    for x in range(head):
        d[x] = s[x]
    x = head
    while x + lanes <= n:
        stream_store(s, x, d, x)
        x += lanes
    for y in range(x, n):
        d[y] = s[y]


@njit(inline="always", **_JIT)
def _write_cache(src, dst, stream):
    if stream:
        _stream_copy(src, dst)
    else:
        _copy(src, dst)


# A forward cache larger than this is written with non-temporal stores: it cannot stay in the
# caches until the backward reads it (32 MB: all of the test machine's L3). A smaller one is
# written normally, so the backward finds it in L2/L3.
STREAM_CACHE_BYTES = 32 << 20


CACHE_LINE_BYTES = 64


@njit(inline="always", **_JIT)
def _prefetch_span(arr, start, count):
    """Hints the items start … start + count − 1 of a C-contiguous array (in its flat order) into
    the caches, one hint per cache line."""
    flat = _flat(arr)
    for x in range(start, start + count, CACHE_LINE_BYTES // flat.itemsize):
        prefetch(flat, x)


@njit(inline="always", **_JIT)
def _prefetch_backward_step(first, n, s, dO, A0, Z, DM, M, O, GB_out):
    """Hints what the backward walk reads at step s for the rows first … first + n − 1: the cache
    rows of step s, and m_{s−1} and o_{s−1} (m_s it read at step s + 1). Issued one step ahead,
    while the walk works on step s + 1 (``simd.prefetch`` says why)."""
    B, T, N = dO.shape
    Dm = DM.shape[2]
    for r in range(n):
        piece = (first + r) * T + s  # row b, step s of a [B,T,...] array
        _prefetch_span(dO, piece * N, N)
        _prefetch_span(DM, piece * Dm * N, Dm * N)
        _prefetch_span(A0, piece * A0.shape[2] * N, A0.shape[2] * N)
        _prefetch_span(GB_out, piece * GB_out.shape[2] * N, GB_out.shape[2] * N)
        for l in range(Z.shape[0]):
            H = Z.shape[3]
            _prefetch_span(Z, (l * B * T + piece) * H * N, H * N)
        if s > 0:
            _prefetch_span(M, (piece - 1) * Dm * N, Dm * N)
            if O.shape[0]:
                _prefetch_span(O, (piece - 1) * N, N)


@njit(inline="always", **_JIT)
def _to_row_vectors(src, src_off, src_row_stride, dstT, width, n):
    """dstT[c, r] = src[src_off + r·src_row_stride + c] for c < width, r < n: n rows of a flat
    array (row r at src_off + r·src_row_stride) into the row-minor layout dstT [≥ width, R].
    Blocks of ROW_LANES items are transposed in registers when the tile is full (n = R =
    ROW_LANES), the rest item by item."""
    R = dstT.shape[1]
    d = _flat(dstT)
    c0 = 0
    if n == ROW_LANES and R == ROW_LANES:
        while c0 + ROW_LANES <= width:
            transpose_rows(src, src_off + c0, src_row_stride, d, c0 * R, R)
            c0 += ROW_LANES
    for r in range(n):
        for c in range(c0, width):
            d[c * R + r] = src[src_off + r * src_row_stride + c]


@njit(inline="always", **_JIT)
def _from_row_vectors(srcT, dst, dst_off, dst_row_stride, width, n):
    """The inverse of ``_to_row_vectors``: dst[dst_off + r·dst_row_stride + c] = srcT[c, r]."""
    R = srcT.shape[1]
    s = _flat(srcT)
    c0 = 0
    if n == ROW_LANES and R == ROW_LANES:
        while c0 + ROW_LANES <= width:
            transpose_rows(s, c0 * R, R, dst, dst_off + c0, dst_row_stride)
            c0 += ROW_LANES
    for r in range(n):
        for c in range(c0, width):
            dst[dst_off + r * dst_row_stride + c] = s[c * R + r]


@njit(inline="always", **_JIT)
def _run_bounds(target):
    """Where a list of entries moves on to another target row: the entries runs[u] … runs[u+1] − 1
    all add into row target[runs[u]] (runs [U+1] int64, from 0 to the number of entries)."""
    E = target.shape[0]
    count = 0
    for e in range(E):
        if e == 0 or target[e] != target[e - 1]:
            count += 1
    runs = np.empty(count + 1, np.int64)
    u = 0
    for e in range(E):
        if e == 0 or target[e] != target[e - 1]:
            runs[u] = e
            u += 1
    runs[count] = E
    return runs


@njit(inline="always", **_JIT)
def _add_recurrent(accT, rec_chan, rec_w, rec_src, srcT, n, runs):
    """accT[rec_chan[e], :n] += rec_w[e] · srcT[rec_src[e], :n] for every entry e, in entry order
    (runs: ``_run_bounds(rec_chan)``).

    accT [C,R], srcT [S,R]: one column per batch row of the tile, so an entry is a unit-stride
    FMA over the rows. For a full tile of ROW_LANES rows each run of entries into one row is
    summed in a register (``simd.add_scaled_row_run``); else a loop per entry (a runtime trip
    count: a constant one gets unrolled and stays scalar).
    """
    if n == ROW_LANES and accT.shape[1] == ROW_LANES and srcT.shape[1] == ROW_LANES:
        acc_flat = _flat(accT)
        src_flat = _flat(srcT)
        for u in range(runs.shape[0] - 1):
            first = runs[u]
            add_scaled_row_run(acc_flat, rec_chan[first] * ROW_LANES, src_flat, rec_src, rec_w, first, runs[u + 1])
        return
    for e in range(rec_chan.shape[0]):
        acc = accT[rec_chan[e]]
        src = srcT[rec_src[e]]
        w = rec_w[e]
        for r in range(n):
            acc[r] += w * src[r]


@njit(inline="always", **_JIT)
def _add_recurrent_products(accT, a_chan, b_src, aT, bT, n):
    """accT[e, :n] += aT[a_chan[e], :n] · bT[b_src[e], :n] for every entry e (all row-minor, as in
    ``_add_recurrent``): each entry's weight gradient, one vector FMA over the tile's rows."""
    if n == ROW_LANES and accT.shape[1] == ROW_LANES and aT.shape[1] == ROW_LANES and bT.shape[1] == ROW_LANES:
        acc_flat = _flat(accT)
        a_flat = _flat(aT)
        b_flat = _flat(bT)
        for e in range(a_chan.shape[0]):
            add_product_row_vector(acc_flat, e * ROW_LANES, a_flat, a_chan[e] * ROW_LANES, b_flat,
                                   b_src[e] * ROW_LANES)
        return
    for e in range(a_chan.shape[0]):
        acc = accT[e]
        a = aT[a_chan[e]]
        b = bT[b_src[e]]
        for r in range(n):
            acc[r] += a[r] * b[r]


# Batch rows walked together (None: one tile per thread, at most MAX_TILE rows). Measured one-threaded
# with the recurrent sums vectorised over the tile: 8 rows beat 4 on the SHD-Adding shape (the
# recurrent sums' cost per entry is mostly fixed, so it shrinks per row) and tied 16; on the char-LM
# shape 8 tied 4 and 16 was slower.
MAX_TILE = 8
tile_rows = None


def batch_tile(B):
    if tile_rows is not None:
        return max(1, int(tile_rows))
    threads = max(numba.get_num_threads(), 1)
    return max(1, min(MAX_TILE, -(-B // threads)))


def network_forward(E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out, c_out,
                    kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope,
                    A0_out, Z_out, DM_out, M_out, O_out, b_out):
    """Walk one layer of the network forward over all T steps (docs/spec.md §7.3).

    Per step, for every neuron (columns i):
        b_t   = κ_b ⊙ b_{t−1} + E_t + Σ_{recurrent e} w_e · o_{t−1}[src_e]   (into branch k_e)
        a_0   = [b_t ; κ_m ⊙ m_{t−1}];  z_l, a_l = act(z_l) through the hidden layers
        Δm_t  = φ(W_out a_{L} + c_out);  m_t = κ_m ⊙ m_{t−1} + c_m ⊙ Δm_t
        o_t   = w_o · m_t + c_o
    With L = 0 the output layer is the first layer (W_in maps a_0 straight to the
    pre-φ values, Z_out is unused) and W_out / c_out are ignored.

    E        [B,T,nb,N]  external part of the synaptic sums (routing of the layer's input).
    kappa_b  [nb,N];  rec_*  [E] entries (module docstring), rec_ptr [N+1].
    W_in     [I0,W0,N], c_in [W0,N];  W_hid [Lh,H,H,N], c_hid [Lh,H,N];  W_out [H,Dm,N], c_out [Dm,N].
    kappa_m, c_m, w_o [Dm,N];  c_o [N].   b0 [B,nb,N], m0 [B,Dm,N], o0 [B,N]: the state before t = 0.
    A0_out [B,T,I0,N]   the first layer's input a_0 per step (its top nb rows are b_t); or
                        [B,T,nb,N], b_t alone, for ``network_backward_block``, which rebuilds
                        κ_m ⊙ m_{t−1} from M (the cache's largest part that is cheap to recompute).
    Z_out  [L,B,T,H,N]  hidden pre-activations (L = Z_out.shape[0]).
    DM_out, M_out [B,T,Dm,N]  Δm_t and m_t;  O_out [B,T,N] o_t;  b_out [B,nb,N] the last b_t.
    Tiles of batch rows (``batch_tile``) run in parallel; the result does not depend on the tiling.
    """
    stream = A0_out.nbytes + Z_out.nbytes + DM_out.nbytes + M_out.nbytes + O_out.nbytes > STREAM_CACHE_BYTES
    m_last = np.empty(m0.shape, m0.dtype)  # the walk's last m_t, also M_out[:, -1]
    _network_forward(E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out, c_out,
                     kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope, batch_tile(E.shape[0]),
                     True, stream, A0_out, Z_out, DM_out, M_out, O_out, b_out, m_last)


def network_forward_without_cache(E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out,
                                  c_out, kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope,
                                  num_hidden_layers, O_out, b_out, m_out):
    """``network_forward`` for inference and streaming (capability "forward_without_cache"): the same
    walk, bit for bit, keeping no cache for a backward.

    Of the cache only O_out [B,T,N] is written; b_out [B,nb,N] and m_out [B,Dm,N] get the state
    after the last step. ``num_hidden_layers`` is L (the placeholders W_hid, W_out of a shallower
    MLP do not tell it). On the SHD-Adding shape the cache is ~45 floats per neuron and step
    against O's one: an inference pass took 21 ms instead of 25 without writing it.
    """
    B, T, nb, N = E.shape
    Dm = kappa_m.shape[0]
    I0, W0, _ = W_in.shape
    dt = E.dtype
    # No rows: the walk reads these placeholders' shapes (L, H) and writes nothing into them.
    _network_forward(E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out, c_out,
                     kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope, batch_tile(B), False,
                     False, np.empty((0, T, I0, N), dt), np.empty((num_hidden_layers, 0, T, W0, N), dt),
                     np.empty((0, T, Dm, N), dt), np.empty((0, T, Dm, N), dt), O_out, b_out, m_out)


@njit(parallel=True, **_JIT)
def _network_forward(E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out, c_out,
                     kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope, R, keep_cache, stream,
                     A0_out, Z_out, DM_out, M_out, O_out, b_out, m_out):
    B, _, _, N = E.shape
    rec_chan = rec_k * N + rec_i  # flat index into a [nb,N] block: one index load per entry, not two
    rec_runs = _run_bounds(rec_chan)
    n_tiles = (B + R - 1) // R
    for ti in prange(n_tiles):
        _forward_tile(ti * R, min(R, B - ti * R), E, kappa_b, rec_chan, rec_runs, rec_src, rec_w, W_in, c_in, W_hid,
                      c_hid, W_out, c_out, kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope, R,
                      keep_cache, stream, A0_out, Z_out, DM_out, M_out, O_out, b_out, m_out)


@njit(**_JIT)
def _forward_tile(first, n, E, kappa_b, rec_chan, rec_runs, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out, c_out,
                  kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope, R, keep_cache, stream, A0_out,
                  Z_out, DM_out, M_out, O_out, b_out, m_out):
    """The batch rows [first, first + n) of ``_network_forward`` through all T steps (rec_chan: the
    entries' flat [nb,N] channels, rec_runs: ``_run_bounds(rec_chan)``; without keep_cache only
    O_out, b_out, m_out are written). A function called from the parallel loop, not its body:
    Numba's parallel passes then see a small loop (the walk inlined into it took minutes to
    compile)."""
    _, T, nb, N = E.shape
    Dm = kappa_m.shape[0]
    I0, W0, _ = W_in.shape
    L = Z_out.shape[0]
    H = Z_out.shape[3]
    dt = E.dtype
    # The branch sums and o_{t−1} are kept source- / channel-major with the tile's rows
    # contiguous, so each recurrent entry is one vector FMA over the rows (module docstring).
    C = nb * N
    # Zeros: the columns of rows past n are computed on with the others and must stay finite.
    brT = np.zeros((C, R), dt)
    eT = np.zeros((C, R), dt)  # E_t of the tile's rows
    kappa_bT = np.empty((C, R), dt)  # κ_b of each channel, in every column
    for c in range(C):
        for r in range(R):
            kappa_bT[c, r] = kappa_b[c // N, c % N]
    oT = np.empty((N, R), dt)
    m = np.empty((R, Dm, N), dt)
    o = np.empty((R, N), dt)
    a0 = np.empty((R, I0, N), dt)
    z0 = np.empty((R, W0, N), dt)
    a = np.empty((R, H, N), dt)
    z = np.empty((R, H, N), dt)
    pre = np.empty((R, Dm, N), dt)
    for r in range(n):
        for k in range(nb):
            for i in range(N):
                brT[k * N + i, r] = b0[first + r, k, i]
        for i in range(N):
            oT[i, r] = o0[first + r, i]
        m[r] = m0[first + r]
    E_flat, br_flat, eT_flat, kappa_bT_flat = _flat(E), _flat(brT), _flat(eT), _flat(kappa_bT)
    for t in range(T):
        if t + 1 < T:
            for r in range(n):  # the next step's E rows: each on another page (``simd.prefetch``)
                _prefetch_span(E, ((first + r) * T + t + 1) * C, C)
        _to_row_vectors(E_flat, (first * T + t) * C, T * C, eT, C, n)
        for x in range(C * R):
            br_flat[x] = kappa_bT_flat[x] * br_flat[x] + eT_flat[x]
        _add_recurrent(brT, rec_chan, rec_w, rec_src, oT, n, rec_runs)
        _from_row_vectors(brT, _flat(a0), 0, I0 * N, C, n)
        for r in range(n):
            bb = first + r
            a0r = a0[r]
            for j in range(Dm):
                for i in range(N):
                    a0r[nb + j, i] = kappa_m[j, i] * m[r, j, i]
            if keep_cache:
                _write_cache(a0r[:A0_out.shape[2]], A0_out[bb, t], stream)
        if L == 0:
            _dense_rows(a0, W_in, c_in, pre, n)
        else:
            _dense_rows(a0, W_in, c_in, z0, n)
            for r in range(n):
                if keep_cache:
                    _write_cache(z0[r], Z_out[0, first + r, t], stream)
            pw.activate_all(_flat(z0), _flat(a), n * H * N, activation)
            for l in range(1, L):
                _dense_rows(a, W_hid[l - 1], c_hid[l - 1], z, n)
                for r in range(n):
                    if keep_cache:
                        _write_cache(z[r], Z_out[l, first + r, t], stream)
                pw.activate_all(_flat(z), _flat(a), n * H * N, activation)
            _dense_rows(a, W_out, c_out, pre, n)
        # φ on its own flat loop over the tile: one array in and out, so it vectorises.
        pre_flat = _flat(pre)
        for x in range(n * Dm * N):
            pre_flat[x] = pw.phi(pre_flat[x], phi_scale, phi_slope)
        for r in range(n):
            bb = first + r
            mr = m[r]
            o_r = o[r]
            dm_r = pre[r]
            if keep_cache:
                _write_cache(dm_r, DM_out[bb, t], stream)
            for j in range(Dm):
                for i in range(N):
                    mr[j, i] = a0[r, nb + j, i] + c_m[j, i] * dm_r[j, i]
            if keep_cache:
                _write_cache(mr, M_out[bb, t], stream)
            for i in range(N):
                o_r[i] = c_o[i]
            for j in range(Dm):
                for i in range(N):
                    o_r[i] += w_o[j, i] * mr[j, i]
            _copy(o_r, O_out[bb, t])  # read again soon: by the layer above or the readout
        _to_row_vectors(_flat(o), 0, N, oT, N, n)
    for r in range(n):
        for k in range(nb):
            for i in range(N):
                b_out[first + r, k, i] = brT[k * N + i, r]
        m_out[first + r] = m[r]
    if stream:
        store_fence()


def network_backward(dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry, W_in, W_hid, W_out,
                     kappa_m, c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope,
                     GB_out, dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b, carry_m, carry_o):
    """Backpropagation through time of ``network_forward`` for one layer (docs/gradients.md, ELM Network).

    dO      [B,T,N]      ∂loss/∂o_t from outside the layer (readout or the next layer), not
                         including the recurrent path, which is walked here.
    src_ptr [N+1], src_entry [E]  the recurrent entries grouped by source neuron: entries
                         src_entry[src_ptr[j]:src_ptr[j+1]] (ascending) read neuron j. The
                         gradient reaching o_{t−1}[j] is gathered over them, so every
                         neuron's sum is formed by one owner in a fixed order.
    A0, Z, DM, M         the forward's A0_out (whole), Z_out, DM_out, M_out, unchanged; m0 as given to it.
    GB_out  [B,T,nb,N]   g_b: ∂loss/∂b_t in total = ∂loss/∂(everything added into b_t), i.e. the
                         gradient of the external sums E_t and of each recurrent term.
    dZ_out  [L,B,T,H,N]  ∂loss/∂z_l;  dP_out [B,T,Dm,N] ∂loss/∂(pre-φ output of the MLP)
                         (with L = 0 that is also the first layer's ∂z).
    GO_out  [B,T,N]      ∂loss/∂o_t in total (outside plus the recurrent path).
    act_out [L,B,T,H,N]  act(z_l), the hidden layers' outputs, for the weight gradients.
    gkappa_out, gc_out [B,Dm,N]  per batch row Σ_t ∂loss/∂κ_m and Σ_t ∂loss/∂c_m, ADDED to what
                         they hold (zero them for a whole sequence), so that a backward walked in
                         segments, last first, sums in the order of one walk over all T.
    carry_b [B,nb,N], carry_m [B,Dm,N], carry_o [B,N]  the three adjoints carried between steps
                         (g_b(t+1), κ_m ⊙ (g + r) and the recurrent part of ∂loss/∂o_t): in, their
                         values after step T−1 (zeros for a whole sequence); out, what reaches the
                         initial state b0, m0, o0 (what the walk of the segment before needs).
    """
    B, T = dO.shape[0], dO.shape[1]
    dt = dO.dtype  # no grad_* arrays: the weight gradients are summed afterwards, by neuron_weight_grad
    _network_backward(dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry, W_in, W_hid, W_out,
                      kappa_m, c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope, batch_tile(B), 0, T,
                      False, GB_out, dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b, carry_m, carry_o,
                      _none(3, dt), _none(2, dt), _none(4, dt), _none(3, dt), _none(3, dt), _none(2, dt), _none(3, dt),
                      _none(2, dt), _none(3, dt), _none(2, dt), _none(2, dt))


def _none(ndim, dtype):
    """An empty array in place of an output the walk does not write."""
    return np.empty((0,) * ndim, dtype)


# Batch rows whose weight gradients the walk of ``network_backward_block`` sums together, four
# rows per pass over a partial sum, like ``neuron_weight_grad``: a constant, so the sums' order
# does not depend on the thread count (a tile is a whole number of such groups).
GROUP_ROWS = 4


def network_backward_block(dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry, W_in, W_hid,
                           W_out, kappa_m, c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope, t0, t1, O,
                           o0, GB_out, gkappa_out, gc_out, carry_b, carry_m, carry_o, grad_W_in, grad_c_in, grad_W_hid,
                           grad_c_hid, grad_W_out, grad_c_out, grad_w_o, grad_c_o, grad_w_rec):
    """``network_backward`` over the time block [t0, t1) of its arrays, summing the block's
    weight gradients in the walk (capability "weight_grads_in_walk").

    Each step's ∂z, act(z), ∂(pre-φ) and ∂o are still in the tile's buffers when the walk
    adds them into the weight gradients, so they are never written out and read back: on the
    SHD-Adding shape that traffic (~100 MB a step) cost more than the products themselves.

    Arguments as in ``network_backward`` (without dZ_out, dP_out, GO_out, act_out), and:
    t0, t1    the steps walked, last first: the carries come in as after step t1−1 and leave as
              what reaches step t0−1 (m_{t0−1} is M[:, t0−1], or m0 when t0 = 0).
    A0        the forward's A0_out, whole [B,T,I0,N] or b_t alone [B,T,nb,N]: the walk then
              rebuilds a_0's κ_m ⊙ m_{t−1} rows from M and m0, the same products the forward made.
    O [B,T,N], o0 [B,N]  the forward's O_out and the o0 it was given: what the recurrent synapses read.
    grad_W_in [I0,W0,N], grad_c_in [W0,N], grad_W_hid [Lh,H,H,N], grad_c_hid [Lh,H,N],
    grad_W_out [H,Dm,N], grad_c_out [Dm,N]  Σ over the block's rows of each MLP layer's
              (input ⊗ output gradient) and output gradient, shaped like the weights given
              (the placeholders of absent layers get zeros); grad_w_o [Dm,1,N] Σ m_t ⊗ ∂o_t,
              grad_c_o [1,N] Σ ∂o_t; grad_w_rec [B,E] per batch row Σ_t g_b(t)[k_e, i_e] · o_{t−1}[src_e],
              the recurrent entries' gradient (``recurrent_weight_grad``'s partial_out). All overwritten.
    Every sum over rows runs per group of GROUP_ROWS batch rows, steps last first, the rows of
    a group four at a time; the groups' partial sums are then added in group order. grad_w_rec
    sums each row's steps, last first.
    """
    B = dO.shape[0]
    tile = GROUP_ROWS * -(-batch_tile(B) // GROUP_ROWS)
    _network_backward(dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry, W_in, W_hid, W_out,
                      kappa_m, c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope, tile, t0, t1, True,
                      GB_out, _none(5, dO.dtype), _none(4, dO.dtype), _none(3, dO.dtype), _none(5, dO.dtype),
                      gkappa_out, gc_out, carry_b, carry_m, carry_o, grad_W_in, grad_c_in, grad_W_hid, grad_c_hid,
                      grad_W_out, grad_c_out, grad_w_o, grad_c_o, O, o0, grad_w_rec)


@njit(inline="always", **_JIT)
def _add_outer4(acc, bias, x0, x1, x2, x3, y0, y1, y2, y3):
    """acc[j, o, :] += Σ_r x_r[j, :] · y_r[o, :] and bias[o, :] += Σ_r y_r[o, :] over four rows r,
    added row after row: x_r [J,N] a row's inputs, y_r [O,N] its output gradients."""
    J, O, N = acc.shape
    for o in range(O):
        row = bias[o]
        g0, g1, g2, g3 = y0[o], y1[o], y2[o], y3[o]
        for i in range(N):
            row[i] = (((row[i] + g0[i]) + g1[i]) + g2[i]) + g3[i]
    for j in range(J):
        a0, a1, a2, a3 = x0[j], x1[j], x2[j], x3[j]
        for o in range(O):
            row = acc[j, o]
            g0, g1, g2, g3 = y0[o], y1[o], y2[o], y3[o]
            for i in range(N):
                row[i] = (((row[i] + a0[i] * g0[i]) + a1[i] * g1[i]) + a2[i] * g2[i]) + a3[i] * g3[i]


@njit(inline="always", **_JIT)
def _add_outer1(acc, bias, x, y):
    """``_add_outer4`` for one row."""
    J, O, N = acc.shape
    for o in range(O):
        row = bias[o]
        g = y[o]
        for i in range(N):
            row[i] += g[i]
    for j in range(J):
        a = x[j]
        for o in range(O):
            row = acc[j, o]
            g = y[o]
            for i in range(N):
                row[i] += a[i] * g[i]


@njit(inline="always", **_JIT)
def _rebuild_first_layer_input(out, A0, M, m0, kappa_m, first, t, n):
    """out[r, 0] = a_0 = [b_t ; κ_m ⊙ m_{t−1}] of the rows first + r < first + n, from a cache A0
    [B,T,nb,N] of b_t alone: κ_m ⊙ m_{t−1} is the forward's own product of the same two numbers
    (m_{t−1} is M[:, t−1], or m0 at t = 0), so a_0 has the bits the forward used."""
    nb = A0.shape[2]
    Dm, N = kappa_m.shape
    for r in range(n):
        b = first + r
        dst = out[r, 0]
        cached = A0[b, t]
        m_prev = M[b, t - 1] if t > 0 else m0[b]
        for k in range(nb):
            for i in range(N):
                dst[k, i] = cached[k, i]
        for j in range(Dm):
            for i in range(N):
                dst[nb + j, i] = kappa_m[j, i] * m_prev[j, i]


@njit(**_JIT)
def _add_outer_tile(P, Pc, group0, X, x_first, x_t, Y, n):
    """Adds the tile's n rows into the partial sums of their groups: P[group0 + q] and Pc[group0 + q]
    get the rows r of group q (``_add_outer4``), whose inputs are X[x_first + r, x_t] and output
    gradients Y[r]. A call, not inlined: five inlined copies made the walk take minutes to compile."""
    for q0 in range(0, n, GROUP_ROWS):
        acc = P[group0 + q0 // GROUP_ROWS]
        bias = Pc[group0 + q0 // GROUP_ROWS]
        if q0 + GROUP_ROWS <= n:
            _add_outer4(acc, bias, X[x_first + q0, x_t], X[x_first + q0 + 1, x_t], X[x_first + q0 + 2, x_t],
                        X[x_first + q0 + 3, x_t], Y[q0], Y[q0 + 1], Y[q0 + 2], Y[q0 + 3])
        else:
            for r in range(q0, n):
                _add_outer1(acc, bias, X[x_first + r, x_t], Y[r])


@njit(inline="always", **_JIT)
def _sum_groups(P, out):
    """out = Σ_g P[g], added in group order (P [G,...] and out [...] C-contiguous, G ≥ 1)."""
    dst = _flat(out)
    first = _flat(P[0])
    for x in range(dst.shape[0]):
        dst[x] = first[x]
    for g in range(1, P.shape[0]):
        src = _flat(P[g])
        for x in range(dst.shape[0]):
            dst[x] += src[x]


@njit(parallel=True, **_JIT)
def _network_backward(dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry, W_in, W_hid, W_out,
                      kappa_m, c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope, R, t0, t1, in_walk,
                      GB_out, dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b_io, carry_m_io, carry_o_io,
                      grad_W_in, grad_c_in, grad_W_hid, grad_c_hid, grad_W_out, grad_c_out, grad_w_o, grad_c_o, O, o0,
                      grad_w_rec):
    """The walk of ``network_backward`` (in_walk False: it writes dZ_out … act_out for the weight
    gradients) and of ``network_backward_block`` (in_walk True: it sums them itself into grad_*)."""
    B, _, nb, N = GB_out.shape
    Dm = kappa_m.shape[0]
    I0, W0, _ = W_in.shape
    dt = dO.dtype
    # The recurrent entries in source order, their weight and flat [nb,N] channel side by side:
    # the transposed synapses, through which g_b flows back to the source neurons.
    n_rec = src_entry.shape[0]
    w_by_src = np.empty(n_rec, dt)
    chan_by_src = np.empty(n_rec, np.int64)
    neuron_by_src = np.empty(n_rec, np.int64)
    for j in range(N):
        for q in range(src_ptr[j], src_ptr[j + 1]):
            e = src_entry[q]
            w_by_src[q] = rec_w[e]
            chan_by_src[q] = rec_k[e] * N + rec_i[e]
            neuron_by_src[q] = j
    src_runs = _run_bounds(neuron_by_src)
    rec_chan = rec_k * N + rec_i  # the entries in their own order, for grad_w_rec
    # Per group of GROUP_ROWS batch rows, a partial sum of every weight gradient (none without in_walk).
    groups = (B + GROUP_ROWS - 1) // GROUP_ROWS if in_walk else 0
    P_in = np.zeros((groups, I0, W0, N), dt)
    Pc_in = np.zeros((groups, W0, N), dt)
    P_hid = np.zeros((W_hid.shape[0], groups, W_hid.shape[1], W_hid.shape[2], N), dt)
    Pc_hid = np.zeros((W_hid.shape[0], groups, W_hid.shape[2], N), dt)
    P_out = np.zeros((groups, W_out.shape[0], W_out.shape[1], N), dt)
    Pc_out = np.zeros((groups, W_out.shape[1], N), dt)
    P_wo = np.zeros((groups, Dm, 1, N), dt)
    Pc_o = np.zeros((groups, 1, N), dt)
    n_tiles = (B + R - 1) // R
    for ti in prange(n_tiles):
        _backward_tile(ti * R, min(R, B - ti * R), dO, kappa_b, w_by_src, chan_by_src, neuron_by_src, src_runs, W_in,
                       W_hid, W_out, kappa_m, c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope, R, t0, t1,
                       in_walk, GB_out, dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b_io, carry_m_io,
                       carry_o_io, P_in, Pc_in, P_hid, Pc_hid, P_out, Pc_out, P_wo, Pc_o, O, o0, rec_chan, rec_src,
                       grad_w_rec)
    if in_walk:
        _sum_groups(P_in, grad_W_in)
        _sum_groups(Pc_in, grad_c_in)
        for l in range(W_hid.shape[0]):
            _sum_groups(P_hid[l], grad_W_hid[l])
            _sum_groups(Pc_hid[l], grad_c_hid[l])
        _sum_groups(P_out, grad_W_out)
        _sum_groups(Pc_out, grad_c_out)
        _sum_groups(P_wo, grad_w_o)
        _sum_groups(Pc_o, grad_c_o)


@njit(**_JIT)
def _backward_tile(first, n, dO, kappa_b, w_by_src, chan_by_src, neuron_by_src, src_runs, W_in, W_hid, W_out, kappa_m,
                   c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope, R, t0, t1, in_walk, GB_out, dZ_out,
                   dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b_io, carry_m_io, carry_o_io, P_in, Pc_in,
                   P_hid, Pc_hid, P_out, Pc_out, P_wo, Pc_o, O, o0, rec_chan, rec_src, grad_w_rec):
    """The batch rows [first, first + n) of ``_network_backward`` through steps t1−1 … t0 (the
    entries by source: w_by_src, chan_by_src, neuron_by_src, src_runs, and in their own order: rec_chan,
    rec_src; P_*: the groups' partial sums). A function called from the parallel loop, as
    ``_forward_tile`` is."""
    _, _, nb, N = GB_out.shape
    Dm = kappa_m.shape[0]
    I0, W0, _ = W_in.shape
    L = Z.shape[0]
    H = Z.shape[3]
    dt = dO.dtype
    group0 = first // GROUP_ROWS
    carry_m = np.zeros((R, Dm, N), dt)
    carry_b = np.zeros((R, nb, N), dt)
    # g_b and the recurrent path's ∂loss/∂o_{t−1}, row-minor as in the forward (module docstring).
    gbT = np.empty((nb * N, R), dt)
    carry_oT = np.zeros((N, R), dt)
    for r in range(n):
        carry_m[r] = carry_m_io[first + r]
        carry_b[r] = carry_b_io[first + r]
        for i in range(N):
            carry_oT[i, r] = carry_o_io[first + r, i]
    go = np.empty((R, 1, N), dt)  # [R,1,N]: the output gradients of w_o's (Dm → 1) product
    g = np.empty((R, Dm, N), dt)
    dpre = np.empty((R, Dm, N), dt)
    da = np.empty((R, H, N), dt)
    # ∂z of two consecutive layers: layer l's and the one above it, whose weight gradient needs act(z_l).
    dz_even = np.empty((R, H, N), dt)
    dz_odd = np.empty((R, H, N), dt)
    act = np.empty((R, 1, H, N), dt)  # [R,1,…]: indexed [r, 0] as the cache's rows are [b, t]
    a0_rebuilt = np.empty((R, 1, I0, N), dt)  # a_0 of a tile's rows, from a cache of b_t alone
    da0 = np.empty((R, I0, N), dt)
    # Per recurrent entry and row, Σ_t g_b(t) · o_{t−1}: row-minor like g_b, so an entry is one vector FMA.
    rec_grad_T = np.zeros((rec_src.shape[0] if in_walk else 0, R), dt)
    o_prevT = np.empty((N, R), dt)
    carry_o = np.empty((R, N), dt)  # carry_oT's rows
    for t in range(t1 - 1, t0 - 1, -1):
        if t > t0:
            _prefetch_backward_step(first, n, t - 1, dO, A0, Z, DM, M, O, GB_out)
        _from_row_vectors(carry_oT, _flat(carry_o), 0, N, N, n)
        for r in range(n):
            bb = first + r
            # (a) go = dO + carry_o
            go_r = go[r, 0]
            for i in range(N):
                go_r[i] = dO[bb, t, i] + carry_o[r, i]
            # (b) g = w_o ⊙ go + carry_m;  gc += g ⊙ Δm;  dp = g ⊙ c_m ⊙ φ'(p)
            dm_t = DM[bb, t]
            gc = gc_out[bb]
            for j in range(Dm):
                for i in range(N):
                    gji = w_o[j, i] * go_r[i] + carry_m[r, j, i]
                    g[r, j, i] = gji
                    dm = dm_t[j, i]
                    gc[j, i] += gji * dm
                    dpre[r, j, i] = pw.phi_backward(gji * c_m[j, i], dm, phi_scale, phi_slope)
            if not in_walk:
                _copy(go[r], GO_out[bb, t])
                _copy(dpre[r], dP_out[bb, t])
        if in_walk:  # w_o: ∂o_t/∂w_o = m_t, ∂o_t/∂c_o = 1
            _add_outer_tile(P_wo, Pc_o, group0, M, first, t, go, n)
        # The first layer's input rows: the cache's, or rebuilt where it kept b_t alone.
        a0_src, a0_first, a0_t = A0, first, t
        if in_walk and A0.shape[2] < I0:
            _rebuild_first_layer_input(a0_rebuilt, A0, M, m0, kappa_m, first, t, n)
            a0_src, a0_first, a0_t = a0_rebuilt, 0, 0
        # (c) da = W_Lᵀ dp; for l = L−1 … 0: dz_l = da ⊙ act'(z_l), da = W_lᵀ dz_l;  da_0 = W_0ᵀ dz_0
        # Each layer's weight gradient is Σ_rows (its input) ⊗ (its output gradient).
        if L == 0:
            _dense_transposed_rows(dpre, W_in, da0, n)
            if in_walk:
                _add_outer_tile(P_in, Pc_in, group0, a0_src, a0_first, a0_t, dpre, n)
        else:
            _dense_transposed_rows(dpre, W_out, da, n)
            above = dpre
            for l in range(L - 1, -1, -1):
                dz = dz_even if l % 2 == 0 else dz_odd
                for r in range(n):
                    bb = first + r
                    pw.activation_backward_all(_flat(Z[l, bb, t]), _flat(da[r]), _flat(dz[r]), _flat(act[r]),
                                               H * N, activation)
                    if not in_walk:
                        _copy(dz[r], dZ_out[l, bb, t])
                        _copy(act[r], act_out[l, bb, t])
                if in_walk:
                    if l == L - 1:
                        _add_outer_tile(P_out, Pc_out, group0, act, 0, 0, above, n)
                    else:
                        _add_outer_tile(P_hid[l], Pc_hid[l], group0, act, 0, 0, above, n)
                above = dz
                if l > 0:
                    _dense_transposed_rows(dz, W_hid[l - 1], da, n)
            _dense_transposed_rows(above, W_in, da0, n)
            if in_walk:
                _add_outer_tile(P_in, Pc_in, group0, a0_src, a0_first, a0_t, above, n)
        for r in range(n):
            bb = first + r
            # (d) total = g + r, r = da_0[nb:];  gk += total ⊙ m_{t−1};  carry_m = κ_m ⊙ total
            # Memory: m_{t−1} reaches the loss through κ_m ⊙ m_{t−1} in both m_t and a_0.
            gk = gkappa_out[bb]
            m_prev = M[bb, t - 1] if t > 0 else m0[bb]
            for j in range(Dm):
                for i in range(N):
                    total = g[r, j, i] + da0[r, nb + j, i]
                    gk[j, i] += total * m_prev[j, i]
                    carry_m[r, j, i] = kappa_m[j, i] * total
            # (e) g_b(t) = da_0[:nb] + κ_b ⊙ g_b(t+1)
            gb = GB_out[bb, t]
            for k in range(nb):
                for i in range(N):
                    carry_b[r, k, i] = da0[r, k, i] + kappa_b[k, i] * carry_b[r, k, i]
                    gb[k, i] = carry_b[r, k, i]
        _to_row_vectors(_flat(carry_b), 0, nb * N, gbT, nb * N, n)
        # ∂loss/∂w_e += g_b(t)[k_e, i_e] · o_{t−1}[src_e]
        if rec_grad_T.shape[0]:
            if t > 0:
                _to_row_vectors(_flat(O), (first * O.shape[1] + t - 1) * N, O.shape[1] * N, o_prevT, N, n)
            else:
                _to_row_vectors(_flat(o0), first * N, N, o_prevT, N, n)
            _add_recurrent_products(rec_grad_T, rec_chan, rec_src, gbT, o_prevT, n)
        # (f) carry_o[j] = Σ_{recurrent e with src_e = j} w_e · g_b(t)[k_e, i_e]
        # The recurrent synapses of step t read o_{t−1}: their gradient joins ∂loss/∂o_{t−1}.
        for j in range(N):
            for r in range(n):
                carry_oT[j, r] = 0
        _add_recurrent(carry_oT, neuron_by_src, w_by_src, chan_by_src, gbT, n, src_runs)
    for r in range(n):
        carry_m_io[first + r] = carry_m[r]
        carry_b_io[first + r] = carry_b[r]
        for i in range(N):
            carry_o_io[first + r, i] = carry_oT[i, r]
        for e in range(rec_grad_T.shape[0]):
            grad_w_rec[first + r, e] = rec_grad_T[e, r]


# Row chunks of the weight-gradient sums: a constant, so the sums' order (and the
# result, bit for bit) does not depend on the thread count.
WEIGHT_GRAD_CHUNKS = 8


@njit(parallel=True, **_JIT)
def _sum_chunks(partial, out):
    """out = Σ_c partial[c], added in chunk order: the result does not depend on the thread count.

    partial [chunks, ...] and out [...] C-contiguous, of one shape after the chunk axis.
    """
    _add_chunks(partial, out)


@njit(inline="always", **_JIT)
def _add_chunks(partial, out):
    """``_sum_chunks``'s loop, inlined where a caller decides whether its prange runs in parallel."""
    chunks = partial.shape[0]
    flat = partial.reshape(chunks, -1)
    dst = out.reshape(-1)
    for x in prange(dst.shape[0]):
        total = flat[0, x]
        for c in range(1, chunks):
            total += flat[c, x]
        dst[x] = total


@njit(parallel=True, **_JIT)
def neuron_weight_grad(G, A, t0, t1, out, bias_out):
    """out[j, o, :] = Σ_r A[r, j, :] · G[r, o, :] and bias_out[o, :] = Σ_r G[r, o, :]: every
    neuron's weight and bias gradient over the rows r = (b, t) of steps [t0, t1), batch row
    major (the rows of a time block, engine/segments.py, in the order a copy of them has).

    G [B,T,O,N] gradients of a layer's outputs, A [B,T,J,N] its inputs; out [J,O,N] (the weight
    layout) and bias_out [O,N] are overwritten. The block's rows are read in place: a copy of
    them per weight gradient cost the long-sequence backward a fifth of its time. The rows are
    cut into WEIGHT_GRAD_CHUNKS contiguous chunks summed in parallel (each reads its rows of A
    and G once, four rows per pass over its [J,O,N] partial sum: the sum over rows is long, so
    the vector blocks of the walks' products, which hold their accumulators over a short sum,
    would stream the rows once per block; measured 2-4x slower), then the partials are added
    in chunk order.
    """
    B, _, O, N = G.shape
    J = A.shape[2]
    steps = t1 - t0
    R = B * steps
    chunks = max(1, min(WEIGHT_GRAD_CHUNKS, R))
    size = (R + chunks - 1) // chunks
    partial = np.zeros((chunks, J, O, N), G.dtype)
    partial_bias = np.zeros((chunks, O, N), G.dtype)
    for c in prange(chunks):
        acc = partial[c]
        bias = partial_bias[c]
        r = c * size
        stop = min(R, r + size)
        while r + 4 <= stop:
            _add_outer4(acc, bias, _block_row(A, r, steps, t0), _block_row(A, r + 1, steps, t0),
                        _block_row(A, r + 2, steps, t0), _block_row(A, r + 3, steps, t0),
                        _block_row(G, r, steps, t0), _block_row(G, r + 1, steps, t0),
                        _block_row(G, r + 2, steps, t0), _block_row(G, r + 3, steps, t0))
            r += 4
        while r < stop:
            _add_outer1(acc, bias, _block_row(A, r, steps, t0), _block_row(G, r, steps, t0))
            r += 1
    _sum_chunks(partial, out)
    _sum_chunks(partial_bias, bias_out)


@njit(inline="always", **_JIT)
def _block_row(X, r, steps, t0):
    """Row r of the time block [t0, t0 + steps) of X [B,T,…]: X[r // steps, t0 + r % steps]."""
    b = r // steps
    return X[b, t0 + r - b * steps]


STEP_BLOCK = 16  # time steps per vector in recurrent_weight_grad (one AVX-512 register of float32)


@njit(parallel=True, **_JIT)
def recurrent_weight_grad(GB, O, o0, rec_i, rec_k, rec_src, partial_out):
    """partial_out[b, e] = Σ_t GB[b,t,k_e,i_e] · o_{t−1}[b, src_e] (o_{−1} = o0): ∂loss/∂w_e per batch row.

    GB [B,T,nb,N] from ``network_backward``; O [B,T,N] the forward's outputs; partial_out [B,E].
    Blocks of STEP_BLOCK steps are transposed (channel-major) so that every entry's sum over
    the block is one unit-stride product; the per-step lanes are added at the end.
    """
    B, T, nb, N = GB.shape
    n_rec = rec_i.shape[0]
    rec_chan = rec_k * N + rec_i
    S = STEP_BLOCK
    for bb in prange(B):
        gT = np.zeros((nb * N, S), GB.dtype)
        oT = np.zeros((N, S), GB.dtype)
        lanes = np.zeros((n_rec, S), GB.dtype)
        for t0 in range(0, T, S):
            steps = min(S, T - t0)
            for tt in range(steps):
                t = t0 + tt
                o_prev = O[bb, t - 1] if t > 0 else o0[bb]
                gb_flat = _flat(GB[bb, t])
                for c in range(nb * N):
                    gT[c, tt] = gb_flat[c]
                for j in range(N):
                    oT[j, tt] = o_prev[j]
            for tt in range(steps, S):  # a short last block: the unused lanes add zeros
                for j in range(N):
                    oT[j, tt] = 0
            for e in range(n_rec):
                g = gT[rec_chan[e]]
                o = oT[rec_src[e]]
                lane = lanes[e]
                for tt in range(S):
                    lane[tt] += g[tt] * o[tt]
        acc = partial_out[bb]
        for e in range(n_rec):
            total = GB.dtype.type(0)
            for tt in range(S):
                total += lanes[e, tt]
            acc[e] = total


# ---- the readout's products -------------------------------------------------------------
#
# Plain NumPy ``@`` would do, but OpenBLAS's threads, woken after each Numba kernel, made these
# small products the slowest part of a step (measured on 2 cores: 60-70 ms for dYᵀ·O of the
# SHD-Adding shape, 3200 x 19 x 128, against 0.4 ms single-threaded). Here they run in the
# Numba thread pool like everything else, through the register-blocked product of kernels/cpu.py.

ROW_BLOCK = 64
# Below this many multiply-adds a readout product runs on the calling thread: waking the pool's
# sleeping threads for it cost more than its work (measured on 2 cores, 2026-12-08: the
# 173-parameter network's three readout products took ~0.25 ms of a 2.3 ms step in parallel,
# ~0.1 ms serial; SHD-Adding's 7.8M-MAC dYᵀ·O tied). Both forms run the same loop, so the
# result is the same to the bit.
SERIAL_BELOW_MACS = 2_000_000


def rows_product(A, Bt, bias, out):
    """out = A @ Bt + bias:  A [R,K], Bt [K,M] (rows contiguous), bias [M], out [R,M].

    Blocks of ROW_BLOCK rows run in parallel, each summing over k in ascending order.
    """
    serial = A.shape[0] * A.shape[1] * Bt.shape[1] < SERIAL_BELOW_MACS
    (_rows_product_serial if serial else _rows_product_parallel)(A, Bt, bias, out)


@njit(inline="always", **_JIT)
def _rows_product(A, Bt, bias, out):
    R = A.shape[0]
    n_blocks = (R + ROW_BLOCK - 1) // ROW_BLOCK
    for blk in prange(n_blocks):
        r0 = blk * ROW_BLOCK
        r1 = min(R, r0 + ROW_BLOCK)
        part = out[r0:r1]
        for r in range(r1 - r0):
            part[r, :] = bias
        _accumulate_product(A[r0:r1], Bt, part)


@njit(parallel=True, **_JIT)
def _rows_product_parallel(A, Bt, bias, out):
    _rows_product(A, Bt, bias, out)


@njit(**_JIT)
def _rows_product_serial(A, Bt, bias, out):
    _rows_product(A, Bt, bias, out)


def rows_transposed_product(A, G, out):
    """out = Aᵀ @ G:  A [R,K], G [R,M], out [K,M] (a weight gradient summed over all R rows).

    The rows are cut into WEIGHT_GRAD_CHUNKS chunks summed in parallel, then added in chunk
    order, so the result does not depend on the thread count.
    """
    serial = A.shape[0] * A.shape[1] * G.shape[1] < SERIAL_BELOW_MACS
    (_rows_transposed_product_serial if serial else _rows_transposed_product_parallel)(A, G, out)


@njit(inline="always", **_JIT)
def _rows_transposed_product(A, G, out):
    R, K = A.shape
    M = G.shape[1]
    chunks = max(1, min(WEIGHT_GRAD_CHUNKS, R))
    size = (R + chunks - 1) // chunks
    partial = np.zeros((chunks, K, M), G.dtype)
    for c in prange(chunks):
        r0 = c * size
        r1 = min(R, r0 + size)
        if r1 > r0:
            _accumulate_product(A[r0:r1].T, G[r0:r1], partial[c])
    _add_chunks(partial, out)


@njit(parallel=True, **_JIT)
def _rows_transposed_product_parallel(A, G, out):
    _rows_transposed_product(A, G, out)


@njit(**_JIT)
def _rows_transposed_product_serial(A, G, out):
    _rows_transposed_product(A, G, out)
