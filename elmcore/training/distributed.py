"""Data-parallel training over MPI (``mpiexec -n K elm train …``), NCCL for the gradients on GPUs.

The trainer talks to a :class:`Communicator`. In one process it is the no-op base
class; under an MPI launcher with more than one rank it is :class:`MPICommunicator`
(or :class:`NCCLCommunicator` on ``cuda``). The scheme, step by step:

* Every rank draws the same global batch: the batch order and windows come from
  generators seeded by (seed, epoch) alone (see ``elmcore.training.train``), so no data is sent.
* Rank r keeps the contiguous rows ``[r·B/K, (r+1)·B/K)`` of a global batch of B
  rows. The losses are means over the batch (``elmcore.training.losses``), so the shard's
  gradient, scaled by ``B_r / B``, summed over the ranks, is exactly the gradient of
  the global batch's loss; a ragged last batch only changes B. A rank whose shard
  is empty (B < K) runs one row with weight 0, so every rank takes part in every
  collective and the code has no special case.
* One all-reduce of one flat buffer per step: every gradient, then the shard's
  weighted loss, then a status slot (1 on a rank whose forward pass failed, e.g.
  non-finite outputs, 0 elsewhere; on GPUs the flag is written on the device and the
  reduced loss and count are read with the step's other scalars, in one copy). The
  reduced buffer is identical on every rank, so clipping and the optimiser step are
  too, and the parameters never drift; and a failure seen by one rank is decided on
  every rank after the same collective, so no rank raises while the others wait in
  the all-reduce (NCCL has no timeout).
* Validation shards batches round-robin and reduces the sums; only rank 0 writes
  logs, metrics, checkpoints and the summary. Resuming reads ``last.npz`` on every
  rank, so a multi-node run needs its run directory on a shared file system.

Only the summation order differs from one process, so K ranks reproduce the
single-process run to rounding (the test suite checks float64 to 1e-10).
"""

import contextlib
import os
import sys
import time

import numpy as np

from elmcore.engine.optional import install_command
from elmcore.errors import ELMError

# Environment variables an MPI launcher sets for the world size: Hydra (MPICH, Intel MPI),
# Open MPI, MVAPICH, SLURM's srun. A plain single process sets none of them.
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
# A pipe to the rank's supervising parent (``elm_cli.launch``), which names the run directory in its messages.
RUN_DIR_FD = "ELMCORE_RUN_DIR_FD"


class Communicator:
    """One process: every collective is the identity."""

    rank = 0
    size = 1
    local_rank = 0

    @property
    def is_root(self):
        return self.rank == 0

    def describe(self):
        return "1 process"

    # ---- training step -------------------------------------------------------------
    def shard_rows(self, n):
        """(start, stop, weight) of this rank's rows of a global batch of ``n`` rows."""
        start, stop = self.rank * n // self.size, (self.rank + 1) * n // self.size
        if stop > start:
            return start, stop, (stop - start) / n
        return 0, min(1, n), 0.0  # an empty shard runs one row that does not count

    def shard_batch(self, X, target):
        """This rank's rows of a global batch, and the weight of its loss in the global mean."""
        if self.size == 1:
            return X, target, 1.0
        start, stop, weight = self.shard_rows(len(X))
        return X[start:stop], target[start:stop], weight

    def allreduce_gradients(self, grads, loss, weight, failed=False):
        """(global loss, global gradients, number of ranks that failed) from this rank's shard.

        A rank whose forward pass failed passes ``failed`` true instead of raising, so that every
        rank learns of it in the same collective; see the module notes. ``loss`` and ``failed`` may
        be 0-d arrays on the gradients' device, and the loss and the count then come back as such
        (the trainer reads them with its other scalars, in one copy): nothing here reads the device.
        """
        return loss, grads, failed

    # ---- validation and small values ---------------------------------------------------
    def allreduce_sum(self, values):
        """Element-wise sum over ranks of a small float64 vector."""
        return np.asarray(values, dtype=np.float64)

    def allgather(self, obj):
        """The list of every rank's ``obj``, in rank order."""
        return [obj]

    def bcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return obj

    def on_root(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` run on rank 0 alone; its result on every rank.

        When it fails, every rank raises: rank 0 its own error, the others a silent
        :class:`ReportedByRoot`, so the job ends at once with rank 0's one line instead
        of leaving the other ranks waiting in their next collective.
        """
        return function(*args, **kwargs)

    def output_on_root(self, progress, log):
        """The progress flag and log function a rank should use: rank 0's own, silence elsewhere."""
        if self.is_root:
            return progress, log
        return False, _silent


def _silent(message):
    pass


class ReportedByRoot(ELMError):
    """What a rank other than 0 raises when rank 0 failed at something only it does; rank 0 reports it."""
    silent = True


def mark_collective(error):
    """Note on ``error`` that every rank knows of it, so ending the job needs no abort."""
    try:
        error.collective = True
    except AttributeError:  # an exception type that takes no attributes
        pass
    return error


def flatten_into(buffer, grads, keys):
    """Copy ``grads[k]`` for ``k`` in ``keys`` into the front of the 1-D ``buffer``; return the end offset."""
    offset = 0
    for k in keys:
        g = grads[k]
        buffer[offset:offset + g.size] = g.reshape(-1)
        offset += g.size
    return offset


def unflatten(buffer, grads, keys):
    """Views of ``buffer`` shaped like ``grads[k]`` (the optimiser may scale them in place)."""
    out, offset = {}, 0
    for k in keys:
        shape, size = grads[k].shape, grads[k].size
        out[k] = buffer[offset:offset + size].reshape(shape)
        offset += size
    return out


class MPICommunicator(Communicator):
    """K processes under an MPI launcher; gradients reduced through MPI on host memory."""

    def __init__(self, world):
        self.world = world
        self.rank, self.size = world.Get_rank(), world.Get_size()
        from mpi4py import MPI
        self._mpi = MPI
        node = world.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        # The ranks of a node use its GPUs in turn (training ranks and sweep ranks alike).
        from elmcore.engine.cuda_backend import set_gpu_slot
        set_gpu_slot(self.local_rank)
        self._buffer = None

    def describe(self):
        return f"{self.size} MPI ranks"

    def _flat_buffer(self, grads, keys, xp):
        n = sum(grads[k].size for k in keys) + 2  # the loss and the status slot
        dtype = grads[keys[0]].dtype
        if self._buffer is None or self._buffer.size != n or self._buffer.dtype != dtype:
            self._buffer = xp.empty(n, dtype=dtype)
        return self._buffer

    def _pack(self, grads, loss, weight, failed, xp):
        keys = sorted(grads)
        buffer = self._flat_buffer(grads, keys, xp)
        end = flatten_into(buffer, grads, keys)
        buffer[end] = loss
        buffer[:end + 1] *= buffer.dtype.type(weight)
        buffer[end + 1] = failed  # counted even on a rank of weight 0 (a device flag is copied on the device)
        return keys, buffer

    @staticmethod
    def _unpack(buffer, grads, keys):
        return float(buffer[-2]), unflatten(buffer, grads, keys), int(round(float(buffer[-1])))

    def on_root(self, function, *args, **kwargs):
        outcome = None
        if self.is_root:
            try:
                outcome = ("ok", function(*args, **kwargs))
            except Exception as e:
                self.world.bcast(("error", str(e)), root=0)
                raise mark_collective(e)
        outcome = self.world.bcast(outcome, root=0)
        if outcome[0] == "error":
            raise mark_collective(ReportedByRoot(outcome[1]))
        return outcome[1]

    def allreduce_gradients(self, grads, loss, weight, failed=False):
        keys, buffer = self._pack(grads, loss, weight, failed, np)
        self.world.Allreduce(self._mpi.IN_PLACE, buffer, op=self._mpi.SUM)
        return self._unpack(buffer, grads, keys)

    def allreduce_sum(self, values):
        values = np.array(values, dtype=np.float64)
        self.world.Allreduce(self._mpi.IN_PLACE, values, op=self._mpi.SUM)
        return values

    def allgather(self, obj):
        return self.world.allgather(obj)

    def bcast(self, obj):
        return self.world.bcast(obj, root=0)


# NCCL's names for the two parameter dtypes.
def nccl_dtype(nccl, dtype):
    kinds = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}
    if np.dtype(dtype).name not in kinds:
        raise ELMError(f"NCCL all-reduce supports float32 and float64 gradients, got {np.dtype(dtype).name}")
    return kinds[np.dtype(dtype).name]


class NCCLCommunicator(MPICommunicator):
    """One GPU per rank: gradients reduced by NCCL on device arrays, NCCL bootstrapped over MPI.

    The GPU is the node-local rank modulo the GPUs this process sees, so both
    ``CUDA_VISIBLE_DEVICES`` set per rank by a scheduler and all GPUs visible work.
    Everything but the gradients (validation sums, broadcasts) still goes over MPI.
    """

    def __init__(self, world):
        super().__init__(world)
        import cupy
        try:
            from cupy.cuda import nccl
        except ImportError as e:
            nccl, reason = None, str(e)
        if nccl is None or not getattr(nccl, "available", True):
            raise ELMError("data-parallel training on cuda needs NCCL, which CuPy cannot load here"
                           f"{' (' + reason + ')' if nccl is None else ''}; install NCCL for your CUDA "
                           "(e.g. pip install nvidia-nccl-cu12, or the cluster's nccl module)")
        count = cupy.cuda.runtime.getDeviceCount()
        self.gpu = self.local_rank % count
        cupy.cuda.Device(self.gpu).use()
        from numba import cuda as numba_cuda
        numba_cuda.select_device(self.gpu)  # the kernels launch in the same device's context
        unique_id = nccl.get_unique_id() if self.rank == 0 else None
        unique_id = world.bcast(unique_id, root=0)
        self._cupy, self._nccl = cupy, nccl
        self.nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)

    def describe(self):
        return f"{self.size} MPI ranks, NCCL on GPU {self.gpu} of this node"

    def allreduce_gradients(self, grads, loss, weight, failed=False):
        cupy, nccl = self._cupy, self._nccl
        keys, buffer = self._pack(grads, loss, weight, failed, cupy)
        stream = cupy.cuda.get_current_stream()
        self.nccl.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, nccl_dtype(nccl, buffer.dtype),
                            nccl.NCCL_SUM, stream.ptr)
        # The loss and the count stay on the device (0-d views), for the trainer's one read of the step.
        return buffer[-2], unflatten(buffer, grads, keys), buffer[-1]


# ---- which communicator a process uses ------------------------------------------------------

_world = None
_alone = 0


def launcher_size(environ=os.environ):
    """The world size an MPI launcher announced in the environment (1 when none did)."""
    for name in LAUNCHER_SIZE_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def communicator(device="cpu"):
    """The communicator for this process: the MPI world when started by a launcher with K > 1 ranks."""
    global _world
    if _alone or launcher_size() == 1:
        return Communicator()
    if _world is None:
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise ELMError(f"started by an MPI launcher with {launcher_size()} ranks, but mpi4py cannot be "
                           f"imported ({e}); install it with `{install_command('mpi')}`") from None
        world = MPI.COMM_WORLD
        if world.Get_size() == 1:
            raise ELMError(f"the launcher announced {launcher_size()} ranks but MPI sees 1: mpi4py is built "
                           "for a different MPI than the mpiexec that started this job; use the mpiexec "
                           "of the MPI that mpi4py loads (`python -m mpi4py --mpi-library`)")
        _world = world
        _end_the_job_on_uncaught_errors()
    if device in ("cuda", "auto") and _uses_real_gpu():
        return NCCLCommunicator(_world)
    return MPICommunicator(_world)


def _uses_real_gpu():
    """Whether the model's arrays will live on a GPU (not under the CUDA simulator, which uses NumPy)."""
    from elmcore.engine.backend import cuda_available
    if not cuda_available():
        return False  # for device "cuda", get_backend says why when the model is built
    from elmcore.kernels.cuda_launch import SIMULATOR
    return not SIMULATOR


def announce_run_dir(run_dir):
    """Tell a rank's supervising parent, if there is one, the run directory this rank trains in."""
    fd = os.environ.get(RUN_DIR_FD, "")
    if not fd.isdigit():
        return
    with contextlib.suppress(OSError):  # no parent listening, or a full pipe: the parent falls back to argv
        os.set_blocking(int(fd), False)
        os.write(int(fd), (os.path.abspath(run_dir) + "\n").encode())


# ---- ending a job when one rank fails -----------------------------------------------------------

# A rank other than 0 that fails waits this long before it reports and aborts: when rank 0 fails
# too (most errors reach every rank alike), rank 0's abort ends the job first, so it reports once.
REPORT_GRACE_S = 2.0
# Seconds between flushing the error line and MPI_Abort. Hydra's proxy can take the abort before
# the line still in its pipe and drop the line: the likely cause of a line lost on a loaded CI
# machine (not reproduced on an idle one).
FORWARD_GRACE_S = 0.5
# Seconds the other ranks wait for rank 0 to report an error every rank raised. Rank 0 is at the
# same point already, so only a bug (an error marked collective that is not) lets this run out.
ROOT_REPORT_TIMEOUT_S = 60.0


def in_parallel_job():
    """Whether this process is one of several MPI ranks (the world was set up by :func:`communicator`)."""
    return _world is not None and not _alone and _world.Get_size() > 1


def end_job_after(report, code=2, collective=False):
    """Call ``report()`` (which prints the one error line); then, in a job of several ranks, end every rank.

    A ``collective`` error was raised by every rank at the same point: rank 0 alone reports
    it, and the others wait until it has, because the launcher kills every rank the moment
    one exits with a failure (Hydra: SIGKILL), and a rank that exited first would silence
    rank 0. Any other error would leave the others waiting forever in their next collective,
    so the job is aborted, with MPI's own abort banner held back: the error line is the
    whole message.
    """
    if not in_parallel_job():
        report()
        return
    rank = _world.Get_rank()
    if collective:
        if rank == 0:
            report()
            _flush_output()
        if _wait_for_every_rank(ROOT_REPORT_TIMEOUT_S):
            return  # every rank exits through MPI_Finalize, which none leaves before all are in it
        if rank != 0:  # rank 0 never came: this rank's line is the only one
            report()
            _flush_output()
    else:
        if rank != 0:
            time.sleep(REPORT_GRACE_S)
        report()
        _flush_output()
    time.sleep(FORWARD_GRACE_S)
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    _world.Abort(code)


def _flush_output():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _wait_for_every_rank(timeout_s):
    """A barrier that gives up after ``timeout_s``; whether every rank reached it."""
    request = _world.Ibarrier()
    deadline = time.monotonic() + timeout_s
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _end_the_job_on_uncaught_errors():
    """A traceback on one rank ends the whole job (exit 1), instead of leaving the others waiting."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, (KeyboardInterrupt, SystemExit)):
            previous(kind, value, tb)
            return
        end_job_after(lambda: previous(kind, value, tb), code=1)

    sys.excepthook = hook


@contextlib.contextmanager
def alone():
    """Inside, :func:`communicator` gives the one-process communicator (a sweep trains one point per rank)."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1
