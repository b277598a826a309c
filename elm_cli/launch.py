"""The ``elm`` entry point: what must happen before NumPy and Numba are imported.

Under an MPI launcher (``mpiexec -n K elm train …``, ``srun elm train …``) two things
need the process environment before the libraries read it:

* Threads per rank. K ranks on one node share its cores: each rank gets
  cores // (ranks on this node) Numba and BLAS threads, or the cores the launcher
  bound it to. A value the user exported wins.
* A rank that dies must be named. When a rank is killed (the OOM killer, SIGKILL,
  a crash) the launcher kills the others at once and reports only a PID. So
  ``elm train`` and ``elm sweep`` run in a child process of a thin parent: the
  parent holds no MPI state, sees how its child ended, and says which rank died
  and how to resume. The child inherits every descriptor (the launcher's
  connection) and dies with its parent; it tells the parent its run directory
  through a pipe, so that the parent's messages name it.
* One Ctrl-C must end every rank. A rank that is waiting in a collective for a
  rank that already stopped never returns to Python, where the interrupt would
  be seen: the parent gives its child a few seconds after the first SIGINT, then
  kills it. Every rank then ends with exit code 130, and rank 0 names the
  command that resumes the run.

This module imports nothing heavy: the CLI itself is imported only afterwards.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

SUPERVISED = "ELMCORE_RANK_SUPERVISED"
WATCHED_COMMANDS = ("train", "sweep")
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# The pipe a rank writes its run directory to; the same name as elmcore.training.distributed.RUN_DIR_FD
# (not imported: this module must not import NumPy before the thread variables are set).
RUN_DIR_FD = "ELMCORE_RUN_DIR_FD"
# The trainer's lock file in a run directory: elmcore.training.train.LOCK (not imported, as above).
LOCK_FILE = ".lock"
# Seconds a rank has, after Ctrl-C, to stop by itself before its parent kills it.
INTERRUPT_GRACE_S = 5.0
# Seconds more that ranks other than 0 stay after an interrupt, for rank 0 (killed itself after
# INTERRUPT_GRACE_S at worst) to print how to go on.
REPORT_GRACE_S = 2.0

# (rank, world size, ranks on this node) as each launcher names them.
LAUNCHER_VARIABLES = (
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS"),                                        # Hydra: MPICH, Intel MPI
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"),     # Open MPI
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"),        # MVAPICH
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", None),                                     # srun
)


def launcher_ranks(environ=os.environ):
    """(rank, size, ranks on this node) announced by an MPI launcher, or None outside one (or for 1 rank)."""
    for rank_name, size_name, local_name in LAUNCHER_VARIABLES:
        rank, size = environ.get(rank_name, ""), environ.get(size_name, "")
        if rank.isdigit() and size.isdigit() and int(size) > 1:
            local = environ.get(local_name, "") if local_name else _slurm_tasks_on_node(environ)
            return int(rank), int(size), int(local) if str(local).isdigit() and int(local) > 0 else int(size)
    return None


def _slurm_tasks_on_node(environ):
    """Tasks of this srun step on this node, from SLURM_STEP_TASKS_PER_NODE such as '2(x3),1'."""
    counts = []
    for part in environ.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        number, _, repeat = part.partition("(x")
        if not number.isdigit():
            return ""
        counts += [int(number)] * (int(repeat.rstrip(")")) if repeat.rstrip(")").isdigit() else 1)
    node = environ.get("SLURM_NODEID", "0")
    return str(counts[int(node)]) if node.isdigit() and int(node) < len(counts) else ""


def threads_per_rank(local_ranks, usable_cores=None, node_cores=None):
    """Threads for one of ``local_ranks`` ranks on a node: its bound cores, else an equal share."""
    if usable_cores is None:
        usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    usable = usable_cores
    node = node_cores if node_cores is not None else (os.cpu_count() or usable)
    if usable < node:
        return usable  # the launcher bound this rank to its own cores
    return max(1, usable // max(1, local_ranks))


def set_thread_defaults(local_ranks, environ=os.environ):
    threads = str(threads_per_rank(local_ranks))
    for name in THREAD_VARIABLES:
        environ.setdefault(name, threads)


def resume_command(size, run_dir):
    return f"mpiexec -n {size} elm train --resume {shlex.quote(run_dir) if run_dir else 'RUN_DIR'}"


def argv_run_dir(argv):
    """The run directory named on an ``elm train`` command line (--resume or --run-dir), or None."""
    found = None
    for i, arg in enumerate(argv):
        for flag in ("--resume", "--run-dir"):
            if arg == flag and i + 1 < len(argv):
                found = argv[i + 1]
            elif arg.startswith(flag + "="):
                found = arg[len(flag) + 1:]
    return found


def death_message(rank, size, pid, signum, argv, run_dir=None):
    """The line a rank's parent prints when the rank was killed by a signal."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    command = argv[1] if len(argv) > 1 else "elm"
    how = (f"continue with `{resume_command(size, run_dir or argv_run_dir(argv))}` (the last checkpoint, "
           "last.npz, is always whole)" if command == "train" else
           "run the same `elm sweep` again: finished points are kept, interrupted ones resume")
    return (f"error: rank {rank} of {size} (pid {pid} on {socket.gethostname()}) was killed by {name}; "
            f"the launcher stops the other ranks. To go on, {how}.")


def _die_with_parent():
    """In the child: be killed when the parent dies (Linux), so no rank outlives its launcher."""
    try:
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _read_announced(reader):
    """The last run directory the child wrote to the pipe, or None."""
    if reader is None:
        return None
    os.set_blocking(reader, False)
    data = b""
    try:
        while chunk := os.read(reader, 65536):
            data += chunk
    except OSError:  # nothing (more) to read
        pass
    os.close(reader)
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[-1] if lines else None


def _kill_if_running(child):
    if child.poll() is None:
        child.kill()


def supervise(rank, size, argv):
    """Run ``argv`` as a child rank; return the exit code to end with."""
    env = dict(os.environ, **{SUPERVISED: "1"})
    command = argv[1] if len(argv) > 1 else ""
    reader = writer = None
    if command == "train":
        reader, writer = os.pipe()
        os.set_inheritable(writer, True)
        env[RUN_DIR_FD] = str(writer)
    # Every rank of `elm train` reaches the same end; rank 0 alone reports it (errors still show).
    quiet = rank != 0 and command == "train"
    child = subprocess.Popen([sys.executable, "-m", "elm_cli.launch", *argv[1:]], env=env, close_fds=False,
                             stdout=subprocess.DEVNULL if quiet else None,
                             preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    if writer is not None:
        os.close(writer)
    interrupted = []

    def forward(signum, frame):
        if signum == signal.SIGINT:
            if interrupted:
                return  # the child is stopping already (and may have had this Ctrl-C from the terminal too)
            interrupted.append(signum)
            timer = threading.Timer(INTERRUPT_GRACE_S, _kill_if_running, (child,))
            timer.daemon = True
            timer.start()
        child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    code = child.wait()
    if interrupted and rank != 0:
        # The launcher kills every rank the moment one exits with a failure (Hydra: SIGKILL, no
        # handler runs), so a rank that stopped first would end rank 0 before it printed how to go
        # on (seen when rank 0 was still writing a checkpoint). Rank 0 ends the job itself once it
        # has reported; this wait only bounds the case where it never does.
        time.sleep(INTERRUPT_GRACE_S + REPORT_GRACE_S)
    run_dir = _read_announced(reader) or argv_run_dir(argv)
    if interrupted and code < 0:
        if rank == 0 and command == "train":  # the child could not say it: it was stuck, and killed
            if run_dir:
                _remove_lock_left_by(child.pid, run_dir)
            where = (f"continue with: {resume_command(size, run_dir)} (from its last checkpoint, last.npz)"
                     if run_dir else "no run directory was made yet: nothing to resume")
            sys.stderr.write(f"interrupted; {where}\n")
            sys.stderr.flush()
        return 130
    if code < 0:
        sys.stderr.write(death_message(rank, size, child.pid, -code, argv, run_dir) + "\n")
        sys.stderr.flush()
        return 128 - code
    return code


def _remove_lock_left_by(pid, run_dir):
    """Remove the run directory's lock file if the killed trainer ``pid`` wrote it. Its lock died with
    it (an flock), so the file would only be clutter; a trainer that holds it now has written its own pid."""
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read().strip() == str(pid):
                os.unlink(path)
    except OSError:
        pass


def _interrupt_once(signum, frame):
    """A rank's first Ctrl-C interrupts it; any more (the terminal's and the parent's) must not
    interrupt it again while it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main():
    ranks = launcher_ranks()
    if ranks is not None:
        rank, size, local = ranks
        set_thread_defaults(local)
        watched = len(sys.argv) > 1 and sys.argv[1] in WATCHED_COMMANDS
        if watched and os.environ.get(SUPERVISED) != "1":
            sys.exit(supervise(rank, size, sys.argv))
        if watched:
            signal.signal(signal.SIGINT, _interrupt_once)
    from elm_cli.main import main as cli_main
    cli_main()


if __name__ == "__main__":
    main()
