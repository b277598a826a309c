"""The network's CUDA kernels compute the CPU kernels' numbers (and the oracle files').

Numba reads ``NUMBA_ENABLE_CUDASIM`` once, when ``numba.cuda`` is first imported, so the
CUDA tests here run where CUDA is usable (a real GPU, or a process started with the
simulator on). Elsewhere ``test_cuda_tests_pass_under_the_simulator`` runs this file in
one child pytest process with the simulator on and fails with the child's report if any
test there fails. With ``ELM_TEST_REQUIRE_GPU=1`` (bench/gpu_check.sh on a lent GPU) there
is no simulator fall-back: every CUDA test fails unless a real GPU is usable.
The simulator runs every CUDA thread as a Python thread: shapes stay tiny.
"""

import functools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from elmcore import ELMNetwork
from elmcore.network import params as NP
from elmcore.neuron.config import ELMConfig
from elmcore.engine.cuda_backend import cuda_problem
from elmcore.verification.oracle import load_oracle, verify_case

# Without a GPU these checks run in a child pytest under the CUDA simulator (about 30 s warm on 2 busy cores).
pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN_NETWORK_DIR = os.path.join(HERE, "data", "golden_network")
SIM_ENV = "NUMBA_ENABLE_CUDASIM"
IN_SIMULATOR = os.environ.get(SIM_ENV) == "1"
# Set by bench/gpu_check.sh: on a lent GPU machine a silent fall-back to the simulator would hide a broken GPU.
REQUIRE_GPU = os.environ.get("ELM_TEST_REQUIRE_GPU") == "1"
PROBLEM = cuda_problem()
CUDA_HERE = PROBLEM is None
REAL_GPU = CUDA_HERE and not IN_SIMULATOR
NO_GPU_REASON = "needs a real CUDA GPU: " + ("this process runs the CUDA simulator" if IN_SIMULATOR else str(PROBLEM))


def needs_cuda(test):
    """Run ``test`` where CUDA is usable; fail without a real GPU under ELM_TEST_REQUIRE_GPU=1; else skip it
    (the simulator child process runs it)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if REQUIRE_GPU and not REAL_GPU:
            pytest.fail(NO_GPU_REASON, pytrace=False)
        if not CUDA_HERE:
            pytest.skip("no CUDA here: run by the simulator child process")
        return test(*args, **kwargs)
    return wrapper

if IN_SIMULATOR:
    sys.setswitchinterval(2e-4)  # the simulator's barriers busy-poll Python threads

# CPU ↔ CUDA: the same formulas summed in the same order, up to FMA contraction and libm.
TOL = {"float64": 1e-12, "float32": 1e-5}
ORACLE_TOL = {"float64": 1e-9, "float32": 1e-3}


@pytest.mark.slow
@pytest.mark.skipif(CUDA_HERE, reason="CUDA is usable in this process: the tests below run directly")
@pytest.mark.skipif(REQUIRE_GPU, reason="ELM_TEST_REQUIRE_GPU=1: no simulator fall-back (the tests below fail)")
def test_cuda_tests_pass_under_the_simulator():
    env = dict(os.environ, **{SIM_ENV: "1"})
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not gpu"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(HERE))
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", tail)
    # every CUDA test of this file ran (only this parent test is skipped in the child)
    assert passed and int(passed.group(1)) >= 16 and "1 skipped" in tail, tail


def _run(cfg, params, X, G, dtype, device):
    net = ELMNetwork(cfg, params=params, dtype=dtype, device=device)
    host = net.backend.to_host
    Y, cache = net.forward(X, return_cache=True)
    out = {"Y": np.asarray(host(Y), np.float64)}
    grads = net.backward(G, cache, input_grad=True)
    out.update({f"grad/{k}": np.asarray(host(v), np.float64) for k, v in grads.items()})
    _, traces = net.traces(X)
    out.update({f"trace/{k}": np.asarray(host(v), np.float64) for k, v in traces.items()})
    state = net.init_state(X.shape[0])
    _, state = net.run(X[:, :2], state)
    Y2, state = net.run(X[:, 2:], state)
    out["streamed"] = np.asarray(host(Y2), np.float64)
    out.update({f"state/{k}": np.asarray(host(v), np.float64) for k, v in state.items()})
    return out


CASES = [  # (layers, ρ, hidden layers, activation, learned τ_m)
    (1, 0.5, 1, "relu", False),
    (2, 1.0, 0, "silu", True),
    (3, 0.0, 2, "silu", True),
    (1, 0.25, 2, "relu", True),
]


@needs_cuda
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_kernels_equal_the_cpu_kernels(case, dtype):
    layers, rho, hidden, act, learn = CASES[case]
    rng = np.random.default_rng(case)
    cfg = ELMConfig.from_dict(dict(version="elm_network", num_input=4, num_output=2, num_neurons=5,
                                   num_layers=layers, num_memory=3, mlp_num_layers=hidden, mlp_hidden_size=4,
                                   mlp_activation=act, num_branch=2, num_synapse_per_branch=2,
                                   recurrent_fraction=rho, learn_memory_tau=learn, memory_tau_max=40.0))
    params = NP.init_params(cfg, seed=case, dtype=np.float64)
    for layer in range(layers):
        params[f"layers.{layer}.tau_b"] = rng.uniform(2, 8, params[f"layers.{layer}.tau_b"].shape)
    X = rng.normal(size=(2, 5, 4))
    X[rng.random(X.shape) < 0.3] = 0
    G = rng.normal(size=(2, 5, 2))
    cpu = _run(cfg, params, X, G, dtype, "cpu")
    gpu = _run(cfg, params, X, G, dtype, "cuda")
    assert set(cpu) == set(gpu)
    for key in cpu:
        scale = max(np.abs(cpu[key]).max(), 1e-30)
        assert np.abs(cpu[key] - gpu[key]).max() <= TOL[dtype] * scale, key


@needs_cuda
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("path", sorted(os.path.join(GOLDEN_NETWORK_DIR, f) for f in os.listdir(GOLDEN_NETWORK_DIR)
                                         if f.endswith(".npz")), ids=os.path.basename)
def test_cuda_matches_the_network_oracle(path, dtype):
    case = load_oracle(path)
    bad = [(n, e) for n, e in verify_case(case, dtype=dtype, device="cuda") if not e <= ORACLE_TOL[dtype]]
    assert not bad, bad


@needs_cuda
def test_cuda_reads_one_byte_spikes():
    rng = np.random.default_rng(7)
    cfg = ELMConfig.from_dict(dict(version="elm_network", num_input=12, num_output=2, num_neurons=3, num_memory=2,
                                   num_branch=2, num_synapse_per_branch=2))
    spikes = rng.random((2, 4, 12)) < 0.2
    net = ELMNetwork(cfg, seed=1, dtype="float64", device="cuda")
    ref = net.backend.to_host(net.forward(spikes.astype(np.float64)))
    assert np.allclose(net.backend.to_host(net.forward(spikes.astype(np.uint8))), ref, rtol=0, atol=1e-14)


@needs_cuda
def test_every_listed_kernel_compiles_per_dtype():
    from elmcore.kernels import network_cuda
    for dtype in (np.float32, np.float64):
        kernels = network_cuda.kernel_set(dtype)
        assert set(network_cuda.KERNELS) == set(kernels)
