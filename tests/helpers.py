"""Shared test utilities (imported by test modules; not a conftest so it stays explicit)."""

import functools
import os
import re
import subprocess
import sys

import pytest

from elmcore.engine.cuda_backend import cuda_problem
from elmcore.neuron.config import ELMConfig

HERE = os.path.dirname(__file__)
GOLDEN_DIR = os.path.join(HERE, "data", "golden")
REFERENCE_DIR = os.path.join(HERE, "data", "reference_models")


# The CUDA checks: run directly where CUDA is usable (a GPU, or this process under the simulator);
# elsewhere a slow test reruns the file's CUDA tests in a child pytest under the simulator.
SIM_ENV = "NUMBA_ENABLE_CUDASIM"
IN_SIMULATOR = os.environ.get(SIM_ENV) == "1"
CUDA_HERE = cuda_problem() is None
needs_cuda = pytest.mark.skipif(not CUDA_HERE, reason="no CUDA here: run by the simulator child process")
if IN_SIMULATOR:
    sys.setswitchinterval(2e-4)  # the simulator's barriers busy-poll Python threads


def run_under_simulator(test_file, *pytest_args, timeout):
    """pytest on ``test_file`` (with ``pytest_args``) in a child process under the CUDA simulator,
    from the repository root; (its return code, the tail of its output, the number of tests passed)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", *pytest_args],
                          env=dict(os.environ, **{SIM_ENV: "1"}), capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.abspath(HERE)))
    tail = (proc.stdout + proc.stderr)[-4000:]
    passed = re.search(r"(\d+) passed", tail)
    return proc.returncode, tail, int(passed.group(1)) if passed else None


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing in the trainer handles it."""


def run_killed_after(trainer, steps):
    """Run ``trainer`` and kill it as it starts training step ``steps`` + 1 (what it saved stays on disk)."""
    real_step, calls = trainer._train_step, {"n": 0}

    def dying_step(*args):
        if calls["n"] == steps:
            raise Killed()
        calls["n"] += 1
        return real_step(*args)

    trainer._train_step = dying_step
    with pytest.raises(Killed):
        trainer.run()


def golden_files():
    return sorted(os.path.join(GOLDEN_DIR, f) for f in os.listdir(GOLDEN_DIR) if f.endswith(".npz"))


def random_config(rng, version=None, routing="any", layers=None, activation=None):
    """A small config drawn from every axis the engine supports."""
    version = version or rng.choice(["elm_v1", "branch_elm_v2"])
    if routing == "any":
        routing = rng.choice([None, "random_routing", "neuronio_routing"])
    num_input = int(rng.integers(1, 9))
    if routing is None:
        spb = int(rng.choice([d for d in range(1, num_input + 1) if num_input % d == 0]))
        branches = num_input // spb
    elif routing == "neuronio_routing":
        branches = int(rng.integers(1, num_input + 1))
        spb = -(-num_input // branches) + int(rng.integers(0, 3))
    else:
        branches, spb = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    d = dict(num_input=num_input, num_output=int(rng.integers(1, 4)), num_memory=int(rng.integers(1, 6)),
             mlp_num_layers=int(rng.integers(0, 4)) if layers is None else layers,
             mlp_hidden_size=int(rng.integers(1, 7)),
             mlp_activation=activation or str(rng.choice(["relu", "silu"])),
             num_branch=branches, num_synapse_per_branch=spb, input_to_synapse_routing=routing,
             learn_memory_tau=bool(rng.random() < 0.7), lambda_value=float(rng.uniform(1, 6)),
             memory_tau_min=float(rng.uniform(0.5, 2)), memory_tau_max=float(rng.uniform(10, 300)),
             delta_t=float(rng.choice([1.0, 0.5, 2.0])), version=str(version))
    return ELMConfig.from_dict(d)


def record_calls(monkeypatch, module, names):
    """Wrap the functions ``names`` of ``module`` so that each call first appends its name to the list
    returned (which walk a pass took, in order)."""
    calls = []
    for name in names:
        monkeypatch.setattr(module, name, functools.partial(_record_call, calls, name, getattr(module, name)))
    return calls


def _record_call(calls, name, function, *args):
    calls.append(name)
    return function(*args)
