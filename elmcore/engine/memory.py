"""Memory estimates checked before allocating, for every model family and for data generated in memory."""

import os

from elmcore.errors import ELMError


ARRAY_OVERHEAD_BYTES = 112  # sys.getsizeof(np.empty(0)): what each tensor costs besides its data


def memory_limit_bytes():
    """What this process may allocate: physical memory, lowered by a cgroup limit or RLIMIT_AS / RLIMIT_DATA.

    ``None`` where none of them can be read. Every forward pass checks its size against this,
    and reading the cgroup files took 50 µs, a few per cent of a small model's pass: they and
    the physical memory are read once per process; the resource limits, which the process
    itself may lower at any time, at every call (two system calls).
    """
    if _machine_limits.get("pid") != os.getpid():  # a forked child may sit in another cgroup
        _machine_limits.update(pid=os.getpid(), limits=_read_machine_limits())
    limits = list(_machine_limits["limits"])
    try:
        import resource
        for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            soft, _ = resource.getrlimit(which)
            if soft != resource.RLIM_INFINITY and soft > 0:
                limits.append(soft)
    except (ImportError, ValueError, OSError):
        pass
    return min(limits) if limits else None


_machine_limits = {}


def _read_machine_limits():
    """Physical memory and the cgroup's limit, those that can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for cgroup_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(cgroup_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return limits


def format_bytes(n):
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            try:
                return f"{n / size:.3g} {unit}"
            except OverflowError:  # a Python int past the float range
                return f"more than 2^{int(n).bit_length() - 1} bytes"
    return f"{int(n)} bytes"


def gpu_memory_bytes():
    """(bytes this process can still allocate on its current GPU, the GPU's total), through CuPy.

    Free device memory plus what CuPy's memory pool holds unused (it reuses those blocks).
    """
    import cupy
    free, total = cupy.cuda.Device().mem_info
    return free + cupy.get_default_memory_pool().free_bytes(), total


def on_real_gpu(backend):
    """Whether ``backend`` keeps its arrays in GPU memory (``cuda``, not the simulator's NumPy arrays)."""
    return getattr(backend, "name", "cpu") == "cuda" and not getattr(backend, "simulated", False)


def available_bytes(backend=None):
    """What a pass on ``backend`` may allocate: the GPU's free memory on a real GPU, else the host's limit
    (``None`` where it cannot be read)."""
    if on_real_gpu(backend):
        return gpu_memory_bytes()[0]
    return memory_limit_bytes()


def check_memory(nbytes, what, backend=None):
    """Refuse, before allocating, work that cannot fit in this machine's memory.

    ``what`` names the thing being built; the message says how much it would
    need and how much there is, so the user can see which size to shrink.
    With a ``backend`` whose arrays live on a GPU the GPU's memory is checked
    instead of the host's.
    """
    if on_real_gpu(backend):
        available, total = gpu_memory_bytes()
        if nbytes > available:
            raise ELMError(f"{what} would need at least {format_bytes(nbytes)} of GPU memory; this GPU has "
                           f"{format_bytes(available)} free of {format_bytes(total)}")
        return
    limit = memory_limit_bytes()
    if limit is not None and nbytes > limit:
        raise ELMError(f"{what} would need at least {format_bytes(nbytes)} of memory; this machine "
                       f"allows {format_bytes(limit)}")
