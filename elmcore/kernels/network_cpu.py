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

Every kernel writes caller-owned ``*_out`` arrays and keeps no state between calls.
Float arrays of one call share the model dtype; ``phi_*`` scalars have it too.
"""

import numpy as np
from numba import njit, prange

from . import vecmath as vm
from .cpu import route_forward, route_input_grad, route_weight_grad  # noqa: F401  (the external synapses)

_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})


@njit(inline="always", **_JIT)
def _dense(a, W, c, out):
    """out[o, :] = c[o, :] + Σ_j W[j, o, :] · a[j, :]   (one matrix-vector product per neuron).

    a [J,N], W [J,O,N], c [O,N], out [O,N] (must not alias a).
    """
    J, O, N = W.shape
    for o in range(O):
        for i in range(N):
            out[o, i] = c[o, i]
    for j in range(J):
        aj = a[j]
        wj = W[j]
        for o in range(O):
            row = out[o]
            w = wj[o]
            for i in range(N):
                row[i] += w[i] * aj[i]


@njit(inline="always", **_JIT)
def _dense_transposed(dz, W, out, first, last):
    """out[j, :] = Σ_o W[j, o, :] · dz[o, :] for first ≤ j < last (the adjoint of ``_dense``)."""
    J, O, N = W.shape
    for j in range(first, last):
        row = out[j]
        for i in range(N):
            row[i] = 0
        wj = W[j]
        for o in range(O):
            w = wj[o]
            d = dz[o]
            for i in range(N):
                row[i] += w[i] * d[i]


@njit(inline="always", **_JIT)
def _activate(z, a, silu):
    O, N = z.shape
    if silu:
        for o in range(O):
            for i in range(N):
                a[o, i] = vm.silu(z[o, i])
    else:
        for o in range(O):
            for i in range(N):
                a[o, i] = max(z[o, i], 0)


@njit(parallel=True, **_JIT)
def network_forward(E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out, c_out,
                    kappa_m, c_m, w_o, c_o, b0, m0, o0, silu, phi_scale, phi_slope,
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
    """
    B, T, nb, N = E.shape
    Dm = kappa_m.shape[0]
    W0 = W_in.shape[1]
    L = Z_out.shape[0]
    H = Z_out.shape[3]
    n_rec = rec_w.shape[0]
    dt = E.dtype
    for bb in prange(B):
        branch = b0[bb].copy()
        m = m0[bb].copy()
        o = o0[bb].copy()
        z0 = np.empty((W0, N), dt)
        a = np.empty((H, N), dt)
        z = np.empty((H, N), dt)
        pre = np.empty((Dm, N), dt)
        for t in range(T):
            e_t = E[bb, t]
            for k in range(nb):
                for i in range(N):
                    branch[k, i] = kappa_b[k, i] * branch[k, i] + e_t[k, i]
            for e in range(n_rec):
                branch[rec_k[e], rec_i[e]] += rec_w[e] * o[rec_src[e]]
            a0 = A0_out[bb, t]
            for k in range(nb):
                for i in range(N):
                    a0[k, i] = branch[k, i]
            for j in range(Dm):
                for i in range(N):
                    a0[nb + j, i] = kappa_m[j, i] * m[j, i]
            if L == 0:
                _dense(a0, W_in, c_in, pre)
            else:
                _dense(a0, W_in, c_in, z0)
                Z_out[0, bb, t] = z0
                _activate(z0, a, silu)
                for l in range(1, L):
                    _dense(a, W_hid[l - 1], c_hid[l - 1], z)
                    Z_out[l, bb, t] = z
                    _activate(z, a, silu)
                _dense(a, W_out, c_out, pre)
            dm_t = DM_out[bb, t]
            for j in range(Dm):
                for i in range(N):
                    dm = phi_scale * vm.tanh(phi_slope * pre[j, i])
                    dm_t[j, i] = dm
                    m[j, i] = a0[nb + j, i] + c_m[j, i] * dm
            M_out[bb, t] = m
            for i in range(N):
                o[i] = c_o[i]
            for j in range(Dm):
                for i in range(N):
                    o[i] += w_o[j, i] * m[j, i]
            O_out[bb, t] = o
        b_out[bb] = branch


@njit(parallel=True, **_JIT)
def network_backward(dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry, W_in, W_hid, W_out,
                     kappa_m, c_m, w_o, m0, A0, Z, DM, M, silu, phi_scale, phi_slope,
                     GB_out, dZ_out, dP_out, GO_out, A_out, gkappa_out, gc_out):
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
    A_out   [L,B,T,H,N]  act(z_l), the hidden layers' outputs, for the weight gradients.
    gkappa_out, gc_out [B,Dm,N]  per batch row Σ_t ∂loss/∂κ_m and Σ_t ∂loss/∂c_m.
    The gradient w.r.t. the initial state is not formed (training starts from zero).
    """
    B, T, nb, N = GB_out.shape
    Dm = kappa_m.shape[0]
    I0, W0, _ = W_in.shape
    L = Z.shape[0]
    H = Z.shape[3]
    dt = dO.dtype
    dphi_scale = phi_scale * phi_slope
    for bb in prange(B):
        carry_m = np.zeros((Dm, N), dt)
        carry_b = np.zeros((nb, N), dt)
        carry_o = np.zeros(N, dt)
        g = np.empty((Dm, N), dt)
        dpre = np.empty((Dm, N), dt)
        da = np.empty((H, N), dt)
        dz = np.empty((H, N), dt)
        da0 = np.empty((I0, N), dt)
        gk = gkappa_out[bb]
        gc = gc_out[bb]
        gk[:] = 0
        gc[:] = 0
        for t in range(T - 1, -1, -1):
            go = GO_out[bb, t]
            for i in range(N):
                go[i] = dO[bb, t, i] + carry_o[i]
            dm_t = DM[bb, t]
            for j in range(Dm):
                for i in range(N):
                    g[j, i] = w_o[j, i] * go[i] + carry_m[j, i]
                    dm = dm_t[j, i]
                    gc[j, i] += g[j, i] * dm
                    q = dm / phi_scale
                    dpre[j, i] = g[j, i] * c_m[j, i] * dphi_scale * (1 - q * q)
            dP_out[bb, t] = dpre
            if L == 0:
                _dense_transposed(dpre, W_in, da0, 0, I0)
            else:
                _dense_transposed(dpre, W_out, da, 0, H)
                for l in range(L - 1, -1, -1):
                    zl = Z[l, bb, t]
                    al = A_out[l, bb, t]
                    if silu:
                        for h in range(H):
                            for i in range(N):
                                s = vm.sigmoid(zl[h, i])
                                dz[h, i] = da[h, i] * (s * (1.0 + zl[h, i] * (1.0 - s)))
                                al[h, i] = zl[h, i] * s
                    else:
                        for h in range(H):
                            for i in range(N):
                                dz[h, i] = da[h, i] if zl[h, i] > 0 else 0
                                al[h, i] = max(zl[h, i], 0)
                    dZ_out[l, bb, t] = dz
                    if l > 0:
                        _dense_transposed(dz, W_hid[l - 1], da, 0, H)
                _dense_transposed(dz, W_in, da0, 0, I0)
            # Memory: m_{t−1} reaches the loss through κ_m ⊙ m_{t−1} in both m_t and a_0.
            for j in range(Dm):
                for i in range(N):
                    total = g[j, i] + da0[nb + j, i]
                    m_prev = M[bb, t - 1, j, i] if t > 0 else m0[bb, j, i]
                    gk[j, i] += total * m_prev
                    carry_m[j, i] = kappa_m[j, i] * total
            gb = GB_out[bb, t]
            for k in range(nb):
                for i in range(N):
                    carry_b[k, i] = da0[k, i] + kappa_b[k, i] * carry_b[k, i]
                    gb[k, i] = carry_b[k, i]
            # The recurrent synapses of step t read o_{t−1}: their gradient joins ∂loss/∂o_{t−1}.
            for j in range(N):
                acc = dt.type(0)
                for q in range(src_ptr[j], src_ptr[j + 1]):
                    e = src_entry[q]
                    acc += rec_w[e] * gb[rec_k[e], rec_i[e]]
                carry_o[j] = acc


@njit(parallel=True, **_JIT)
def neuron_weight_grad(G, A, out):
    """out[j, o, :] = Σ_r A[r, j, :] · G[r, o, :]: every neuron's weight gradient over all B·T rows.

    G [R,O,N] gradients of a layer's outputs, A [R,J,N] its inputs; out [J,O,N] (the weight
    layout) is overwritten. Parallel over o, so no two threads write the same element and
    the sum order (over r) is fixed: the result does not depend on the thread count.
    """
    R, O, N = G.shape
    J = A.shape[1]
    for o in prange(O):
        acc = np.zeros((J, N), G.dtype)
        for r in range(R):
            g = G[r, o]
            a = A[r]
            for j in range(J):
                row = acc[j]
                aj = a[j]
                for i in range(N):
                    row[i] += aj[i] * g[i]
        for j in range(J):
            out[j, o] = acc[j]


@njit(parallel=True, **_JIT)
def recurrent_weight_grad(GB, O, o0, rec_i, rec_k, rec_src, partial_out):
    """partial_out[b, e] = Σ_t GB[b,t,k_e,i_e] · o_{t−1}[b, src_e] (o_{−1} = o0): ∂loss/∂w_e per batch row.

    GB [B,T,nb,N] from ``network_backward``; O [B,T,N] the forward's outputs; partial_out [B,E].
    """
    B, T, nb, N = GB.shape
    n_rec = rec_i.shape[0]
    for bb in prange(B):
        acc = partial_out[bb]
        acc[:] = 0
        for t in range(T):
            o_prev = O[bb, t - 1] if t > 0 else o0[bb]
            gb = GB[bb, t]
            for e in range(n_rec):
                acc[e] += gb[rec_k[e], rec_i[e]] * o_prev[rec_src[e]]


# Every compiled network kernel (the codegen probe compiles the CUDA twins of these names).
KERNELS = ("network_forward", "network_backward", "neuron_weight_grad", "recurrent_weight_grad",
           "route_forward", "route_weight_grad", "route_input_grad")
