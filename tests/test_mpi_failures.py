"""A failure on any rank of an `mpiexec -n 2` job ends the whole job within seconds, with one `error:` line.

Before, rank 0 failing alone (its run directory under a file, or in /proc) left rank 1
waiting forever in the next collective; a diverging run printed two contradicting messages.
"""

import json
import subprocess
import sys
import time

import pytest

from test_distributed import ELM_COMMAND, MPIEXEC, _env, needs_mpiexec

TINY = ["--task", "adding", "--task-option", "n=40", "--task-option", "length=6", "--set", "num_memory=3",
        "--batch-size", "8", "--quiet", "--epochs", "1"]
# Seconds within which a failed job must end: imports and MPI start-up, not a hang.
PROMPT_S = 120


def mpirun(args, ranks=2, timeout=PROMPT_S):
    started = time.monotonic()
    result = subprocess.run([MPIEXEC, "-n", str(ranks), *args], capture_output=True, text=True, env=_env(),
                            timeout=timeout, stdin=subprocess.DEVNULL)
    result.seconds = time.monotonic() - started
    return result


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.lower().startswith("error")]


def assert_one_error(result, *fragments, code=2):
    """Exit ``code``, one `error:` line holding the fragments (the run's log lines may precede it),
    and nothing from MPI itself (its abort banner) or Python (a traceback)."""
    lines = error_lines(result)
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for noise in ("Traceback", "Abort(", "BAD TERMINATION", "killed by"):
        assert noise not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.slow
@needs_mpiexec
@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_rank_0_failing_alone_to_create_the_run_directory_ends_the_job(tmp_path, where):
    if where == "under_a_file":
        blocker = tmp_path / "a_file"
        blocker.write_text("not a directory")
        run_dir = str(blocker / "run")
    else:
        run_dir = f"/proc/elmcore-test-{time.time_ns()}/run"
    result = mpirun(ELM_COMMAND + ["train", *TINY, "--run-dir", run_dir])
    assert_one_error(result, "run directory", run_dir)


@pytest.mark.slow
@needs_mpiexec
def test_rank_0_failing_alone_to_lock_the_run_directory_ends_the_job(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".lock").mkdir(parents=True)  # a lock file that cannot be opened for writing
    result = mpirun(ELM_COMMAND + ["train", *TINY, "--run-dir", str(run_dir)])
    assert_one_error(result, "lock", str(run_dir))


@pytest.mark.slow
@needs_mpiexec
def test_a_sweep_whose_directory_rank_0_cannot_create_ends_the_job(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    sweep = tmp_path / "s.json"
    sweep.write_text(json.dumps({"sweep_dir": str(blocker / "sw"), "grid": {"seed": [0, 1]},
                                 "base": {"task": "adding", "task_options": {"n": 40, "length": 6}, "epochs": 1}}))
    result = mpirun(ELM_COMMAND + ["sweep", str(sweep)])
    assert_one_error(result, str(blocker / "sw"))


@pytest.mark.slow
@needs_mpiexec
def test_every_rank_of_a_diverging_run_reports_the_same(tmp_path):
    run_dir = tmp_path / "run"
    result = mpirun(ELM_COMMAND + ["train", *TINY, "--epochs", "3", "--lr", "1e3", "--checkpoint-every", "1",
                                   "--run-dir", str(run_dir)])
    assert_one_error(result, "training stopped")
    assert "checkpoint" in error_lines(result)[0]


_ONE_RANK_FAILS = """
import sys
from elm_cli.common import UserError
from elmcore.training.distributed import communicator
comm = communicator()
if comm.rank == 1:
    {failure}
comm.allgather(None)  # rank 0 waits here for a rank that never comes
print("rank", comm.rank, "went on")
"""


@pytest.mark.slow
@needs_mpiexec
@pytest.mark.parametrize("failure,code,fragment", [
    ("UserError('rank 1 cannot read its shard').show(); sys.exit(2)", 2, "error: rank 1 cannot read its shard"),
    ("raise RuntimeError('a bug on rank 1')", 1, "RuntimeError: a bug on rank 1"),
])
def test_a_rank_other_than_0_failing_alone_ends_the_job(failure, code, fragment):
    result = mpirun([sys.executable, "-c", _ONE_RANK_FAILS.format(failure=failure)])
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert fragment in result.stderr and "went on" not in result.stdout
    assert result.seconds < PROMPT_S / 2


_RANK_1_DIVERGES = """
import sys
from elmcore.training.distributed import communicator
if communicator().rank == 1:  # only rank 1's shard gives non-finite outputs
    from elmcore.engine.model_base import InputChecks
    from elmcore.errors import NonFiniteOutputError
    def diverge(self, Y, X):
        raise NonFiniteOutputError("the model produced non-finite outputs from finite input")
    InputChecks._check_output = diverge
from elm_cli.main import cli
cli(sys.argv[1:])
"""


@pytest.mark.slow
@needs_mpiexec
def test_a_rank_whose_forward_pass_is_not_finite_does_not_hang_the_others(tmp_path):
    # Before, rank 1 raised before the gradient all-reduce and rank 0 waited in it forever (with NCCL:
    # no timeout at all). Now rank 1 joins it with a failure flag and both ranks stop at the same step.
    result = mpirun([sys.executable, "-c", _RANK_1_DIVERGES, "train", *TINY, "--run-dir", str(tmp_path / "run")])
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "not finite at step 1 on 1 of 2 ranks" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.seconds < PROMPT_S / 2


_RANK_0_REPORTS_LATE = """
import os, sys, time
from elmcore.training.distributed import communicator
from elmcore.training.train import Trainer
if communicator().rank == 0:
    diverged = Trainer._diverged
    def late(self, *args, **kwargs):
        time.sleep(3)  # rank 0 still busy (a loaded machine) when rank 1 has stopped
        return diverged(self, *args, **kwargs)
    Trainer._diverged = late
else:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # so the one line can only be rank 0's
""" + _RANK_1_DIVERGES


@pytest.mark.slow
@needs_mpiexec
def test_rank_0_reports_an_error_every_rank_raised_even_when_it_gets_there_last(tmp_path):
    # Before, every rank raised the divergence on its own: rank 1 waited 2 s, then aborted the job
    # and rank 0, still 1 s from its line, was killed silently. Now the others wait for rank 0's line.
    result = mpirun([sys.executable, "-c", _RANK_0_REPORTS_LATE, "train", *TINY, "--run-dir", str(tmp_path / "run")])
    assert_one_error(result, "not finite at step 1 on 1 of 2 ranks")
    assert result.seconds < PROMPT_S / 2
