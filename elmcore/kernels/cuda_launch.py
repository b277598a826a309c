"""What every CUDA kernel module (``cuda.py``, ``network_cuda.py``) launches its kernels with.

Whether the CUDA simulator runs (``NUMBA_ENABLE_CUDASIM=1``, read by Numba when ``numba.cuda`` is
first imported), the stream kernels go to, how array arguments reach Numba, the grid of the
grid-stride kernels, and the float types kernels are built for, with constants of that type.

Streams: kernels are launched on CuPy's current stream, and array arguments are imported with
``sync=False``, so no launch blocks the host and kernels stay ordered with cuBLAS GEMMs.

The dot product the time walks spend their time in (``dot``) is here too, written for the
machine code it compiles to (docs/architecture.md, "SASS per FMA").
"""

import numpy as np
from numba import cuda

from ..errors import ELMError


def _simulator_enabled():
    try:
        from numba.cuda.core import config
    except ImportError:  # numba-cuda < 0.20, or numba's bundled CUDA target
        from numba.core import config
    return bool(config.ENABLE_CUDASIM)


SIMULATOR = _simulator_enabled()

# The simulator runs every CUDA thread as a Python thread: small blocks and
# grids keep it fast, and grid-stride loops keep the results identical.
FLAT_THREADS = 32 if SIMULATOR else 256
MAX_BLOCKS = 2 if SIMULATOR else 65535

# Kernel offsets and loop counters: Numba types the sums of two uint32 as uint64, so every
# advance is written U(a + b), which compiles to one 32-bit add; indexing with an unsigned
# value skips Numba's negative-index wrap-around.
U = np.uint32
# The same for offsets into arrays that may hold 2^31 elements or more.
U64 = np.uint64


def array_module(a):
    """numpy (always under the simulator) or cupy, whichever owns ``a``."""
    if SIMULATOR or isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy


_external_streams = {}


def stream():
    """CuPy's current stream, so kernels and cuBLAS GEMMs stay ordered without host syncs."""
    if SIMULATOR:
        return 0
    try:
        import cupy
    except ImportError:
        return 0
    ptr = cupy.cuda.get_current_stream().ptr
    if not ptr:
        return 0  # CuPy's null stream is the legacy default stream Numba uses for 0.
    if ptr not in _external_streams:
        _external_streams[ptr] = cuda.external_stream(ptr)
    return _external_streams[ptr]


def device_arg(a):
    """``a`` as a kernel argument: CuPy arrays through ``__cuda_array_interface__``, without a copy."""
    if SIMULATOR or not hasattr(a, "__cuda_array_interface__"):
        return a
    # Same stream as the producer (see stream): skip Numba's per-argument host sync.
    return cuda.as_cuda_array(a, sync=False)


def launch(kernel, blocks, threads, *args):
    """Launch ``kernel`` on the current stream, without dynamic shared memory."""
    args = tuple(device_arg(a) for a in args)
    kernel[blocks, threads, stream(), 0](*args)


def flat_shape(n):
    """(blocks, threads) for a grid-stride kernel over ``n`` items."""
    threads = max(1, min(FLAT_THREADS, n))
    return max(1, min(-(-n // threads), MAX_BLOCKS)), threads


@cuda.jit(device=True)
def dot(acc, x, x_at, x_step, w, w_at, w_step, n):
    """acc + Σ_{k<n} x[x_at + k·x_step] · w[w_at + k·w_step], added in k order (the CPU twins' order).

    The offsets and steps are uint32 (``U``) and advanced by addition in a ``while`` loop that
    ends on the x offset: a signed index would make Numba emit a wrap-around check for negative
    indices on every load, and ``range`` with int64 indices 64-bit multiplies and compares; this
    form compiles to two loads (with one address instruction each), an FMA and three integer
    instructions per step (tests/test_cuda_codegen.py holds the time walks to it).
    """
    x_end = U(x_at + n * x_step)
    while x_at != x_end:
        acc += x[x_at] * w[w_at]
        x_at = U(x_at + x_step)
        w_at = U(w_at + w_step)
    return acc


def float_type(dtype):
    """The NumPy scalar type the kernels are specialised for (float32 or float64)."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ELMError(f"CUDA kernels support float32 and float64, got {dt}")
    return dt.type


def constants(np_dtype):
    """(Numba dtype, 0, 1) of one float type.

    Constants are NumPy scalars of the model dtype so that float32 kernels never
    promote to float64 arithmetic; the Numba dtype types dynamic shared arrays.
    """
    from numba import from_dtype
    return from_dtype(np.dtype(np_dtype)), np_dtype(0), np_dtype(1)
