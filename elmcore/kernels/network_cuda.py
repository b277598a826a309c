"""Numba CUDA kernels of the ELM Network: the GPU twins of ``kernels/network_cpu.py``.

Every public function has exactly the signature and the semantics of its namesake in
``network_cpu.py`` (read its docstrings first; same letters and the same neuron-minor
layout). Arrays are CuPy arrays on a real GPU, handed over through
``__cuda_array_interface__`` without copies, or NumPy arrays under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``). Outputs go into caller-owned ``*_out`` arrays.

Design, and why:

* Time walks (``network_forward`` / ``network_backward``): ONE launch for all T steps.
  One block per batch row (grid-stride over rows), threads over neurons; a thread owns
  the same neurons in every phase, so each neuron's state is only ever touched by its
  owner. Neurons meet only through the recurrent synapses, which read o_{t−1} of other
  neurons (forward) or scatter into it (backward, formed as a gather over the entries
  grouped by source): one ``syncthreads`` per step makes those values visible.
* No shared memory and no per-thread scratch: a neuron's state between phases lives in
  the output arrays themselves (b_t in A0_out, pre-φ values in DM_out before φ overwrites
  them, the memory carry of step t−1 in dP_out[:, t−1] until step t−1 replaces it with
  ∂/∂pre). Those rows are the thread's own and stay in L1/L2.
* Sums run in the CPU kernels' order (over inputs j ascending, then over o ascending),
  so CPU and CUDA agree to rounding.
* Weight gradients (``neuron_weight_grad``, ``recurrent_weight_grad``): one thread per
  output element, summing over all rows in order: deterministic, no atomics.
* The external-input routing reuses ``kernels/cuda.py``'s routing kernels.

Streams: launched on CuPy's current stream with ``sync=False`` arrays (``cuda_launch.py``).
"""

import functools

from numba import cuda

from . import pointwise as pw
from .cuda import route_forward, route_input_grad, route_weight_grad  # noqa: F401  (the external synapses)
from .cuda_launch import MAX_BLOCKS, SIMULATOR, array_module, flat_shape, float_type, launch

# Optional parts of the kernel contract (kernels/contract.py): the network's kernels have none.
CAPABILITIES = frozenset()

# The simulator runs every CUDA thread as a Python thread: few threads keep it fast.
_NEURON_THREADS = 4 if SIMULATOR else 128


@functools.lru_cache(maxsize=None)
def _kernels(np_dtype):
    """Kernels specialised for one float dtype (constants typed so float32 stays float32)."""
    ZERO = np_dtype(0)
    pointwise = pw.cuda_functions(np_dtype)
    activate, activation_slope, phi, phi_backward = (pointwise.activate, pointwise.activation_slope,
                                                     pointwise.phi, pointwise.phi_backward)

    @cuda.jit
    def network_forward_kernel(E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out,
                        c_out, kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope, L, H,
                        A0_out, Z_out, DM_out, M_out, O_out, b_out):
        B, T, nb, N = E.shape
        Dm = kappa_m.shape[0]
        I0 = W_in.shape[0]
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        for bb in range(cuda.blockIdx.x, B, cuda.gridDim.x):
            for t in range(T):
                for i in range(tid, N, nthreads):
                    for k in range(nb):
                        prev = A0_out[bb, t - 1, k, i] if t > 0 else b0[bb, k, i]
                        A0_out[bb, t, k, i] = kappa_b[k, i] * prev + E[bb, t, k, i]
                    for e in range(rec_ptr[i], rec_ptr[i + 1]):
                        o_prev = O_out[bb, t - 1, rec_src[e]] if t > 0 else o0[bb, rec_src[e]]
                        A0_out[bb, t, rec_k[e], i] += rec_w[e] * o_prev
                    for j in range(Dm):
                        m_prev = M_out[bb, t - 1, j, i] if t > 0 else m0[bb, j, i]
                        A0_out[bb, t, nb + j, i] = kappa_m[j, i] * m_prev
                    # The first layer writes z_0, or the pre-φ values into DM_out when L = 0.
                    W0 = W_in.shape[1]
                    for o in range(W0):
                        if L == 0:
                            DM_out[bb, t, o, i] = c_in[o, i]
                        else:
                            Z_out[0, bb, t, o, i] = c_in[o, i]
                    for j in range(I0):
                        a = A0_out[bb, t, j, i]
                        for o in range(W0):
                            if L == 0:
                                DM_out[bb, t, o, i] += W_in[j, o, i] * a
                            else:
                                Z_out[0, bb, t, o, i] += W_in[j, o, i] * a
                    for l in range(1, L):
                        for o in range(H):
                            Z_out[l, bb, t, o, i] = c_hid[l - 1, o, i]
                        for j in range(H):
                            a = activate(Z_out[l - 1, bb, t, j, i], activation)
                            for o in range(H):
                                Z_out[l, bb, t, o, i] += W_hid[l - 1, j, o, i] * a
                    if L > 0:
                        for o in range(Dm):
                            DM_out[bb, t, o, i] = c_out[o, i]
                        for j in range(H):
                            a = activate(Z_out[L - 1, bb, t, j, i], activation)
                            for o in range(Dm):
                                DM_out[bb, t, o, i] += W_out[j, o, i] * a
                    out = c_o[i]
                    for j in range(Dm):
                        dm = phi(DM_out[bb, t, j, i], phi_scale, phi_slope)
                        DM_out[bb, t, j, i] = dm
                        m = A0_out[bb, t, nb + j, i] + c_m[j, i] * dm
                        M_out[bb, t, j, i] = m
                        out += w_o[j, i] * m
                    O_out[bb, t, i] = out
                # o_t of every neuron is read by the recurrent synapses of step t + 1.
                cuda.syncthreads()
            for i in range(tid, N, nthreads):
                for k in range(nb):
                    b_out[bb, k, i] = A0_out[bb, T - 1, k, i]

    @cuda.jit
    def network_backward_kernel(dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry, W_in, W_hid,
                         W_out, kappa_m, c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope, L, H,
                         GB_out, dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b, carry_m, carry_o):
        B, T, nb, N = GB_out.shape
        Dm = kappa_m.shape[0]
        W0 = W_in.shape[1]
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        for bb in range(cuda.blockIdx.x, B, cuda.gridDim.x):
            for i in range(tid, N, nthreads):
                GO_out[bb, T - 1, i] = dO[bb, T - 1, i] + carry_o[bb, i]
                for j in range(Dm):
                    dP_out[bb, T - 1, j, i] = carry_m[bb, j, i]  # the memory carry into the last step
            for t in range(T - 1, -1, -1):
                for i in range(tid, N, nthreads):
                    # (a) go = dO + carry_o (GO_out[bb, t] was completed by step t + 1's pass (f))
                    go = GO_out[bb, t, i]
                    # dP_out[bb, t] holds the memory carry from step t + 1 until pass C below.
                    # (b) dp = (w_o ⊙ go + carry_m) ⊙ c_m ⊙ φ'(p)   (pre_phi_grad)
                    # (c) dz_l = (W_{l+1}ᵀ dz_{l+1}) ⊙ act'(z_l)
                    if L > 0:
                        for h in range(H):
                            dZ_out[L - 1, bb, t, h, i] = ZERO
                        for o in range(Dm):
                            dp = phi_backward((w_o[o, i] * go + dP_out[bb, t, o, i]) * c_m[o, i], DM[bb, t, o, i],
                                              phi_scale, phi_slope)
                            for h in range(H):
                                dZ_out[L - 1, bb, t, h, i] += W_out[h, o, i] * dp
                        for l in range(L - 1, -1, -1):
                            for h in range(H):
                                z = Z[l, bb, t, h, i]
                                dZ_out[l, bb, t, h, i] *= activation_slope(z, activation)
                                act_out[l, bb, t, h, i] = activate(z, activation)
                            if l > 0:
                                for h in range(H):
                                    dZ_out[l - 1, bb, t, h, i] = ZERO
                                for o in range(H):
                                    d = dZ_out[l, bb, t, o, i]
                                    for h in range(H):
                                        dZ_out[l - 1, bb, t, h, i] += W_hid[l - 1, h, o, i] * d
                    # (c) da_0 = W_0ᵀ dz_0, branch rows;  (e) g_b(t) = da_0[:nb] + κ_b ⊙ g_b(t+1)
                    # Pass A: the branch rows of ∂a_0, into g_b.
                    for k in range(nb):
                        acc = ZERO
                        for o in range(W0):
                            if L == 0:
                                d = phi_backward((w_o[o, i] * go + dP_out[bb, t, o, i]) * c_m[o, i],
                                                 DM[bb, t, o, i], phi_scale, phi_slope)
                            else:
                                d = dZ_out[0, bb, t, o, i]
                            acc += W_in[k, o, i] * d
                        carry = GB_out[bb, t + 1, k, i] if t < T - 1 else carry_b[bb, k, i]
                        GB_out[bb, t, k, i] = acc + kappa_b[k, i] * carry
                    # (b) g = w_o ⊙ go + carry_m,  gc += g ⊙ Δm
                    # (d) total = g + da_0[nb:],  gk += total ⊙ m_{t−1},  carry_m = κ_m ⊙ total
                    # Pass B: the memory rows; the carry for step t − 1 goes to dP_out[bb, t − 1].
                    for j in range(Dm):
                        acc = ZERO
                        for o in range(W0):
                            if L == 0:
                                d = phi_backward((w_o[o, i] * go + dP_out[bb, t, o, i]) * c_m[o, i],
                                                 DM[bb, t, o, i], phi_scale, phi_slope)
                            else:
                                d = dZ_out[0, bb, t, o, i]
                            acc += W_in[nb + j, o, i] * d
                        g = w_o[j, i] * go + dP_out[bb, t, j, i]
                        gc_out[bb, j, i] += g * DM[bb, t, j, i]
                        total = g + acc
                        m_prev = M[bb, t - 1, j, i] if t > 0 else m0[bb, j, i]
                        gkappa_out[bb, j, i] += total * m_prev
                        if t > 0:
                            dP_out[bb, t - 1, j, i] = kappa_m[j, i] * total
                        else:
                            carry_m[bb, j, i] = kappa_m[j, i] * total
                    # (b) dp = g ⊙ c_m ⊙ φ'(p)
                    # Pass C: ∂loss/∂pre replaces the carry.
                    for j in range(Dm):
                        dP_out[bb, t, j, i] = phi_backward((w_o[j, i] * go + dP_out[bb, t, j, i]) * c_m[j, i],
                                                           DM[bb, t, j, i], phi_scale, phi_slope)
                # (f) carry_o[j] = Σ_{recurrent e with src_e = j} w_e · g_b(t)[k_e, i_e], then (a) of step t − 1
                # g_b of every neuron at step t is gathered into ∂loss/∂o_{t−1} of its sources.
                cuda.syncthreads()
                for j in range(tid, N, nthreads):
                    acc = ZERO
                    for q in range(src_ptr[j], src_ptr[j + 1]):
                        e = src_entry[q]
                        acc += rec_w[e] * GB_out[bb, t, rec_k[e], rec_i[e]]
                    if t > 0:
                        GO_out[bb, t - 1, j] = dO[bb, t - 1, j] + acc
                    else:
                        carry_o[bb, j] = acc
            for i in range(tid, N, nthreads):
                for k in range(nb):
                    carry_b[bb, k, i] = GB_out[bb, 0, k, i]

    @cuda.jit
    def neuron_weight_grad_kernel(G, A, out, bias_out):
        R, O, N = G.shape
        J = A.shape[1]
        for k in range(cuda.grid(1), J * O * N, cuda.gridsize(1)):
            j = k // (O * N)
            rest = k - j * O * N
            o = rest // N
            i = rest - o * N
            acc = ZERO
            for r in range(R):
                acc += A[r, j, i] * G[r, o, i]
            out[j, o, i] = acc
            if j == 0:  # the threads of the first input also own the bias sums (the same G column)
                total = ZERO
                for r in range(R):
                    total += G[r, o, i]
                bias_out[o, i] = total

    @cuda.jit
    def recurrent_weight_grad_kernel(GB, O, o0, rec_i, rec_k, rec_src, partial_out):
        B, T, nb, N = GB.shape
        n_rec = rec_i.shape[0]
        for k in range(cuda.grid(1), B * n_rec, cuda.gridsize(1)):
            bb = k // n_rec
            e = k - bb * n_rec
            acc = ZERO
            for t in range(T):
                o_prev = O[bb, t - 1, rec_src[e]] if t > 0 else o0[bb, rec_src[e]]
                acc += GB[bb, t, rec_k[e], rec_i[e]] * o_prev
            partial_out[bb, e] = acc

    return dict(network_forward_kernel=network_forward_kernel, network_backward_kernel=network_backward_kernel,
                neuron_weight_grad_kernel=neuron_weight_grad_kernel,
                recurrent_weight_grad_kernel=recurrent_weight_grad_kernel)


# The network's own CUDA kernels, compiled per dtype by ``kernel_set`` (the codegen probe
# compiles every one of them); the routing kernels are kernels/cuda.py's.
KERNELS = ("network_forward_kernel", "network_backward_kernel", "neuron_weight_grad_kernel",
           "recurrent_weight_grad_kernel")


def kernel_set(dtype):
    """{name: numba CUDA kernel} for one float dtype (float32 or float64)."""
    return _kernels(float_type(dtype))


def _rows_shape(B, N):
    return max(1, min(B, MAX_BLOCKS)), max(1, min(N, _NEURON_THREADS))


def network_forward(E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out, c_out,
                    kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope,
                    A0_out, Z_out, DM_out, M_out, O_out, b_out):
    """See ``network_cpu.network_forward``. One block per batch row, threads over neurons."""
    B, _, _, N = E.shape
    k = kernel_set(E.dtype)["network_forward_kernel"]
    rec_ptr, rec_i, rec_k, rec_src, rec_w = _nonempty(rec_ptr, rec_i, rec_k, rec_src, rec_w)
    L, H = Z_out.shape[0], Z_out.shape[3]
    Z_out, = _hidden_stand_ins(Z_out)
    launch(k, *_rows_shape(B, N), E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid,
            W_out, c_out, kappa_m, c_m, w_o, c_o, b0, m0, o0, int(activation), phi_scale, phi_slope, L, H,
            A0_out, Z_out, DM_out, M_out, O_out, b_out)


def network_backward(dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry, W_in, W_hid, W_out,
                     kappa_m, c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope,
                     GB_out, dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b, carry_m, carry_o):
    """See ``network_cpu.network_backward``. One block per batch row, threads over neurons."""
    B, _, _, N = GB_out.shape
    k = kernel_set(dO.dtype)["network_backward_kernel"]
    rec_ptr, rec_i, rec_k, rec_src, rec_w = _nonempty(rec_ptr, rec_i, rec_k, rec_src, rec_w)
    src_entry, = _nonempty(src_entry)
    L, H = Z.shape[0], Z.shape[3]
    Z, dZ_out, act_out = _hidden_stand_ins(Z, dZ_out, act_out)
    launch(k, *_rows_shape(B, N), dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry,
            W_in, W_hid, W_out, kappa_m, c_m, w_o, m0, A0, Z, DM, M, int(activation), phi_scale, phi_slope, L, H,
            GB_out, dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b, carry_m, carry_o)


def neuron_weight_grad(G, A, out, bias_out):
    """See ``network_cpu.neuron_weight_grad``. One thread per weight element; those of input 0
    also sum the bias."""
    launch(kernel_set(G.dtype)["neuron_weight_grad_kernel"], *flat_shape(out.size), G, A, out, bias_out)


def recurrent_weight_grad(GB, O, o0, rec_i, rec_k, rec_src, partial_out):
    """See ``network_cpu.recurrent_weight_grad``. One thread per (batch row, entry)."""
    if partial_out.size == 0:
        return
    launch(kernel_set(GB.dtype)["recurrent_weight_grad_kernel"], *flat_shape(partial_out.size), GB, O, o0, rec_i,
            rec_k, rec_src, partial_out)


def rows_product(A, Bt, bias, out):
    """See ``network_cpu.rows_product``: a cuBLAS GEMM through the array library."""
    xp = array_module(out)
    xp.matmul(A, Bt, out=out)
    out += bias


def rows_transposed_product(A, G, out):
    """See ``network_cpu.rows_transposed_product``: a cuBLAS GEMM through the array library."""
    array_module(out).matmul(A.T, G, out=out)


def _nonempty(*arrays):
    """Entry lists may be empty (ρ = 0 or 1): pass one unused element instead (loops never reach it)."""
    out = []
    for a in arrays:
        if a.shape[0] == 0:
            a = array_module(a).zeros(1, a.dtype)
        out.append(a)
    return out


def _hidden_stand_ins(*arrays):
    """Z / dZ / A have no rows without hidden layers, and a zero-size array cannot cross the
    array interface: pass a one-element stand-in (the kernels get L = 0 and never touch it)."""
    return [a if a.size else array_module(a).zeros((1, 1, 1, 1, 1), a.dtype) for a in arrays]
