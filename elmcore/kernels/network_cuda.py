"""Numba CUDA kernels of the ELM Network: the GPU twins of ``kernels/network_cpu.py``.

Every public function has exactly the signature and the semantics of its namesake in
``network_cpu.py`` (read its docstrings first; same letters and the same neuron-minor
layout). Arrays are CuPy arrays on a real GPU, handed over through
``__cuda_array_interface__`` without copies, or NumPy arrays under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``). Outputs go into caller-owned ``*_out`` arrays.

Design, and why:

* Time walks (``network_forward`` / ``network_backward``): ONE launch for all T steps.
  One block per batch row (grid-stride over rows), one thread per neuron, blocks of up to
  256 threads (``MAX_WALK_THREADS``; larger layers are walked by the same threads in turn,
  neuron i, i + blockDim, ...); a thread owns the same neurons in every phase, so each
  neuron's state is only ever touched by its owner. Neurons meet only through the
  recurrent synapses, which read o_{t−1} of other neurons (forward) or scatter into it
  (backward, formed as a gather over the entries grouped by source): one ``syncthreads``
  per step makes those values visible.
* The dot products accumulate in registers (loop interchange: each output's sum over its
  inputs is formed, then stored once) with ``cuda_launch.dot``'s uint32 offsets: Numba
  cannot prove that the output arrays do not alias, so a sum kept in them (out[o] += w·x)
  costs a load and a store per multiply-add. The vector a sum reads (the neuron's a_0, a
  layer's activations, ∂pre, ∂z) is on chip: each thread has a scratch row in shared
  memory, rows ``row_stride`` (odd) values apart so a warp's 32 threads hit 32 banks.
  The per-neuron MLP weights of all N neurons are packed into one flat buffer, staged in
  shared memory when they fit beside the scratch (``plan_walk``, chosen by size as the
  single neuron's launcher does), else read from global memory; the neuron-minor layout
  W[j, o, i] makes a warp's 32 reads of one weight coalesced in both places.
* What crosses steps stays in the output arrays (b_{t−1} in A0_out, m_{t−1} in M_out, the
  memory carry of step t−1 in dP_out[:, t−1] until step t−1 replaces it with ∂/∂pre, the
  Σ∂κ_m and Σ∂c_m sums in their outputs), read back once per step, so a thread walking
  several neurons needs one scratch row only.
* Sums run in the CPU kernels' order (over inputs j ascending, then over o ascending),
  so CPU and CUDA agree to rounding.
* Weight gradients: ``neuron_weight_grad`` sums over all B·T rows of a time block, so its rows are
  split into chunks, one grid row (blockIdx.y) each, with one thread per output element and chunk
  (``weight_grad_chunks``: one thread per element alone filled a GPU only for very large layers);
  each chunk's partial sums are added in chunk order by one more pass: deterministic, no atomics.
  Its flat offsets are uint64: B·T·J·N may exceed 2^31. ``recurrent_weight_grad``: one thread per
  (batch row, entry), summing over t in order.
* The external-input routing reuses ``kernels/cuda.py``'s routing kernels.

Streams: launched on CuPy's current stream with ``sync=False`` arrays (``cuda_launch.py``).
"""

import dataclasses
import functools
from typing import Optional

from numba import cuda

from ..errors import ELMError
from . import pointwise as pw
from .cuda import _device_limits, _packed, _place_weights, _weight_staging, launch_planned
from .cuda import route_forward, route_input_grad, route_weight_grad  # noqa: F401  (the external synapses)
from .cuda_launch import MAX_BLOCKS, SIMULATOR, U, U64, array_module, constants, dot, flat_shape, float_type, launch

# Optional parts of the kernel contract (kernels/contract.py): the network's kernels have none.
CAPABILITIES = frozenset()

# Threads per block of the time walks: one per neuron, up to this many (larger layers are
# walked by the same threads in turn). The simulator runs every CUDA thread as a Python
# thread: few threads keep it fast (tests raise it through ``policy``).
MAX_WALK_THREADS = 256
_SIMULATOR_THREADS = 4
# neuron_weight_grad's split of the rows (weight_grad_chunks): enough threads to fill an H100 or
# H200 (132 multiprocessors · 2,048 threads), chunks of at least MIN_CHUNK_ROWS rows. The simulator
# aims low, so that its small test shapes are split too.
WEIGHT_GRAD_THREADS = 64 if SIMULATOR else 1 << 18
MIN_CHUNK_ROWS = 2 if SIMULATOR else 32
MAX_GRID_ROWS = 65535  # CUDA's limit on gridDim.y


@functools.lru_cache(maxsize=None)
def _kernels(np_dtype, weights_in_shared=False):
    """Kernels specialised for one float dtype (constants typed so float32 stays float32) and one
    placement of the time walks' MLP weights (the other kernels are the same in both)."""
    nb_dtype, ZERO, _ = constants(np_dtype)
    pointwise = pw.cuda_functions(np_dtype)
    activate, activation_slope, phi, phi_backward = (pointwise.activate, pointwise.activation_slope,
                                                     pointwise.phi, pointwise.phi_backward)
    stage_weights = _weight_staging(weights_in_shared)

    @cuda.jit
    def network_forward_kernel(E, kappa_b, rec_ptr, rec_k, rec_src, rec_w, packed, o_cin, o_whid, o_chid, o_wout,
                               o_cout, kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope, L, H,
                               row_stride, A0_out, Z_out, DM_out, M_out, O_out, b_out):
        # packed: W_in [I0,W0,N] | c_in [W0,N] | W_hid [Lh,H,H,N] | c_hid [Lh,H,N] | W_out [H,Dm,N] | c_out [Dm,N]
        # at 0, o_cin, o_whid, o_chid, o_wout, o_cout (W_in, c_in only when L = 0). Shared memory:
        # [packed (if staged)] then a row per thread, every row_stride values: a_0 [I0], activations
        # ping-pong [2,H].
        smem = cuda.shared.array(0, nb_dtype)
        B, T, nb, N = E.shape
        Dm = kappa_m.shape[0]
        I0 = nb + Dm
        W, base = stage_weights(packed, smem)
        cuda.syncthreads()
        nt = U(cuda.blockDim.x)
        neurons = U(N)
        one = U(1)
        a0 = U(base + cuda.threadIdx.x * row_stride)
        act0 = U(a0 + I0)
        # The output layer: z_0 itself when L = 0 (then W0 = Dm), else fed by the last activations.
        out_bias = U(o_cin if L == 0 else o_cout)
        out_x = a0 if L == 0 else U(act0 + ((L - 1) % 2) * H)
        out_w = U(0 if L == 0 else o_wout)
        out_n = U(I0 if L == 0 else H)
        for bb in range(cuda.blockIdx.x, B, cuda.gridDim.x):
            for t in range(T):
                i = U(cuda.threadIdx.x)
                while i < neurons:
                    # a_0 = [b_t; κ_m ⊙ m_{t−1}] into the thread's column, and into A0_out.
                    for k in range(nb):
                        prev = A0_out[bb, t - 1, k, i] if t > 0 else b0[bb, k, i]
                        smem[a0 + k] = kappa_b[k, i] * prev + E[bb, t, k, i]
                    for e in range(rec_ptr[i], rec_ptr[i + 1]):
                        o_prev = O_out[bb, t - 1, rec_src[e]] if t > 0 else o0[bb, rec_src[e]]
                        smem[a0 + rec_k[e]] += rec_w[e] * o_prev
                    for k in range(nb):
                        A0_out[bb, t, k, i] = smem[a0 + k]
                    for j in range(Dm):
                        m_prev = M_out[bb, t - 1, j, i] if t > 0 else m0[bb, j, i]
                        km = kappa_m[j, i] * m_prev
                        smem[a0 + nb + j] = km
                        A0_out[bb, t, nb + j, i] = km
                    # Hidden layers: z_l = c_l + Σ_j W_l[j] · a_{l−1}[j], summed in a register.
                    for l in range(L):
                        dst = U(act0 + (l % 2) * H)
                        if l == 0:
                            x_at, w_at, bias_at, n = a0, U(i), U(o_cin + i), U(I0)
                        else:
                            x_at = U(act0 + ((l - 1) % 2) * H)
                            w_at = U(o_whid + (l - 1) * H * H * N + i)
                            bias_at = U(o_chid + (l - 1) * H * N + i)
                            n = U(H)
                        for o in range(H):
                            z = dot(W[bias_at + o * N], smem, x_at, one, W, U(w_at + o * N), U(H * N), n)
                            Z_out[l, bb, t, o, i] = z
                            smem[dst + o] = activate(z, activation)
                    # Δm = φ(pre), m_t = κ_m ⊙ m_{t−1} + c_m ⊙ Δm, o_t = c_o + Σ_j w_o[j] m_t[j]
                    out = c_o[i]
                    for o in range(Dm):
                        pre = dot(W[out_bias + o * N + i], smem, out_x, one, W, U(out_w + o * N + i), U(Dm * N), out_n)
                        dm = phi(pre, phi_scale, phi_slope)
                        DM_out[bb, t, o, i] = dm
                        m = smem[a0 + nb + o] + c_m[o, i] * dm
                        M_out[bb, t, o, i] = m
                        out += w_o[o, i] * m
                    O_out[bb, t, i] = out
                    i = U(i + nt)
                # o_t of every neuron is read by the recurrent synapses of step t + 1.
                cuda.syncthreads()
            i = U(cuda.threadIdx.x)
            while i < neurons:
                for k in range(nb):
                    b_out[bb, k, i] = A0_out[bb, T - 1, k, i]
                i = U(i + nt)

    @cuda.jit
    def network_backward_kernel(dO, kappa_b, src_ptr, src_chan, src_w, packed, o_whid, o_wout,
                                kappa_m, c_m, w_o, m0, Z, DM, M, activation, phi_scale, phi_slope, L, H,
                                row_stride, GB_out, dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out,
                                carry_b, carry_m, carry_o):
        # packed: W_in [I0,W0,N] | W_hid [Lh,H,H,N] | W_out [H,Dm,N] at 0, o_whid, o_wout (W_in only when
        # L = 0). Shared memory: [packed (if staged)] then a row per thread, every row_stride values:
        # g [Dm], ∂pre [Dm], ∂z ping-pong [2,H]. GB_out is [B,T,nb·N] here (channel k·N + i); the
        # recurrent entries by source neuron (src_ptr): their weight src_w and channel src_chan side by side.
        smem = cuda.shared.array(0, nb_dtype)
        B, T, N = dO.shape
        nb = kappa_b.shape[0]
        Dm = kappa_m.shape[0]
        W0 = H if L > 0 else Dm
        W, base = stage_weights(packed, smem)
        cuda.syncthreads()
        nt = U(cuda.blockDim.x)
        neurons = U(N)
        one = U(1)
        g_at = U(base + cuda.threadIdx.x * row_stride)
        dp_at = U(g_at + Dm)
        dz0 = U(dp_at + Dm)
        for bb in range(cuda.blockIdx.x, B, cuda.gridDim.x):
            i = U(cuda.threadIdx.x)
            while i < neurons:
                for j in range(Dm):
                    dP_out[bb, T - 1, j, i] = carry_m[bb, j, i]  # the memory carry into the last step
                i = U(i + nt)
            for t in range(T - 1, -1, -1):
                i = U(cuda.threadIdx.x)
                while i < neurons:
                    # (a) go = dO + carry_o (carry_o[bb, i]: the caller's at t = T − 1, then step t + 1's (f),
                    # written by this same thread)
                    go = dO[bb, t, i] + carry_o[bb, i]
                    GO_out[bb, t, i] = go
                    # (b) g = w_o ⊙ go + carry_m;  gc += g ⊙ Δm;  dp = g ⊙ c_m ⊙ φ'(p)
                    # dP_out[bb, t] holds the memory carry from step t + 1 until dp replaces it.
                    for o in range(Dm):
                        g = w_o[o, i] * go + dP_out[bb, t, o, i]
                        smem[g_at + o] = g
                        dm = DM[bb, t, o, i]
                        gc_out[bb, o, i] += g * dm
                        dp = phi_backward(g * c_m[o, i], dm, phi_scale, phi_slope)
                        dP_out[bb, t, o, i] = dp
                        smem[dp_at + o] = dp
                    # (c) da = W_outᵀ dp; for l = L−1 … 0: dz_l = da ⊙ act'(z_l), da = W_lᵀ dz_l,
                    # each sum in a register over o ascending.
                    d_at = dp_at
                    for l in range(L - 1, -1, -1):
                        dst = U(dz0 + (l % 2) * H)
                        if l == L - 1:
                            w_at, n = U(o_wout + i), U(Dm)
                        else:
                            w_at, n = U(o_whid + l * H * H * N + i), U(H)
                        for h in range(H):
                            acc = dot(ZERO, smem, d_at, one, W, U(w_at + h * n * N), neurons, n)
                            z = Z[l, bb, t, h, i]
                            dz = acc * activation_slope(z, activation)
                            dZ_out[l, bb, t, h, i] = dz
                            act_out[l, bb, t, h, i] = activate(z, activation)
                            smem[dst + h] = dz
                        d_at = dst
                    # (c) da_0 = W_0ᵀ dz_0 (dz_0 = dp when L = 0);  (e) g_b(t) = da_0[:nb] + κ_b ⊙ g_b(t+1)
                    for k in range(nb):
                        acc = dot(ZERO, smem, d_at, one, W, U(k * W0 * N + i), neurons, U(W0))
                        carry = GB_out[bb, t + 1, k * N + i] if t < T - 1 else carry_b[bb, k, i]
                        GB_out[bb, t, k * N + i] = acc + kappa_b[k, i] * carry
                    # (d) total = g + da_0[nb:],  gk += total ⊙ m_{t−1},  carry_m = κ_m ⊙ total
                    # (the carry for step t − 1 goes to dP_out[bb, t − 1]).
                    for j in range(Dm):
                        acc = dot(ZERO, smem, d_at, one, W, U((nb + j) * W0 * N + i), neurons, U(W0))
                        total = smem[g_at + j] + acc
                        m_prev = M[bb, t - 1, j, i] if t > 0 else m0[bb, j, i]
                        gkappa_out[bb, j, i] += total * m_prev
                        if t > 0:
                            dP_out[bb, t - 1, j, i] = kappa_m[j, i] * total
                        else:
                            carry_m[bb, j, i] = kappa_m[j, i] * total
                    i = U(i + nt)
                # (f) carry_o[j] = Σ_{recurrent e with src_e = j} w_e · g_b(t)[k_e, i_e], read by (a) of step
                # t − 1: g_b of every neuron at step t is gathered into ∂loss/∂o_{t−1} of its sources (after
                # t = 0 carry_o is the adjoint of the state's o, which the segment before continues from).
                # Each thread gathers for the neurons it walks, so (a) reads carry_o without a barrier.
                cuda.syncthreads()
                j = U(cuda.threadIdx.x)
                while j < neurons:
                    acc = ZERO
                    q = U(src_ptr[j])
                    q_end = U(src_ptr[j + 1])
                    while q != q_end:
                        acc += src_w[q] * GB_out[bb, t, src_chan[q]]
                        q = U(q + 1)
                    carry_o[bb, j] = acc
                    j = U(j + nt)
            i = U(cuda.threadIdx.x)
            while i < neurons:
                for k in range(nb):
                    carry_b[bb, k, i] = GB_out[bb, 0, k * N + i]
                i = U(i + nt)

    @cuda.jit
    def neuron_weight_grad_kernel(G, A, T, J, O, N, t0, t1, rows, rows_per_chunk, part, part_bias):
        # G [B·T·O·N], A [B·T·J·N] flat. Grid row y sums its chunk of the time block's rows (b, t),
        # t0 <= t < t1, b-major (rows = B·(t1 − t0)), into part[y] [J·O·N] and, the threads of input 0,
        # part_bias[y] [O·N]. Offsets are uint64 (B·T·J·N may exceed 2^31), advanced by addition: no
        # wrap-around check and no multiply per row.
        chunk = cuda.blockIdx.y
        steps = t1 - t0
        r_start = chunk * rows_per_chunk
        r_stop = min(rows, r_start + rows_per_chunk)
        jn = U64(J * N)
        on = U64(O * N)
        for k in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, J * O * N,
                       cuda.gridDim.x * cuda.blockDim.x):
            j = k // (O * N)
            rest = k - j * O * N
            o = rest // N
            a_col = U64(j * N + rest - o * N)  # j·N + i
            acc = ZERO
            bias = ZERO
            r = r_start
            while r < r_stop:
                b = r // steps
                t = t0 + r - b * steps
                n = min(r_stop - r, t1 - t)  # this chunk's rows of batch row b
                row = U64(b * T + t)
                a_at = U64(U64(row * jn) + a_col)
                g_at = U64(U64(row * on) + U64(rest))
                a_end = U64(a_at + U64(U64(n) * jn))
                while a_at != a_end:
                    g = G[g_at]
                    acc += A[a_at] * g
                    bias += g
                    a_at = U64(a_at + jn)
                    g_at = U64(g_at + on)
                r += n
            part[chunk, k] = acc
            if j == 0:  # every thread sums its G column; those of input 0 own the bias
                part_bias[chunk, rest] = bias

    @cuda.jit
    def chunk_sum_kernel(part, out):
        # out[k] = Σ_c part[c, k], chunks in order: the same bits on every run.
        chunks, K = part.shape
        for k in range(cuda.grid(1), K, cuda.gridsize(1)):
            acc = part[0, k]
            for c in range(1, chunks):
                acc += part[c, k]
            out[k] = acc

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
                neuron_weight_grad_kernel=neuron_weight_grad_kernel, chunk_sum_kernel=chunk_sum_kernel,
                recurrent_weight_grad_kernel=recurrent_weight_grad_kernel)


# The network's own CUDA kernels, compiled per dtype by ``kernel_set`` (the codegen probe
# compiles every one of them); the routing kernels are kernels/cuda.py's.
KERNELS = ("network_forward_kernel", "network_backward_kernel", "neuron_weight_grad_kernel", "chunk_sum_kernel",
           "recurrent_weight_grad_kernel")


def kernel_set(dtype, weights_in_shared=False):
    """{name: numba CUDA kernel} for one float dtype (float32 or float64) and placement of the time
    walks' weights (True: staged in shared memory)."""
    return _kernels(float_type(dtype), bool(weights_in_shared))


@dataclasses.dataclass
class WalkPolicy:
    """Overrides of the time walks' launch shape (``None``: decide from the sizes and the device).

    Tests use it to drive every shape through the simulator; production code leaves it alone.

    threads            threads per block (neurons beyond it are walked by the same threads in turn).
    weights_in_shared  False forces the weights-in-global-memory path; True stages them in shared memory.
    """
    threads: Optional[int] = None
    weights_in_shared: Optional[bool] = None


policy = WalkPolicy()


@dataclasses.dataclass(frozen=True)
class WalkLaunch:
    """How one time walk is laid out: ``blocks`` (one per batch row, grid-stride beyond), ``threads``
    over neurons, whether the MLP weights are staged in shared memory, dynamic shared bytes per block."""
    blocks: int
    threads: int
    weights_in_shared: bool
    shared_bytes: int


def plan_walk(batch, neurons, row_floats, weight_floats, itemsize, max_threads=MAX_WALK_THREADS, limits=None):
    """Choose a time walk's launch shape (pure function of sizes, device limits and ``policy``).

    row_floats     the per-thread scratch row (floats) in shared memory; rows are laid out every
                   ``row_stride(row_floats)`` values.
    weight_floats  length of the packed MLP weights of all neurons.
    max_threads    threads one block may have (the compiled kernel's register use may lower it).
    limits         (multiprocessors, dynamic shared bytes per block); default: the current device's.
    One thread per neuron up to ``max_threads`` (whole warps), fewer when the scratch columns do not
    fit in shared memory; the weights are staged when they fit beside the scratch. Raises ELMError
    when not even one warp's scratch fits.
    """
    _, limit = _device_limits() if limits is None else limits
    if policy.threads:
        threads = int(policy.threads)
    elif SIMULATOR:
        threads = max(1, min(neurons, _SIMULATOR_THREADS))
    else:
        threads = max(32, min(-(-neurons // 32) * 32, max_threads // 32 * 32))
    warp = 1 if SIMULATOR or policy.threads else 32
    stride = row_stride(row_floats)
    while threads > warp and threads * stride * itemsize > limit:
        threads -= warp
    scratch = threads * stride * itemsize
    if scratch > limit:
        raise ELMError(f"the network's per-neuron scratch ({row_floats} values per neuron) does not fit in "
                       f"{limit} bytes of GPU shared memory: reduce num_memory, num_branch or mlp_hidden_size")
    in_shared, shared = _place_weights(scratch, weight_floats * itemsize, limit, policy)
    return WalkLaunch(max(1, min(batch, MAX_BLOCKS)), threads, in_shared, shared)


def row_stride(row_floats):
    """Distance between two threads' scratch rows: odd, so that the 32 threads of a warp reading
    value k of their own rows hit 32 different shared memory banks."""
    return row_floats | 1


def _launch_walk(name, batch, neurons, row_floats, packed, args):
    """Plan, pick the placement's kernel and launch (``packed``: the weights among args). Returns the plan."""
    dtype = args[0].dtype
    return launch_planned(
        lambda max_threads, limits: plan_walk(batch, neurons, row_floats, packed.size, dtype.itemsize,
                                              max_threads, limits),
        lambda plan: kernel_set(dtype, plan.weights_in_shared)[name],
        lambda plan: plan.threads, MAX_WALK_THREADS, args)


def network_forward(E, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, W_in, c_in, W_hid, c_hid, W_out, c_out,
                    kappa_m, c_m, w_o, c_o, b0, m0, o0, activation, phi_scale, phi_slope,
                    A0_out, Z_out, DM_out, M_out, O_out, b_out):
    """See ``network_cpu.network_forward``. One block per batch row, a thread per neuron; the MLP
    weights are packed into one flat buffer (staged in shared memory when they fit). Returns the
    WalkLaunch used."""
    xp, dt = array_module(E), E.dtype
    B, _, nb, N = E.shape
    I0, W0, _ = W_in.shape
    Dm = kappa_m.shape[0]
    L, H = Z_out.shape[0], Z_out.shape[3]
    Lh = max(L - 1, 0)
    o_cin = I0 * W0 * N
    o_whid = o_cin + W0 * N
    o_chid = o_whid + Lh * H * H * N
    o_wout = o_chid + Lh * H * N
    o_cout = o_wout + H * Dm * N
    # W_hid / c_hid (L < 2) and W_out / c_out (L = 0) may be the model's placeholders: left out.
    packed = _packed(xp, dt, [W_in, c_in] + ([W_hid, c_hid] if Lh else []) + ([W_out, c_out] if L else []))
    rec_ptr, rec_k, rec_src, rec_w = _nonempty(rec_ptr, rec_k, rec_src, rec_w)
    Z_out, = _hidden_stand_ins(Z_out)
    row_floats = I0 + (2 * H if L else 0)
    return _launch_walk("network_forward_kernel", B, N, row_floats, packed, (
        E, kappa_b, rec_ptr, rec_k, rec_src, rec_w, packed, o_cin, o_whid, o_chid, o_wout, o_cout,
        kappa_m, c_m, w_o, c_o, b0, m0, o0, int(activation), phi_scale, phi_slope, L, H, row_stride(row_floats),
        A0_out, Z_out, DM_out, M_out, O_out, b_out))


def network_backward(dO, kappa_b, rec_ptr, rec_i, rec_k, rec_src, rec_w, src_ptr, src_entry, W_in, W_hid, W_out,
                     kappa_m, c_m, w_o, m0, A0, Z, DM, M, activation, phi_scale, phi_slope,
                     GB_out, dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b, carry_m, carry_o):
    """See ``network_cpu.network_backward``. One block per batch row, a thread per neuron; the MLP
    weights are packed as in ``network_forward``. Returns the WalkLaunch used."""
    xp, dt = array_module(dO), dO.dtype
    B, _, nb, N = GB_out.shape
    I0, W0, _ = W_in.shape
    Dm = kappa_m.shape[0]
    L, H = Z.shape[0], Z.shape[3]
    Lh = max(L - 1, 0)
    o_whid = I0 * W0 * N
    o_wout = o_whid + Lh * H * H * N
    packed = _packed(xp, dt, [W_in] + ([W_hid] if Lh else []) + ([W_out] if L else []))
    # The transposed synapses, gathered by source neuron: weight and flat [nb,N] channel side by side.
    src_chan, src_w = _nonempty((rec_k * N + rec_i)[src_entry].astype(xp.uint32), rec_w[src_entry])
    Z, dZ_out, act_out = _hidden_stand_ins(Z, dZ_out, act_out)
    # The kernel indexes g_b by flat channel k·N + i: a [B,T,nb·N] view of GB_out's own memory.
    gb = GB_out if GB_out.flags.c_contiguous else xp.empty(GB_out.shape, GB_out.dtype)
    row_floats = 2 * Dm + (2 * H if L else 0)
    plan = _launch_walk("network_backward_kernel", B, N, row_floats, packed, (
        dO, kappa_b, src_ptr, src_chan, src_w, packed, o_whid, o_wout,
        kappa_m, c_m, w_o, m0, Z, DM, M, int(activation), phi_scale, phi_slope, L, H, row_stride(row_floats),
        gb.reshape(B, -1, nb * N), dZ_out, dP_out, GO_out, act_out, gkappa_out, gc_out, carry_b, carry_m, carry_o))
    if gb is not GB_out:
        GB_out[...] = gb
    return plan


def weight_grad_chunks(rows, elements):
    """(chunks, rows per chunk) for ``neuron_weight_grad``: rows are split into chunks (a grid row
    each) until about ``WEIGHT_GRAD_THREADS`` threads run, chunks of at least ``MIN_CHUNK_ROWS``
    rows; an output that alone has that many elements is summed by one chunk, with no partial sums.
    Several chunks hold chunks · elements partial sums: fewer than WEIGHT_GRAD_THREADS + elements."""
    if rows <= 0:
        return 1, 0
    chunks = max(1, min(-(-WEIGHT_GRAD_THREADS // max(elements, 1)), -(-rows // MIN_CHUNK_ROWS), MAX_GRID_ROWS))
    per = -(-rows // chunks)
    return -(-rows // per), per


def neuron_weight_grad(G, A, t0, t1, out, bias_out):
    """See ``network_cpu.neuron_weight_grad``. One thread per weight element per chunk of the rows
    (``weight_grad_chunks``); the threads of input 0 also sum the bias. With several chunks, each
    writes partial sums that one more pass adds in chunk order (deterministic, no atomics).
    Returns the number of chunks."""
    xp = array_module(out)
    B, T, O, N = G.shape
    J = A.shape[2]
    chunks, per = weight_grad_chunks(B * (t1 - t0), J * O * N)
    ks = kernel_set(G.dtype)
    G_flat, A_flat = (xp.ascontiguousarray(a).reshape(-1) for a in (G, A))
    direct = chunks == 1 and out.flags.c_contiguous and bias_out.flags.c_contiguous
    if direct:
        part, part_bias = out.reshape(1, -1), bias_out.reshape(1, -1)
    else:
        part, part_bias = xp.empty((chunks, out.size), out.dtype), xp.empty((chunks, bias_out.size), out.dtype)
    blocks, threads = flat_shape(out.size)
    launch(ks["neuron_weight_grad_kernel"], (blocks, chunks), threads, G_flat, A_flat, T, J, O, N, int(t0), int(t1),
           B * (int(t1) - int(t0)), per, part, part_bias)
    if not direct:
        for p, target in ((part, out), (part_bias, bias_out)):
            flat = target.reshape(-1) if target.flags.c_contiguous else xp.empty(target.size, target.dtype)
            launch(ks["chunk_sum_kernel"], *flat_shape(target.size), p, flat)
            if not target.flags.c_contiguous:
                target[...] = flat.reshape(target.shape)
    return chunks


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
