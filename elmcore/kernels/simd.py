"""Register-blocked vector products, written as LLVM vector code through Numba intrinsics: the
ELM Network's per-neuron MLPs (``blocked_product``) and the single neuron's recurrence
(``broadcast_product``, at the end of this file).

Why. Each neuron has its own small weight matrices, so the network's products are many tiny
ones (12 × 16, 16 × 8, …) over vectors of neurons. Written as Numba loops, their accumulators
go through memory at every step of the sum: LLVM cannot keep them in registers across the
reduction loop and must check at run time that the operands do not overlap. Measured on one
core (bench/network_floor.py): 6–13 GMAC/s for the loops, 11–21 for these blocks.

One block call computes P × Q accumulator vectors, each ``lanes`` consecutive neurons:

    acc[p, q] = out[p, q]                                          p < P, q < Q
    for k in 0 … K−1:   acc[p, q] = fma(x[k, p], y[k, q], acc[p, q])
    out[p, q] = acc[p, q]

where the vector x[k, p] starts at element ``x_off + k·x_sk + p·x_sp`` of the C-contiguous
array x (y[k, q] and out[p, q] alike). The sum runs over k in ascending order, one fused
multiply-add per step: the order of the loops it replaces and of the CUDA twins. A vector is
64 bytes (16 float32 or 8 float64 values: one AVX-512 register), then 32 and 16 bytes for what
is left of the neurons; LLVM splits a vector where the CPU has narrower ones, so the code is
correct on any machine Numba supports.
"""

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

VECTOR_BYTES = 64


def _same_float_c_arrays(*arrays):
    """The blocks' typing rule: C-contiguous arrays of one float dtype (their offsets assume it)."""
    return all(isinstance(a, types.Array) and isinstance(a.dtype, types.Float) and a.layout == "C"
               for a in arrays) and len({a.dtype for a in arrays}) == 1


def _vector_setup(context, builder, signature, args, offsets, width_bytes):
    """(vector type, its pointer type, llvm.fma over it, [the first len(offsets) arrays' data
    pointers advanced by their offsets]) for a block over vectors of ``width_bytes`` bytes."""
    elem = context.get_value_type(signature.args[0].dtype)
    width = width_bytes // context.get_abi_sizeof(elem)
    vec = ir.VectorType(elem, width)
    suffix = "f32" if isinstance(elem, ir.FloatType) else "f64"
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                         f"llvm.fma.v{width}{suffix}")
    bases = [builder.gep(context.make_array(aty)(context, builder, arr).data, [offset])
             for arr, aty, offset in zip(args, signature.args, offsets)]
    return vec, vec.as_pointer(), fma, bases


def _make_block(P, Q, width_bytes):
    @intrinsic
    def block(typingctx, x, y, out, x_off, x_sk, x_sp, y_off, y_sk, y_sq, out_off, out_sp, out_sq, K):
        if not _same_float_c_arrays(x, y, out):
            return None
        sig = types.void(x, y, out, *([types.intp] * 10))

        def codegen(context, builder, signature, args):
            x_off, x_sk, x_sp, y_off, y_sk, y_sq, out_off, out_sp, out_sq, K = args[3:]
            vec, vec_ptr, fma, (x_base, y_base, out_base) = _vector_setup(
                context, builder, signature, args, (x_off, y_off, out_off), width_bytes)

            def vector_at(base, offset):
                return builder.bitcast(builder.gep(base, [offset]), vec_ptr)

            def times(a, k):
                return builder.mul(a, ir.Constant(a.type, k))

            out_ptrs = [[vector_at(out_base, builder.add(times(out_sp, p), times(out_sq, q))) for q in range(Q)]
                        for p in range(P)]
            # Accumulators live in stack slots that LLVM's mem2reg turns into registers.
            slots = [[cgutils.alloca_once(builder, vec) for _ in range(Q)] for _ in range(P)]
            for p in range(P):
                for q in range(Q):
                    builder.store(builder.load(out_ptrs[p][q], align=1), slots[p][q])
            with cgutils.for_range(builder, K) as loop:
                k = loop.index
                x_k = builder.gep(x_base, [builder.mul(k, x_sk)])
                y_k = builder.gep(y_base, [builder.mul(k, y_sk)])
                xs = [builder.load(vector_at(x_k, times(x_sp, p)), align=1) for p in range(P)]
                ys = [builder.load(vector_at(y_k, times(y_sq, q)), align=1) for q in range(Q)]
                for p in range(P):
                    for q in range(Q):
                        builder.store(builder.call(fma, [xs[p], ys[q], builder.load(slots[p][q])]), slots[p][q])
            for p in range(P):
                for q in range(Q):
                    builder.store(builder.load(slots[p][q]), out_ptrs[p][q], align=1)
            return context.get_dummy_value()

        return sig, codegen

    return block


def _make_blocks(width_bytes):
    """The P × Q accumulator vectors of ``width_bytes`` each that start at neuron i: 4 x 4 blocks
    (16 accumulators and 8 operand vectors: within AVX-512's 32 vector registers), narrower ones
    for the remainders of P and Q."""
    b44, b41 = _make_block(4, 4, width_bytes), _make_block(4, 1, width_bytes)
    b14, b11 = _make_block(1, 4, width_bytes), _make_block(1, 1, width_bytes)

    @njit(inline="always", error_model="numpy")
    def blocks(x, y, out, i, x_off, x_sk, x_sp, y_off, y_sk, y_sq, out_off, out_sp, out_sq, K, P, Q):
        p = 0
        while p < P:
            rows = 4 if p + 4 <= P else 1
            xo = x_off + i + p * x_sp
            oo = out_off + i + p * out_sp
            q = 0
            while q < Q:
                cols = 4 if q + 4 <= Q else 1
                yo = y_off + i + q * y_sq
                o2 = oo + q * out_sq
                if rows == 4 and cols == 4:
                    b44(x, y, out, xo, x_sk, x_sp, yo, y_sk, y_sq, o2, out_sp, out_sq, K)
                elif rows == 4:
                    b41(x, y, out, xo, x_sk, x_sp, yo, y_sk, y_sq, o2, out_sp, out_sq, K)
                elif cols == 4:
                    b14(x, y, out, xo, x_sk, x_sp, yo, y_sk, y_sq, o2, out_sp, out_sq, K)
                else:
                    b11(x, y, out, xo, x_sk, x_sp, yo, y_sk, y_sq, o2, out_sp, out_sq, K)
                q += cols
            p += rows

    return blocks


# Vectors of 64, 32 and 16 bytes: fewer neurons than one 64-byte vector (a budget sweep's
# smallest networks: 4 or 8 float32 neurons) and the remainders of wider layers still run in
# vectors, not in the scalar loop after them.
_BLOCKS_64, _BLOCKS_32, _BLOCKS_16 = _make_blocks(64), _make_blocks(32), _make_blocks(16)


@njit(inline="always", cache=True, error_model="numpy")
def blocked_product(x, y, out, x_off, x_sk, x_sp, y_off, y_sk, y_sq, out_off, out_sp, out_sq, K, P, Q, N):
    """The block products over P x Q accumulator vectors for the neurons [0, N − N mod (16 bytes))
    (offsets advance by one per neuron); returns where the neurons left to a scalar loop begin."""
    V = VECTOR_BYTES // out.itemsize
    stop = N - N % V
    for i in range(0, stop, V):
        _BLOCKS_64(x, y, out, i, x_off, x_sk, x_sp, y_off, y_sk, y_sq, out_off, out_sp, out_sq, K, P, Q)
    if N - stop >= V // 2:
        _BLOCKS_32(x, y, out, stop, x_off, x_sk, x_sp, y_off, y_sk, y_sq, out_off, out_sp, out_sq, K, P, Q)
        stop += V // 2
    if N - stop >= V // 4:
        _BLOCKS_16(x, y, out, stop, x_off, x_sk, x_sp, y_off, y_sk, y_sq, out_off, out_sp, out_sq, K, P, Q)
        stop += V // 4
    return stop


# ---- rows times a shared matrix: the single neuron's recurrence --------------------------------
#
# out[r, :] += A[r, :] @ W for a tile of batch rows, every row against the same W. The
# auto-vectorised loop this replaces (``cpu._accumulate_product``) added four products into
# ``out`` in memory per pass over W's rows; here each block keeps R rows × one vector of outputs
# in registers over the whole sum and broadcasts A[r, k] against W[k, j : j + lanes]. Measured on
# one core in float32 (16 rows, K × N = 100 × 200 and 200 × 100): 40 and 35 GMAC/s, against 27
# and 22 for the loop.

def _make_row_block(R, width_bytes):
    @intrinsic
    def block(typingctx, A, W, out, a_off, a_sr, w_off, w_sk, out_off, out_sr, K):
        if not _same_float_c_arrays(A, W, out):
            return None
        sig = types.void(A, W, out, *([types.intp] * 7))

        def codegen(context, builder, signature, args):
            a_off, a_sr, w_off, w_sk, out_off, out_sr, K = args[3:]
            vec, vec_ptr, fma, (a_base, w_base, out_base) = _vector_setup(
                context, builder, signature, args, (a_off, w_off, out_off), width_bytes)
            width = vec.count

            def times(a, k):
                return builder.mul(a, ir.Constant(a.type, k))
            out_ptrs = [builder.bitcast(builder.gep(out_base, [times(out_sr, r)]), vec_ptr) for r in range(R)]
            a_rows = [builder.gep(a_base, [times(a_sr, r)]) for r in range(R)]
            # Accumulators live in stack slots that LLVM's mem2reg turns into registers.
            slots = [cgutils.alloca_once(builder, vec) for _ in range(R)]
            for r in range(R):
                builder.store(builder.load(out_ptrs[r], align=1), slots[r])
            undef = ir.Constant(vec, ir.Undefined)
            lane0 = ir.Constant(ir.IntType(32), 0)
            splat = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)
            with cgutils.for_range(builder, K) as loop:
                k = loop.index
                w = builder.load(builder.bitcast(builder.gep(w_base, [builder.mul(k, w_sk)]), vec_ptr), align=1)
                for r in range(R):
                    a = builder.load(builder.gep(a_rows[r], [k]))
                    a_vec = builder.shuffle_vector(builder.insert_element(undef, a, lane0), undef, splat)
                    builder.store(builder.call(fma, [a_vec, w, builder.load(slots[r])]), slots[r])
            for r in range(R):
                builder.store(builder.load(slots[r]), out_ptrs[r], align=1)
            return context.get_dummy_value()

        return sig, codegen

    return block


def _make_columns(width_bytes):
    """The tile's rows times one vector of W's columns: blocks of 4 rows (8 accumulator registers
    on AVX2, 4 on AVX-512), then single rows."""
    rows4, rows1 = _make_row_block(4, width_bytes), _make_row_block(1, width_bytes)

    @njit(inline="always", error_model="numpy")
    def columns(A, W, out, j, n, K, N):
        r = 0
        while r + 4 <= n:
            rows4(A, W, out, r * K, K, j, N, r * N + j, N, K)
            r += 4
        while r < n:
            rows1(A, W, out, r * K, K, j, N, r * N + j, N, K)
            r += 1

    return columns


# Vectors of 64, 32 and 16 bytes, so a row's tail narrower than 64 bytes still runs in vectors
# (100 float32 outputs: six of 16 lanes, one of 4).
_COLUMNS_64, _COLUMNS_32, _COLUMNS_16 = _make_columns(64), _make_columns(32), _make_columns(16)


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once, whatever the caller's fastmath flags (the vector blocks' arithmetic)."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        elem = context.get_value_type(signature.args[0])
        suffix = "f32" if isinstance(elem, ir.FloatType) else "f64"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(elem, [elem, elem, elem]),
                                             f"llvm.fma.{suffix}")
        return builder.call(fma, list(args))

    return a(a, a, a), codegen


@njit(inline="always", cache=True, error_model="numpy")
def broadcast_product(A, W, out):
    """out[n, :] += A[n, :] @ W:  A [n,K], W [K,N], out [n,N], all C-contiguous, one float dtype.

    Every out[r, j] adds its K products one fused multiply-add at a time, k ascending (the order
    of the CUDA twins' dot loops).
    """
    n, K = A.shape
    N = W.shape[1]
    size = out.itemsize
    j = 0
    while j < N:
        left = (N - j) * size
        if left >= 64:
            _COLUMNS_64(A, W, out, j, n, K, N)
            j += 64 // size
        elif left >= 32:
            _COLUMNS_32(A, W, out, j, n, K, N)
            j += 32 // size
        elif left >= 16:
            _COLUMNS_16(A, W, out, j, n, K, N)
            j += 16 // size
        else:
            for r in range(n):
                acc = out[r, j]
                for k in range(K):
                    acc = _fma(A[r, k], W[k, j], acc)
                out[r, j] = acc
            j += 1


# ---- one tile's batch rows as one vector (the network walks' recurrent synapses) ----------
#
# The ELM Network's walks keep what a recurrent synapse reads and writes row-minor: a channel's
# values for the tile's batch rows side by side, so one synapse entry is one vector
# multiply-add over the rows (network_cpu.py, module docstring). Written as a Numba loop with a
# runtime trip count, every entry paid a loop's set-up and tail, a negative-index check on
# both its indices, and an overlap check; with a constant trip count LLVM unrolled the loop and
# left it scalar. For a full tile of ROW_LANES rows these intrinsics are the entries' vector
# operations alone: on the SHD-Adding and char-LM shapes the entries were a tenth of the forward
# walk and a fifth of the backward.

ROW_LANES = 8


def _row_vectors(context, builder, signature, args, pairs):
    """(vector type, llvm.fma over it, [a <ROW_LANES x T>* pointer for each (array, offset) arg pair])."""
    elem = context.get_value_type(signature.args[pairs[0][0]].dtype)
    vec = ir.VectorType(elem, ROW_LANES)
    suffix = "f32" if isinstance(elem, ir.FloatType) else "f64"
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                         f"llvm.fma.v{ROW_LANES}{suffix}")
    pointers = [builder.bitcast(builder.gep(context.make_array(signature.args[a])(context, builder, args[a]).data,
                                            [args[o]]), vec.as_pointer())
                for a, o in pairs]
    return vec, fma, pointers


@intrinsic
def add_scaled_row_run(typingctx, acc, acc_off, src, src_rows, weights, start, stop):
    """acc[acc_off : acc_off + ROW_LANES] += Σ_e weights[e] · src[src_rows[e]·ROW_LANES : …] for
    e = start … stop − 1 in that order, one fused multiply-add per entry and item, the sum held in
    a register from the first entry to the last (1-D C arrays: acc, src and weights of one float
    dtype, src_rows of int64; no bounds checks).

    Adding each entry into memory in turn gives the same bits, but entries that add into one row
    then wait on each other through memory (a store, then a load of what it stored): where a
    neuron's entries come one after another, that chain was most of their time."""
    if not (_same_float_c_arrays(acc, src, weights) and acc.ndim == src.ndim == weights.ndim == 1
            and isinstance(src_rows, types.Array) and src_rows.dtype == types.int64 and src_rows.ndim == 1
            and src_rows.layout == "C"):
        return None
    sig = types.void(acc, types.intp, src, src_rows, weights, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        vec, fma, (acc_at,) = _row_vectors(context, builder, signature, args, [(0, 1)])
        src_data, rows_data, weight_data = (context.make_array(signature.args[a])(context, builder, args[a]).data
                                            for a in (2, 3, 4))
        total = cgutils.alloca_once_value(builder, builder.load(acc_at, align=1))
        lanes = ir.Constant(ir.IntType(64), ROW_LANES)
        with cgutils.for_range_slice(builder, args[5], args[6], ir.Constant(ir.IntType(64), 1)) as (e, _):
            row = builder.load(builder.gep(rows_data, [e]))
            x = builder.load(builder.bitcast(builder.gep(src_data, [builder.mul(row, lanes)]), vec.as_pointer()),
                             align=1)
            scale = cgutils.get_null_value(vec)
            w = builder.load(builder.gep(weight_data, [e]))
            for lane in range(ROW_LANES):
                scale = builder.insert_element(scale, w, ir.Constant(ir.IntType(32), lane))
            builder.store(builder.call(fma, [scale, x, builder.load(total)]), total)
        builder.store(builder.load(total), acc_at, align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def add_product_row_vector(typingctx, acc, acc_off, a, a_off, b, b_off):
    """acc[acc_off : acc_off + ROW_LANES] += a[a_off : …] · b[b_off : …] item by item, one fused
    multiply-add each (1-D C arrays of one float dtype; no bounds checks)."""
    if not (_same_float_c_arrays(acc, a, b) and acc.ndim == a.ndim == b.ndim == 1):
        return None
    sig = types.void(acc, types.intp, a, types.intp, b, types.intp)

    def codegen(context, builder, signature, args):
        _, fma, (acc_at, a_at, b_at) = _row_vectors(context, builder, signature, args, [(0, 1), (2, 3), (4, 5)])
        total = builder.call(fma, [builder.load(a_at, align=1), builder.load(b_at, align=1),
                                   builder.load(acc_at, align=1)])
        builder.store(total, acc_at, align=1)
        return context.get_dummy_value()

    return sig, codegen


# The three stages of an 8 × 8 transpose as two-vector shuffles (each mask picks from the
# 16 items of its two vectors): pairs of rows interleaved, then pairs of pairs, then halves.
_INTERLEAVE = ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15])
_PAIRS = ([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])
_HALVES = ([0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])


@intrinsic
def transpose_rows(typingctx, src, src_off, src_stride, dst, dst_off, dst_stride):
    """dst[dst_off + j·dst_stride + i] = src[src_off + i·src_stride + j] for i, j < ROW_LANES: a
    ROW_LANES × ROW_LANES block transposed in registers (1-D C arrays of one float dtype; no
    bounds checks; src and dst must not overlap).

    The network walks turn a tile's rows into row vectors (the recurrent synapses' layout) and
    back at every step; item by item, each such copy was a strided load or store per item."""
    if not (_same_float_c_arrays(src, dst) and src.ndim == dst.ndim == 1):
        return None
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)
    assert ROW_LANES == 8  # the shuffle stages above

    def codegen(context, builder, signature, args):
        src_arr, src_off, src_stride, dst_arr, dst_off, dst_stride = args
        elem = context.get_value_type(signature.args[0].dtype)
        vec_ptr = ir.VectorType(elem, ROW_LANES).as_pointer()
        src_data = context.make_array(signature.args[0])(context, builder, src_arr).data
        dst_data = context.make_array(signature.args[3])(context, builder, dst_arr).data

        def at(data, offset, stride, k):
            index = builder.add(offset, builder.mul(stride, ir.Constant(stride.type, k)))
            return builder.bitcast(builder.gep(data, [index]), vec_ptr)

        def shuffle(a, b, mask):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 8), mask))

        rows = [builder.load(at(src_data, src_off, src_stride, i), align=1) for i in range(ROW_LANES)]
        t = [shuffle(rows[2 * p], rows[2 * p + 1], _INTERLEAVE[h]) for p in range(4) for h in range(2)]
        u = [shuffle(t[a], t[a + 2], _PAIRS[h]) for a in (0, 1, 4, 5) for h in range(2)]
        for j in range(4):
            for h in range(2):
                builder.store(shuffle(u[j], u[j + 4], _HALVES[h]), at(dst_data, dst_off, dst_stride, j + 4 * h),
                              align=1)
        return context.get_dummy_value()

    return sig, codegen


# ---- non-temporal stores: caches written now and read back much later --------------------
#
# A training forward writes its cache (tens to hundreds of MB) and reads none of it until the
# backward. Ordinary stores first read every line they write into the caches (a write
# allocate), so such a cache costs twice its size in memory traffic and evicts the weights the
# walk is using. Non-temporal stores send whole lines straight to memory: measured on the
# 2-core test machine, 74 MB written in 180 KB pieces between other work took 14 ms instead of
# 19 (docs/architecture.md, "Backends": ELM Network, CPU).

STREAM_BYTES = 32  # one AVX register; LLVM splits it on machines with narrower vectors


@intrinsic
def stream_store(typingctx, src, src_off, dst, dst_off):
    """dst[dst_off : dst_off + STREAM_BYTES / itemsize] = src[src_off : …] with a non-temporal
    store (1-D C arrays of one float dtype; dst's element dst_off must be STREAM_BYTES-aligned)."""
    if not (_same_float_c_arrays(src, dst) and src.ndim == 1 and dst.ndim == 1):
        return None
    sig = types.void(src, types.intp, dst, types.intp)

    def codegen(context, builder, signature, args):
        src, src_off, dst, dst_off = args
        src_ty, _, dst_ty, _ = signature.args
        elem = context.get_value_type(src_ty.dtype)
        vec_ptr = ir.VectorType(elem, STREAM_BYTES // context.get_abi_sizeof(elem)).as_pointer()
        src_at = builder.gep(context.make_array(src_ty)(context, builder, src).data, [src_off])
        dst_at = builder.gep(context.make_array(dst_ty)(context, builder, dst).data, [dst_off])
        value = builder.load(builder.bitcast(src_at, vec_ptr), align=1)
        store = builder.store(value, builder.bitcast(dst_at, vec_ptr), align=STREAM_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch(typingctx, arr, offset):
    """A hint to bring the cache line of item ``offset`` of an array into the caches
    (``prefetcht1``); no fault, no result. The offset counts items in memory order for a
    C-contiguous array, along the axis (by its stride) for a 1-D one of any layout.

    Why: the network walks read the forward's cache one step at a time, a few KiB per batch
    row and step, each piece on another page; hardware prefetchers do not follow a stream
    across a page, so every piece began with misses to memory. The walks hint the next step's
    pieces while they work on this one."""
    if not (isinstance(arr, types.Array) and (arr.layout == "C" or arr.ndim == 1)):
        return None
    sig = types.void(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        byte_ptr = ir.IntType(8).as_pointer()
        if signature.args[0].layout == "C":
            at = builder.bitcast(builder.gep(ary.data, [args[1]]), byte_ptr)
        else:
            stride = cgutils.unpack_tuple(builder, ary.strides, 1)[0]
            at = builder.gep(builder.bitcast(ary.data, byte_ptr), [builder.mul(args[1], stride)])
        i32 = ir.IntType(32)
        hint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
                                              "llvm.prefetch.p0")
        # a read (0), locality 2 (prefetcht1), of data (1)
        builder.call(hint, [at, i32(0), i32(2), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def data_address(typingctx, arr):
    """The address of an array's first element, as an integer (for alignment arithmetic)."""
    if not isinstance(arr, types.Array):
        return None
    sig = types.intp(arr)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, context.get_value_type(types.intp))

    return sig, codegen


@intrinsic
def store_fence(typingctx):
    """A full memory fence: non-temporal stores are weakly ordered, so a thread fences them before
    another thread may read what they wrote (on x86 an ``mfence``)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen
