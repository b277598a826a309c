"""The kernels' pointwise math (elmcore/kernels/pointwise.py): every MLP activation of its table, and φ.

Each activation is checked against its own reference below (REFERENCES: the one place a new
activation is described to the tests), its slope against central differences, its CUDA device
forms against its CPU forms, and whole models using it against finite differences (both model
families), against the CPU models on the CUDA kernels, and, where PyTorch is installed, against
the PyTorch baselines of bench/.

Numba reads ``NUMBA_ENABLE_CUDASIM`` once, when ``numba.cuda`` is first imported, so the CUDA
tests run where CUDA is usable (a real GPU, or a process started with the simulator on);
elsewhere ``test_cuda_tests_pass_under_the_simulator`` runs them in one child process with the
simulator on.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import cuda, njit  # cuda: a module global, as the simulator swaps it in kernels' globals

from elmcore import ELM, ELMConfig, ELMError, ELMNetwork
from elmcore.kernels import pointwise as pw
from elmcore.neuron.params import PHI_SCALE, PHI_SLOPE
from elmcore.verification.gradcheck import DEFAULT_NETWORK_CONFIG, gradcheck, passes, random_test_params
from helpers import CUDA_HERE, needs_cuda, random_config, run_under_simulator


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


# name -> (act, act′) in float64, written from the textbook definitions.
REFERENCES = {
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(np.float64)),
    "silu": (lambda z: z * _sigmoid(z), lambda z: _sigmoid(z) * (1 + z * (1 - _sigmoid(z)))),
    "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
}

REPO = Path(__file__).resolve().parents[1]

# Points away from relu's kink (its slope there is a convention, not a derivative), both signs,
# the saturated tails and zero itself.
GRID = np.concatenate([np.linspace(-12, 12, 2401), [-40.0, -1e-9, 0.0, 1e-9, 40.0]])
GRID = GRID[np.abs(GRID) != 1e-3]


@njit
def _cpu_forms(z, da, activation, a_out, dz_out, a_back_out):
    n = z.shape[0]
    pw.activate_all(z, a_out, n, activation)
    pw.activation_backward_all(z, da, dz_out, a_back_out, n, activation)


def _run_cpu_forms(name, z, da):
    a, dz, a_back = (np.full_like(z, np.nan) for _ in range(3))
    _cpu_forms(z, da, pw.activation_code(name), a, dz, a_back)
    return a, dz, a_back


@njit
def _phi_forms(x, g, scale, slope, dm_out, dx_out):
    for i in range(x.shape[0]):
        dm_out[i] = pw.phi(x[i], scale, slope)
        dx_out[i] = pw.phi_backward(g[i], dm_out[i], scale, slope)


def _close(got, ref, rel):
    return np.abs(got - ref).max() <= rel * max(np.abs(ref).max(), 1.0)


# ---- the table ---------------------------------------------------------------------------

def test_numpy_forms_equal_the_references():
    """The plain reference walk (rung 1b) reads its activations from pointwise's NumPy forms."""
    z = np.linspace(-6, 6, 241)
    for name in pw.ACTIVATIONS:
        act, slope = pw.numpy_forms(name)
        ref_act, ref_slope = REFERENCES[name]
        assert _close(act(z), ref_act(z), 1e-14) and _close(slope(z), ref_slope(z), 1e-14), name
    with pytest.raises(ELMError, match="unknown MLP activation"):
        pw.numpy_forms("softmax")


def test_every_activation_has_a_code_a_reference_and_a_config_name():
    assert pw.ACTIVATIONS == tuple(pw.ACTIVATION_CODES)
    assert set(REFERENCES) == set(pw.ACTIVATIONS)
    codes = [pw.activation_code(name) for name in pw.ACTIVATIONS]
    assert sorted(codes) == list(range(len(codes)))
    from elmcore.engine import fields
    assert fields.ACTIVATIONS == pw.ACTIVATIONS
    for name in pw.ACTIVATIONS:
        assert ELMConfig(num_input=2, num_output=1, mlp_activation=name).mlp_activation == name
    with pytest.raises(ELMError, match="unknown MLP activation 'softmax'"):
        pw.activation_code("softmax")


# ---- CPU forms -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", pw.ACTIVATIONS)
def test_cpu_forms_match_the_reference_and_finite_differences(name):
    act, slope = REFERENCES[name]
    rng = np.random.default_rng(0)
    da = rng.normal(size=GRID.shape)
    a, dz, a_back = _run_cpu_forms(name, GRID, da)
    assert _close(a, act(GRID), 1e-15) and np.array_equal(a, a_back)
    assert _close(dz, da * slope(GRID), 1e-15)
    # The slope is the derivative of the forward (central differences, away from the kink).
    h = 1e-6
    away = np.abs(GRID) > 1e-4
    numeric = (act(GRID[away] + h) - act(GRID[away] - h)) / (2 * h)
    _, dz_one, _ = _run_cpu_forms(name, GRID, np.ones_like(GRID))
    assert np.abs(dz_one[away] - numeric).max() < 1e-8


@pytest.mark.parametrize("name", pw.ACTIVATIONS)
def test_cpu_forms_in_float32(name):
    z = GRID.astype(np.float32)
    da = np.random.default_rng(1).normal(size=z.shape).astype(np.float32)
    a, dz, _ = _run_cpu_forms(name, z, da)
    assert a.dtype == dz.dtype == np.float32
    a64, dz64, _ = _run_cpu_forms(name, z.astype(np.float64), da.astype(np.float64))
    assert _close(a, a64, 1e-6) and _close(dz, dz64, 1e-6)


def test_a_code_without_a_branch_gives_nan_not_another_activation():
    z = np.linspace(-2, 2, 9)
    a, dz, a_back = (np.zeros_like(z) for _ in range(3))
    _cpu_forms(z, np.ones_like(z), len(pw.ACTIVATIONS) + 7, a, dz, a_back)
    assert np.isnan(a).all() and np.isnan(dz).all() and np.isnan(a_back).all()


def test_phi_and_its_backward_from_the_stored_output():
    x = np.linspace(-6, 6, 1201)
    g = np.random.default_rng(2).normal(size=x.shape)
    dm, dx = np.empty_like(x), np.empty_like(x)
    _phi_forms(x, g, PHI_SCALE, PHI_SLOPE, dm, dx)
    assert _close(dm, PHI_SCALE * np.tanh(PHI_SLOPE * x), 1e-15)
    h = 1e-6
    numeric = (PHI_SCALE * np.tanh(PHI_SLOPE * (x + h)) - PHI_SCALE * np.tanh(PHI_SLOPE * (x - h))) / (2 * h)
    assert np.abs(dx - g * numeric).max() < 1e-8


# ---- whole models: finite differences, both families ----------------------------------------

@pytest.mark.parametrize("name", pw.ACTIVATIONS)
def test_neuron_gradients_by_finite_differences(name):
    rng = np.random.default_rng(len(name))
    cfg = random_config(rng, version="branch_elm_v2", routing="random_routing", layers=2,
                        activation=name).replace(learn_memory_tau=True)
    rows = gradcheck(cfg, params=random_test_params(cfg, rng), batch=2, steps=4, seed=1, max_entries=8)
    assert {r.name for r in rows} == set(ELM(cfg, dtype="float64").trainable_keys) | {"X"}
    bad = [r for r in rows if not passes(r, 1e-6)]
    assert not bad, bad


@pytest.mark.parametrize("name", pw.ACTIVATIONS)
def test_network_gradients_by_finite_differences(name):
    cfg = ELMConfig.from_dict(dict(DEFAULT_NETWORK_CONFIG, mlp_activation=name, mlp_num_layers=2))
    rows = gradcheck(cfg, batch=2, steps=3, seed=2, max_entries=8)
    assert {r.name for r in rows} == set(ELMNetwork(cfg, dtype="float64").trainable_keys) | {"X"}
    bad = [r for r in rows if not passes(r)]
    assert not bad, bad


# ---- CUDA: device forms and whole models against the CPU ------------------------------------

TOL = {"float64": 1e-12, "float32": 1e-5}


def _device_forms(dtype, code, z, g):
    """(act, act′, φ, g·φ′) evaluated by the CUDA device forms."""
    from elmcore.kernels import cuda_launch
    fns = pw.cuda_functions(dtype.type)
    activate, activation_slope, phi, phi_backward = fns.activate, fns.activation_slope, fns.phi, fns.phi_backward

    @cuda.jit
    def evaluate(z, g, code, scale, slope, out):
        for i in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
            out[0, i] = activate(z[i], code)
            out[1, i] = activation_slope(z[i], code)
            out[2, i] = phi(z[i], scale, slope)
            out[3, i] = phi_backward(g[i], out[2, i], scale, slope)

    if cuda_launch.SIMULATOR:
        xp = np
    else:
        import cupy as xp
    out = xp.zeros((4, z.shape[0]), dtype)
    cuda_launch.launch(evaluate, *cuda_launch.flat_shape(z.shape[0]), xp.asarray(z), xp.asarray(g), code,
                       dtype.type(PHI_SCALE), dtype.type(PHI_SLOPE), out)
    return out if xp is np else xp.asnumpy(out)


@needs_cuda
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", pw.ACTIVATIONS)
def test_cuda_device_forms_equal_the_cpu_forms(name, dtype):
    dt = np.dtype(dtype)
    z = np.linspace(-9, 9, 37).astype(dt)
    g = np.random.default_rng(3).normal(size=z.shape).astype(dt)
    got = _device_forms(dt, pw.activation_code(name), z, g)
    a, slope, _ = _run_cpu_forms(name, z, np.ones_like(z))
    dm, dx = np.empty_like(z), np.empty_like(z)
    _phi_forms(z, g, dt.type(PHI_SCALE), dt.type(PHI_SLOPE), dm, dx)
    for row, ref in zip(got, (a, slope, dm, dx)):
        assert _close(row.astype(np.float64), ref.astype(np.float64), TOL[dtype])


def _model_numbers(model, X, G):
    host = model.backend.to_host
    Y, cache = model.forward(X, return_cache=True)
    out = {"Y": np.asarray(host(Y), np.float64)}
    out.update({k: np.asarray(host(v), np.float64) for k, v in model.backward(G, cache, input_grad=True).items()})
    return out


@needs_cuda
@pytest.mark.parametrize("family", ["neuron", "network"])
@pytest.mark.parametrize("name", pw.ACTIVATIONS)
def test_cuda_models_equal_the_cpu_models(name, family):
    rng = np.random.default_rng(4)
    if family == "neuron":
        cfg = random_config(rng, version="elm_v1", routing="neuronio_routing", layers=2, activation=name)
        params, model_class = random_test_params(cfg, rng), ELM
    else:
        cfg = ELMConfig.from_dict(dict(DEFAULT_NETWORK_CONFIG, mlp_activation=name))
        params, model_class = None, ELMNetwork
    X = rng.normal(size=(2, 4, cfg.num_input))
    G = rng.normal(size=(2, 4, cfg.num_output))
    cpu = model_class(cfg, params=params, seed=5, dtype="float64", device="cpu")
    gpu = model_class(cfg, params={k: cpu.backend.to_host(v) for k, v in cpu.params.items()}, dtype="float64",
                      device="cuda")
    ref, got = _model_numbers(cpu, X, G), _model_numbers(gpu, X, G)
    assert set(ref) == set(got)
    for key in ref:
        assert _close(got[key], ref[key], TOL["float64"]), key


@pytest.mark.slow
@pytest.mark.skipif(CUDA_HERE, reason="CUDA is usable in this process: the CUDA tests run directly")
def test_cuda_tests_pass_under_the_simulator():
    returncode, tail, passed = run_under_simulator(__file__, "-k", "cuda", timeout=1500)
    assert returncode == 0, tail
    # every CUDA test of this file ran: device forms and models for each activation (this test is skipped there)
    assert passed == 4 * len(pw.ACTIVATIONS), tail


# ---- the PyTorch baselines (only where PyTorch is installed) --------------------------------

def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_numbers(torch, model, X, G):
    X = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    Y = model(X)
    (Y * torch.tensor(G, dtype=torch.float64)).sum().backward()
    grads = {k: p.grad.numpy() for k, p in model.named_parameters() if p.requires_grad}
    grads["X"] = X.grad.numpy()
    return dict(Y=Y.detach().numpy(), **grads)


@pytest.mark.parametrize("family", ["neuron", "network"])
@pytest.mark.parametrize("name", pw.ACTIVATIONS)
def test_matches_the_pytorch_baselines(name, family):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (the baselines are optional)")
    rng = np.random.default_rng(6)
    if family == "neuron":
        config = dict(num_input=5, num_output=2, num_memory=3, mlp_num_layers=2, mlp_hidden_size=4,
                      mlp_activation=name, learn_memory_tau=True, memory_tau_max=40.0,
                      input_to_synapse_routing="random_routing", num_branch=3, num_synapse_per_branch=2)
        cfg = ELMConfig.from_dict(config, version="branch_elm_v2")
        params = random_test_params(cfg, rng)
        engine = ELM(cfg, params=params, dtype="float64")
        reference = _load("torch_baseline").TorchELM(config, "branch_elm_v2", params, dtype=torch.float64)
    else:
        config = dict(DEFAULT_NETWORK_CONFIG, mlp_activation=name, mlp_num_layers=2)
        cfg = ELMConfig.from_dict(config)
        engine = ELMNetwork(cfg, seed=7, dtype="float64")
        params = {k: np.asarray(v) for k, v in engine.params.items()}
        sys.path.insert(0, str(REPO / "bench"))
        try:
            reference = _load("torch_network").TorchELMNetwork(config, params, dtype=torch.float64)
        finally:
            sys.path.remove(str(REPO / "bench"))
    X = rng.normal(size=(2, 6, cfg.num_input))
    G = rng.normal(size=(2, 6, cfg.num_output))
    ref = _model_numbers(engine, X, G)
    got = _torch_numbers(torch, reference, X, G)
    assert set(got) == set(ref)
    for key in ref:
        assert _close(got[key], ref[key], 1e-9), key
