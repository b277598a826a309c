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
from .simd import blocked_product
from .cpu import route_forward, route_input_grad, route_weight_grad  # noqa: F401  (the external synapses)

_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})

# Optional parts of the kernel contract (kernels/contract.py): the network's kernels have none.
CAPABILITIES = frozenset()


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
def _add_recurrent(accT, rec_chan, rec_w, rec_src, srcT, n):
    """accT[rec_chan[e], :n] += rec_w[e] · srcT[rec_src[e], :n] for every entry e, in entry order.

    accT [C,R], srcT [S,R]: one column per batch row of the tile, so an entry is a unit-stride
    FMA over the rows (a runtime trip count: a constant one gets unrolled and stays scalar).
    """
    for e in range(rec_chan.shape[0]):
        acc = accT[rec_chan[e]]
        src = srcT[rec_src[e]]
        w = rec_w[e]
        for r in range(n):
            acc[r] += w * src[r]


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
    A0_out [B,T,I0,N]   the first layer's input a_0 per step (its top nb rows are b_t).
    Z_out  [L,B,T,H,N]  hidden pre-activations (L = Z_out.shape[0]).
    DM_out, M_out [B,T,Dm,N]  Δm_t and m_t;  O_out [B,T,N] o_t;  b_out [B,nb,N] the last b_t.
    Tiles of batch rows (``batch_tile``) run in parallel; the result does not depend on the tiling.
    """
    _network_forward(E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out, c_out,
                     kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope, batch_tile(E.shape[0]),
                     A0_out, Z_out, DM_out, M_out, O_out, b_out)


@njit(parallel=True, **_JIT)
def _network_forward(E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out, c_out,
                     kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope, R,
                     A0_out, Z_out, DM_out, M_out, O_out, b_out):
    B, T, nb, N = E.shape
    Dm = kappa_m.shape[0]
    I0, W0, _ = W_in.shape
    L = Z_out.shape[0]
    H = Z_out.shape[3]
    dt = E.dtype
    rec_chan = rec_k * N + rec_i  # flat index into a [nb,N] block: one index load per entry, not two
    n_tiles = (B + R - 1) // R
    for ti in prange(n_tiles):
        first = ti * R
        n = min(R, B - first)
        # The branch sums and o_{t−1} are kept source- / channel-major with the tile's rows
        # contiguous, so each recurrent entry is one vector FMA over the rows (module docstring).
        brT = np.empty((nb * N, R), dt)
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
        for t in range(T):
            for r in range(n):
                e_t = E[first + r, t]
                for k in range(nb):
                    for i in range(N):
                        c = k * N + i
                        brT[c, r] = kappa_b[k, i] * brT[c, r] + e_t[k, i]
            _add_recurrent(brT, rec_chan, rec_w, rec_src, oT, n)
            for r in range(n):
                bb = first + r
                a0r = a0[r]
                for k in range(nb):
                    for i in range(N):
                        a0r[k, i] = brT[k * N + i, r]
                for j in range(Dm):
                    for i in range(N):
                        a0r[nb + j, i] = kappa_m[j, i] * m[r, j, i]
                _copy(a0r, A0_out[bb, t])
            if L == 0:
                _dense_rows(a0, W_in, c_in, pre, n)
            else:
                _dense_rows(a0, W_in, c_in, z0, n)
                for r in range(n):
                    _copy(z0[r], Z_out[0, first + r, t])
                pw.activate_all(_flat(z0), _flat(a), n * H * N, activation)
                for l in range(1, L):
                    _dense_rows(a, W_hid[l - 1], c_hid[l - 1], z, n)
                    for r in range(n):
                        _copy(z[r], Z_out[l, first + r, t])
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
                _copy(dm_r, DM_out[bb, t])
                for j in range(Dm):
                    for i in range(N):
                        mr[j, i] = a0[r, nb + j, i] + c_m[j, i] * dm_r[j, i]
                _copy(mr, M_out[bb, t])
                for i in range(N):
                    o_r[i] = c_o[i]
                for j in range(Dm):
                    for i in range(N):
                        o_r[i] += w_o[j, i] * mr[j, i]
                _copy(o_r, O_out[bb, t])
                for i in range(N):
                    oT[i, r] = o_r[i]
        for r in range(n):
            for k in range(nb):
                for i in range(N):
                    b_out[first + r, k, i] = brT[k * N + i, r]


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
    A0, Z, DM, M         the forward's A0_out, Z_out, DM_out, M_out, unchanged; m0 as given to it.
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
    _network_backward(dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry, W_in, W_hid, W_out,
                      kappa_m, c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope, batch_tile(dO.shape[0]),
                      GB_out, dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b, carry_m, carry_o)


@njit(parallel=True, **_JIT)
def _network_backward(dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry, W_in, W_hid, W_out,
                      kappa_m, c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope, R,
                      GB_out, dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b_io, carry_m_io, carry_o_io):
    B, T, nb, N = GB_out.shape
    Dm = kappa_m.shape[0]
    I0, W0, _ = W_in.shape
    L = Z.shape[0]
    H = Z.shape[3]
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
    n_tiles = (B + R - 1) // R
    for ti in prange(n_tiles):
        first = ti * R
        n = min(R, B - first)
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
        g = np.empty((R, Dm, N), dt)
        dpre = np.empty((R, Dm, N), dt)
        da = np.empty((R, H, N), dt)
        dz = np.empty((R, H, N), dt)
        da0 = np.empty((R, I0, N), dt)
        for t in range(T - 1, -1, -1):
            for r in range(n):
                bb = first + r
                # (a) go = dO + carry_o
                go = GO_out[bb, t]
                for i in range(N):
                    go[i] = dO[bb, t, i] + carry_oT[i, r]
                # (b) g = w_o ⊙ go + carry_m;  gc += g ⊙ Δm;  dp = g ⊙ c_m ⊙ φ'(p)
                dm_t = DM[bb, t]
                gc = gc_out[bb]
                for j in range(Dm):
                    for i in range(N):
                        gji = w_o[j, i] * go[i] + carry_m[r, j, i]
                        g[r, j, i] = gji
                        dm = dm_t[j, i]
                        gc[j, i] += gji * dm
                        dpre[r, j, i] = pw.phi_backward(gji * c_m[j, i], dm, phi_scale, phi_slope)
                _copy(dpre[r], dP_out[bb, t])
            # (c) da = W_Lᵀ dp; for l = L−1 … 0: dz_l = da ⊙ act'(z_l), da = W_lᵀ dz_l;  da_0 = W_0ᵀ dz_0
            if L == 0:
                _dense_transposed_rows(dpre, W_in, da0, n)
            else:
                _dense_transposed_rows(dpre, W_out, da, n)
                for l in range(L - 1, -1, -1):
                    for r in range(n):
                        bb = first + r
                        pw.activation_backward_all(_flat(Z[l, bb, t]), _flat(da[r]), _flat(dz[r]),
                                                   _flat(act_out[l, bb, t]), H * N, activation)
                        _copy(dz[r], dZ_out[l, bb, t])
                    if l > 0:
                        _dense_transposed_rows(dz, W_hid[l - 1], da, n)
                _dense_transposed_rows(dz, W_in, da0, n)
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
                for k in range(nb):
                    for i in range(N):
                        gbT[k * N + i, r] = carry_b[r, k, i]
            # (f) carry_o[j] = Σ_{recurrent e with src_e = j} w_e · g_b(t)[k_e, i_e]
            # The recurrent synapses of step t read o_{t−1}: their gradient joins ∂loss/∂o_{t−1}.
            for j in range(N):
                for r in range(n):
                    carry_oT[j, r] = 0
            _add_recurrent(carry_oT, neuron_by_src, w_by_src, chan_by_src, gbT, n)
        for r in range(n):
            carry_m_io[first + r] = carry_m[r]
            carry_b_io[first + r] = carry_b[r]
            for i in range(N):
                carry_o_io[first + r, i] = carry_oT[i, r]


# Row chunks of the weight-gradient sums: a constant, so the sums' order (and the
# result, bit for bit) does not depend on the thread count.
WEIGHT_GRAD_CHUNKS = 8


@njit(parallel=True, **_JIT)
def _sum_chunks(partial, out):
    """out = Σ_c partial[c], added in chunk order: the result does not depend on the thread count.

    partial [chunks, ...] and out [...] C-contiguous, of one shape after the chunk axis.
    """
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
            G0, G1, G2, G3 = (_block_row(G, r, steps, t0), _block_row(G, r + 1, steps, t0),
                              _block_row(G, r + 2, steps, t0), _block_row(G, r + 3, steps, t0))
            A0, A1, A2, A3 = (_block_row(A, r, steps, t0), _block_row(A, r + 1, steps, t0),
                              _block_row(A, r + 2, steps, t0), _block_row(A, r + 3, steps, t0))
            for o in range(O):
                row = bias[o]
                g0, g1, g2, g3 = G0[o], G1[o], G2[o], G3[o]
                for i in range(N):
                    row[i] = (((row[i] + g0[i]) + g1[i]) + g2[i]) + g3[i]
            for j in range(J):
                a0, a1, a2, a3 = A0[j], A1[j], A2[j], A3[j]
                for o in range(O):
                    row = acc[j, o]
                    g0, g1, g2, g3 = G0[o], G1[o], G2[o], G3[o]
                    for i in range(N):
                        row[i] = (((row[i] + a0[i] * g0[i]) + a1[i] * g1[i]) + a2[i] * g2[i]) + a3[i] * g3[i]
            r += 4
        while r < stop:
            Gr, Ar = _block_row(G, r, steps, t0), _block_row(A, r, steps, t0)
            for o in range(O):
                row = bias[o]
                g = Gr[o]
                for i in range(N):
                    row[i] += g[i]
            for j in range(J):
                a = Ar[j]
                for o in range(O):
                    row = acc[j, o]
                    g = Gr[o]
                    for i in range(N):
                        row[i] += a[i] * g[i]
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


@njit(parallel=True, **_JIT)
def rows_product(A, Bt, bias, out):
    """out = A @ Bt + bias:  A [R,K], Bt [K,M] (rows contiguous), bias [M], out [R,M].

    Blocks of ROW_BLOCK rows run in parallel, each summing over k in ascending order.
    """
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
def rows_transposed_product(A, G, out):
    """out = Aᵀ @ G:  A [R,K], G [R,M], out [K,M] (a weight gradient summed over all R rows).

    The rows are cut into WEIGHT_GRAD_CHUNKS chunks summed in parallel, then added in chunk
    order, so the result does not depend on the thread count.
    """
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
    _sum_chunks(partial, out)
