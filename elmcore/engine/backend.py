"""Compute backends: an array module (``xp``) plus the kernels for the sequential parts.

``cpu``: NumPy arrays, BLAS GEMMs, Numba ``@njit`` kernels.
``cuda``: CuPy arrays, cuBLAS GEMMs, Numba CUDA kernels (see ``kernels/cuda.py``).
``auto``: ``cuda`` when a usable GPU is present, else ``cpu``.

Each backend hands every model family its kernel module (``kernels`` for the single
neuron, ``network_kernels`` for the ELM Network; ``kernels/contract.py``): models ask
the backend for them and never look at its name.
"""

import contextlib
import os

import numpy as np

from elmcore.errors import ELMError

DEVICES = ("cpu", "cuda", "auto")


class CPUBackend:
    name = "cpu"
    xp = np
    # Fresh large arrays cost a page fault per 4 KiB on first touch here; CuPy's memory pool
    # already recycles device memory, so only the CPU model keeps spare buffers.
    reuses_buffers = True

    @property
    def kernels(self):
        from elmcore.kernels import cpu
        return cpu

    @property
    def network_kernels(self):
        from elmcore.kernels import network_cpu
        return network_cpu

    # Work (batch × steps × trainable parameters) below which a pass runs on one thread (see
    # ``kernel_threads``). GEMMs: None, the trainer's rule (``training/threads.py``). Numba kernels:
    # far lower, since a network's time walk is one parallel region long enough to split. Measured on
    # 2 cores (bench/bench_sizes.py, 2026-12-07, one thread against two): 55k and 146k of work ran
    # faster on one (1.5 against 2.1 ms), 138k tied, and from 366k two won (3.9 against 3.1 ms; the
    # 173-parameter network's 554k: 6.5 against 4.4 ms, and 3.7M: 21 against 14 ms), idle and with
    # both cores kept busy alike. An earlier rule of 4M had been set from one day's runs at load 1.
    # bench/bench_threads.py sets both to 0 to time every size at every thread count.
    one_blas_thread_below_work = None
    one_numba_thread_below_work = 300_000

    @staticmethod
    def to_host(a):
        return np.asarray(a)

    @staticmethod
    def synchronize():
        """CPU work is done when the call returns."""

    @staticmethod
    def upload(a):
        """A host batch as the model's arrays hold it: on the CPU the batch itself (no copy)."""
        return a

    @contextlib.contextmanager
    def kernel_threads(self, work, numba_threads=True):
        """Run the body's GEMMs (below ``one_blas_thread_below_work``) and Numba kernels (below
        ``one_numba_thread_below_work``) on one thread, where ``work`` is too small for a second to pay.

        Each parallel kernel or threaded GEMM wakes sleeping threads and waits for the slowest at
        its end. On a shared machine those waits were most of a small model's step (measured on
        2 busy cores: a 173-parameter network's step at one time step, 2.3 ms, took 0.7 on one
        thread; a single neuron with d_m = 10, B = 32, T = 100, whose MLP weight gradients are
        GEMMs long enough for OpenBLAS to thread, 128 ms, 3.3 with one BLAS thread).
        ``numba_threads=False`` leaves Numba's count alone, for a model whose results depend on
        it (an OpenBLAS GEMM's rounding may also differ with its thread count). Only ever lowers
        the thread counts, and only for the body; an exported NUMBA_NUM_THREADS or
        OPENBLAS_NUM_THREADS (MKL_, BLIS_) is kept. The BLAS counts go through threadpoolctl, which
        knows every BLAS NumPy may be built with.
        """
        import numba
        blas_threshold = self.one_blas_thread_below_work
        if blas_threshold is None:
            from elmcore.training.threads import WORK_PER_THREAD
            blas_threshold = 2 * WORK_PER_THREAD
        # Counts the user exported are kept, as the trainer keeps them.
        lower_numba = numba_threads and work < self.one_numba_thread_below_work and \
            not os.environ.get("NUMBA_NUM_THREADS")
        lower_blas = work < blas_threshold and not any(map(os.environ.get, BLAS_THREAD_ENV))
        # Each library's own count, set and restored directly: threadpoolctl's ``limit`` took 40 µs a
        # pass, a tenth of a 173-parameter network's step over its four passes.
        blas_before = [(pool, pool.num_threads) for pool in blas_pools().lib_controllers] if lower_blas else []
        blas_before = [(pool, n) for pool, n in blas_before if n > 1]
        numba_before = numba.get_num_threads() if lower_numba else 1
        if numba_before == 1 and not blas_before:
            yield
            return
        if numba_before > 1:
            numba.set_num_threads(1)
        for pool, _ in blas_before:
            pool.set_num_threads(1)
        try:
            yield
        finally:
            for pool, n in blas_before:
                pool.set_num_threads(n)
            if numba_before > 1:
                numba.set_num_threads(numba_before)


# A thread count the user exported for the BLAS NumPy uses is kept.
BLAS_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def blas_pools():
    """threadpoolctl's controller of the BLAS libraries loaded in this process (looked up once: NumPy
    loads its BLAS on import, before any model exists)."""
    if "blas" not in _BLAS_POOLS:
        from threadpoolctl import ThreadpoolController
        _BLAS_POOLS["blas"] = ThreadpoolController().select(user_api="blas")
    return _BLAS_POOLS["blas"]


_BLAS_POOLS = {}


_BACKENDS = {}


def get_backend(device="cpu"):
    if device not in DEVICES:
        raise ELMError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device not in _BACKENDS:
        if device == "cpu":
            _BACKENDS[device] = CPUBackend()
        else:
            from elmcore.engine.cuda_backend import CUDABackend
            _BACKENDS[device] = CUDABackend()
    return _BACKENDS[device]


def cuda_available():
    try:
        from elmcore.engine.cuda_backend import cuda_problem
    except ImportError:
        return False
    return cuda_problem() is None


def host_scalars(backend, values):
    """``values`` as Python floats, the arrays of ``backend.xp`` among them (0-d: losses, squared norms,
    finiteness flags) read to the host in ONE copy, stacked in float64 on the device first (exact for
    float32, float64, integer and bool values); host numbers are converted where they are.

    A GPU step that read each of its scalars alone waited for the device ~30 times per step.
    """
    xp = backend.xp
    on_device = [i for i, v in enumerate(values) if isinstance(v, xp.ndarray)]
    out = list(values)
    if on_device:
        stacked = xp.stack([xp.asarray(values[i], dtype=xp.float64).reshape(()) for i in on_device])
        for i, value in zip(on_device, backend.to_host(stacked).tolist()):
            out[i] = value
    return [float(v) for v in out]


def array_module(a):
    """numpy or cupy, whichever owns ``a`` (CuPy is only imported when it is already loaded)."""
    import sys
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(a, cupy.ndarray):
        return cupy
    return np
