"""Rung 3 of the verification ladder (docs/architecture.md §4): the CUDA backend computes the CPU engine's numbers.

Numba reads ``NUMBA_ENABLE_CUDASIM`` once, when ``numba.cuda`` is first
imported, and a simulator switched on for the whole test session would also
make ``--device auto`` pick the (slow) simulator in every other test file. So
the CUDA checks here are decorated with :func:`on_cuda`, which runs them

* directly, when this process already has the simulator or a usable GPU;
* otherwise in ONE child pytest process over this file with the simulator on,
  reporting each test's own verdict (pass, fail with the child's message, skip).

The simulator runs every CUDA thread as a Python thread, so shapes stay tiny.
Tests marked ``gpu`` need a real GPU (larger shapes, shared-memory opt-in,
CuPy streams) and are skipped elsewhere.
"""

import functools
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from elmcore import ELM, ELMError
from elmcore.neuron import params as P
from elmcore.neuron.config import ELMConfig
from elmcore.engine.cuda_backend import cuda_problem
from elmcore.kernels.pointwise import ACT_RELU, ACT_SILU, activation_code
from elmcore.verification.oracle import load_oracle, relative_error, verify_case
from helpers import GOLDEN_DIR, random_config

# Every CUDA check here waits for one child pytest under the simulator (20-25 s warm on 2 busy cores).
pytestmark = pytest.mark.slow

SIM_ENV = "NUMBA_ENABLE_CUDASIM"
IN_SIMULATOR = os.environ.get(SIM_ENV) == "1"
# Set by bench/gpu_check.sh: on a lent GPU machine a silent fall-back to the simulator would hide a broken GPU.
REQUIRE_GPU = os.environ.get("ELM_TEST_REQUIRE_GPU") == "1"
PROBLEM = cuda_problem()
REAL_GPU = PROBLEM is None and not IN_SIMULATOR
SIMULATED = PROBLEM is None and IN_SIMULATOR
NO_GPU_REASON = "needs a real CUDA GPU: " + ("this process runs the CUDA simulator" if IN_SIMULATOR else str(PROBLEM))
# The simulator run of this file took 7 minutes on a loaded, shared 2-core machine (300 s timed out).
CHILD_TIMEOUT_S = 900
if IN_SIMULATOR:
    # The simulator's block manager busy-polls its Python threads; with the default
    # 5 ms GIL switch interval every barrier waits for it. 0.2 ms makes runs ~4x faster.
    sys.setswitchinterval(2e-4)

# CPU ↔ CUDA: the same formulas, summed in a (nearly) equal order.
TOL = {"float64": 1e-12, "float32": 1e-5}
# CUDA ↔ oracle (the release run in float64 by PyTorch).
ORACLE_TOL = {"float64": 1e-10, "float32": 1e-4}

parent_only = pytest.mark.skipif(IN_SIMULATOR, reason="checked by the parent process")


# ---- running CUDA tests where CUDA is -----------------------------------------------

@functools.lru_cache(maxsize=None)
def _child_verdicts():
    """Run this file's CUDA tests once under the simulator; {test name: (outcome, text)}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        env = dict(os.environ, **{SIM_ENV: "1"})
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not gpu",
             f"--junitxml={report}"],
            env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        tail = (proc.stdout + proc.stderr)[-3000:]
        if not os.path.exists(report):
            return {}, tail
        verdicts = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, text = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = tag
                    text = (node.get("message") or "") + "\n" + (node.text or "")
                    break
            verdicts[case.get("name")] = (outcome, text)
    return verdicts, tail


def on_cuda(test):
    """Run ``test`` here when CUDA (real or simulated) is available, else read the child's verdict."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if REAL_GPU or (SIMULATED and not REQUIRE_GPU):
            return test(*args, **kwargs)
        if REQUIRE_GPU:
            pytest.fail(NO_GPU_REASON, pytrace=False)
        if IN_SIMULATOR:  # never spawn a simulator from the simulator's own run
            pytest.fail(f"NUMBA_ENABLE_CUDASIM=1 but CUDA is unusable: {PROBLEM}", pytrace=False)
        name = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].rsplit(" (", 1)[0]
        verdicts, tail = _child_verdicts()
        if name not in verdicts:
            pytest.fail(f"the simulator run did not report {name}; its output ended with:\n{tail}",
                        pytrace=False)
        outcome, text = verdicts[name]
        if outcome == "skipped":
            pytest.skip(text.strip())
        if outcome != "passed":
            pytest.fail(f"under NUMBA_ENABLE_CUDASIM=1:\n{text}", pytrace=False)
    return wrapper


def on_gpu(test):
    """A ``gpu``-marked test: skipped without a real GPU (failed instead under ELM_TEST_REQUIRE_GPU=1)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if not REAL_GPU:
            if REQUIRE_GPU:
                pytest.fail(NO_GPU_REASON, pytrace=False)
            pytest.skip(NO_GPU_REASON)
        return test(*args, **kwargs)
    return pytest.mark.gpu(wrapper)


# ---- helpers ----------------------------------------------------------------------

def _host(model, a):
    return np.asarray(model.backend.to_host(a), dtype=np.float64)


def run_engine(cfg, params, X, G, dtype, device, state=None):
    """Y, every gradient (and ∂X), the traces and the final state of one model, on the host."""
    model = ELM(cfg, params=params, dtype=dtype, device=device)
    xp = model.xp
    if state is not None:
        state = {k: xp.asarray(v, dtype=model.dtype) for k, v in state.items()}
    Y, cache = model._forward(model.prepare_input(X), state)
    out = {"Y": _host(model, Y)}
    grads = model.backward(xp.asarray(G), cache, input_grad=True)
    out.update({f"grad/{k}": _host(model, v) for k, v in grads.items()})
    out.update({f"state/{k}": _host(model, v) for k, v in cache["final_state"].items()})
    if state is None:
        _, traces = model.traces(X)
        out.update({f"trace/{k}": _host(model, v) for k, v in traces.items()})
    assert all(v.dtype == np.float64 for v in out.values())
    return out


def assert_same(got, ref, tol):
    assert set(got) == set(ref)
    errors = {k: relative_error(got[k], ref[k]) for k in ref}
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"arrays beyond {tol}: {bad}"


def _case(name, steps=None):
    case = load_oracle(os.path.join(GOLDEN_DIR, f"{name}.npz"))
    if steps is not None:
        case.X, case.G = case.X[:, :steps], case.G[:, :steps]
    return case


# ---- (a) oracle files --------------------------------------------------------------

SMALL_ORACLES = ["v1_basic", "v1_branch_neuronio_routing", "v2_random_routing"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", SMALL_ORACLES)
@on_cuda
def test_oracle_file_on_cuda(name, dtype):
    case = _case(name)
    got = run_engine(case.config, case.params, case.X, case.G, dtype, "cuda")
    oracle = {"Y": case.Y, **{f"grad/{k}": v for k, v in case.grads.items()},
              **{f"trace/{k}": v for k, v in case.traces.items()}}
    assert set(case.grads) >= {"X", "_proto_w_s", "w_y.weight"}
    assert_same({k: got[k] for k in oracle}, oracle, ORACLE_TOL[dtype])
    ref = run_engine(case.config, case.params, case.X, case.G, dtype, "cpu")
    assert_same(got, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@on_cuda
def test_long_horizon_truncated_matches_cpu(dtype):
    # T = 300 is too long for the simulator; the first steps exercise the same code.
    case = _case("v2_long_horizon", steps=40)
    ref = run_engine(case.config, case.params, case.X, case.G, dtype, "cpu")
    got = run_engine(case.config, case.params, case.X, case.G, dtype, "cuda")
    assert_same(got, ref, TOL[dtype])


# ---- (b) random tiny configurations ----------------------------------------------------

RANDOM_CASES = [(version, routing, layers)
                for version in ("elm_v1", "branch_elm_v2")
                for routing in (None, "random_routing", "neuronio_routing")
                for layers in (0, 1, 2)]


def _random_setup(seed, version, routing, layers, activation):
    rng = np.random.default_rng(seed)
    cfg = random_config(rng, version=version, routing=routing, layers=layers, activation=activation)
    cfg = cfg.replace(learn_memory_tau=True, num_memory=min(cfg.num_memory, 4),
                      mlp_hidden_size=min(cfg.hidden_size, 5))
    params = P.init_params(cfg, seed=seed, dtype=np.float64)
    # Some dead synapses (relu(w) = 0) and, in v1, uneven τ_s inside a branch: the per-synapse scan path.
    params["_proto_w_s"] = rng.uniform(-0.3, 1.0, cfg.num_synapse)
    if version == "elm_v1" and seed % 2:
        params["tau_s"] = rng.uniform(2.0, 8.0, cfg.num_synapse)
    B, T = 2, 5
    X = rng.normal(size=(B, T, cfg.num_input)) * (rng.random((B, T, cfg.num_input)) < 0.5)
    X[0, 1] = 0.0  # a step without any input
    G = rng.normal(size=(B, T, cfg.num_output))
    return cfg, params, X, G


@pytest.mark.parametrize("version,routing,layers", RANDOM_CASES,
                         ids=[f"{v}-{r or 'none'}-L{l}" for v, r, l in RANDOM_CASES])
@on_cuda
def test_random_config_matches_cpu(version, routing, layers):
    index = RANDOM_CASES.index((version, routing, layers))
    activation = ("relu", "silu")[index % 2]
    cfg, params, X, G = _random_setup(100 + index, version, routing, layers, activation)
    assert cfg.mlp_num_layers == layers and cfg.mlp_activation == activation
    ref = run_engine(cfg, params, X, G, "float64", "cpu")
    got = run_engine(cfg, params, X, G, "float64", "cuda")
    assert "grad/_proto_tau_m" in got and "grad/X" in got
    assert_same(got, ref, TOL["float64"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@on_cuda
def test_streaming_state_matches_cpu(dtype):
    # A nonzero starting state exercises u0 in the scan and m0 in both recurrence kernels.
    cfg, params, X, G = _random_setup(7, "elm_v1", "neuronio_routing", 2, "silu")
    rng = np.random.default_rng(3)
    zero = ELM(cfg, params=params, dtype=dtype).init_state(2)
    assert zero["u"].shape[1] == cfg.num_synapse  # uneven τ_s: one scan channel per synapse
    state = {k: rng.normal(size=v.shape) for k, v in zero.items()}
    ref = run_engine(cfg, params, X, G, dtype, "cpu", state)
    got = run_engine(cfg, params, X, G, dtype, "cuda", state)
    assert_same(got, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@on_cuda
def test_one_byte_spike_input_matches_cpu(dtype):
    # ±1 spikes as int8 (and bool) reach the routing kernels without a float copy.
    cfg, params, X, G = _random_setup(13, "elm_v1", "neuronio_routing", 1, "silu")
    spikes = (np.sign(X)).astype(np.int8)
    ref = run_engine(cfg, params, spikes, G, dtype, "cpu")
    got = run_engine(cfg, params, spikes, G, dtype, "cuda")
    assert_same(got, ref, TOL[dtype])
    assert_same(run_engine(cfg, params, spikes != 0, G, dtype, "cuda"),
                run_engine(cfg, params, spikes != 0, G, dtype, "cpu"), TOL[dtype])


@on_cuda
def test_chunked_stream_on_cuda_equals_one_pass():
    cfg, params, X, _ = _random_setup(11, "branch_elm_v2", "random_routing", 1, "relu")
    model = ELM(cfg, params=params, dtype="float64", device="cuda")
    full = model.forward(X)
    y1, state = model.run(X[:, :2], model.init_state(2))
    y2, _ = model.run(X[:, 2:], state)
    assert relative_error(np.concatenate([y1, y2], axis=1), full) < 1e-13


# ---- (c) the kernels one by one -------------------------------------------------------------

def _kernels():
    from elmcore.kernels import cpu
    from elmcore.kernels import cuda as gpu
    return cpu, gpu


def _device_xp():
    """The array module the CUDA kernels take here: CuPy on a real GPU, NumPy under the simulator."""
    if REAL_GPU:
        import cupy
        return cupy
    return np


def _to_host(a):
    return a if isinstance(a, np.ndarray) else a.get()


def _routing(rng, D, S, spc):
    """A CSR over inputs as Routing.build makes it, with an input that feeds nothing."""
    idx = rng.integers(1, D, S)
    keep = np.nonzero(rng.random(S) < 0.85)[0]
    order = keep[np.argsort(idx[keep], kind="stable")]
    counts = np.bincount(idx[order], minlength=D)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indptr, order.astype(np.int64), S // spc


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("spc", [1, 3])
@on_cuda
def test_routing_kernels_match_cpu(dtype, spc):
    cpu, gpu = _kernels()
    rng = np.random.default_rng(spc)
    B, T, D, S = 2, 4, 5, 6
    indptr, entry_syn, C = _routing(rng, D, S, spc)
    assert indptr[1] == 0  # input 0 feeds no synapse
    E = entry_syn.size
    w = rng.uniform(0.1, 1.0, E).astype(dtype)
    mask = rng.choice([0.0, 1.0, 0.5], E).astype(dtype)
    X = (rng.normal(size=(B, T, D)) * (rng.random((B, T, D)) < 0.5)).astype(dtype)
    dA = rng.normal(size=(B, T, C)).astype(dtype)
    tol = TOL[np.dtype(dtype).name]
    outs = {}
    for name, k, xp in (("cpu", cpu, np), ("cuda", gpu, _device_xp())):
        X_, indptr_, syn_, w_, mask_, dA_ = (xp.asarray(a) for a in (X, indptr, entry_syn, w, mask, dA))
        A = xp.full((B, T, C), np.nan, dtype)  # every element must be written
        part = xp.full((B, S), np.nan, dtype)
        dX = xp.full((B, T, D), np.nan, dtype)
        k.route_forward(X_, indptr_, syn_, w_, spc, A)
        k.route_weight_grad(X_, indptr_, syn_, mask_, spc, dA_, part)
        k.route_input_grad(dA_, indptr_, syn_, w_, spc, dX)
        outs[name] = {key: _to_host(v) for key, v in dict(A=A, part=part, dX=dX).items()}
    for key, ref in outs["cpu"].items():
        got = outs["cuda"][key]
        assert got.dtype == dtype and np.all(np.isfinite(got)), key
        assert relative_error(got, ref) <= tol, key


ROUTE_GRAD_INPUTS = [  # (fraction of non-zero inputs, input dtype)
    (0.01, "float"), (0.01, "uint8"), (1.0, "float")]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("density,x_kind", ROUTE_GRAD_INPUTS,
                         ids=[f"{'sparse' if d < 1 else 'dense'}-{k}" for d, k in ROUTE_GRAD_INPUTS])
@on_cuda
def test_route_weight_grad_on_sparse_and_dense_time_blocks(dtype, density, x_kind):
    # route_weight_grad tests four steps at a time: T = 23 leaves a tail of three, and the forced
    # spikes sit at either end of a group and in the tail of a time block of a longer input.
    cpu, gpu = _kernels()
    rng = np.random.default_rng(int(density * 100))
    B, T, D, S, spc = 2, 23, 7, 12, 3
    indptr, entry_syn, C = _routing(rng, D, S, spc)
    fed = np.nonzero(np.diff(indptr))[0]
    # inputs feeding several synapses, one synapse (a register sum) and none
    assert np.diff(indptr).max() > 1 and 1 in np.diff(indptr) and indptr[1] == 0
    mask = rng.uniform(0.5, 1.0, entry_syn.size).astype(dtype)
    values = rng.integers(1, 4, (B, T + 5, D)) if x_kind == "uint8" else rng.normal(size=(B, T + 5, D))
    X_long = values * (rng.random((B, T + 5, D)) < density)
    single = np.nonzero(np.diff(indptr) == 1)[0][0]
    X_long[0, 2 + 0, fed[0]] = X_long[1, 2 + 7, fed[-1]] = X_long[1, 2 + T - 1, fed[0]] = 2
    X_long[0, 2 + 4, single] = X_long[1, 2 + T - 2, single] = 3
    X_long = X_long.astype(np.uint8 if x_kind == "uint8" else dtype)
    dA = rng.normal(size=(B, T, C)).astype(dtype)
    xp = _device_xp()
    ref = np.full((B, S), np.nan, dtype)
    X = np.ascontiguousarray(X_long[:, 2:2 + T])  # as segments.block_view hands a block over
    cpu.route_weight_grad(X, indptr, entry_syn, mask, spc, dA, ref)
    got = xp.full((B, S), np.nan, dtype)
    gpu.route_weight_grad(xp.asarray(X), *(xp.asarray(a) for a in (indptr, entry_syn, mask)), spc,
                          xp.asarray(dA), got)
    got = _to_host(got)
    assert got.dtype == dtype and np.all(np.isfinite(got))
    # Synapses that no non-zero input reached stay exactly zero; the others match the CPU's sums.
    assert np.array_equal(got == 0, ref == 0) and np.count_nonzero(ref) >= 3
    assert relative_error(got, ref) <= TOL[np.dtype(dtype).name]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@on_cuda
def test_scan_kernels_match_cpu_in_place_and_from_u0(dtype):
    cpu, gpu = _kernels()
    rng = np.random.default_rng(5)
    B, T, C = 2, 6, 3
    A = rng.normal(size=(B, T, C)).astype(dtype)
    kappa = rng.uniform(0.2, 0.95, C).astype(dtype)
    u0 = rng.normal(size=(B, C)).astype(dtype)
    tol = TOL[np.dtype(dtype).name]
    xp = _device_xp()
    kappa_, u0_ = xp.asarray(kappa), xp.asarray(u0)
    U_ref, U_got = np.empty_like(A), xp.array(A)
    cpu.scan_forward(A, kappa, u0, U_ref)
    gpu.scan_forward(U_got, kappa_, u0_, U_got)  # in place, as the model calls it
    assert relative_error(_to_host(U_got), U_ref) <= tol
    dA_ref, dA_got = np.empty_like(A), xp.array(A)
    dA_next = rng.normal(size=(B, C)).astype(dtype)  # the adjoint from a later segment
    cpu.scan_backward(A, kappa, dA_next, dA_ref)
    gpu.scan_backward(dA_got, kappa_, xp.asarray(dA_next), dA_got)
    assert relative_error(_to_host(dA_got), dA_ref) <= tol


def _recurrence_inputs(rng, dtype, B, T, Dm, H, L):
    W0 = H if L else Dm
    def f(*s):
        return rng.normal(scale=0.6, size=s).astype(dtype)

    return dict(Zb=f(B, T, W0), W0m=f(W0, Dm), Wh=f(max(L - 1, 0), H, H), ch=f(max(L - 1, 0), H),
                Wo=f(Dm, H) if L else np.zeros((1, 1), dtype), co=f(Dm),
                kappa_m=rng.uniform(0.3, 0.99, Dm).astype(dtype), c_m=rng.uniform(0.1, 2, Dm).astype(dtype),
                m0=f(B, Dm), dM=f(B, T, Dm),
                # A later segment's adjoint and sums so far: the backward adds to them.
                carry=f(B, Dm), gk=f(B, Dm), gc=f(B, Dm))


def _run_recurrence(k, inp, activation, L, H, tile=2, xp=np):
    """Forward then backward through kernel module ``k`` on ``xp`` arrays; outputs on the host."""
    inp = {key: xp.asarray(v) for key, v in inp.items()}
    B, T, _ = inp["Zb"].shape
    Dm = inp["kappa_m"].shape[0]
    dt = inp["Zb"].dtype
    scale, slope = dt.type(P.PHI_SCALE), dt.type(P.PHI_SLOPE)
    M, DM, Z = (xp.full(s, np.nan, dt) for s in ((B, T, Dm), (B, T, Dm), (L, B, T, H)))
    WhT = xp.ascontiguousarray(inp["Wh"].transpose(0, 2, 1))
    WoT = xp.ascontiguousarray(inp["Wo"].T)
    KM = xp.full((B, T, Dm + 1), np.nan, dt)[:, :, 1:]  # a strided view, as the model passes it
    forward_plan = k.recur_forward(inp["Zb"], xp.ascontiguousarray(inp["W0m"].T), WhT, inp["ch"], WoT, inp["co"],
                                   inp["kappa_m"], inp["c_m"], inp["m0"], activation, scale, slope, tile, M, Z,
                                   DM, KM)
    dZ, dO, A = (xp.full(s, np.nan, dt) for s in ((L, B, T, H), (B, T, Dm), (L, B, T, H)))
    gk, gc, carry = inp["gk"].copy(), inp["gc"].copy(), inp["carry"].copy()
    backward_plan = k.recur_backward(inp["dM"], inp["W0m"], inp["Wh"], inp["Wo"], inp["kappa_m"], inp["c_m"],
                                     inp["m0"], M, Z, DM, activation, scale, slope, tile, carry, dZ, dO, gk, gc, A)
    outputs = {key: _to_host(v) for key, v in dict(M=M, DM=DM, Z=Z, KM=KM, dZ=dZ, dO=dO, gk=gk, gc=gc,
                                                    A=A, carry=carry).items()}
    return outputs, (forward_plan, backward_plan)


RECURRENCE_CASES = [  # (L, activation, rows per block, weights in shared memory)
    (0, "relu", 2, True), (0, "silu", 1, False), (1, "relu", 3, True), (1, "silu", 2, False),
    (2, "silu", 2, True), (2, "relu", 1, False), (3, "silu", 3, True), (3, "relu", 2, False)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("L,activation,rows,in_shared", RECURRENCE_CASES,
                         ids=[f"L{c[0]}-{c[1]}-R{c[2]}-{'shared' if c[3] else 'global'}"
                              for c in RECURRENCE_CASES])
@on_cuda
def test_recurrence_kernels_match_cpu(dtype, L, activation, rows, in_shared, monkeypatch):
    cpu, gpu = _kernels()
    # B = 3 with 2 rows per block leaves an idle row in the last block.
    monkeypatch.setattr(gpu, "policy", gpu.LaunchPolicy(weights_in_shared=in_shared))
    rng = np.random.default_rng(10 * L + rows)
    B, T, Dm, H = 3, 5, 3, 4
    inp = _recurrence_inputs(rng, dtype, B, T, Dm, H, L)
    ref, _ = _run_recurrence(cpu, inp, activation_code(activation), L, H, tile=1)
    got, plans = _run_recurrence(gpu, inp, activation_code(activation), L, H, tile=rows, xp=_device_xp())
    assert all(p.weights_in_shared is in_shared and p.rows_per_block == rows for p in plans)
    tol = TOL[np.dtype(dtype).name]
    for key in ref:
        assert got[key].dtype == dtype and np.all(np.isfinite(got[key])), key
        assert relative_error(got[key], ref[key]) <= tol, key


@pytest.mark.parametrize("L", [0, 1, 2])
@on_cuda
def test_recurrence_threads_walking_several_units(L, monkeypatch):
    # Layers wider than the block's unit threads are walked by the kernels' stride loops.
    cpu, gpu = _kernels()
    cap, Dm, H = (2, 3, 5) if gpu.SIMULATOR else (32, 35, 70)
    monkeypatch.setattr(gpu, "_MAX_RECURRENCE_THREADS", cap)
    inp = _recurrence_inputs(np.random.default_rng(L), np.float64, 2, 4, Dm, H, L)
    ref, _ = _run_recurrence(cpu, inp, ACT_SILU, L, H, tile=1)
    got, plans = _run_recurrence(gpu, inp, ACT_SILU, L, H, tile=2, xp=_device_xp())
    assert all(p.unit_threads == cap and p.rows_per_block == 1 for p in plans)
    for key in ref:
        assert relative_error(got[key], ref[key]) <= TOL["float64"], key


SPLIT_OUTPUT_SHAPES = [  # (L, Dm, H, dtype): the forward's row has >= 2·Dm unit threads
    (1, 2, 5, np.float64),  # 5 threads: 2 + 2 sum halves of lengths 2 and 3, one thread idle
    (2, 3, 6, np.float32),  # 6 threads, all busy
    (3, 2, 7, np.float64),
]


@pytest.mark.parametrize("L,Dm,H,dtype", SPLIT_OUTPUT_SHAPES,
                         ids=[f"L{c[0]}-Dm{c[1]}-H{c[2]}" for c in SPLIT_OUTPUT_SHAPES])
@on_cuda
def test_recurrence_output_layer_split_over_two_threads(L, Dm, H, dtype):
    # With twice as many unit threads as memory units, recur_forward sums each output's dot in two
    # halves on two threads (an extra barrier between them); 3 rows in tiles of 2 leave an idle row.
    cpu, gpu = _kernels()
    inp = _recurrence_inputs(np.random.default_rng(Dm * H + L), dtype, 3, 4, Dm, H, L)
    ref, _ = _run_recurrence(cpu, inp, ACT_SILU, L, H, tile=1)
    got, (forward_plan, _) = _run_recurrence(gpu, inp, ACT_SILU, L, H, tile=2, xp=_device_xp())
    assert forward_plan.unit_threads >= 2 * Dm and forward_plan.rows_per_block == 2
    for key in ref:
        assert got[key].dtype == dtype and np.all(np.isfinite(got[key])), key
        assert relative_error(got[key], ref[key]) <= TOL[np.dtype(dtype).name], key


@on_cuda
def test_recurrence_tile_is_capped_by_the_batch_and_four_rows():
    _, gpu = _kernels()
    inp = _recurrence_inputs(np.random.default_rng(0), np.float64, 3, 2, 2, 3, 1)
    for tile, rows, blocks in ((2, 2, 2), (9, 3, 1), (1, 1, 3)):
        _, plans = _run_recurrence(gpu, inp, ACT_RELU, 1, 3, tile=tile, xp=_device_xp())
        assert all((p.rows_per_block, p.blocks) == (rows, blocks) for p in plans)
    if gpu.SIMULATOR:  # always 2 rows, so that tests meet multi-row tiles
        assert gpu.batch_tile(1) == gpu.batch_tile(1000) == 2
    else:  # one row per block until every multiprocessor has a block, then up to 4
        assert (gpu.batch_tile(1), gpu.batch_tile(1000)) == (1, 4)


def test_plan_puts_weights_in_global_memory_when_they_do_not_fit():
    from elmcore.kernels import cuda as gpu
    H200 = (132, 227 * 1024)  # multiprocessors, opt-in shared bytes per block
    # d_m = 150, h = 300, float32: the two big matrices alone are 360 KB.
    big = gpu.plan_recurrence(64, 1, 300, 2 * 150 + 2 * 300, 2 * 150 * 300 + 300 + 150, 4, limits=H200)
    assert not big.weights_in_shared and big.shared_bytes <= H200[1]
    # d_m = 100, h = 200 (the official model's size): 160 KB of weights stay on chip.
    small = gpu.plan_recurrence(64, 1, 200, 2 * 100 + 2 * 200, 2 * 100 * 200 + 200 + 100, 4, limits=H200)
    assert small.weights_in_shared and small.shared_bytes <= H200[1]
    assert small.rows_per_block * small.unit_threads <= 512
    with pytest.raises(ELMError, match="shared memory"):
        gpu.plan_recurrence(4, 1, 64, 100_000, 10, 8, limits=H200)


@on_cuda
def test_simulator_leaves_cpu_kernels_compiled():
    # NUMBA_ENABLE_CUDASIM swaps numba.cuda only: the @njit CPU kernels stay machine code.
    from numba.core.registry import CPUDispatcher
    cpu, _ = _kernels()
    for name in ("_route_forward", "_route_weight_grad", "scan_forward", "_recur_forward", "recur_backward"):
        assert isinstance(getattr(cpu, name), CPUDispatcher), name


# ---- (d) backend selection and the missing-GPU message -----------------------------------

_PROBE = textwrap.dedent("""
    import json, sys, types
    scenario = sys.argv[1]
    from numba import cuda
    if scenario != "plain":
        cuda.is_available = lambda: True
    if scenario == "no_cupy":
        sys.modules["cupy"] = None
    elif scenario in ("no_device", "zero_devices", "old_driver", "wrong_result", "gpu_slot"):
        def count():
            if scenario == "no_device":
                raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
            return {"zero_devices": 0, "gpu_slot": 2}.get(scenario, 1)
        used = []
        fake = types.ModuleType("cupy")
        fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count),
                                          Device=lambda i: types.SimpleNamespace(use=lambda: used.append(i)))
        sys.modules["cupy"] = fake
    if scenario == "gpu_slot":  # sweep worker 3 on a node with 2 GPUs: GPU 1, for CuPy and Numba alike
        import os
        os.environ["ELMCORE_GPU_SLOT"] = "3"
    if scenario in ("old_driver", "wrong_result", "gpu_slot"):
        cuda.select_device = lambda i: used.append(("numba", i))
        import elmcore.engine.cuda_backend as cb
        def launch():  # what numba-cuda raises when the driver is older than the PTX
            if scenario == "wrong_result":
                return 0
            if scenario == "gpu_slot":
                return 1
            raise RuntimeError("[222] Call to cuModuleLoadDataEx results in CUDA_ERROR_UNSUPPORTED_PTX_VERSION")
        cb._launch_probe_kernel = launch
    from elmcore import ELM, ELMConfig, ELMError
    from elmcore.engine.backend import get_backend
    from elmcore.engine import cuda_backend
    from elmcore.engine.cuda_backend import cuda_problem
    out = {"problem": cuda_problem(), "numba_sees_gpu": bool(cuda.is_available())}
    if scenario == "gpu_slot":
        print(json.dumps({"problem": out["problem"], "selected": cuda_backend.selected_gpu, "used": used}))
        sys.exit()
    try:
        ELM(ELMConfig(num_input=2, num_output=1, num_memory=2), device="cuda")
        out["construct"] = "ok"
    except ELMError as e:
        out["construct"] = str(e)
    out["auto"] = get_backend("auto").name
    print(json.dumps(out))
""")


@functools.lru_cache(maxsize=None)
def _probe(scenario):
    env = {k: v for k, v in os.environ.items() if k != SIM_ENV}
    proc = subprocess.run([sys.executable, "-c", _PROBE, scenario], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@parent_only
def test_cuda_problem_without_simulator_names_what_is_missing():
    out = _probe("plain")
    if out["problem"] is None:  # a machine with a GPU, numba-cuda and CuPy
        assert out["construct"] == "ok" and out["auto"] == "cuda"
        return
    if not out["numba_sees_gpu"]:
        assert "driver" in out["problem"]
    assert out["construct"] == f"--device cuda: {out['problem']}"
    assert out["auto"] == "cpu"


@parent_only
@pytest.mark.parametrize("scenario,expected", [
    ("no_cupy", "CuPy is not installed"),
    ("no_device", "cudaErrorNoDevice"),
    ("zero_devices", "CuPy finds no CUDA device"),
    ("old_driver", "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"),
    ("wrong_result", "wrote 0, not 1"),
])
def test_cuda_problem_probes_cupy(scenario, expected):
    out = _probe(scenario)
    assert out["problem"] is not None and expected in out["problem"]
    if scenario == "old_driver":  # one sentence naming the mismatch, not just numba's error code
        assert "driver is likely older than the PTX" in out["problem"] and "\n" not in out["problem"]
    assert out["construct"] == f"--device cuda: {out['problem']}"
    assert out["auto"] == "cpu"


@parent_only
def test_cuda_problem_selects_the_gpu_of_this_process_slot_before_launching():
    out = _probe("gpu_slot")
    assert out == {"problem": None, "selected": 1, "used": [1, ["numba", 1]]}


@on_cuda
def test_backend_under_simulator_or_gpu():
    model = ELM(ELMConfig(num_input=2, num_output=1, num_memory=2), device="cuda")
    assert model.backend.name == "cuda"
    assert (model.xp is np) == model.backend.kernels.SIMULATOR
    host = model.backend.to_host(model.xp.ones(3))
    assert isinstance(host, np.ndarray) and host.tolist() == [1.0, 1.0, 1.0]


# ---- real GPU only -------------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["official_best_elm_neuron", "v2_long_horizon"])
def test_gpu_large_oracles(name, dtype):
    case = _case(name)
    results = dict(verify_case(case, dtype=dtype, device="cuda"))
    bad = {k: e for k, e in results.items() if not e <= ORACLE_TOL[dtype]}
    assert not bad, bad
    ref = run_engine(case.config, case.params, case.X, case.G, dtype, "cpu")
    got = run_engine(case.config, case.params, case.X, case.G, dtype, "cuda")
    assert_same(got, ref, TOL[dtype] * (1 if dtype == "float64" else 10))


@on_gpu
@pytest.mark.parametrize("num_memory,hidden,in_shared", [(100, 200, True), (150, 300, False)])
def test_gpu_recurrence_placement_and_values(num_memory, hidden, in_shared):
    cpu, gpu = _kernels()
    import cupy
    rng = np.random.default_rng(1)
    inp = _recurrence_inputs(rng, np.float32, 64, 20, num_memory, hidden, 1)
    inp = {k: v * (0.2 if k in ("W0m", "Wo") else 1) for k, v in inp.items()}
    ref, _ = _run_recurrence(cpu, inp, ACT_SILU, 1, hidden, tile=1)
    got, plans = _run_recurrence(gpu, inp, ACT_SILU, 1, hidden, tile=gpu.batch_tile(64), xp=cupy)
    # The forward's weights decide the placement (the backward has more per-row state).
    assert plans[0].weights_in_shared is in_shared
    for key in ref:
        assert relative_error(got[key], ref[key]) <= 1e-4, key


@on_gpu
def test_gpu_non_default_cupy_stream():
    import cupy
    case = _case("v1_branch_neuronio_routing")
    ref = run_engine(case.config, case.params, case.X, case.G, "float64", "cpu")
    with cupy.cuda.Stream(non_blocking=True):
        got = run_engine(case.config, case.params, case.X, case.G, "float64", "cuda")
    assert_same(got, ref, TOL["float64"])
