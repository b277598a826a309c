"""The ``cuda`` backend: CuPy arrays and cuBLAS GEMMs around Numba CUDA kernels.

On a real GPU ``xp`` is CuPy and the kernels in ``kernels/cuda.py`` receive CuPy
arrays through ``__cuda_array_interface__`` (no copies). Under the CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``, read by Numba when ``numba.cuda`` is
first imported) the same kernels run on CPU threads over NumPy arrays, so
``xp`` is NumPy and CuPy is not needed: that is how machines without a GPU
check the CUDA code.
"""

import functools
import os

import numpy as np

from elmcore.errors import ELMError


def cuda_problem():
    """Why the ``cuda`` device cannot be used here, or ``None`` when it can.

    CuPy imports fine on a machine without a GPU and fails only at its first
    allocation, so the device count is probed explicitly.

    Returns
    -------
    str or None
        One sentence naming what is missing (numba-cuda, driver, device, CuPy).
    """
    try:
        from numba import cuda
    except ImportError as e:
        return f"numba-cuda is not installed ({e}); install it with `pip install numba-cuda`"
    except Exception as e:  # e.g. CUDA bindings that do not match numba-cuda
        return f"numba-cuda cannot be imported ({type(e).__name__}: {e})"
    from elmcore.kernels.cuda_launch import SIMULATOR
    if SIMULATOR:
        return None
    if not cuda.is_available():
        driver_error = getattr(cuda, "cuda_error", lambda: None)()  # absent from old numba
        reason = " ".join(str(driver_error or "").split())
        return ("no usable NVIDIA GPU: numba-cuda cannot find a CUDA driver and device"
                + (f" ({reason})" if reason else ""))
    try:
        import cupy
    except ImportError as e:
        return f"CuPy is not installed ({e}); install the cupy-cuda12x or cupy-cuda13x wheel matching the driver"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError, or a missing libcudart for this CuPy build
        return f"CuPy cannot use the GPU ({type(e).__name__}: {' '.join(str(e).split())})"
    if count < 1:
        return "CuPy finds no CUDA device"
    return _select_gpu_and_launch(count)


# Which of a node's processes this one is: ``elm sweep --jobs N`` gives each worker its slot in
# this variable; an MPI rank's communicator sets its node-local rank (set_gpu_slot).
GPU_SLOT_ENV = "ELMCORE_GPU_SLOT"
_gpu_slot = None
selected_gpu = None  # the GPU this process uses, once cuda_problem() found one


def set_gpu_slot(slot):
    """Use GPU ``slot % device count``; effective only before the first CUDA use (cuda_problem)."""
    global _gpu_slot
    _gpu_slot = int(slot)


def gpu_slot():
    if _gpu_slot is not None:
        return _gpu_slot
    value = os.environ.get(GPU_SLOT_ENV, "")
    return int(value) if value.isdigit() else 0


@functools.lru_cache(maxsize=None)
def _select_gpu_and_launch(count):
    """Make GPU ``slot % count`` current for CuPy and Numba (before any context exists), then launch on it.

    Without this every sweep worker and every rank of a node would share GPU 0.
    """
    global selected_gpu
    import cupy
    from numba import cuda
    gpu = gpu_slot() % count
    cupy.cuda.Device(gpu).use()
    cuda.select_device(gpu)
    selected_gpu = gpu
    return _launch_problem()


def _launch_probe_kernel():
    """Compile and launch one one-thread kernel; return what it wrote (1)."""
    from numba import cuda

    @cuda.jit
    def write_one(out):
        out[0] = 1

    out = cuda.device_array(1, dtype=np.int32)
    write_one[1, 1](out)
    return int(out.copy_to_host()[0])


def _cuda_versions():
    """The driver's CUDA version and NVVM's, as far as they can be read (for the launch-failure sentence)."""
    parts = []
    try:
        from numba.cuda.cudadrv.driver import driver
        parts.append("driver supports CUDA {}.{}".format(*driver.get_version()))
    except Exception:  # the versions only decorate the message
        pass
    try:
        from numba.cuda.cudadrv import nvvm
        parts.append("NVVM {}.{}".format(*nvvm.NVVM().get_version()[:2]))
    except Exception:
        pass
    return ", ".join(parts)


@functools.lru_cache(maxsize=None)
def _launch_problem():
    """Launch one tiny kernel (once per process).

    Every earlier probe passes when the driver is older than the PTX that numba-cuda's
    NVVM emits; such a machine would otherwise fail at the first real launch.
    """
    try:
        wrote = _launch_probe_kernel()
    except Exception as e:
        versions = _cuda_versions()
        return (f"a one-thread test kernel fails to launch ({type(e).__name__}: {' '.join(str(e).split())})"
                f"{f' ({versions})' if versions else ''}: the NVIDIA driver is likely older than the PTX "
                "numba-cuda compiles to; update the driver, or install the numba-cuda and CUDA toolkit "
                "release the driver supports")
    if wrote != 1:
        return f"a one-thread test kernel ran but wrote {wrote}, not 1: the GPU or its driver computes wrongly"
    return None


class CUDABackend:
    """Array module plus kernel modules (``kernels``, ``network_kernels``) for ``--device cuda``.

    Raises
    ------
    ELMError
        ``--device cuda: <reason>`` when :func:`cuda_problem` reports one.
    """
    reuses_buffers = False  # CuPy's memory pool recycles device memory itself

    name = "cuda"

    def __init__(self):
        problem = cuda_problem()
        if problem is not None:
            raise ELMError(f"--device cuda: {problem}")
        from elmcore.kernels import cuda as kernels
        from elmcore.kernels import network_cuda
        self.kernels = kernels
        self.network_kernels = network_cuda
        self.simulated = kernels.SIMULATOR
        self._upload = None
        if self.simulated:
            self.xp = np
        else:
            import cupy
            self.xp = cupy

    def upload(self, a):
        """A host batch on the device, copied asynchronously from page-locked memory (``PinnedUpload``);
        as it is under the simulator, whose arrays are host arrays."""
        if self.simulated:
            return a
        if self._upload is None:
            self._upload = PinnedUpload(self.xp)
        return self._upload(a)

    def random_uniform(self, seed, shape):
        """Uniform float32 draws in [0, 1) made on the device from ``seed``: Philox, whose seeding costs
        nothing, so that a fresh seed per training step is cheap (the step's seed comes from the host's
        generator, whose state checkpoints keep)."""
        if self.simulated:
            return np.random.default_rng(seed).random(shape, dtype=np.float32)
        cupy = self.xp
        generator = cupy.random.RandomState(seed, method=cupy.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)
        return generator.random_sample(shape, dtype=cupy.float32)

    def synchronize(self):
        """Wait for all queued GPU work (timings must include it); nothing to wait for when simulated."""
        if not self.simulated:
            self.xp.cuda.get_current_stream().synchronize()

    def to_host(self, a):
        """A NumPy array holding ``a`` (a copy from device memory on a real GPU)."""
        if self.simulated or isinstance(a, np.ndarray):
            return np.asarray(a)
        return self.xp.asnumpy(a)


class PinnedUpload:
    """Host batches to the device through one page-locked (pinned) staging buffer, grown as needed.

    A copy from pageable memory goes through a driver bounce buffer and makes the host wait; from
    pinned memory it is one DMA transfer queued on the current stream (so it is ordered before the
    kernels that read the batch and after those still using the memory it lands in), and the host
    goes on. The staging buffer is refilled only once the event recorded after the previous copy has
    passed. ``cupy`` is the array module (a stand-in in tests).
    """

    def __init__(self, cupy):
        self.cupy = cupy
        self.staging = None
        self.copied = None  # the event after the last copy out of ``staging``

    def __call__(self, a):
        cupy = self.cupy
        a = np.ascontiguousarray(a)
        if self.copied is not None:
            self.copied.synchronize()
        if self.staging is None or self.staging.nbytes < a.nbytes:
            memory = cupy.cuda.alloc_pinned_memory(a.nbytes)
            self.staging = np.ndarray((a.nbytes,), np.uint8, buffer=memory)
        host = self.staging[:a.nbytes].view(a.dtype).reshape(a.shape)
        host[...] = a
        stream = cupy.cuda.get_current_stream()
        out = cupy.empty(a.shape, a.dtype)
        out.set(host, stream=stream)
        self.copied = stream.record()
        return out
