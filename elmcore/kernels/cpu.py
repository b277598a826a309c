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

import numpy as np
from numba import njit, prange

_JIT = dict(cache=True, nogil=True)


# ---- routing ------------------------------------------------------------------

@njit(parallel=True, **_JIT)
def route_forward(X, indptr, entry_syn, entry_weight, syn_per_channel, A_out):
    """A_out[b,t,c] = Σ_{entries e of input i, channel(e) = c} X[b,t,i] · entry_weight[e].

    X            [B,T,D]  input, read only.
    indptr       [D+1]    int64 CSR row pointers over inputs.
    entry_syn    [E]      int64 synapse id of each entry.
    entry_weight [E]      w_s[j] · mask[j] of the entry's synapse.
    A_out        [B,T,C]  overwritten; channel(e) = entry_syn[e] // syn_per_channel.
    """
    B, T, D = X.shape
    for b in prange(B):
        for t in range(T):
            row = A_out[b, t]
            row[:] = 0
            x_row = X[b, t]
            for i in range(D):
                x = x_row[i]
                if x != 0:
                    for e in range(indptr[i], indptr[i + 1]):
                        row[entry_syn[e] // syn_per_channel] += x * entry_weight[e]


@njit(parallel=True, **_JIT)
def route_weight_grad(X, indptr, entry_syn, entry_mask, syn_per_channel, dA, partial_out):
    """partial_out[b,j] = Σ_t Σ_{entries e of synapse j} X[b,t,i(e)] · mask · dA[b,t,channel(j)].

    The gradient w.r.t. w_s is partial_out.sum(0); per-batch rows keep the
    parallel loop free of write conflicts.
    dA          [B,T,C]  gradient w.r.t. the routed channel input, read only.
    partial_out [B,S]    overwritten.
    """
    B, T, D = X.shape
    for b in prange(B):
        acc = partial_out[b]
        acc[:] = 0
        for t in range(T):
            x_row = X[b, t]
            g_row = dA[b, t]
            for i in range(D):
                x = x_row[i]
                if x != 0:
                    for e in range(indptr[i], indptr[i + 1]):
                        j = entry_syn[e]
                        acc[j] += x * entry_mask[e] * g_row[j // syn_per_channel]


@njit(parallel=True, **_JIT)
def route_input_grad(dA, indptr, entry_syn, entry_weight, syn_per_channel, dX_out):
    """dX_out[b,t,i] = Σ_{entries e of input i} entry_weight[e] · dA[b,t,channel(e)]."""
    B, T, D = dX_out.shape
    for b in prange(B):
        for t in range(T):
            g_row = dA[b, t]
            for i in range(D):
                acc = dX_out.dtype.type(0)
                for e in range(indptr[i], indptr[i + 1]):
                    acc += entry_weight[e] * g_row[entry_syn[e] // syn_per_channel]
                dX_out[b, t, i] = acc


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
def scan_backward(dU, kappa, dA_out):
    """Adjoint of scan_forward: dA_out[:,t] = dU[:,t] + kappa ⊙ dA_out[:,t+1].

    dU may be the same array as dA_out. The gradient w.r.t. u0 is kappa ⊙ dA_out[:,0].
    """
    B, T, C = dU.shape
    for b in prange(B):
        nxt = np.zeros(C, dU.dtype)
        for t in range(T - 1, -1, -1):
            for c in range(C):
                nxt[c] = dU[b, t, c] + kappa[c] * nxt[c]
                dA_out[b, t, c] = nxt[c]


# ---- the MLP-and-memory recurrence ------------------------------------------------

@njit(inline="always")
def _activate(z, silu):
    if silu:
        return z / (1 + np.exp(-z))
    return z if z > 0 else z * 0


@njit(inline="always")
def _activation_slope(z, silu):
    if silu:
        s = 1 / (1 + np.exp(-z))
        return s * (1 + z * (1 - s))
    return z * 0 + 1 if z > 0 else z * 0


@njit(parallel=True, **_JIT)
def recur_forward(Zb, W0mT, WhT, ch, WoT, co, kappa_m, c_m, m0, silu, phi_scale, phi_slope,
                  M_out, Z_out, DM_out):
    """Run the MLP-and-memory recurrence over all T steps.

    Per step:  z_0 = Zb[:,t] + W0m (κ_m ⊙ m_{t−1});  a_l = act(z_l);
               z_l = W_l a_{l−1} + c_l (0 < l < L);  o = W_o a_{L−1} + c_o;
               Δm = φ(o);  m_t = κ_m ⊙ m_{t−1} + c_m ⊙ Δm.
    With L = 0 there is no hidden layer: o = z_0 and Zb already holds c_o.

    Zb     [B,T,W0]   branch part of the first layer plus its bias (one GEMM upstream).
    W0mT   [Dm,W0]    memory columns of the first layer, transposed (rows contiguous
                      per memory unit, so the update is an AXPY the compiler vectorises).
    WhT    [Lh,H,H]   hidden-to-hidden weights, transposed; ch [Lh,H] their biases.
    WoT    [H,Dm]     output layer, transposed; co [Dm]. Unused (any shape) when L = 0.
    kappa_m, c_m [Dm] memory decay and input gain (λ(1−κ_m) in v1, 1−κ_λ in v2).
    m0     [B,Dm]     state before the first step.
    M_out  [B,T,Dm]   m_t after each step.
    Z_out  [L,B,T,H]  pre-activations z_l, kept for the backward pass (L = Z_out.shape[0]).
    DM_out [B,T,Dm]   Δm_t, kept for the backward pass (φ' and ∂/∂c_m need it).
    """
    B, T, W0 = Zb.shape
    Dm = kappa_m.shape[0]
    L = Z_out.shape[0]
    H = Z_out.shape[3]
    for b in prange(B):
        m = m0[b].copy()
        km_m = np.empty(Dm, Zb.dtype)
        z0 = np.empty(W0, Zb.dtype)
        a = np.empty(H, Zb.dtype)
        z = np.empty(H, Zb.dtype)
        o = np.empty(Dm, Zb.dtype)
        for t in range(T):
            for i in range(Dm):
                km_m[i] = kappa_m[i] * m[i]
            z0[:] = Zb[b, t]
            for i in range(Dm):
                v = km_m[i]
                for j in range(W0):
                    z0[j] += v * W0mT[i, j]
            if L == 0:
                o[:] = z0
            else:
                for j in range(H):
                    Z_out[0, b, t, j] = z0[j]
                    a[j] = _activate(z0[j], silu)
                for l in range(1, L):
                    z[:] = ch[l - 1]
                    for i in range(H):
                        v = a[i]
                        for j in range(H):
                            z[j] += v * WhT[l - 1, i, j]
                    for j in range(H):
                        Z_out[l, b, t, j] = z[j]
                        a[j] = _activate(z[j], silu)
                o[:] = co
                for i in range(H):
                    v = a[i]
                    for j in range(Dm):
                        o[j] += v * WoT[i, j]
            for i in range(Dm):
                dm = phi_scale * np.tanh(phi_slope * o[i])
                DM_out[b, t, i] = dm
                m[i] = km_m[i] + c_m[i] * dm
                M_out[b, t, i] = m[i]


@njit(parallel=True, **_JIT)
def recur_backward(dM, W0m, Wh, Wo, kappa_m, c_m, m0, M, Z, DM, silu, phi_scale, phi_slope,
                   dZ_out, dO_out, gkappa_out, gc_out):
    """Backpropagation through time of recur_forward.

    dM     [B,T,Dm]   ∂loss/∂m_t from the readout (not including later steps).
    W0m    [W0,Dm]    memory columns of the first layer (untransposed: the adjoint
                      W0mᵀ·dz is then an AXPY over contiguous rows).
    Wh     [Lh,H,H], Wo [Dm,H]  untransposed weights.
    M, Z, DM          the forward's M_out, Z_out, DM_out, unchanged.
    dZ_out [L,B,T,H]  ∂loss/∂z_l for every step (for the weight GEMMs).
    dO_out [B,T,Dm]   ∂loss/∂o, the output-layer pre-activation (with L = 0 it is also ∂loss/∂z_0).
    gkappa_out [B,Dm] per-batch Σ_t ∂loss/∂κ_m through both κ_m ⊙ m_{t−1} uses.
    gc_out     [B,Dm] per-batch Σ_t ∂loss/∂c_m.
    The gradient w.r.t. m0 is not returned (the model always starts from zero
    when training).
    """
    B, T, Dm = dM.shape
    L = Z.shape[0]
    H = Z.shape[3]
    W0 = W0m.shape[0]
    dphi_scale = phi_scale * phi_slope
    for b in prange(B):
        carry = np.zeros(Dm, dM.dtype)
        g = np.empty(Dm, dM.dtype)
        do = np.empty(Dm, dM.dtype)
        da = np.empty(H, dM.dtype)
        dz = np.empty(H, dM.dtype)
        dz0 = np.empty(W0, dM.dtype)
        r = np.empty(Dm, dM.dtype)
        gk = gkappa_out[b]
        gc = gc_out[b]
        gk[:] = 0
        gc[:] = 0
        for t in range(T - 1, -1, -1):
            for i in range(Dm):
                g[i] = dM[b, t, i] + carry[i]
                dm = DM[b, t, i]
                gc[i] += g[i] * dm
                q = dm / phi_scale
                do[i] = g[i] * c_m[i] * dphi_scale * (1 - q * q)
                dO_out[b, t, i] = do[i]
            if L == 0:
                dz0[:] = do
            else:
                da[:] = 0
                for j in range(Dm):
                    v = do[j]
                    for i in range(H):
                        da[i] += v * Wo[j, i]
                for l in range(L - 1, -1, -1):
                    for i in range(H):
                        dz[i] = da[i] * _activation_slope(Z[l, b, t, i], silu)
                        dZ_out[l, b, t, i] = dz[i]
                    if l > 0:
                        da[:] = 0
                        for j in range(H):
                            v = dz[j]
                            for i in range(H):
                                da[i] += v * Wh[l - 1, j, i]
                dz0[:] = dz
            r[:] = 0
            for j in range(W0):
                v = dz0[j]
                for i in range(Dm):
                    r[i] += v * W0m[j, i]
            for i in range(Dm):
                m_prev = M[b, t - 1, i] if t > 0 else m0[b, i]
                total = g[i] + r[i]
                gk[i] += total * m_prev
                carry[i] = kappa_m[i] * total
