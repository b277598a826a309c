"""Numba CPU kernels: the parts of the ELM that are not plain GEMMs.

Shapes use B batch, T time, D inputs, S synapses, C scan channels (branches,
or synapses on v1's per-synapse path), Dm memory units, H hidden width,
W0 width of the first MLP layer (H, or Dm when the MLP has no hidden layer),
L hidden layers, Lh = max(L − 1, 0) hidden-to-hidden layers.

Every kernel writes into caller-owned output arrays (named ``*_out``); none
keeps state between calls. All float arrays of one call share the model dtype
(float32 or float64); scalars passed as ``phi_*`` must have that dtype too so
that float32 kernels stay in float32 arithmetic.

Routing is a sparse map "input i feeds synapses entry_syn[indptr[i]:indptr[i+1]]"
(CSR). Spike inputs are mostly zeros, so the routing kernels skip zero inputs
instead of running a dense (D × C) GEMM.
"""

import sys

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import pointwise as pw
from . import simd

# Optional parts of the kernel contract (kernels/contract.py) this module provides.
CAPABILITIES = frozenset({"sparse_first_layer", "forward_without_cache"})

# error_model="numpy": Python's error model checks every float division for a zero
# divisor, and that branch stops LLVM from vectorising the loops around it
# (measured: the SiLU/tanh loops of the recurrence ran 8x slower).
_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})


# ---- routing ------------------------------------------------------------------
#
# Spike inputs are ~99 % zeros, and finding the non-zeros dominated the routing
# kernels. One-byte inputs (uint8 / int8 spikes) are therefore also read as 64-bit
# words, eight inputs per test (``_row_nonzeros``); wider dtypes are read one by one.


def _words(X):
    """A uint64 view of X's bytes when X has one-byte items, else an empty array."""
    if X.dtype.itemsize != 1:
        return np.empty(0, np.uint64)
    flat = X.reshape(-1)
    return flat[: flat.size // 8 * 8].view(np.uint64)


_LITTLE_ENDIAN = sys.byteorder == "little"  # the first of a word's bytes is its lowest


@intrinsic
def _trailing_zeros(typingctx, word):
    """How many zero bits a non-zero uint64 ends with (LLVM's cttz: one instruction on x86 and ARM)."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        cttz = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]),
                                              "llvm.cttz.i64")
        return builder.call(cttz, [args[0], ir.Constant(ir.IntType(1), 1)])

    return types.int64(types.uint64), codegen


@njit(inline="always", cache=True, error_model="numpy")
def _row_nonzeros(x_row, words, start, idx):
    """Write the positions of x_row's non-zeros into idx; return how many there are.

    x_row  [D]   one input row; start is the flat index of its first item in X.
    words  [W]   uint64 view of X's bytes (``_words``), or empty to test item by item.
    idx    [D]   int64 scratch, overwritten.
    """
    D = x_row.shape[0]
    n = 0
    i = 0
    if words.size:
        # Items up to the next word boundary, then whole words, then the tail.
        lead = min((8 - start % 8) % 8, D)
        while i < lead:
            if x_row[i] != 0:
                idx[n] = i
                n += 1
            i += 1
        w = (start + i) // 8
        while i + 8 <= D:
            word = words[w]
            if _LITTLE_ENDIAN:
                # Each non-zero byte in turn, lowest address first: one test per spike, not per byte
                # (the per-byte tests' mispredicted branches were most of the routing's time).
                while word != 0:
                    byte = _trailing_zeros(word) >> 3
                    idx[n] = i + byte
                    n += 1
                    word &= ~(np.uint64(0xFF) << np.uint64(8 * byte))
            elif word != 0:
                for q in range(8):
                    if x_row[i + q] != 0:
                        idx[n] = i + q
                        n += 1
            i += 8
            w += 1
    while i < D:
        if x_row[i] != 0:
            idx[n] = i
            n += 1
        i += 1
    return n


@njit(inline="always", **_JIT)
def _prefetch_row(row):
    """Hints a 1-D row into the caches, one hint per 64-byte line (``simd.prefetch``)."""
    for x in range(0, row.shape[0], 64 // row.itemsize):
        simd.prefetch(row, x)


@njit(parallel=True, **_JIT)
def _route_forward(X, words, indptr, channel, entry_weight, A_out):
    B, T, D = X.shape
    for b in prange(B):
        idx = np.empty(D, np.int64)
        for t in range(T):
            row = A_out[b, t]
            row[:] = 0
            x_row = X[b, t]
            for q in range(_row_nonzeros(x_row, words, (b * T + t) * D, idx)):
                i = idx[q]
                x = x_row[i]
                for e in range(indptr[i], indptr[i + 1]):
                    row[channel[e]] += x * entry_weight[e]


def route_forward(X, indptr, entry_syn, entry_weight, syn_per_channel, A_out):
    """A_out[b,t,c] = Σ_{entries e of input i, channel(e) = c} X[b,t,i] · entry_weight[e].

    X            [B,T,D]  input, read only (float, or one-byte integers).
    indptr       [D+1]    int64 CSR row pointers over inputs.
    entry_syn    [E]      int64 synapse id of each entry.
    entry_weight [E]      w_s[j] · mask[j] of the entry's synapse.
    A_out        [B,T,C]  overwritten; channel(e) = entry_syn[e] // syn_per_channel.
    """
    _route_forward(X, _words(X), indptr, entry_syn // syn_per_channel, entry_weight, A_out)


@njit(parallel=True, **_JIT)
def _route_weight_grad(X, words, indptr, entry_syn, channel, entry_mask, dA, partial_out):
    B, T, D = X.shape
    for b in prange(B):
        idx = np.empty(D, np.int64)
        acc = partial_out[b]
        acc[:] = 0
        for t in range(T):
            # The spikes read their channels' gradients from all over the row, a page of its own:
            # the next step's row is hinted while this one is summed.
            if t + 1 < T:
                _prefetch_row(dA[b, t + 1])
            x_row = X[b, t]
            g_row = dA[b, t]
            for q in range(_row_nonzeros(x_row, words, (b * T + t) * D, idx)):
                i = idx[q]
                x = x_row[i]
                for e in range(indptr[i], indptr[i + 1]):
                    acc[entry_syn[e]] += x * entry_mask[e] * g_row[channel[e]]


def route_weight_grad(X, indptr, entry_syn, entry_mask, syn_per_channel, dA, partial_out):
    """partial_out[b,j] = Σ_t Σ_{entries e of synapse j} X[b,t,i(e)] · mask · dA[b,t,channel(j)].

    The gradient w.r.t. w_s is partial_out.sum(0); per-batch rows keep the
    parallel loop free of write conflicts.
    dA          [B,T,C]  gradient w.r.t. the routed channel input, read only.
    partial_out [B,S]    overwritten.
    """
    _route_weight_grad(X, _words(X), indptr, entry_syn, entry_syn // syn_per_channel, entry_mask, dA,
                       partial_out)


@njit(parallel=True, **_JIT)
def route_input_grad(dA, indptr, entry_syn, entry_weight, syn_per_channel, dX_out):
    """dX_out[b,t,i] = Σ_{entries e of input i} entry_weight[e] · dA[b,t,channel(e)]."""
    B, T, D = dX_out.shape
    channel = entry_syn // syn_per_channel  # once, not once per entry visit
    for b in prange(B):
        for t in range(T):
            g_row = dA[b, t]
            for i in range(D):
                acc = dX_out.dtype.type(0)
                for e in range(indptr[i], indptr[i + 1]):
                    acc += entry_weight[e] * g_row[channel[e]]
                dX_out[b, t, i] = acc


# ---- the first layer's branch columns on sparse input (CPU only) ---------------------
#
# When every scan channel has the same decay κ, the scan commutes with the first
# layer:  scan_κ(R) @ W0bᵀ = scan_κ(R @ W0bᵀ),  and its adjoint gives
# dW0b = Σ_t revscan_κ(dZ0)ᵀ R.  With sparse R (spike input over many branches,
# SHD: 700 branches at ~5 % density) the products then cost nnz(R)·W0 instead of
# B·T·nb·W0, and the dense (B·T × nb) GEMMs disappear.

@njit(parallel=True, **_JIT)
def sparse_rows_product(R, W0bT, P_out):
    """P_out[b,t,:] = Σ_{k: R[b,t,k] ≠ 0} R[b,t,k] · W0bT[k,:].

    R [B,T,nb] routed input, read only; W0bT [nb,W0] branch columns of the first
    layer, transposed; P_out [B,T,W0] overwritten.
    """
    B, T, nb = R.shape
    W0 = P_out.shape[2]
    for b in prange(B):
        for t in range(T):
            out = P_out[b, t]
            for j in range(W0):
                out[j] = 0
            r_row = R[b, t]
            for k in range(nb):
                r = r_row[k]
                if r != 0:
                    w = W0bT[k]
                    for j in range(W0):
                        out[j] += r * w[j]


@njit(parallel=True, **_JIT)
def sparse_rows_weight_grad(R, G, partial_out):
    """partial_out[c,k,:] = Σ_{b in chunk c, t: R[b,t,k] ≠ 0} R[b,t,k] · G[b,t,:].

    G [B,T,W0] is revscan_κ(∂loss/∂z_0). partial_out [C,nb,W0] (C chunks of the batch,
    one per thread) is overwritten; dW0bᵀ is its sum over chunks. Rows of R are read
    in order, which matters: R is mostly zeros and scanning it dominates.
    """
    B, T, nb = R.shape
    W0 = G.shape[2]
    chunks = partial_out.shape[0]
    for c in prange(chunks):
        acc = partial_out[c]
        acc[:] = 0
        for b in range(c, B, chunks):
            for t in range(T):
                r_row = R[b, t]
                g = G[b, t]
                for k in range(nb):
                    r = r_row[k]
                    if r != 0:
                        row = acc[k]
                        for j in range(W0):
                            row[j] += r * g[j]


@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"contract", "reassoc"})
def _route_weight_grad_projected(X, words, indptr, entry_syn, channel, entry_mask, G, W0bT, partial_out):
    B, T, D = X.shape
    W0 = G.shape[2]
    for b in prange(B):
        idx = np.empty(D, np.int64)
        acc = partial_out[b]
        acc[:] = 0
        for t in range(T):
            x_row = X[b, t]
            g = G[b, t]
            for q in range(_row_nonzeros(x_row, words, (b * T + t) * D, idx)):
                i = idx[q]
                x = x_row[i]
                for e in range(indptr[i], indptr[i + 1]):
                    w = W0bT[channel[e]]
                    d = g[0] * w[0]
                    for h in range(1, W0):
                        d += g[h] * w[h]
                    acc[entry_syn[e]] += x * entry_mask[e] * d


def route_weight_grad_projected(X, indptr, entry_syn, entry_mask, syn_per_channel, G, W0bT, partial_out):
    """route_weight_grad with dA[b,t,k] = G[b,t,:] · W0bT[k,:] formed only where an input spiked.

    The dense dA = G @ W0b would cost B·T·nb·W0; here each input event costs one
    dot product of length W0 per synapse it feeds ("reassoc" lets that sum vectorise).
    """
    _route_weight_grad_projected(X, _words(X), indptr, entry_syn, entry_syn // syn_per_channel, entry_mask,
                                 G, W0bT, partial_out)


# ---- linear leaky scans ---------------------------------------------------------

@njit(parallel=True, **_JIT)
def scan_forward(A, kappa, u0, U_out):
    """U_out[:,t] = kappa ⊙ U_out[:,t−1] + A[:,t], with U_out[:,−1] = u0.

    A [B,T,C] may be the same array as U_out (in-place scan). kappa [C], u0 [B,C].
    """
    B, T, C = A.shape
    for b in prange(B):
        prev = u0[b].copy()
        for t in range(T):
            for c in range(C):
                prev[c] = kappa[c] * prev[c] + A[b, t, c]
                U_out[b, t, c] = prev[c]


@njit(parallel=True, **_JIT)
def scan_backward(dU, kappa, dA_next, dA_out):
    """Adjoint of scan_forward: dA_out[:,t] = dU[:,t] + kappa ⊙ dA_out[:,t+1].

    dA_next [B,C] stands for dA_out[:,T], the adjoint from steps after this walk: zeros for
    a whole sequence, the later segment's dA_out[:,0] when the backward walks segments.
    dU may be the same array as dA_out. The gradient w.r.t. u0 is kappa ⊙ dA_out[:,0].
    """
    B, T, C = dU.shape
    for b in prange(B):
        nxt = dA_next[b].copy()
        for t in range(T - 1, -1, -1):
            for c in range(C):
                nxt[c] = dU[b, t, c] + kappa[c] * nxt[c]
                dA_out[b, t, c] = nxt[c]


# ---- the MLP-and-memory recurrence ------------------------------------------------
#
# Both passes walk time for a tile of batch rows at once, so each weight row
# loaded into L1 serves the whole tile, and every matrix product is
# ``simd.broadcast_product`` (the tile's sums held in registers). Tiles run in parallel.
# ``_accumulate_product`` below is the plain-loop product for operands that may be strided
# views (the ELM Network's readout takes it with a transposed A).

@njit(inline="always", cache=True, error_model="numpy", fastmath={"contract"})
def _accumulate_product(A, Wt, out):
    """out[n, :] += A[n, :] @ Wt for a tile: A [n,K], Wt [K,N] (rows contiguous), out [n,N].

    Blocks of 4 tile rows × 4 rows of Wt: each loaded Wt element serves four
    output rows and each output element is loaded and stored once per four
    products. The inner loop over N is contiguous in every operand and
    vectorises (measured 60 GMAC/s on one core in float32, against 44 for
    one row at a time).
    """
    n, K = A.shape
    N = Wt.shape[1]
    r = 0
    while r + 4 <= n:
        o0, o1, o2, o3 = out[r], out[r + 1], out[r + 2], out[r + 3]
        k = 0
        while k + 4 <= K:
            w0, w1, w2, w3 = Wt[k], Wt[k + 1], Wt[k + 2], Wt[k + 3]
            a00, a01, a02, a03 = A[r, k], A[r, k + 1], A[r, k + 2], A[r, k + 3]
            a10, a11, a12, a13 = A[r + 1, k], A[r + 1, k + 1], A[r + 1, k + 2], A[r + 1, k + 3]
            a20, a21, a22, a23 = A[r + 2, k], A[r + 2, k + 1], A[r + 2, k + 2], A[r + 2, k + 3]
            a30, a31, a32, a33 = A[r + 3, k], A[r + 3, k + 1], A[r + 3, k + 2], A[r + 3, k + 3]
            for j in range(N):
                x0, x1, x2, x3 = w0[j], w1[j], w2[j], w3[j]
                o0[j] += a00 * x0 + a01 * x1 + a02 * x2 + a03 * x3
                o1[j] += a10 * x0 + a11 * x1 + a12 * x2 + a13 * x3
                o2[j] += a20 * x0 + a21 * x1 + a22 * x2 + a23 * x3
                o3[j] += a30 * x0 + a31 * x1 + a32 * x2 + a33 * x3
            k += 4
        while k < K:
            w0 = Wt[k]
            a0, a1, a2, a3 = A[r, k], A[r + 1, k], A[r + 2, k], A[r + 3, k]
            for j in range(N):
                x0 = w0[j]
                o0[j] += a0 * x0
                o1[j] += a1 * x0
                o2[j] += a2 * x0
                o3[j] += a3 * x0
            k += 1
        r += 4
    while r < n:
        row = out[r]
        for k in range(K):
            a0 = A[r, k]
            w0 = Wt[k]
            for j in range(N):
                row[j] += a0 * w0[j]
        r += 1


def batch_chunks():
    """How many per-thread partial sums a reduction over the batch keeps."""
    return max(numba.get_num_threads(), 1)


def batch_tile(B):
    """Rows per tile: one tile per thread, at most 16 rows (the tile's state stays in L1)."""
    threads = max(numba.get_num_threads(), 1)
    return max(1, min(16, -(-B // threads)))


def recur_forward(Zb, W0mT, WhT, ch, WoT, co, kappa_m, c_m, m0, activation, phi_scale, phi_slope,
                  tile, M_out, Z_out, DM_out, KM_out):
    """Run the MLP-and-memory recurrence over all T steps.

    Per step:  z_0 = Zb[:,t] + W0m (κ_m ⊙ m_{t−1});  a_l = act(z_l);
               z_l = W_l a_{l−1} + c_l (0 < l < L);  o = W_o a_{L−1} + c_o;
               Δm = φ(o);  m_t = κ_m ⊙ m_{t−1} + c_m ⊙ Δm.
    With L = 0 there is no hidden layer: o = z_0 and Zb already holds c_o.

    Zb     [B,T,W0]   branch part of the first layer plus its bias (one GEMM upstream).
    W0mT   [Dm,W0]    memory columns of the first layer, transposed (rows contiguous).
    WhT    [Lh,H,H]   hidden-to-hidden weights, transposed; ch [Lh,H] their biases.
    WoT    [H,Dm]     output layer, transposed; co [Dm]. Unused (any shape) when L = 0.
    kappa_m, c_m [Dm] memory decay and input gain (λ(1−κ_m) in v1, 1−κ_λ in v2).
    m0     [B,Dm]     state before the first step.
    activation        act's code (``pointwise.ACTIVATION_CODES``).
    tile              batch rows walked together (``batch_tile``); any value ≥ 1 is correct.
    M_out  [B,T,Dm]   m_t after each step.
    Z_out  [L,B,T,H]  pre-activations z_l, kept for the backward pass (L = Z_out.shape[0]).
    DM_out [B,T,Dm]   Δm_t, kept for the backward pass (φ' and ∂/∂c_m need it).
    KM_out [B,T,Dm]   κ_m ⊙ m_{t−1}, the memory half of the first layer's input; may be a
                      strided view (the model passes the columns beside U of one buffer, so
                      the first layer's weight gradient is a single GEMM).
    """
    _recur_forward(Zb, W0mT, WhT, ch, WoT, co, kappa_m, c_m, m0, activation, phi_scale, phi_slope, tile, True,
                   M_out, Z_out, DM_out, KM_out)


def recur_forward_without_cache(Zb, W0mT, WhT, ch, WoT, co, kappa_m, c_m, m0, activation, phi_scale, phi_slope,
                                tile, num_hidden_layers, M_out):
    """``recur_forward`` for inference and streaming (capability "forward_without_cache"): the same
    walk, bit for bit, writing only M_out [B,T,Dm] (the readout's input and the last state), not the
    backward's Z, Δm and κ_m ⊙ m_{t−1}. ``num_hidden_layers`` is L (WoT's placeholder shape does
    not tell it). On NeuronIO-best those arrays are ~26 MB a pass.
    """
    B, T, W0 = Zb.shape
    Dm = kappa_m.shape[0]
    dt = Zb.dtype
    # No rows: the walk reads these placeholders' shapes (L, and H = W0 when L > 0) and writes nothing into them.
    # KM's is a strided view, as the model's KM_out is, so that both calls share one compiled walk.
    _recur_forward(Zb, W0mT, WhT, ch, WoT, co, kappa_m, c_m, m0, activation, phi_scale, phi_slope, tile, False,
                   M_out, np.empty((num_hidden_layers, 0, T, W0), dt), np.empty((0, T, Dm), dt),
                   np.empty((0, T, Dm + 1), dt)[:, :, 1:])


@njit(parallel=True, **_JIT)
def _recur_forward(Zb, W0mT, WhT, ch, WoT, co, kappa_m, c_m, m0, activation, phi_scale, phi_slope, tile, keep_cache,
                   M_out, Z_out, DM_out, KM_out):
    B, T, W0 = Zb.shape
    Dm = kappa_m.shape[0]
    L = Z_out.shape[0]
    H = Z_out.shape[3]
    dt = Zb.dtype
    n_tiles = (B + tile - 1) // tile
    for ti in prange(n_tiles):
        b0 = ti * tile
        n = min(tile, B - b0)
        m = m0[b0:b0 + n].copy()
        km_m = np.empty((n, Dm), dt)
        z0 = np.empty((n, W0), dt)
        a = np.empty((n, H), dt)
        z = np.empty((n, H), dt)
        o = np.empty((n, Dm), dt)
        for t in range(T):
            for r in range(n):
                for i in range(Dm):
                    km_m[r, i] = kappa_m[i] * m[r, i]
                if keep_cache:
                    KM_out[b0 + r, t] = km_m[r]
                z0[r] = Zb[b0 + r, t]
            simd.broadcast_product(km_m, W0mT, z0)
            if L == 0:
                o[:] = z0
            else:
                if keep_cache:
                    for r in range(n):
                        Z_out[0, b0 + r, t] = z0[r]
                pw.activate_all(z0.reshape(-1), a.reshape(-1), n * H, activation)
                for l in range(1, L):
                    for r in range(n):
                        z[r] = ch[l - 1]
                    simd.broadcast_product(a, WhT[l - 1], z)
                    if keep_cache:
                        for r in range(n):
                            Z_out[l, b0 + r, t] = z[r]
                    pw.activate_all(z.reshape(-1), a.reshape(-1), n * H, activation)
                for r in range(n):
                    o[r] = co
                simd.broadcast_product(a, WoT, o)
            for r in range(n):
                for i in range(Dm):
                    dm = pw.phi(o[r, i], phi_scale, phi_slope)
                    if keep_cache:
                        DM_out[b0 + r, t, i] = dm
                    m[r, i] = km_m[r, i] + c_m[i] * dm
                M_out[b0 + r, t] = m[r]


@njit(parallel=True, **_JIT)
def recur_backward(dM, W0m, Wh, Wo, kappa_m, c_m, m0, M, Z, DM, activation, phi_scale, phi_slope, tile, carry,
                   dZ_out, dO_out, gkappa_out, gc_out, act_out):
    """Backpropagation through time of recur_forward.

    dM     [B,T,Dm]   ∂loss/∂m_t from the readout (not including later steps).
    W0m    [W0,Dm]    memory columns of the first layer (untransposed: W0mᵀ·dz is then a
                      product with contiguous rows, as in the forward).
    Wh     [Lh,H,H], Wo [Dm,H]  untransposed weights.
    M, Z, DM          the forward's M_out, Z_out, DM_out, unchanged.
    tile              batch rows walked together; any value ≥ 1 is correct.
    dZ_out [L,B,T,H]  ∂loss/∂z_l for every step (for the weight GEMMs).
    dO_out [B,T,Dm]   ∂loss/∂o, the output-layer pre-activation (with L = 0 it is also ∂loss/∂z_0).
    gkappa_out [B,Dm] per-batch Σ_t ∂loss/∂κ_m through both κ_m ⊙ m_{t−1} uses, ADDED to what
                      it holds (zero it for a whole sequence): a backward walked in segments,
                      last first, then sums in exactly the order of one walk over all T.
    gc_out     [B,Dm] per-batch Σ_t ∂loss/∂c_m, added to likewise.
    act_out [L,B,T,H] the activations act(z_l), the inputs of the weight GEMMs; written
                      here because the SiLU slope needs σ(z_l) anyway (may alias nothing else).
    carry  [B,Dm]     in: ∂loss/∂m_{T−1} through steps after this walk (zeros for a whole
                      sequence); out: ∂loss/∂m_{−1}, the gradient reaching m0 (what the
                      walk of the segment before needs).
    """
    B, T, Dm = dM.shape
    L = Z.shape[0]
    H = Z.shape[3]
    W0 = W0m.shape[0]
    dt = dM.dtype
    n_tiles = (B + tile - 1) // tile
    for ti in prange(n_tiles):
        b0 = ti * tile
        n = min(tile, B - b0)
        carry_t = carry[b0:b0 + n].copy()
        g = np.empty((n, Dm), dt)
        do = np.empty((n, Dm), dt)
        da = np.empty((n, H), dt)
        dz = np.empty((n, H), dt)
        dz0 = np.empty((n, W0), dt)
        r_m = np.empty((n, Dm), dt)
        gk = gkappa_out[b0:b0 + n]
        gc = gc_out[b0:b0 + n]
        for t in range(T - 1, -1, -1):
            for r in range(n):
                b = b0 + r
                for i in range(Dm):
                    # (a) g = dM + carry
                    g[r, i] = dM[b, t, i] + carry_t[r, i]
                    # (b) gc += g ⊙ Δm
                    dm = DM[b, t, i]
                    gc[r, i] += g[r, i] * dm
                    # (c) do = g ⊙ c_m ⊙ φ'(o),  φ'(o) = s·k·(1 − (Δm/s)²)
                    do[r, i] = pw.phi_backward(g[r, i] * c_m[i], dm, phi_scale, phi_slope)
                dO_out[b, t] = do[r]
            # (d) da = W_oᵀ do; for l = L−1 … 0: dz_l = da ⊙ act'(z_l), da = W_lᵀ dz_l   (L = 0: dz0 = do)
            if L == 0:
                dz0[:] = do
            else:
                da[:] = 0
                simd.broadcast_product(do, Wo, da)
                for l in range(L - 1, -1, -1):
                    for r in range(n):
                        pw.activation_backward_all(Z[l, b0 + r, t], da[r], dz[r], act_out[l, b0 + r, t], H,
                                                   activation)
                        dZ_out[l, b0 + r, t] = dz[r]
                    if l > 0:
                        da[:] = 0
                        simd.broadcast_product(dz, Wh[l - 1], da)
                dz0[:] = dz
            # (e) r = W0mᵀ dz0
            r_m[:] = 0
            simd.broadcast_product(dz0, W0m, r_m)
            for r in range(n):
                b = b0 + r
                for i in range(Dm):
                    # (f) total = g + r;  gk += total ⊙ m_{t−1};  carry = κ_m ⊙ total
                    m_prev = M[b, t - 1, i] if t > 0 else m0[b, i]
                    total = g[r, i] + r_m[r, i]
                    gk[r, i] += total * m_prev
                    carry_t[r, i] = kappa_m[i] * total
        carry[b0:b0 + n] = carry_t
