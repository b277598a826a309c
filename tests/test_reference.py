"""Rung 1b of the verification ladder (docs/architecture.md §4): the plain NumPy reference
(``elmcore.verification.reference``) against the oracle files and finite differences, and every
kernel path (CPU; CUDA under the simulator) against the reference to 1e-12 in float64.

The CUDA checks run where CUDA is usable (a real GPU, or a process started with
``NUMBA_ENABLE_CUDASIM=1``). Elsewhere ``test_simulator_runs_the_cuda_checks`` runs them in one
child pytest process with the simulator on, as tests/test_network_cuda.py does, because Numba
reads the variable once, when ``numba.cuda`` is first imported.
"""

import os
import zlib

import numpy as np
import pytest

from elmcore.kernels.pointwise import ACTIVATIONS
from elmcore import ELM, ELMError, ELMNetwork
from elmcore.network import params as NP
from elmcore.neuron import params as P
from elmcore.verification import reference
from elmcore.verification.gradcheck import (GradcheckRow, passes, random_network_test_params,
                                            random_test_params)
from elmcore.verification.oracle import TOLERANCE, load_oracle, relative_error
from elmcore.verification.reference import network as reference_network
from elmcore.verification.reference import neuron as reference_neuron
from helpers import CUDA_HERE, GOLDEN_DIR, golden_files, needs_cuda, random_config, run_under_simulator
from test_network import random_network_config

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN_NETWORK_DIR = os.path.join(HERE, "data", "golden_network")
ORACLES = golden_files() + sorted(os.path.join(GOLDEN_NETWORK_DIR, f) for f in os.listdir(GOLDEN_NETWORK_DIR)
                                  if f.endswith(".npz"))
ORACLE_IDS = [os.path.basename(p)[:-4] for p in ORACLES]


# Kernel ↔ reference in float64: the same formulas summed in another order.
KERNEL_TOL = 1e-12
FD_TOLERANCE = 1e-6


def _oracle_errors(case):
    """{array name: relative error} of the reference against one oracle file."""
    Y, trace = reference.forward(case.config, case.params, case.X)
    grads = reference.backward(case.config, case.params, trace, case.G)
    errors = {"Y": relative_error(Y, case.Y), "loss": relative_error(float((Y * case.G).sum()), case.loss)}
    errors.update({f"grad/{k}": relative_error(grads[k], v) if k in grads else float("inf")
                   for k, v in case.grads.items()})
    errors.update({f"trace/{k}": relative_error(trace[k], v) if k in trace else float("inf")
                   for k, v in case.traces.items()})
    return errors


# ---- (1) the oracle files ---------------------------------------------------------------------------

def test_every_oracle_file_is_checked():
    assert {"v1_basic", "v1_branch_neuronio_routing", "v2_random_routing", "v2_long_horizon",
            "official_best_elm_neuron", "net_basic", "net_silu_deep_learned_tau", "net_two_layers"} <= set(ORACLE_IDS)


@pytest.mark.parametrize("path", ORACLES, ids=ORACLE_IDS)
def test_reference_reproduces_the_oracle_file(path):
    case = load_oracle(path)
    errors = _oracle_errors(case)
    # Y, loss, every gradient in the file (X included) and every trace.
    assert len(errors) == 2 + len(case.grads) + len(case.traces) and "X" in case.grads and case.traces
    bad = {k: e for k, e in errors.items() if not e <= TOLERANCE["float64"]}
    assert not bad, bad
    assert max(errors.values()) < 1e-10


@pytest.mark.parametrize("path", ORACLES, ids=ORACLE_IDS)
def test_reference_returns_the_models_gradient_keys(path):
    case = load_oracle(path)
    _, trace = reference.forward(case.config, case.params, case.X)
    grads = reference.backward(case.config, case.params, trace, case.G)
    family = NP if case.config.is_network else P
    assert list(grads) == family.trainable_keys(case.config) + ["X"]
    assert set(grads) == set(case.grads)


# ---- (2) finite differences in float64 ---------------------------------------------------------------

def _fd_rows(config, params, X, G, state, rng, eps=1e-6, max_entries=8):
    """Central differences of loss = Σ Y ⊙ G through the reference, for sampled entries of every
    trainable tensor, X and every initial-state array, against its analytic gradients."""
    Y, trace = reference.forward(config, params, X, state)
    grads = reference.backward(config, params, trace, G)
    analytic = dict(grads)
    analytic.update({f"state0/{k}": v for k, v in trace["adjoint_state0"].items()})
    noise = 4 * np.finfo(np.float64).eps * float(np.abs(Y * G).sum()) / eps
    params = {k: np.array(v) for k, v in params.items()}
    X = np.array(X, dtype=np.float64)
    state = {k: np.array(v) for k, v in state.items()}
    targets = [(k, params[k]) for k in grads if k != "X"] + [("X", X)] + \
        [(f"state0/{k}", v) for k, v in state.items()]
    assert {name for name, _ in targets} == set(analytic)
    rows = []
    for name, arr in targets:
        flat = arr.reshape(-1)
        picks = np.arange(flat.size) if flat.size <= max_entries else rng.choice(flat.size, max_entries, replace=False)
        numeric = np.empty(len(picks))
        for n, i in enumerate(picks):
            keep = flat[i]
            flat[i] = keep + eps
            up = float((reference.forward(config, params, X, state)[0] * G).sum())
            flat[i] = keep - eps
            down = float((reference.forward(config, params, X, state)[0] * G).sum())
            flat[i] = keep
            numeric[n] = (up - down) / (2 * eps)
        diff = float(np.abs(analytic[name].reshape(-1)[picks] - numeric).max())
        scale = float(np.abs(numeric).max())
        rows.append(GradcheckRow(name, arr.shape, len(picks), diff, scale, diff / max(scale, 1e-300), noise))
    return rows


def _random_state(config, batch, rng):
    return {k: rng.normal(size=v.shape) for k, v in reference.zero_state(config, batch).items()}


@pytest.mark.parametrize("seed", range(12))
def test_reference_gradients_match_finite_differences_single_neuron(seed):
    rng = np.random.default_rng(500 + seed)
    cfg = random_config(rng, version=("elm_v1", "branch_elm_v2")[seed % 2], layers=seed % 4,
                        activation=("relu", "silu")[seed // 4 % 2]).replace(learn_memory_tau=True)
    params = random_test_params(cfg, rng, nonuniform_tau_s=seed % 3 == 0)
    B, T = 1 + seed % 3, 1 + seed % 6
    X = rng.normal(size=(B, T, cfg.num_input))
    G = rng.normal(size=(B, T, cfg.num_output))
    rows = _fd_rows(cfg, params, X, G, _random_state(cfg, B, rng), rng)
    bad = [r for r in rows if not passes(r, FD_TOLERANCE)]
    assert not bad, bad


@pytest.mark.parametrize("seed", range(8))
def test_reference_gradients_match_finite_differences_network(seed):
    rng = np.random.default_rng(600 + seed)
    cfg = random_network_config(rng, num_layers=1 + seed % 2, recurrent_fraction=(0.0, 0.25, 0.5, 1.0)[seed % 4],
                                mlp_num_layers=seed % 3, mlp_activation=("relu", "silu")[seed // 2 % 2],
                                learn_memory_tau=True)
    params = random_network_test_params(cfg, rng)
    B, T = 1 + seed % 3, 1 + seed % 5
    X = rng.normal(size=(B, T, cfg.num_input))
    G = rng.normal(size=(B, T, cfg.num_output))
    rows = _fd_rows(cfg, params, X, G, _random_state(cfg, B, rng), rng)
    bad = [r for r in rows if not passes(r, FD_TOLERANCE)]
    assert not bad, bad


def test_adjoint_m_is_the_gradient_of_the_memory_at_each_step():
    """∂loss/∂m_t = W_yᵀ dY_t + ∂(loss of the later steps)/∂m_t, the latter the initial-state adjoint
    of the same model run on the rest of the sequence from the state after step t (FD-checked above)."""
    rng = np.random.default_rng(3)
    for version in ("elm_v1", "branch_elm_v2"):
        cfg = random_config(rng, version=version, layers=2)
        params = random_test_params(cfg, rng)
        X, G = rng.normal(size=(2, 5, cfg.num_input)), rng.normal(size=(2, 5, cfg.num_output))
        _, trace = reference.forward(cfg, params, X)
        reference.backward(cfg, params, trace, G)
        scan = "b" if cfg.is_v2 else "s"
        assert trace["adjoint_m"].shape == trace["m"].shape and trace["adjoint_" + scan].shape == trace[scan].shape
        for t in range(5):
            later = np.zeros(trace["m"][:, t].shape)
            if t < 4:
                state = {"m": trace["m"][:, t], scan: trace[scan][:, t]}
                _, tail = reference.forward(cfg, params, X[:, t + 1:], state)
                reference.backward(cfg, params, tail, G[:, t + 1:])
                later = tail["adjoint_state0"]["m"]
            expected = G[:, t] @ params["w_y.weight"] + later
            assert relative_error(trace["adjoint_m"][:, t], expected) < 1e-13, (version, t)


@pytest.mark.parametrize("layers", [1, 2])
def test_network_adjoints_are_the_gradients_of_o_and_m_at_each_step(layers):
    """Per layer, ∂loss/∂o_t = (what step t's readout or next layer sends) + ∂(loss of later steps)/∂o_t,
    and ∂loss/∂m_t = w_o ⊙ ∂loss/∂o_t + ∂(loss of later steps)/∂m_t."""
    rng = np.random.default_rng(40 + layers)
    cfg = random_network_config(rng, num_layers=layers, recurrent_fraction=0.5, mlp_num_layers=1, num_neurons=3)
    params = random_network_test_params(cfg, rng)
    T = 4
    X, G = rng.normal(size=(2, T, cfg.num_input)), rng.normal(size=(2, T, cfg.num_output))
    _, trace = reference.forward(cfg, params, X)
    reference.backward(cfg, params, trace, G)
    for t in range(T):
        if t < T - 1:
            state = {k: trace[k][:, t] for k in reference.zero_state(cfg, 2)}
            _, tail = reference.forward(cfg, params, X[:, t + 1:], state)
            reference.backward(cfg, params, tail, G[:, t + 1:])
            later = tail["adjoint_state0"]
        else:
            later = {k: 0.0 for k in trace["state0"]}
        for layer in range(layers):
            pre = NP.layer_prefix(layer)
            direct = G[:, t] @ params["readout.weight"] if layer == layers - 1 else \
                trace[NP.layer_prefix(layer + 1) + "adjoint_x"][:, t]
            adjoint_o = direct + later[pre + "o"]
            assert relative_error(trace[pre + "adjoint_o"][:, t], adjoint_o) < 1e-13, (layer, t)
            adjoint_m = params[pre + "w_o.weight"] * adjoint_o[:, :, None] + later[pre + "m"]
            assert relative_error(trace[pre + "adjoint_m"][:, t], adjoint_m) < 1e-13, (layer, t)


# ---- (3) every kernel path equals the reference --------------------------------------------------------

def _branch_sums(cfg, s):
    return s.reshape(s.shape[0], cfg.branches, cfg.num_synapse_per_branch).sum(-1)


def _engine_state(model, state):
    """The reference's initial state in the model's layout (``init_state``)."""
    cfg, xp = model.config, model.xp
    if cfg.is_network:
        def stack(name, minor):
            layers = [state[NP.layer_prefix(layer) + name] for layer in range(cfg.num_layers)]
            return np.stack([a.transpose(0, 2, 1) if minor else a for a in layers])
        host = {"b": stack("b", True), "m": stack("m", True), "o": stack("o", False)}
    elif cfg.is_v2:
        host = {"u": state["b"], "m": state["m"]}
    else:  # one scan channel per synapse, or per branch where τ_s is uniform inside it (then only the sum matters)
        host = {"u": state["s"] if model._per_synapse_scan else _branch_sums(cfg, state["s"]), "m": state["m"]}
    # contiguous, as ``run`` hands a state to the kernels
    return {k: xp.ascontiguousarray(xp.asarray(v, dtype=model.dtype)) for k, v in host.items()}


def _engine_run(cfg, params, X, G, device, state=None):
    """Y, every gradient (and X's) and, from the zero state, the traces of the model on ``device``."""
    model = (ELMNetwork if cfg.is_network else ELM)(cfg, params=params, dtype="float64", device=device)
    host = model.backend.to_host
    Y, cache = model._forward(model.prepare_input(X), None if state is None else _engine_state(model, state))
    out = {"Y": np.asarray(host(Y))}
    out.update({f"grad/{k}": np.asarray(host(v)) for k, v in model.backward(G, cache, input_grad=True).items()})
    if state is None:
        _, traces = model.traces(X)
        out.update({f"trace/{k}": np.asarray(host(v)) for k, v in traces.items()})
    return out, model, cache


def _reference_run(cfg, params, X, G, state=None, trace_keys=()):
    Y, trace = reference.forward(cfg, params, X, state)
    out = {"Y": Y}
    out.update({f"grad/{k}": v for k, v in reference.backward(cfg, params, trace, G).items()})
    out.update({f"trace/{k}": trace[k] for k in trace_keys})
    return out


def _assert_engine_equals_reference(cfg, params, X, G, device, state=None):
    got, model, cache = _engine_run(cfg, params, X, G, device, state)
    ref = _reference_run(cfg, params, X, G, state, [k[6:] for k in got if k.startswith("trace/")])
    assert set(got) == set(ref)
    errors = {k: relative_error(got[k], ref[k]) for k in ref}
    bad = {k: e for k, e in errors.items() if not e <= KERNEL_TOL}
    assert not bad, f"{device} beyond {KERNEL_TOL} of the reference: {bad}"
    return model, cache


AXES = [(version, routing, layers, activation) for version in ("elm_v1", "branch_elm_v2")
        for routing in (None, "random_routing", "neuronio_routing") for layers in (0, 1, 2, 3)
        for activation in ACTIVATIONS]


def _neuron_setup(seed, version, routing, layers, activation, per_synapse=False, batch=3, steps=6, **shape):
    rng = np.random.default_rng(seed)
    cfg = random_config(rng, version=version, routing=routing, layers=layers, activation=activation)
    cfg = cfg.replace(learn_memory_tau=True, **shape)
    params = random_test_params(cfg, rng, nonuniform_tau_s=per_synapse)
    X = rng.normal(size=(batch, steps, cfg.num_input)) * (rng.random((batch, steps, cfg.num_input)) < 0.6)
    G = rng.normal(size=(batch, steps, cfg.num_output))
    return cfg, params, X, G, _random_state(cfg, batch, rng)


# Branches of several synapses, so that τ_s can differ inside one.
SEVERAL_PER_BRANCH = {None: dict(num_input=6, num_branch=2, num_synapse_per_branch=3),
                      "random_routing": dict(num_branch=2, num_synapse_per_branch=3),
                      "neuronio_routing": dict(num_input=6, num_branch=2, num_synapse_per_branch=4)}


@pytest.mark.parametrize("version,routing,layers,activation", AXES,
                         ids=[f"{v}-{r or 'none'}-L{n}-{a}" for v, r, n, a in AXES])
def test_cpu_model_equals_the_reference(version, routing, layers, activation):
    seed = zlib.crc32(f"{version}{routing}{layers}{activation}".encode())
    cfg, params, X, G, state = _neuron_setup(seed, version, routing, layers, activation)
    _assert_engine_equals_reference(cfg, params, X, G, "cpu")
    _assert_engine_equals_reference(cfg, params, X, G, "cpu", state)


@pytest.mark.parametrize("routing", [None, "random_routing", "neuronio_routing"])
def test_cpu_per_synapse_path_equals_the_reference(routing):
    """v1 with τ_s differing inside a branch: the engine scans one channel per synapse."""
    cfg, params, X, G, state = _neuron_setup(7, "elm_v1", routing, 2, "silu", per_synapse=True,
                                             **SEVERAL_PER_BRANCH[routing])
    for start in (None, state):
        model, _ = _assert_engine_equals_reference(cfg, params, X, G, "cpu", start)
        assert model._per_synapse_scan


@pytest.mark.parametrize("version", ["elm_v1", "branch_elm_v2"])
@pytest.mark.parametrize("layers", [0, 2])
def test_cpu_sparse_first_layer_path_equals_the_reference(version, layers, monkeypatch):
    """Spike input with one decay for every channel takes the sparse first-layer path."""
    monkeypatch.setattr(ELM, "SPARSE_FIRST_LAYER_DENSITY", 1.0)
    cfg, params, X, G, state = _neuron_setup(11 + layers, version, "random_routing", layers, "silu")
    key = P.input_tau_key(cfg)
    params[key] = np.full_like(params[key], 3.7)
    X = X * (np.random.default_rng(1).random(X.shape) < 0.3)
    for start in (None, state):
        _, cache = _assert_engine_equals_reference(cfg, params, X, G, "cpu", start)
        assert cache["input_path"] == "sparse"


NETWORK_CASES = [  # (layers, ρ, hidden layers, activation, neurons)
    (1, 0.5, 1, "relu", 3), (1, 1.0, 0, "silu", 2), (2, 0.0, 2, "silu", 4), (2, 0.25, 3, "relu", 3),
    (1, 0.5, 2, "silu", 9), (3, 0.75, 1, "relu", 2), (2, 0.5, 0, "relu", 17)] + [
    (1, 0.5, 2, activation, 5) for activation in ACTIVATIONS]  # every activation of kernels/pointwise.py


def _network_setup(case, batch=3, steps=6):
    layers, rho, hidden, activation, neurons = NETWORK_CASES[case]
    rng = np.random.default_rng(700 + case)
    cfg = random_network_config(rng, num_layers=layers, recurrent_fraction=rho, mlp_num_layers=hidden,
                                mlp_activation=activation, num_neurons=neurons, learn_memory_tau=True)
    params = random_network_test_params(cfg, rng)
    X = rng.normal(size=(batch, steps, cfg.num_input)) * (rng.random((batch, steps, cfg.num_input)) < 0.6)
    G = rng.normal(size=(batch, steps, cfg.num_output))
    return cfg, params, X, G, _random_state(cfg, batch, rng)


@pytest.mark.parametrize("case", range(len(NETWORK_CASES)),
                         ids=[f"layers{c[0]}-rho{c[1]}-L{c[2]}-{c[3]}-N{c[4]}" for c in NETWORK_CASES])
def test_cpu_network_equals_the_reference(case):
    """N = 9 and 17 reach the CPU kernels' vector blocks of neurons and their tails."""
    cfg, params, X, G, state = _network_setup(case)
    _assert_engine_equals_reference(cfg, params, X, G, "cpu")
    _assert_engine_equals_reference(cfg, params, X, G, "cpu", state)


# -- the CUDA kernels (a real GPU, or the simulator's child process) --

CUDA_NEURON_CASES = [  # (version, routing, layers, activation, per-synapse scan)
    ("elm_v1", "neuronio_routing", 2, "silu", True), ("elm_v1", "random_routing", 1, "relu", True),
    ("elm_v1", None, 0, "silu", False), ("elm_v1", "random_routing", 3, "relu", False),
    ("branch_elm_v2", "random_routing", 2, "relu", False), ("branch_elm_v2", "neuronio_routing", 0, "relu", False),
    ("branch_elm_v2", None, 3, "silu", False)]
CUDA_NETWORK_CASES = [0, 1, 2, 5]


@needs_cuda
@pytest.mark.parametrize("case", range(len(CUDA_NEURON_CASES)),
                         ids=[f"{v}-{r or 'none'}-L{n}-{a}{'-per-synapse' if s else ''}"
                              for v, r, n, a, s in CUDA_NEURON_CASES])
def test_on_cuda_neuron_equals_the_reference(case):
    version, routing, layers, activation, per_synapse = CUDA_NEURON_CASES[case]
    shape = SEVERAL_PER_BRANCH[routing] if per_synapse else {}
    cfg, params, X, G, state = _neuron_setup(900 + case, version, routing, layers, activation, per_synapse,
                                             batch=2, steps=4, **shape)
    model, _ = _assert_engine_equals_reference(cfg, params, X, G, "cuda", state)
    assert model.backend.name == "cuda"
    if per_synapse:
        assert model._per_synapse_scan
    _assert_engine_equals_reference(cfg, params, X, G, "cuda")


@needs_cuda
@pytest.mark.parametrize("case", CUDA_NETWORK_CASES)
def test_on_cuda_network_equals_the_reference(case):
    cfg, params, X, G, state = _network_setup(case, batch=2, steps=4)
    model, _ = _assert_engine_equals_reference(cfg, params, X, G, "cuda", state)
    assert model.backend.name == "cuda"
    _assert_engine_equals_reference(cfg, params, X, G, "cuda")


@pytest.mark.slow
@pytest.mark.skipif(CUDA_HERE, reason="CUDA is usable in this process: the CUDA checks above run directly")
def test_simulator_runs_the_cuda_checks():
    returncode, tail, passed = run_under_simulator(__file__, "-k", "on_cuda", timeout=900)
    assert returncode == 0, tail
    assert passed == len(CUDA_NEURON_CASES) + len(CUDA_NETWORK_CASES), tail


# ---- (4) the checks can fail --------------------------------------------------------------------------

@pytest.mark.parametrize("name,module", [("v2_random_routing", reference_neuron),
                                         ("net_two_layers", reference_network)], ids=["neuron", "network"])
def test_a_wrong_formula_in_the_reference_is_caught(name, module, monkeypatch):
    """φ' off by 1e-3: the outputs still match the oracle, the gradients do not, nor the finite differences."""
    case = load_oracle(next(p for p in ORACLES if os.path.basename(p) == f"{name}.npz"))
    slope = module.phi_slope_from_output
    monkeypatch.setattr(module, "phi_slope_from_output", lambda dm: slope(dm) * 1.001)
    errors = _oracle_errors(case)
    assert errors["Y"] <= TOLERANCE["float64"] and errors["loss"] <= TOLERANCE["float64"]
    wrong = {k for k, e in errors.items() if e > TOLERANCE["float64"]}
    assert "grad/X" in wrong and all(k.startswith("grad/") for k in wrong)
    rng = np.random.default_rng(0)
    X, G = case.X[:1, :4], case.G[:1, :4]
    rows = _fd_rows(case.config, case.params, X, G, reference.zero_state(case.config, 1), rng)
    assert any(not passes(r, FD_TOLERANCE) for r in rows)


def test_a_corrupted_kernel_gradient_is_caught():
    """One gradient of the CPU model off by one part in 1e9 exceeds the 1e-12 comparison."""
    cfg, params, X, G, _ = _neuron_setup(5, "branch_elm_v2", "random_routing", 1, "silu")
    got, _, _ = _engine_run(cfg, params, X, G, "cpu")
    ref = _reference_run(cfg, params, X, G)
    assert relative_error(got["grad/_proto_tau_m"], ref["grad/_proto_tau_m"]) <= KERNEL_TOL
    corrupted = got["grad/_proto_tau_m"].copy()
    corrupted[np.argmax(np.abs(corrupted))] *= 1 + 1e-9
    assert relative_error(corrupted, ref["grad/_proto_tau_m"]) > KERNEL_TOL


# ---- the API ------------------------------------------------------------------------------------------

def test_gradients_of_a_model_equal_forward_then_backward():
    case = load_oracle(os.path.join(GOLDEN_DIR, "v1_branch_neuronio_routing.npz"))
    model = ELM(case.config, params=case.params, dtype="float32")  # the reference still computes in float64
    Y, grads, trace = reference.gradients(model, case.X, case.G)
    Y2, trace2 = reference.forward(case.config, model.state_dict(), case.X)
    grads2 = reference.backward(case.config, model.state_dict(), trace2, case.G)
    assert Y.dtype == np.float64 and np.array_equal(Y, Y2)
    assert list(grads) == model.trainable_keys + ["X"] and all(np.array_equal(grads[k], grads2[k]) for k in grads)
    for key in ("adjoint_m", "adjoint_o", "adjoint_u", "adjoint_s"):
        assert np.array_equal(trace[key], trace2[key]) and trace[key].shape[:2] == case.X.shape[:2]


def test_bad_input_is_one_clear_error():
    case = load_oracle(os.path.join(GOLDEN_DIR, "v1_basic.npz"))
    with pytest.raises(ELMError, match="X must have shape"):
        reference.forward(case.config, case.params, case.X[:, :, :-1])
    with pytest.raises(ELMError, match="initial state 'm'"):
        state = reference.zero_state(case.config, case.X.shape[0])
        state["m"] = state["m"][:, :-1]
        reference.forward(case.config, case.params, case.X, state)
    with pytest.raises(ELMError, match="_proto_w_s"):
        reference.forward(case.config, {k: v for k, v in case.params.items() if k != "_proto_w_s"}, case.X)
    _, trace = reference.forward(case.config, case.params, case.X)
    with pytest.raises(ELMError, match="dY must have shape"):
        reference.backward(case.config, case.params, trace, case.G[:, 1:])
