"""Data-parallel training: the shard arithmetic in one process, then real `mpiexec -n 2` runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from elm_cli.launch import _read_announced, argv_run_dir, death_message, launcher_ranks, threads_per_rank
from elmcore.neuron.config import ELMConfig
from elmcore.training.distributed import (RUN_DIR_FD, Communicator, announce_run_dir, flatten_into, launcher_size,
                                          nccl_dtype, unflatten)
from elmcore.errors import ELMError
from elmcore.data.neuronio import neuronio_loss
from elmcore.training.losses import LOSS_FUNCTIONS
from elmcore.neuron.model import ELM


class FakeRank(Communicator):
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


@pytest.mark.parametrize("n,size", [(15, 2), (10, 3), (1, 2), (2, 3), (64, 4)])
def test_shards_cover_the_batch_once_and_weights_sum_to_one(n, size):
    covered, total = [], 0.0
    for rank in range(size):
        start, stop, weight = FakeRank(rank, size).shard_rows(n)
        assert stop > start  # every rank computes something, so every rank joins each all-reduce
        if weight:
            covered += list(range(start, stop))
            assert weight == pytest.approx((stop - start) / n)
        total += weight
    assert covered == list(range(n))
    assert total == pytest.approx(1.0)


@pytest.mark.parametrize("loss_name,n,size", [("mse_last", 7, 3), ("cross_entropy_last", 5, 2),
                                              ("neuronio", 6, 4), ("mse", 2, 3)])
def test_weighted_shard_gradients_sum_to_the_global_batch_gradient(loss_name, n, size):
    """What the all-reduce adds up, done by hand: Σ_r (B_r/B)·∇L_r = ∇L of the whole batch."""
    rng = np.random.default_rng(1)
    cfg = ELMConfig.from_dict(dict(num_input=3, num_output=2, num_memory=4, mlp_hidden_size=5,
                                   num_branch=3, num_synapse_per_branch=1, version="branch_elm_v2"))
    model = ELM(cfg, seed=0, dtype="float64")
    T = 5
    X = rng.normal(size=(n, T, 3))
    target = {"mse_last": rng.normal(size=(n, 2)), "cross_entropy_last": rng.integers(0, 2, n),
              "neuronio": np.stack([rng.integers(0, 2, (n, T)), rng.normal(size=(n, T))], -1),
              "mse": rng.normal(size=(n, T, 2))}[loss_name]
    loss_fn = neuronio_loss if loss_name == "neuronio" else LOSS_FUNCTIONS[loss_name]

    def grads_of(Xs, ts):
        Y, cache = model.forward(Xs, return_cache=True)
        loss, dY = loss_fn(Y, ts)
        return loss, model.backward(dY, cache)

    full_loss, full = grads_of(X, target)
    summed, summed_loss = {k: np.zeros_like(g) for k, g in full.items()}, 0.0
    for rank in range(size):
        Xs, ts, weight = FakeRank(rank, size).shard_batch(X, target)
        loss, grads = grads_of(Xs, ts)
        summed_loss += weight * loss
        for k in summed:
            summed[k] += weight * grads[k]
    assert summed_loss == pytest.approx(full_loss, rel=1e-13)
    for k, g in full.items():
        scale = max(np.abs(g).max(), 1e-300)
        assert np.abs(summed[k] - g).max() / scale < 1e-12, k


def test_flat_buffer_round_trip_keeps_every_gradient():
    rng = np.random.default_rng(0)
    grads = {"b": rng.normal(size=(3, 4)), "a": rng.normal(size=5), "c": rng.normal(size=(2, 1, 2))}
    keys = sorted(grads)
    buffer = np.empty(sum(g.size for g in grads.values()) + 1)
    end = flatten_into(buffer, grads, keys)
    assert end == buffer.size - 1
    back = unflatten(buffer, grads, keys)
    for k in grads:
        np.testing.assert_array_equal(back[k], grads[k])
        assert np.shares_memory(back[k], buffer)  # views: the optimiser's in-place clipping reaches them


def test_nccl_dtype_names_the_two_float_kinds_and_refuses_others():
    fake = types.SimpleNamespace(NCCL_FLOAT32=7, NCCL_FLOAT64=8)
    assert nccl_dtype(fake, np.float32) == 7 and nccl_dtype(fake, np.dtype("float64")) == 8
    with pytest.raises(ELMError, match="float16"):
        nccl_dtype(fake, np.float16)


class _DeviceArray(np.ndarray):
    """A host array that shows a device pointer the way CuPy does (``a.data.ptr``)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def test_nccl_all_reduce_gets_the_flat_buffer_in_place_on_the_current_stream():
    """The NCCL path without a GPU: a fake NCCL that sums two identical ranks through the raw pointer."""
    import ctypes
    from elmcore.training.distributed import NCCLCommunicator
    calls = []

    def all_reduce(send, recv, count, dtype, op, stream):
        calls.append((send == recv, count, dtype, op, stream))
        memory = np.ctypeslib.as_array((ctypes.c_double * count).from_address(recv))
        memory *= 2  # rank 1 holds the same shard as rank 0

    comm = object.__new__(NCCLCommunicator)
    comm._buffer, comm.rank, comm.size = None, 0, 2
    comm._cupy = types.SimpleNamespace(
        empty=lambda n, dtype: np.empty(n, dtype).view(_DeviceArray),
        cuda=types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(ptr=99)))
    comm._nccl = types.SimpleNamespace(NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_SUM=0)
    comm.nccl = types.SimpleNamespace(allReduce=all_reduce)
    grads = {"w": np.arange(6.0).reshape(2, 3), "b": np.array([0.5, -1.0])}
    loss, reduced, failed = comm.allreduce_gradients(grads, 3.0, 0.25)
    assert calls == [(True, 10, 8, 0, 99)]  # one call: 8 gradient entries, the loss, the status, in place
    assert loss == pytest.approx(2 * 0.25 * 3.0) and failed == 0
    for k in grads:
        np.testing.assert_allclose(reduced[k], 2 * 0.25 * grads[k])
    # a failed forward pass is counted unscaled by the weight (0 on an empty shard), on every rank
    *_, failed = comm.allreduce_gradients(grads, 0.0, 0.0, failed=True)
    assert failed == 2


def test_launcher_environment_is_read_for_each_mpi_and_slurm():
    assert launcher_ranks({}) is None
    assert launcher_ranks({"PMI_RANK": "0", "PMI_SIZE": "1"}) is None  # one rank: nothing to do
    assert launcher_ranks({"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"}) == (1, 4, 2)
    assert launcher_ranks({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
                           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == (3, 8, 4)
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
             "SLURM_NODEID": "3"}
    assert launcher_ranks(slurm) == (5, 7, 1)
    assert launcher_ranks({**slurm, "SLURM_NODEID": "1"}) == (5, 7, 2)
    assert launcher_size({"SLURM_STEP_NUM_TASKS": "7"}) == 7 and launcher_size({"SLURM_NTASKS": "7"}) == 1


def test_threads_per_rank_share_the_node_or_keep_a_binding():
    assert threads_per_rank(2, usable_cores=2, node_cores=2) == 1
    assert threads_per_rank(4, usable_cores=16, node_cores=16) == 4
    assert threads_per_rank(32, usable_cores=16, node_cores=16) == 1
    assert threads_per_rank(4, usable_cores=3, node_cores=16) == 3  # bound by the launcher


def test_death_message_names_rank_signal_and_the_way_back():
    msg = death_message(1, 2, 4242, signal.SIGKILL, ["elm", "train", "--run-dir", "r"])
    assert msg.startswith("error: rank 1 of 2 (pid 4242") and "SIGKILL" in msg and "--resume r`" in msg
    # A default run directory is known only to the rank, which tells its parent through a pipe.
    from elm_cli import launch
    assert launch.RUN_DIR_FD == RUN_DIR_FD  # one name, spelt twice (launch may not import NumPy)
    reader, writer = os.pipe()
    os.environ[RUN_DIR_FD] = str(writer)
    try:
        announce_run_dir("runs/adding-1")
    finally:
        del os.environ[RUN_DIR_FD]
        os.close(writer)
    announced = _read_announced(reader)
    assert announced == os.path.abspath("runs/adding-1")
    msg = death_message(0, 2, 1, signal.SIGTERM, ["elm", "train"], announced)
    assert f"mpiexec -n 2 elm train --resume {announced}`" in msg and "RUN_DIR" not in msg
    assert argv_run_dir(["elm", "train", "--resume=a b"]) == "a b"


# ---- real runs under mpiexec ----------------------------------------------------------------------

def _mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: install the [mpi] extra "
                                   "(pip install -e '.[mpi]') or an MPI to run the data-parallel tests")
ELM_COMMAND = [sys.executable, "-m", "elm_cli.launch"]
# 151 training rows in batches of 15: shards of 7 and 8 rows, and a last batch of one row,
# for which rank 1 runs a weight-0 row. Validation 19 rows in batches of 8 is sharded 2:1.
TINY = ["--task", "adding", "--task-option", "length=12", "--task-option", "n=189", "--batch-size", "15",
        "--eval-batch-size", "8", "--dtype", "float64", "--input-dropout", "0.1", "--lr", "3e-3",
        "--seed", "3", "--quiet", "--set", "num_memory=6", "--set", "mlp_hidden_size=10"]


def _env():
    env = dict(os.environ)
    for name in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        env.pop(name, None)
    return env


def _train(args, ranks=None, **kw):
    cmd = ([MPIEXEC, "-n", str(ranks)] if ranks else []) + ELM_COMMAND + ["train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600,
                          stdin=subprocess.DEVNULL, **kw)


def _params(run_dir):
    with np.load(os.path.join(run_dir, "last.npz")) as z:
        return {k: z[k] for k in z.files if k.startswith(("param/", "optim/"))}


@pytest.mark.slow
@needs_mpiexec
def test_two_ranks_give_the_single_process_parameters(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = _train(TINY + ["--epochs", "2", "--run-dir", one])
    assert r1.returncode == 0, r1.stderr
    r2 = _train(TINY + ["--epochs", "2", "--run-dir", two], ranks=2)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count("done:") == 1  # rank 1 trains silently
    a, b = _params(one), _params(two)
    steps = [json.loads(line)["step"] for line in open(os.path.join(two, "metrics.jsonl"))
             if '"type": "step"' in line]
    assert steps == list(range(1, 23))  # 2 epochs x 11 batches, each logged once
    for k in a:
        scale = max(np.abs(a[k]).max(), 1e-300)
        assert np.abs(a[k] - b[k]).max() / scale <= 1e-10, k
    s1, s2 = (json.load(open(os.path.join(d, "summary.json"))) for d in (one, two))
    assert s2["best_metric"] == pytest.approx(s1["best_metric"], rel=1e-10)


@pytest.mark.slow
@needs_mpiexec
def test_rank_0_reports_a_ctrl_c_even_when_it_stops_last(tmp_path):
    """The launcher kills every rank the moment one exits with a failure: rank 1 stopping at once
    while rank 0 still waited in the gradient all-reduce (or wrote a checkpoint) ended the job
    without the resume line (seen in CI). Here rank 1 spends each step in a sleep, which Ctrl-C
    interrupts at once, so rank 0 is nearly always the one waiting."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('PMI_RANK') == '1' and os.environ.get('ELMCORE_RANK_SUPERVISED') == '1':\n"
        "    import time\n"
        "    from elmcore.neuron.model import ELM\n"
        "    backward = ELM.backward\n"
        "    def slow_backward(self, *args, **kwargs):\n"
        "        time.sleep(0.3)\n"
        "        return backward(self, *args, **kwargs)\n"
        "    ELM.backward = slow_backward\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    rd = str(tmp_path / "cut")
    err = _ctrl_c_after_five_steps(["--checkpoint-every", "2"], rd, env)
    assert f"elm train --resume {rd}" in err, err
    assert _worker_pid(rd, 0) is None and _worker_pid(rd, 1) is None
    # rank 0, stuck in the all-reduce, was killed by its parent, which removed the lock file it left
    assert not os.path.exists(os.path.join(rd, ".lock"))


def test_the_launcher_names_the_trainers_lock_file():
    from elm_cli import launch
    from elmcore.training import train
    assert launch.LOCK_FILE == train.LOCK


def _ctrl_c_after_five_steps(extra_args, rd, env):
    """Start a two-rank run, send one Ctrl-C to its whole process group (as a terminal does) once
    five steps are logged, check that it ends promptly and non-zero; return its stderr."""
    args = TINY + ["--epochs", "200", "--task-option", "length=40", *extra_args]
    proc = subprocess.Popen([MPIEXEC, "-n", "2"] + ELM_COMMAND + ["train", *args, "--run-dir", rd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env=env, start_new_session=True)
    metrics, deadline = os.path.join(rd, "metrics.jsonl"), time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(metrics) and open(metrics).read().count('"type": "step"') >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 30
    assert proc.returncode != 0, err
    return err


def _worker_pid(run_dir, rank):
    """The training process of ``rank`` (the child of the rank's supervising parent)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if (b"ELMCORE_RANK_SUPERVISED=1" in env and f"PMI_RANK={rank}".encode() in env
                and run_dir.encode() in cmd):
            return int(pid)
    return None


@pytest.mark.slow
@needs_mpiexec
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process through /proc")
def test_a_killed_rank_is_named_and_resume_matches_an_uninterrupted_run(tmp_path):
    args = TINY + ["--epochs", "4", "--checkpoint-every", "3", "--task-option", "length=40"]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    r = _train(args + ["--run-dir", ref], ranks=2)
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([MPIEXEC, "-n", "2"] + ELM_COMMAND + ["train", *args, "--run-dir", cut],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env=_env())
    metrics, deadline, killed = os.path.join(cut, "metrics.jsonl"), time.time() + 300, None
    while killed is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        if os.path.exists(metrics) and open(metrics).read().count('"type": "step"') >= 5:
            killed = _worker_pid(cut, 1)
            if killed:
                os.kill(killed, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert killed, "rank 1's training process was not found before the run ended"
    assert proc.returncode != 0
    assert f"rank 1 of 2 (pid {killed}" in err and "SIGKILL" in err, err
    assert f"elm train --resume {cut}`" in err and "RUN_DIR" not in err
    assert not os.path.exists(os.path.join(cut, "summary.json"))
    resumed = _train(["--resume", cut, "--quiet"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _params(ref), _params(cut)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
@needs_mpiexec
def test_one_ctrl_c_ends_every_rank_with_the_resume_line(tmp_path):
    """Ctrl-C at a terminal sends SIGINT to the whole foreground process group: mpiexec and every rank."""
    rd = str(tmp_path / "cut")
    err = _ctrl_c_after_five_steps(["--checkpoint-every", "3"], rd, _env())
    assert f"elm train --resume {rd}" in err, err
    assert "RUN_DIR" not in err and "Traceback" not in err
    assert _worker_pid(rd, 0) is None and _worker_pid(rd, 1) is None  # no rank left behind
    assert not os.path.exists(os.path.join(rd, ".lock"))
