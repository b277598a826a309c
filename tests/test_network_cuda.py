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


# ---- the time walks' launch shapes, kernel against kernel ------------------------------------

def _walk_inputs(rng, dtype, B, T, N, nb, Dm, H, L, entries):
    """One layer's time-walk arguments, with the model's placeholders where it passes them."""
    I0, W0, Lh = nb + Dm, H if L else Dm, max(L - 1, 0)

    def f(*s, scale=0.5):
        return rng.normal(scale=scale, size=s).astype(dtype)

    target = np.sort(rng.integers(0, N, entries))
    src = rng.integers(0, N, entries)
    rec_k = rng.integers(0, nb, entries)
    rec_ptr = np.concatenate([[0], np.cumsum(np.bincount(target, minlength=N))]).astype(np.int64)
    src_entry = np.argsort(src, kind="stable").astype(np.int64)
    src_ptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=N))]).astype(np.int64)
    return dict(
        E=f(B, T, nb, N), kappa_b=rng.uniform(0.3, 0.95, (nb, N)).astype(dtype), rec_ptr=rec_ptr,
        rec_i=target.astype(np.int64), rec_k=rec_k.astype(np.int64), rec_src=src.astype(np.int64),
        rec_w=f(entries), src_ptr=src_ptr, src_entry=src_entry, W_in=f(I0, W0, N), c_in=f(W0, N),
        W_hid=f(Lh, H, H, N) if Lh else np.zeros((1, 1, 1, N), dtype),
        c_hid=f(Lh, H, N) if Lh else np.zeros((1, 1, N), dtype),
        W_out=f(H, Dm, N) if L else np.zeros((H, 1, N), dtype), c_out=f(Dm, N) if L else np.zeros((1, N), dtype),
        kappa_m=rng.uniform(0.3, 0.95, (Dm, N)).astype(dtype), c_m=rng.uniform(0.2, 1.5, (Dm, N)).astype(dtype),
        w_o=f(Dm, N), c_o=f(N), b0=f(B, nb, N), m0=f(B, Dm, N), o0=f(B, N), dO=f(B, T, N),
        # The backward's in/out carries (the adjoints of a later segment's start) and the sums it adds to.
        carry_b=f(B, nb, N), carry_m=f(B, Dm, N), carry_o=f(B, N), gk=f(B, Dm, N), gc=f(B, Dm, N))


def _walk(k, inp, L, H, activation, xp):
    """network_forward then network_backward of kernel module ``k``; every output on the host."""
    from elmcore.neuron import params as P
    a = {key: xp.asarray(v) for key, v in inp.items()}
    B, T, nb, N = a["E"].shape
    Dm = a["kappa_m"].shape[0]
    dt = a["E"].dtype
    scale, slope = dt.type(P.PHI_SCALE), dt.type(P.PHI_SLOPE)

    def nan(*s):
        return xp.full(s, np.nan, dt)

    fwd = dict(A0=nan(B, T, nb + Dm, N), Z=nan(L, B, T, H, N), DM=nan(B, T, Dm, N), M=nan(B, T, Dm, N),
               O=nan(B, T, N), b=nan(B, nb, N))
    plans = [k.network_forward(a["E"], a["kappa_b"], a["rec_ptr"], a["rec_i"], a["rec_k"], a["rec_src"], a["rec_w"],
                               a["W_in"], a["c_in"], a["W_hid"], a["c_hid"], a["W_out"], a["c_out"], a["kappa_m"],
                               a["c_m"], a["w_o"], a["c_o"], a["b0"], a["m0"], a["o0"], activation, scale, slope,
                               fwd["A0"], fwd["Z"], fwd["DM"], fwd["M"], fwd["O"], fwd["b"])]
    bwd = dict(GB=nan(B, T, nb, N), dZ=nan(L, B, T, H, N), dP=nan(B, T, Dm, N), GO=nan(B, T, N),
               act=nan(L, B, T, H, N), **{key: a[key].copy() for key in ("gk", "gc", "carry_b", "carry_m", "carry_o")})
    plans.append(k.network_backward(a["dO"], a["kappa_b"], a["rec_ptr"], a["rec_i"], a["rec_k"], a["rec_src"],
                                    a["rec_w"], a["src_ptr"], a["src_entry"], a["W_in"], a["W_hid"], a["W_out"],
                                    a["kappa_m"], a["c_m"], a["w_o"], a["m0"], fwd["A0"], fwd["Z"], fwd["DM"],
                                    fwd["M"], activation, scale, slope, bwd["GB"], bwd["dZ"], bwd["dP"], bwd["GO"],
                                    bwd["act"], bwd["gk"], bwd["gc"], bwd["carry_b"], bwd["carry_m"],
                                    bwd["carry_o"]))
    out = {key: v if isinstance(v, np.ndarray) else v.get() for key, v in {**fwd, **bwd}.items()}
    return out, plans


def _device_xp():
    if REAL_GPU:
        import cupy
        return cupy
    return np


WALK_SHAPES = [  # (neurons, threads per block, hidden layers, weights in shared memory)
    (37, 32, 0, True),     # N not a multiple of 32: threads 0-4 walk a second neuron
    (37, 32, 1, False),
    (37, 32, 2, True),
    (37, 32, 2, False),
    (64, 64, 1, False),    # one neuron per thread (the simulator runs each thread in Python: 256 took 50 s)
    (64, 64, 2, True),
]


@needs_cuda
@pytest.mark.parametrize("N,threads,L,in_shared", WALK_SHAPES,
                         ids=[f"N{c[0]}-thr{c[1]}-L{c[2]}-{'shared' if c[3] else 'global'}" for c in WALK_SHAPES])
def test_time_walk_launch_shapes_equal_the_cpu_kernels(N, threads, L, in_shared, monkeypatch):
    from elmcore.kernels import network_cpu, network_cuda
    from elmcore.kernels.pointwise import activation_code
    monkeypatch.setattr(network_cuda, "policy", network_cuda.WalkPolicy(threads=threads, weights_in_shared=in_shared))
    H = 3
    inp = _walk_inputs(np.random.default_rng(N + L), np.float64, 2, 3, N, 2, 2, H, L, entries=2 * N)
    act = activation_code("silu")
    ref, _ = _walk(network_cpu, inp, L, H, act, np)
    got, plans = _walk(network_cuda, inp, L, H, act, _device_xp())
    assert all(p.threads == threads and p.weights_in_shared is in_shared for p in plans)
    for key in ref:
        assert np.all(np.isfinite(got[key])), key
        scale = max(np.abs(ref[key]).max(), 1e-30) if ref[key].size else 1.0
        assert np.abs(got[key] - ref[key]).max(initial=0) <= TOL["float64"] * scale, key


def test_time_walk_plan_one_thread_per_neuron_and_weights_by_size(monkeypatch):
    from elmcore import ELMError
    from elmcore.kernels import network_cuda as NK
    monkeypatch.setattr(NK, "SIMULATOR", False)  # the GPU's rules, wherever this runs
    monkeypatch.setattr(NK, "MAX_BLOCKS", 65535)
    monkeypatch.setattr(NK, "policy", NK.WalkPolicy())
    H100 = (132, 227 * 1024)  # multiprocessors, opt-in shared bytes per block
    # 37 neurons: two whole warps; 15 scratch values per neuron (odd stride 15); small weights stay on chip.
    small = NK.plan_walk(8, 37, 15, 37 * 200, 4, limits=H100)
    assert (small.threads, small.blocks, small.weights_in_shared) == (64, 8, True)
    assert small.shared_bytes == 64 * 15 * 4 + 37 * 200 * 4
    # 1000 neurons: 256 threads walk four neurons each; 1000 · 600 weights (2.4 MB) stay in global memory.
    big = NK.plan_walk(8, 1000, 40, 1000 * 600, 4, limits=H100)
    assert (big.threads, big.weights_in_shared, big.shared_bytes) == (256, False, 256 * 41 * 4)
    # Scratch rows too long for 256 threads in 48 KB: fewer threads (whole warps).
    tight = NK.plan_walk(8, 256, 100, 10, 8, limits=(132, 48 * 1024))
    assert tight.threads == 32 * (48 * 1024 // (101 * 8 * 32)) and tight.threads * 101 * 8 <= 48 * 1024
    with pytest.raises(ELMError, match="shared memory"):
        NK.plan_walk(8, 64, 1000, 10, 8, limits=(132, 48 * 1024))


WEIGHT_GRAD_BLOCKS = [  # (batch, steps, time block [t0, t1), threads to aim at): the rows b-major
    (3, 7, (0, 7), 10**6),  # a whole sequence, its 21 rows split into chunks of 2 (the last has one)
    (3, 9, (2, 7), 10**6),  # a time block: 15 rows, chunks of 2 crossing batch rows (the last has one)
    (2, 5, (1, 4), 1),      # one chunk: the sums written directly
]


@needs_cuda
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("B,T,block,aim", WEIGHT_GRAD_BLOCKS, ids=["whole", "block", "one-chunk"])
def test_neuron_weight_grad_row_chunks_equal_the_cpu_kernel(B, T, block, aim, dtype, monkeypatch):
    from elmcore.kernels import network_cpu, network_cuda
    monkeypatch.setattr(network_cuda, "WEIGHT_GRAD_THREADS", aim)
    monkeypatch.setattr(network_cuda, "MIN_CHUNK_ROWS", 2)
    rng = np.random.default_rng(B * T)
    n_in, n_out, N = 3, 2, 5
    G, A = rng.normal(size=(B, T, n_out, N)).astype(dtype), rng.normal(size=(B, T, n_in, N)).astype(dtype)
    t0, t1 = block
    rows = B * (t1 - t0)
    chunks, per = network_cuda.weight_grad_chunks(rows, n_in * n_out * N)
    assert (chunks > 1 and rows % per) if aim > 1 else chunks == 1
    ref, ref_bias = np.full((n_in, n_out, N), np.nan, dtype), np.full((n_out, N), np.nan, dtype)
    network_cpu.neuron_weight_grad(G, A, t0, t1, ref, ref_bias)
    # the definition, in float64: Σ over the block's rows of A ⊗ G per neuron
    rows_A, rows_G = A[:, t0:t1].reshape(rows, n_in, N), G[:, t0:t1].reshape(rows, n_out, N)
    exact = np.einsum("rjn,ron->jon", rows_A.astype(np.float64), rows_G.astype(np.float64))
    assert np.abs(ref - exact).max() <= 10 * TOL[dtype] * np.abs(exact).max()
    xp = _device_xp()
    out, bias = xp.full((n_in, n_out, N), np.nan, dtype), xp.full((n_out, N), np.nan, dtype)
    assert network_cuda.neuron_weight_grad(xp.asarray(G), xp.asarray(A), t0, t1, out, bias) == chunks
    for got, want in ((out, ref), (bias, ref_bias)):
        got = got if isinstance(got, np.ndarray) else got.get()
        assert got.dtype == dtype and np.all(np.isfinite(got))
        assert np.abs(got - want).max() <= TOL[dtype] * np.abs(want).max()
