"""Numba CUDA kernels: the GPU twins of ``kernels/cpu.py``.

Every public function here has exactly the signature and the semantics of its
namesake in ``kernels/cpu.py`` (read that docstring first: shapes use the same
letters B, T, D, S, C, Dm, H, W0, L, Lh); ``kernels/contract.py`` lists them.
The file is cut by stage (routing, scans, recurrence): each stage's ``@cuda.jit``
kernels (named ``*_kernel``, built once per float type by an ``lru_cache``d
factory) sit next to their launchers, which carry the contract's names. The
launch helpers shared with ``network_cuda.py`` are in ``cuda_launch.py``, the
pointwise math (activations, φ) in ``pointwise.py``. The arrays are CuPy arrays on a real
GPU, handed to Numba through ``__cuda_array_interface__`` without any copy, or
NumPy arrays under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``). Outputs are
written into caller-owned ``*_out`` arrays; nothing is kept between calls.

Ownership and lifetime, haste-style. "caller" is ``ELM`` in ``model.py``:

=====================  ==========  =====================================================
buffer                 owner       lifetime / hand-over
=====================  ==========  =====================================================
X, dA, dU, Zb, dM      caller      read only; only valid for the duration of the call
A_out, U_out, dA_out   caller      overwritten; ``scan_*`` may alias input and output
act_out                caller      overwritten after the launch: act(Z) for the weight GEMMs
partial_out [B,S]      caller      overwritten; per-batch rows, the caller sums them
M_out, Z_out, DM_out   caller      written by ``recur_forward`` and handed UNCHANGED to
                                   ``recur_backward`` as M, Z, DM (together with the
                                   same m0, kappa_m, c_m and weights)
dZ_out, dO_out         caller      overwritten; consumed by the weight GEMMs
gkappa_out, gc_out     caller      added to (zeroed by the caller); per-batch rows [B,Dm]
carry, dA_next         caller      the adjoint of the state after the walk (in; zeros for a
                                   whole sequence); ``carry`` returns the one before it
packed weights         this file   a device copy made per recurrence call (a few
                                   hundred KB at most), freed when the call returns
=====================  ==========  =====================================================

Recurrence kernel arguments (device side; the wrappers build them):

==================  ============  =================================================
argument            shape         meaning
==================  ============  =================================================
packed (forward)    [P]           W0mT [Dm,W0] | WhT [Lh,H,H] | WoT [H,Dm] | ch [Lh,H]
                                  | co [Dm], flattened row-major at offsets 0, o_wh,
                                  o_wo, o_ch, o_co (only W0mT when L = 0)
packed (backward)   [P]           W0m [W0,Dm] | Wh [Lh,H,H] | Wo [Dm,H] at 0, o_wh, o_wo
L, H                int           hidden layers and width, passed explicitly because
                                  Z / dZ are [1,1,1,1] placeholders when L = 0 (a
                                  zero-size array cannot cross the array interface)
activation          int           the MLP activation's code (``pointwise.ACTIVATION_CODES``)
phi_scale, _slope   model dtype   φ(x) = phi_scale · tanh(phi_slope · x)
dynamic shared      see kernels   [staged weights] + R rows of per-row state
==================  ============  =================================================

Forward per-row state: κ_m⊙m ping-pong [2,Dm], activations ping-pong [2,H], the output
sums' second halves [Dm] (the last two only when L > 0).
Backward per-row state: ∂o ping-pong [2,Dm], g, carry, Σ∂κ_m, Σ∂c_m [Dm each],
∂z ping-pong [2,H]. Each thread owns the same units in every phase, so the
element-wise values (g, carry, the two sums) never cross threads.

Design choices, and why:

* Routing forward: one thread block per (b, t) row (grid-stride over rows),
  threads over the inputs so reads of X are coalesced; zero inputs are skipped
  (spike data is > 98 % zeros) and each non-zero input adds its entries into
  ``A_out[b, t, channel]`` with a global ``atomic.add``. Contention is bounded by
  the number of non-zero inputs feeding one channel in one step. The order of
  those additions is not fixed, so the last bits of A may differ between runs
  and from the CPU kernel (tests compare with a relative tolerance).
* Routing weight gradient: one thread per (b, input), walking t once (an input
  feeding several synapses is not re-read per synapse; one feeding none is not
  read at all). Steps are loaded four at a time and tested together, so the
  ~99 % zero steps cost a load and a share of one test each, with four loads in
  flight instead of one. An input feeding one synapse (all of them without a
  routing map) sums x · mask · dA in a register and adds it to
  ``partial_out[b, synapse]`` with one global ``atomic.add``; one feeding several
  adds each non-zero step's terms with an ``atomic.add`` as they come. In the
  model every synapse owns at most one entry, so one thread alone adds to each
  element, in t order, starting from zero: the CPU kernel's order, deterministic.
  (The atomics only keep the CPU kernel's contract for a general CSR map, where
  two inputs may feed one synapse and their order would not be fixed.)
* Routing input gradient: one thread per (b, t, input); a gather, no conflicts.
* Linear scans: one thread per (b, channel), looping over T; neighbouring
  threads touch neighbouring channels, so every step is a coalesced access.
  Each step's input is loaded one step ahead (the scans may run in place, so the
  compiler may not move a load above the previous step's store itself).
* Recurrence: ONE launch for all T steps. One thread block per batch tile of R
  rows (``blockDim = (unit threads, R)``), threads over hidden / memory units.
  The recurrent weights (W0m, Wh, Wo and the biases, packed into one flat
  buffer) are copied into dynamic shared memory once, before the time loop,
  when they fit; otherwise they are read from global memory (L1/L2 cached):
  e.g. d_m = 150 with h = 300 in float32 needs 2·150·300·4 B = 360 KB, more
  than the 227 KB a Hopper block may opt in to. Per-row state vectors always
  live in shared memory. The block synchronises once per layer per step
  (L + 1 times with L hidden layers; once when L = 0, where ping-pong buffers
  remove the second barrier), and once more in the forward when its output
  layer is split: the output layer has Dm dot products of length H, but a row
  has max(W0, Dm) unit threads (e.g. 100 outputs on 224 threads for Dm = 100,
  H = 200, where it was about 55 % of a step), so when the row has 2·Dm threads
  thread Dm + j sums the second half of output j's dot into shared memory and,
  after the barrier, thread j adds it to its own first half (a shuffle would
  save the barrier, but the CUDA simulator has none, and every kernel path is
  tested there). Weight gradients are NOT accumulated here: the
  model forms them afterwards as GEMMs over all B·T rows, from Z, M and dZ.
  Every dot product is ``cuda_launch.dot``: uint32 offsets advanced by addition in a
  ``while`` loop, about 7.5 SASS instructions per FMA where ``range`` with Python's
  negative-index wrap-around took 29-35 (docs/architecture.md, "SASS per FMA").

Streams: kernels are launched on CuPy's current stream, and array arguments
are imported with ``sync=False``, so no launch blocks the host (``cuda_launch.py``).
"""

import dataclasses
import functools
import warnings
from typing import Optional

from numba import cuda

from ..errors import ELMError
from . import pointwise as pw
from .cuda_launch import (MAX_BLOCKS, SIMULATOR, U, array_module, constants, device_arg, dot, flat_shape, float_type,
                          launch, stream)

# Optional parts of the kernel contract (kernels/contract.py): the sparse first
# layer is a CPU trick (it trades dense GEMMs for event loops); cuBLAS is faster.
CAPABILITIES = frozenset()


# The largest routing block (route_forward: threads over the inputs of one row).
_ROUTE_THREADS = 256
# Time steps route_weight_grad loads before one zero test (the kernel is written for 4).
_STEP_GROUP = 4
# Register budget of the recurrence (docs/architecture.md, "CUDA register budget";
# tests/test_cuda_codegen.py checks it with the real compiler): blocks of up to 512
# threads. Unbounded, ptxas gives recur_backward 151-152 registers per thread with
# the weights in shared memory, which fits only 384 threads and would halve the batch
# rows per block of a 200-wide layer; compiled with launch bounds of 512 threads it
# fits in 120-127 registers without spilling. recur_forward needed at most 94
# registers unbounded until its output layer was split over two threads, then 104-134
# (ptxas unrolls and schedules the extra dot differently per variant; 132 allow only
# 384 threads). Launch bounds there make ptxas aim at 64 registers and spill, so it is
# capped at the 128 registers that 512 threads allow instead: 123-128, no spills.
_MAX_RECURRENCE_THREADS = 512
_RECUR_FORWARD_MAX_REGISTERS = 128
# The simulator's cuda.jit takes neither.
_RECUR_BACKWARD_JIT = {} if SIMULATOR else dict(launch_bounds=_MAX_RECURRENCE_THREADS)
_RECUR_FORWARD_JIT = {} if SIMULATOR else dict(max_registers=_RECUR_FORWARD_MAX_REGISTERS)

# The register file, as CUDA's occupancy calculator (cuda_occupancy.h) models it for
# every architecture from sm_70 to sm_120: 65,536 registers per multiprocessor and
# per block, in 4 sub-partitions; a warp's registers are allocated in units of 256,
# and a block's warps are spread evenly over the sub-partitions.
REGISTERS_PER_SM = 65536
REGISTER_SUBPARTITIONS = 4
REGISTER_ALLOCATION_UNIT = 256
MAX_REGISTERS_PER_THREAD = 255
MAX_THREADS_PER_BLOCK = 1024


def max_threads_for_registers(registers):
    """Largest block (whole warps) that fits when each thread uses ``registers`` registers.

    E.g. 128 registers: 4,096 per warp, 4 warps per sub-partition, 512 threads;
    151 registers: 4,864 per warp, 3 warps per sub-partition, 384 threads.
    """
    if registers > MAX_REGISTERS_PER_THREAD:
        return 0
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    warps = REGISTER_SUBPARTITIONS * (REGISTERS_PER_SM // REGISTER_SUBPARTITIONS // max(per_warp, 1))
    return min(MAX_THREADS_PER_BLOCK, 32 * warps)
# Without the opt-in attribute a block may use 48 KB of dynamic shared memory;
# the simulator pretends to be such a device unless a test says otherwise.
_DEFAULT_SHARED_BYTES = 48 * 1024
_MAX_ROWS_PER_BLOCK = 4


@dataclasses.dataclass
class LaunchPolicy:
    """Override of the recurrence's weight placement (``None``: decide from the device).

    Tests use it to drive both placements through the simulator; production
    code leaves it alone.

    weights_in_shared  False forces the weights-in-global-memory path; True
                       stages them in shared memory whatever the device limit.
    """
    weights_in_shared: Optional[bool] = None


policy = LaunchPolicy()


# ---- routing ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _routing_kernels(np_dtype):
    """The routing kernels (and the zero fill route_weight_grad needs) for one float type."""
    _, ZERO, _ = constants(np_dtype)

    @cuda.jit
    def zero_2d_kernel(out):
        rows, cols = out.shape
        for k in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
            out[k // cols, k % cols] = ZERO

    @cuda.jit
    def route_forward_kernel(X, indptr, entry_syn, entry_weight, syn_per_channel, A_out):
        B, T, D = X.shape
        C = A_out.shape[2]
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        for row in range(cuda.blockIdx.x, B * T, cuda.gridDim.x):
            b = row // T
            t = row - b * T
            for c in range(tid, C, nthreads):
                A_out[b, t, c] = ZERO
            cuda.syncthreads()
            for i in range(tid, D, nthreads):
                x = X[b, t, i]
                if x != ZERO:
                    for e in range(indptr[i], indptr[i + 1]):
                        cuda.atomic.add(A_out, (b, t, entry_syn[e] // syn_per_channel), x * entry_weight[e])

    @cuda.jit
    def route_weight_grad_kernel(X, indptr, entry_syn, entry_mask, syn_per_channel, dA, partial_out):
        # One thread per (b, input) walks t once, _STEP_GROUP steps per test: their loads are
        # independent (in flight together) and one test passes over them all when all are zero;
        # a group with a non-zero step (or the last, short group) is then walked step by step.
        B, T, D = X.shape
        for k in range(cuda.grid(1), B * D, cuda.gridsize(1)):
            b = k // D
            i = k - b * D
            e_start = indptr[i]
            e_stop = indptr[i + 1]
            if e_start == e_stop:
                continue  # an input that feeds no synapse is never read
            # An input feeding one synapse (every input, without a routing map) sums in a register
            # and adds once; one feeding several adds each term as it comes.
            single = e_stop - e_start == 1
            j_single = entry_syn[e_start]
            c_single = j_single // syn_per_channel
            mask_single = entry_mask[e_start]
            acc = ZERO
            t = 0
            while t < T:
                n = min(_STEP_GROUP, T - t)
                hit = n < _STEP_GROUP
                if not hit:
                    hit = ((X[b, t, i] != ZERO) | (X[b, t + 1, i] != ZERO) | (X[b, t + 2, i] != ZERO)
                           | (X[b, t + 3, i] != ZERO))
                if hit:
                    for s in range(t, t + n):
                        x = X[b, s, i]
                        if x != ZERO:
                            if single:
                                acc += x * mask_single * dA[b, s, c_single]
                            else:
                                for e in range(e_start, e_stop):
                                    j = entry_syn[e]
                                    cuda.atomic.add(partial_out, (b, j),
                                                    x * entry_mask[e] * dA[b, s, j // syn_per_channel])
                t += n
            if single:
                cuda.atomic.add(partial_out, (b, j_single), acc)

    @cuda.jit
    def route_input_grad_kernel(dA, indptr, entry_syn, entry_weight, syn_per_channel, dX_out):
        B, T, D = dX_out.shape
        for k in range(cuda.grid(1), B * T * D, cuda.gridsize(1)):
            bt = k // D
            i = k - bt * D
            b = bt // T
            t = bt - b * T
            acc = ZERO
            for e in range(indptr[i], indptr[i + 1]):
                acc += entry_weight[e] * dA[b, t, entry_syn[e] // syn_per_channel]
            dX_out[b, t, i] = acc

    return dict(zero_2d_kernel=zero_2d_kernel, route_forward_kernel=route_forward_kernel,
                route_weight_grad_kernel=route_weight_grad_kernel, route_input_grad_kernel=route_input_grad_kernel)


def route_forward(X, indptr, entry_syn, entry_weight, syn_per_channel, A_out):
    """See ``kernels.cpu.route_forward``. One block per (b, t) row, atomics per channel."""
    B, T, D = X.shape
    if SIMULATOR:
        threads = min(D, 8)
    else:
        threads = max(32, min(_ROUTE_THREADS, 1 << (D - 1).bit_length()))
    k = _routing_kernels(float_type(A_out.dtype))["route_forward_kernel"]
    launch(k, min(B * T, MAX_BLOCKS), threads, X, indptr, entry_syn, entry_weight,
            int(syn_per_channel), A_out)


def route_weight_grad(X, indptr, entry_syn, entry_mask, syn_per_channel, dA, partial_out):
    """See ``kernels.cpu.route_weight_grad``. One thread per (b, input), walking t once."""
    B, T, D = X.shape
    ks = _routing_kernels(float_type(partial_out.dtype))
    launch(ks["zero_2d_kernel"], *flat_shape(partial_out.size), partial_out)
    launch(ks["route_weight_grad_kernel"], *flat_shape(B * D), X, indptr, entry_syn, entry_mask,
            int(syn_per_channel), dA, partial_out)


def route_input_grad(dA, indptr, entry_syn, entry_weight, syn_per_channel, dX_out):
    """See ``kernels.cpu.route_input_grad``. One thread per (b, t, input)."""
    k = _routing_kernels(float_type(dX_out.dtype))["route_input_grad_kernel"]
    launch(k, *flat_shape(dX_out.size), dA, indptr, entry_syn, entry_weight,
            int(syn_per_channel), dX_out)


# ---- linear leaky scans ------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _scan_kernels(np_dtype):
    _, ZERO, _ = constants(np_dtype)

    @cuda.jit
    def scan_forward_kernel(A, kappa, u0, U_out):
        B, T, C = A.shape
        for k in range(cuda.grid(1), B * C, cuda.gridsize(1)):
            b = k // C
            c = k - b * C
            decay = kappa[c]
            prev = u0[b, c]
            # Read-ahead: A may alias U_out, so the compiler cannot load A[t + 1] before the store
            # of U_out[t]; loaded here, step t + 1's load overlaps step t's FMA and store.
            ahead = A[b, 0, c] if T > 0 else ZERO
            for t in range(T):
                a = ahead
                if t + 1 < T:
                    ahead = A[b, t + 1, c]
                prev = decay * prev + a
                U_out[b, t, c] = prev

    @cuda.jit
    def scan_backward_kernel(dU, kappa, dA_next, dA_out):
        B, T, C = dU.shape
        for k in range(cuda.grid(1), B * C, cuda.gridsize(1)):
            b = k // C
            c = k - b * C
            decay = kappa[c]
            nxt = dA_next[b, c]
            ahead = dU[b, T - 1, c] if T > 0 else ZERO  # read-ahead, as in scan_forward_kernel
            for t in range(T - 1, -1, -1):
                g = ahead
                if t > 0:
                    ahead = dU[b, t - 1, c]
                nxt = g + decay * nxt
                dA_out[b, t, c] = nxt

    return dict(scan_forward_kernel=scan_forward_kernel, scan_backward_kernel=scan_backward_kernel)


def scan_forward(A, kappa, u0, U_out):
    """See ``kernels.cpu.scan_forward``. One thread per (b, channel); A may alias U_out.

    U_out may be a strided view (the model scans into the branch columns of the first
    layer's input buffer); the kernel then writes a contiguous result that is copied in.
    """
    B, _, C = A.shape
    target = U_out if U_out.flags.c_contiguous else array_module(U_out).empty(U_out.shape, U_out.dtype)
    kernel = _scan_kernels(float_type(U_out.dtype))["scan_forward_kernel"]
    launch(kernel, *flat_shape(B * C), A, kappa, u0, target)
    if target is not U_out:
        U_out[...] = target


def scan_backward(dU, kappa, dA_next, dA_out):
    """See ``kernels.cpu.scan_backward``. One thread per (b, channel); dU may alias dA_out."""
    B, _, C = dU.shape
    kernel = _scan_kernels(float_type(dA_out.dtype))["scan_backward_kernel"]
    launch(kernel, *flat_shape(B * C), dU, kappa, dA_next, dA_out)


# ---- the MLP-and-memory recurrence ---------------------------------------------------

@functools.lru_cache(maxsize=None)
def _activation_kernels(np_dtype):
    """The elementwise pass act_out = act(Z) after recur_backward, for one float type."""
    activate = pw.cuda_functions(np_dtype).activate

    @cuda.jit
    def activate_kernel(Z, activation, act_out):
        for k in range(cuda.grid(1), Z.shape[0], cuda.gridsize(1)):
            act_out[k] = activate(Z[k], activation)

    return dict(activate_kernel=activate_kernel)


@functools.lru_cache(maxsize=None)
def _weight_staging(weights_in_shared):
    """stage_weights(packed, smem) -> (where the kernel reads its weights, first free shared slot)."""
    if weights_in_shared:
        @cuda.jit(device=True)
        def stage_weights(packed, smem):
            """Copy the packed weights into shared memory; returns (weights, first free slot)."""
            nthreads = cuda.blockDim.x * cuda.blockDim.y
            for k in range(cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, packed.shape[0], nthreads):
                smem[k] = packed[k]
            return smem, packed.shape[0]
    else:
        @cuda.jit(device=True)
        def stage_weights(packed, smem):
            return packed, 0

    return stage_weights


@functools.lru_cache(maxsize=None)
def _recurrence_kernels(np_dtype, weights_in_shared):
    """recur_forward and recur_backward for one float type and weight placement."""
    nb_dtype, ZERO, _ = constants(np_dtype)
    pointwise = pw.cuda_functions(np_dtype)
    activate, activation_slope, phi, phi_backward = (pointwise.activate, pointwise.activation_slope,
                                                     pointwise.phi, pointwise.phi_backward)
    stage_weights = _weight_staging(weights_in_shared)

    @cuda.jit(**_RECUR_FORWARD_JIT)
    def recur_forward_kernel(Zb, packed, kappa_m, c_m, m0, activation, phi_scale, phi_slope,
                      L, H, o_wh, o_wo, o_ch, o_co, M_out, Z_out, DM_out):
        # Shared layout: [packed weights (if staged)] then per row r, at
        # base + r·(3·Dm + 2·H) (2·Dm when L = 0): κ_m⊙m ping-pong [2,Dm], activations
        # ping-pong [2,H], the output sums' second halves [Dm].
        smem = cuda.shared.array(0, nb_dtype)
        B, T, W0 = Zb.shape
        Dm = kappa_m.shape[0]
        lane = cuda.threadIdx.x
        nlanes = cuda.blockDim.x
        b = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        active = b < B
        W, base = stage_weights(packed, smem)
        width_a = H if L > 0 else 0
        row = base + cuda.threadIdx.y * (2 * Dm + (2 * H + Dm if L > 0 else 0))
        act0 = row + 2 * Dm
        last = act0 + ((L - 1) % 2) * H  # activations the output layer reads
        # The output layer's Dm dot products of length H would keep only Dm of the row's threads
        # busy: when it has 2·Dm, thread Dm + j sums the second half of output j's dot into
        # second_at + j, and after one more barrier thread j adds it to its first half.
        split = L > 0 and 2 * Dm <= nlanes
        half_h = H // 2
        second_at = act0 + 2 * width_a
        if active:
            for j in range(lane, Dm, nlanes):
                smem[row + j] = kappa_m[j] * m0[b, j]
        cuda.syncthreads()
        p = 0
        for t in range(T):
            km_now = row + p * Dm
            km_next = row + (1 - p) * Dm
            if L > 0:
                if active:
                    for j in range(lane, W0, nlanes):
                        acc = dot(Zb[b, t, j], smem, U(km_now), U(1), W, U(j), U(W0), U(Dm))
                        Z_out[0, b, t, j] = acc
                        smem[act0 + j] = activate(acc, activation)
                cuda.syncthreads()
                for l in range(1, L):
                    src = act0 + ((l - 1) % 2) * H
                    dst = act0 + (l % 2) * H
                    w_l = o_wh + (l - 1) * H * H
                    if active:
                        for j in range(lane, H, nlanes):
                            acc = dot(W[o_ch + (l - 1) * H + j], smem, U(src), U(1), W, U(w_l + j), U(H), U(H))
                            Z_out[l, b, t, j] = acc
                            smem[dst + j] = activate(acc, activation)
                    cuda.syncthreads()
            first = ZERO
            if split:
                if active and lane < 2 * Dm:
                    second = lane >= Dm  # one call of dot for both halves: fewer registers
                    j = lane - Dm if second else lane
                    k0 = half_h if second else 0
                    part = dot(ZERO if second else W[o_co + j], smem, U(last + k0), U(1), W,
                               U(o_wo + k0 * Dm + j), U(Dm), U(H - half_h if second else half_h))
                    if second:
                        smem[second_at + j] = part
                    else:
                        first = part
                cuda.syncthreads()
            if active:
                for j in range(lane, Dm, nlanes):  # split: j = lane, threads lane < Dm only
                    if split:
                        o = first + smem[second_at + j]
                    elif L > 0:
                        o = dot(W[o_co + j], smem, U(last), U(1), W, U(o_wo + j), U(Dm), U(H))
                    else:
                        # No hidden layer: o = z_0, whose bias Zb already carries.
                        o = dot(Zb[b, t, j], smem, U(km_now), U(1), W, U(j), U(W0), U(Dm))
                    dm = phi(o, phi_scale, phi_slope)
                    DM_out[b, t, j] = dm
                    m = smem[km_now + j] + c_m[j] * dm
                    M_out[b, t, j] = m
                    smem[km_next + j] = kappa_m[j] * m
            cuda.syncthreads()
            p = 1 - p

    @cuda.jit(**_RECUR_BACKWARD_JIT)
    def recur_backward_kernel(dM, packed, kappa_m, c_m, m0, M, Z, DM, activation, phi_scale, phi_slope,
                       L, H, o_wh, o_wo, dZ_out, dO_out, gkappa_out, gc_out, carry):
        # Shared layout per row r, at base + r·(6·Dm + 2·H): ∂o ping-pong [2,Dm],
        # g [Dm], carry [Dm], Σ∂κ [Dm], Σ∂c [Dm], ∂z ping-pong [2,H].
        smem = cuda.shared.array(0, nb_dtype)
        B, T, Dm = dM.shape
        W0 = H if L > 0 else Dm
        lane = cuda.threadIdx.x
        nlanes = cuda.blockDim.x
        b = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        active = b < B
        W, base = stage_weights(packed, smem)
        width_dz = H if L > 0 else 0
        row = base + cuda.threadIdx.y * (6 * Dm + 2 * width_dz)
        g_at = row + 2 * Dm
        carry_at = row + 3 * Dm
        gk_at = row + 4 * Dm
        gc_at = row + 5 * Dm
        dz0 = row + 6 * Dm
        if active:
            for i in range(lane, Dm, nlanes):
                smem[carry_at + i] = carry[b, i]
                smem[gk_at + i] = gkappa_out[b, i]
                smem[gc_at + i] = gc_out[b, i]
        cuda.syncthreads()
        p = 0
        for t in range(T - 1, -1, -1):
            do_at = row + p * Dm
            if active:
                for i in range(lane, Dm, nlanes):
                    # (a) g = dM + carry
                    g = dM[b, t, i] + smem[carry_at + i]
                    smem[g_at + i] = g
                    # (b) gc += g ⊙ Δm
                    dm = DM[b, t, i]
                    smem[gc_at + i] += g * dm
                    # (c) do = g ⊙ c_m ⊙ φ'(o),  φ'(o) = s·k·(1 − (Δm/s)²)
                    do = phi_backward(g * c_m[i], dm, phi_scale, phi_slope)
                    dO_out[b, t, i] = do
                    smem[do_at + i] = do
            cuda.syncthreads()
            # (d) da = W_oᵀ do; for l = L−1 … 0: dz_l = da ⊙ act'(z_l), da = W_lᵀ dz_l   (L = 0: dz0 = do)
            if L > 0:
                dst = dz0 + ((L - 1) % 2) * H
                if active:
                    for i in range(lane, H, nlanes):
                        acc = dot(ZERO, smem, U(do_at), U(1), W, U(o_wo + i), U(H), U(Dm))
                        dz = acc * activation_slope(Z[L - 1, b, t, i], activation)
                        dZ_out[L - 1, b, t, i] = dz
                        smem[dst + i] = dz
                cuda.syncthreads()
                for l in range(L - 1, 0, -1):
                    src = dz0 + (l % 2) * H
                    dst = dz0 + ((l - 1) % 2) * H
                    w_l = o_wh + (l - 1) * H * H
                    if active:
                        for i in range(lane, H, nlanes):
                            acc = dot(ZERO, smem, U(src), U(1), W, U(w_l + i), U(H), U(H))
                            dz = acc * activation_slope(Z[l - 1, b, t, i], activation)
                            dZ_out[l - 1, b, t, i] = dz
                            smem[dst + i] = dz
                    cuda.syncthreads()
            # ∂z_0: the first hidden layer's, or ∂o itself when there is no hidden layer.
            dz_first = dz0 if L > 0 else do_at
            if active:
                for i in range(lane, Dm, nlanes):
                    # (e) r = W0mᵀ dz0   (acc)
                    acc = dot(ZERO, smem, U(dz_first), U(1), W, U(i), U(Dm), U(W0))
                    # (f) total = g + r;  gk += total ⊙ m_{t−1};  carry = κ_m ⊙ total
                    total = smem[g_at + i] + acc
                    m_prev = M[b, t - 1, i] if t > 0 else m0[b, i]
                    smem[gk_at + i] += total * m_prev
                    smem[carry_at + i] = kappa_m[i] * total
            p = 1 - p
        if active:
            for i in range(lane, Dm, nlanes):
                gkappa_out[b, i] = smem[gk_at + i]
                gc_out[b, i] = smem[gc_at + i]
                carry[b, i] = smem[carry_at + i]

    return dict(recur_forward_kernel=recur_forward_kernel, recur_backward_kernel=recur_backward_kernel)


@dataclasses.dataclass(frozen=True)
class RecurrenceLaunch:
    """How one recurrence call is laid out on the device.

    rows_per_block     R batch rows per thread block (blockDim.y).
    unit_threads       threads over units per row (blockDim.x).
    blocks             ⌈B / R⌉.
    weights_in_shared  whether the packed weights are staged in shared memory.
    shared_bytes       dynamic shared memory per block.
    """
    rows_per_block: int
    unit_threads: int
    blocks: int
    weights_in_shared: bool
    shared_bytes: int


@functools.lru_cache(maxsize=None)
def _device_limits():
    """(multiprocessors, opt-in dynamic shared bytes per block) of the current GPU."""
    if SIMULATOR:
        return 1, _DEFAULT_SHARED_BYTES
    dev = cuda.get_current_device()
    try:
        optin = int(dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    except Exception:  # attribute unknown to an old driver / binding
        optin = int(dev.MAX_SHARED_MEMORY_PER_BLOCK)
    return int(dev.MULTIPROCESSOR_COUNT), optin


def batch_tile(B):
    """Batch rows per thread block: enough blocks to cover every multiprocessor first.

    The simulator uses 2 so that multi-row tiles, and an idle row in the last
    block, are exercised by the tests.
    """
    if SIMULATOR:
        return 2
    sms, _ = _device_limits()
    return max(1, min(_MAX_ROWS_PER_BLOCK, -(-B // sms)))


def plan_recurrence(batch, tile, unit_width, row_floats, weight_floats, itemsize,
                    max_threads=_MAX_RECURRENCE_THREADS, limits=None):
    """Choose the recurrence launch shape (pure function of sizes, device limits and ``policy``).

    tile           requested batch rows per block (``batch_tile``); lowered to fit
                   4 rows, the batch, the thread limit and shared memory.
    unit_width     widest layer a thread row walks (max(W0, Dm)).
    row_floats     per-row scratch floats in shared memory.
    weight_floats  length of the packed weight buffer.
    max_threads    threads one block may have (the kernel's register use caps it).
    limits         (multiprocessors, dynamic shared bytes per block); default: the
                   current device's, with its opt-in shared memory maximum.
    Raises ELMError when even one row's scratch does not fit in shared memory.
    """
    _, limit = _device_limits() if limits is None else limits
    if SIMULATOR:
        units = min(unit_width, max_threads)
    else:
        # Whole warps; wider layers are walked by the stride loops inside the kernel.
        units = min(-(-unit_width // 32) * 32, max_threads // 32 * 32)
    rows = max(1, min(int(tile), _MAX_ROWS_PER_BLOCK, batch, max_threads // units))
    while rows > 1 and rows * row_floats * itemsize > limit:
        rows -= 1
    scratch = rows * row_floats * itemsize
    if scratch > limit:
        raise ELMError(f"the recurrence state ({row_floats} values per batch row) does not fit in "
                       f"{limit} bytes of GPU shared memory: reduce num_memory or mlp_hidden_size")
    in_shared, shared = _place_weights(scratch, weight_floats * itemsize, limit, policy)
    return RecurrenceLaunch(rows, units, -(-batch // rows), in_shared, shared)


def _place_weights(scratch, weight_bytes, limit, policy):
    """(weights in shared memory?, dynamic shared bytes) of a time walk whose per-row or per-thread
    state takes ``scratch`` bytes: the weights are staged beside it when both fit in ``limit``,
    unless ``policy.weights_in_shared`` decides."""
    in_shared = scratch + weight_bytes <= limit
    if policy.weights_in_shared is not None:
        in_shared = bool(policy.weights_in_shared)
    return in_shared, scratch + (weight_bytes if in_shared else 0)


_opted_in = set()


def _launch_recurrence(name, batch, tile, unit_width, row_floats, args):
    """Plan, pick the kernel variant and launch; returns the RecurrenceLaunch used."""
    dtype, packed = args[0].dtype, args[1]
    return launch_planned(
        lambda max_threads, limits: plan_recurrence(batch, tile, unit_width, row_floats, packed.size,
                                                    dtype.itemsize, max_threads, limits),
        lambda plan: _recurrence_kernels(float_type(dtype), plan.weights_in_shared)[name],
        lambda plan: (plan.unit_threads, plan.rows_per_block), _MAX_RECURRENCE_THREADS, args)


def launch_planned(plan_for, kernel_for, block_of, max_threads, args):
    """Plan a launch with dynamic shared memory, pick the kernel variant and launch it.

    plan_for(max_threads, limits) -> plan (with ``blocks`` and ``shared_bytes``), kernel_for(plan) ->
    the dispatcher, block_of(plan) -> blockDim. On a GPU the plan is redone with fewer threads when
    the compiled kernel's register count allows fewer than it asks for, and within 48 KB when the
    kernel's shared memory cap cannot be raised. Returns the plan used.
    """
    dev_args = tuple(device_arg(a) for a in args)
    limits = None
    while True:
        plan = plan_for(max_threads, limits)
        kernel = kernel_for(plan)
        if SIMULATOR:
            break
        kernel = kernel.specialize(*dev_args)
        # The register budgets make every plan fit; this guards a future kernel
        # (or another ptxas) whose compiled register count allows fewer threads.
        allowed = next(iter(kernel.overloads.values())).max_threads_per_block
        block = block_of(plan)
        threads = block[0] * block[1] if isinstance(block, tuple) else block
        if threads > allowed:
            max_threads = allowed
        elif plan.shared_bytes > _DEFAULT_SHARED_BYTES and not _allow_large_shared(kernel):
            limits = (_device_limits()[0], _DEFAULT_SHARED_BYTES)
        else:
            break
    kernel[plan.blocks, block_of(plan), stream(), plan.shared_bytes](*dev_args)
    return plan


def _allow_large_shared(specialized):
    """Raise the kernel's dynamic shared memory cap to the device's opt-in maximum.

    CUDA refuses launches above 48 KB unless this function attribute is raised,
    and Numba has no public switch for it, so it is set through the driver
    binding as Numba itself sets the carveout attribute. Returns False (and
    warns once) when this Numba's driver layer does not allow it; the caller
    then plans within 48 KB, reading the weights from global memory if needed.
    """
    overload = next(iter(specialized.overloads.values()))
    cufunc = overload._codelibrary.get_cufunc()
    if id(cufunc) in _opted_in:
        return True
    _, optin = _device_limits()
    try:
        from cuda.bindings import driver as binding
        from numba.cuda.cudadrv.driver import driver
        attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        driver.cuKernelSetAttribute(attr, optin, cufunc.handle, cuda.get_current_device().id)
    except Exception as e:  # older numba-cuda: other binding, other handle type
        warnings.warn(f"cannot raise the CUDA shared memory limit above 48 KB ({type(e).__name__}: {e}); "
                      "large recurrences read their weights from global memory")
        return False
    _opted_in.add(id(cufunc))
    return True


def _packed(xp, dtype, parts):
    return xp.concatenate([xp.ascontiguousarray(p, dtype=dtype).reshape(-1) for p in parts])


def _placeholder(xp, dtype):
    """Stands in for the [L,B,T,H] arrays when L = 0 (a zero-size array cannot be passed)."""
    return xp.zeros((1, 1, 1, 1), dtype)


def recur_forward(Zb, W0mT, WhT, ch, WoT, co, kappa_m, c_m, m0, activation, phi_scale, phi_slope,
                  tile, M_out, Z_out, DM_out, KM_out):
    """See ``kernels.cpu.recur_forward`` (same arguments, same outputs).

    Zb     [B,T,W0]  read only.        W0mT [Dm,W0], WhT [Lh,H,H], ch [Lh,H],
    WoT    [H,Dm], co [Dm]  (unused when L = 0): packed here, in this order,
                     into one flat device buffer that the kernel stages in shared memory.
    kappa_m, c_m [Dm], m0 [B,Dm]  read only; hand the same ones to recur_backward.
    tile             batch rows per thread block (``batch_tile(B)``); any value >= 1 is correct.
    M_out, DM_out [B,T,Dm], Z_out [L,B,T,H]  overwritten; recur_backward needs them unchanged.
    KM_out [B,T,Dm]  κ_m ⊙ m_{t−1} (may be a strided view), filled from M_out by one
                     elementwise pass after the launch.
    """
    xp, dt = array_module(Zb), Zb.dtype
    B, T, W0 = Zb.shape
    Dm = kappa_m.shape[0]
    L, H = Z_out.shape[0], Z_out.shape[3]
    Lh = max(L - 1, 0)
    parts = [W0mT, WhT, WoT, ch, co] if L else [W0mT]
    o_wh = Dm * W0
    o_wo = o_wh + Lh * H * H
    o_ch = o_wo + H * Dm
    o_co = o_ch + Lh * H
    packed = _packed(xp, dt, parts)
    row_floats = 2 * Dm + (2 * H + Dm if L else 0)
    plan = _launch_recurrence("recur_forward_kernel", B, tile, max(W0, Dm), row_floats, (
        Zb, packed, kappa_m, c_m, m0, int(activation), dt.type(phi_scale), dt.type(phi_slope),
        L, H, o_wh, o_wo, o_ch, o_co, M_out, Z_out if L else _placeholder(xp, dt), DM_out))
    KM_out[:, 0] = kappa_m * m0
    KM_out[:, 1:] = kappa_m * M_out[:, :-1]
    return plan


def recur_backward(dM, W0m, Wh, Wo, kappa_m, c_m, m0, M, Z, DM, activation, phi_scale, phi_slope, tile, carry,
                   dZ_out, dO_out, gkappa_out, gc_out, act_out):
    """See ``kernels.cpu.recur_backward`` (same arguments, same outputs).

    dM [B,T,Dm] read only.  W0m [W0,Dm], Wh [Lh,H,H], Wo [Dm,H] untransposed, packed
    here into one flat buffer (staged in shared memory when it fits).
    M, Z, DM, m0, kappa_m, c_m: exactly what recur_forward was given / wrote.
    tile             batch rows per thread block; any value >= 1 is correct.
    dZ_out [L,B,T,H], dO_out [B,T,Dm]: overwritten; gkappa_out, gc_out [B,Dm]: added to;
    carry [B,Dm]: in ∂loss/∂m_{T−1} from later steps, out ∂loss/∂m_{−1}.
    act_out [L,B,T,H]  act(Z), written by one elementwise kernel after the launch (on the
                     GPU that pass is bandwidth-bound and cheap; the recurrence kernel keeps
                     its registers for the time loop).
    """
    xp, dt = array_module(dM), dM.dtype
    B, T, Dm = dM.shape
    L, H = Z.shape[0], Z.shape[3]
    Lh = max(L - 1, 0)
    W0 = W0m.shape[0]
    parts = [W0m, Wh, Wo] if L else [W0m]
    o_wh = W0 * Dm
    o_wo = o_wh + Lh * H * H
    packed = _packed(xp, dt, parts)
    row_floats = 6 * Dm + (2 * H if L else 0)
    placeholder = _placeholder(xp, dt)
    plan = _launch_recurrence("recur_backward_kernel", B, tile, max(W0, Dm), row_floats, (
        dM, packed, kappa_m, c_m, m0, M, Z if L else placeholder, DM, int(activation),
        dt.type(phi_scale), dt.type(phi_slope), L, H, o_wh, o_wo,
        dZ_out if L else placeholder, dO_out, gkappa_out, gc_out, carry))
    if L:
        kernel = _activation_kernels(float_type(dt))["activate_kernel"]
        launch(kernel, *flat_shape(Z.size), Z.reshape(-1), int(activation), act_out.reshape(-1))
    return plan
