"""Compute backends: an array module (``xp``) plus the kernels for the sequential parts.

``cpu``: NumPy arrays, BLAS GEMMs, Numba ``@njit`` kernels.
``cuda``: CuPy arrays, cuBLAS GEMMs, Numba CUDA kernels (see ``kernels/cuda.py``).
``auto``: ``cuda`` when a usable GPU is present, else ``cpu``.

Each backend hands every model family its kernel module (``kernels`` for the single
neuron, ``network_kernels`` for the ELM Network; ``kernels/contract.py``): models ask
the backend for them and never look at its name.
"""

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

    @staticmethod
    def to_host(a):
        return np.asarray(a)

    @staticmethod
    def synchronize():
        """CPU work is done when the call returns."""


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


def array_module(a):
    """numpy or cupy, whichever owns ``a`` (CuPy is only imported when it is already loaded)."""
    import sys
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(a, cupy.ndarray):
        return cupy
    return np
