"""The PyTorch-autograd baseline (bench/torch_baseline.py) against the release oracle files and elmcore.

PyTorch is not an elmcore dependency, so this whole file is skipped where it is
not installed.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (the baseline is optional)")

from elmcore import ELM, ELMConfig  # noqa: E402
from elmcore.errors import ConfigError, DataError, ELMError  # noqa: E402
from elmcore.neuron.params import init_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASELINE_PATH = REPO / "bench" / "torch_baseline.py"
GOLDEN_FILES = sorted((REPO / "tests" / "data" / "golden").glob("*.npz"))
FLOAT64_RTOL = 1e-9


def _load_baseline():
    spec = importlib.util.spec_from_file_location("torch_baseline", BASELINE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tb = _load_baseline()


def relative_error(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def run_with_grads(model, X, G):
    """Y, {trainable key: ∂(ΣY⊙G)/∂θ} and ∂/∂X of the baseline, as NumPy."""
    X = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    Y = model(X)
    (Y * torch.tensor(G, dtype=torch.float64)).sum().backward()
    grads = {k: p.grad.numpy() for k, p in model.named_parameters() if p.requires_grad}
    grads["X"] = X.grad.numpy()
    return Y.detach().numpy(), grads


def test_golden_files_are_present():
    assert len(GOLDEN_FILES) >= 5, f"expected the release oracle files, found {GOLDEN_FILES}"


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_matches_release_oracle_in_float64(path):
    with np.load(path, allow_pickle=False) as data:
        golden = {k: data[k] for k in data.files}
    params = {k[len("param/"):]: v for k, v in golden.items() if k.startswith("param/")}
    model = tb.TorchELM(json.loads(str(golden["config"])), str(golden["version"]), params,
                        dtype=torch.float64)
    Y, grads = run_with_grads(model, golden["X"], golden["G"])

    assert relative_error(Y, golden["Y"]) < FLOAT64_RTOL
    assert math.isclose(float((Y * golden["G"]).sum()), float(golden["loss"]), rel_tol=FLOAT64_RTOL)
    golden_grad_keys = {k[len("grad/"):] for k in golden if k.startswith("grad/")}
    assert set(grads) == golden_grad_keys, "the baseline must train exactly the release's parameters"
    for key in golden_grad_keys:
        assert relative_error(grads[key], golden[f"grad/{key}"]) < FLOAT64_RTOL, key


# One drawn configuration per version, covering what the oracle files do not:
# MLP depth 0 and 3, non-uniform τ_s within a branch, Δt ≠ 1, a set hidden width.
CROSS_CHECK_CASES = {
    "elm_v1": dict(num_input=7, num_output=3, num_memory=4, mlp_num_layers=3, mlp_hidden_size=9,
                   mlp_activation="relu", learn_memory_tau=True, memory_tau_max=40.0,
                   input_to_synapse_routing="random_routing", num_branch=3, num_synapse_per_branch=4,
                   delta_t=0.7, lambda_value=2.5),
    "branch_elm_v2": dict(num_input=11, num_output=2, num_memory=5, mlp_num_layers=0,
                          learn_memory_tau=True, memory_tau_max=30.0, tau_b_value=3.0,
                          input_to_synapse_routing="neuronio_routing", num_branch=4,
                          num_synapse_per_branch=3, delta_t=1.5),
}


@pytest.mark.parametrize("version", sorted(CROSS_CHECK_CASES))
def test_matches_elmcore_cpu_engine(version):
    config = CROSS_CHECK_CASES[version]
    cfg = ELMConfig.from_dict(config, version=version)
    rng = np.random.default_rng(7)
    params = init_params(cfg, seed=3, dtype=np.float64)
    # Move parameters off their initial values so every transform is exercised.
    params["_proto_w_s"] = rng.uniform(-0.2, 1.0, params["_proto_w_s"].shape)
    params["_proto_tau_m"] = params["_proto_tau_m"] + rng.normal(0, 0.5, params["_proto_tau_m"].shape)
    tau_key = "tau_b" if cfg.is_v2 else "tau_s"
    params[tau_key] = rng.uniform(1.0, 8.0, params[tau_key].shape)
    X = rng.normal(size=(3, 17, cfg.num_input))
    G = rng.normal(size=(3, 17, cfg.num_output))

    engine = ELM(cfg, params, dtype="float64")
    Y_ref, cache = engine.forward(X, return_cache=True)
    grads_ref = engine.backward(G, cache, input_grad=True)
    model = tb.TorchELM(config, version, params, dtype=torch.float64)
    Y, grads = run_with_grads(model, X, G)

    assert relative_error(Y, Y_ref) < FLOAT64_RTOL
    assert set(grads) == set(grads_ref)
    for key in grads_ref:
        assert relative_error(grads[key], grads_ref[key]) < FLOAT64_RTOL, key


def _tiny_model(dtype=torch.float32, **changes):
    config = dict(num_input=5, num_output=2, num_memory=3, **changes)
    params = init_params(ELMConfig.from_dict(config), seed=1, dtype=np.float64)
    return config, params, tb.TorchELM(config, "elm_v1", params, dtype=dtype)


def test_float32_model_agrees_with_float64():
    _, _, model64 = _tiny_model(torch.float64)
    _, _, model32 = _tiny_model(torch.float32)
    X = np.random.default_rng(0).normal(size=(2, 12, 5))
    with torch.no_grad():
        Y64 = model64(torch.tensor(X)).numpy()
        Y32 = model32(torch.tensor(X, dtype=torch.float32)).numpy()
    assert Y32.dtype == np.float32
    assert relative_error(Y32.astype(np.float64), Y64) < 1e-5


def test_bad_inputs_raise_named_errors():
    config, params, model = _tiny_model()
    with pytest.raises(DataError, match=r"\(batch, time, 5\)"):
        model(torch.zeros(2, 4, 6))
    with pytest.raises(ConfigError, match="num_hidden"):
        tb.TorchELM(dict(config, num_hidden=3), "elm_v1", params)
    with pytest.raises(ConfigError, match="version"):
        tb.TorchELM(config, "elm_v3", params)
    with pytest.raises(ELMError, match="missing 'w_y.bias'"):
        tb.TorchELM(config, "elm_v1", {k: v for k, v in params.items() if k != "w_y.bias"})
    with pytest.raises(ELMError, match="'w_y.weight' has shape"):
        tb.TorchELM(config, "elm_v1", dict(params, **{"w_y.weight": np.zeros((2, 4))}))
    with pytest.raises(ELMError, match="unexpected 'extra'"):
        tb.TorchELM(config, "elm_v1", dict(params, extra=np.ones(2)))
    with pytest.raises(ELMError, match="'_proto_w_s' holds NaN"):
        tb.TorchELM(config, "elm_v1", dict(params, _proto_w_s=np.full(5, np.nan)))
    with pytest.raises(ELMError, match="steps"):
        tb.time_inference(model, np.zeros((1, 2, 5)), steps=0, warmup=0)


def test_training_step_timer_trains_only_trainable_parameters():
    _, _, model = _tiny_model(learn_memory_tau=False)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    X = (rng.random((4, 10, 5)) < 0.3).astype(np.float32)
    loss_fn = tb.neuronio_loss_fn((rng.random((4, 10)) < 0.2).astype(np.float32),
                                  rng.normal(size=(4, 10)).astype(np.float32))
    seconds = tb.time_training_step(model, X, loss_fn, steps=3, warmup=1)
    after = model.state_dict()

    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    assert not torch.equal(before["w_y.weight"], after["w_y.weight"])
    assert not torch.equal(before["mlp.network.0.weight"], after["mlp.network.0.weight"])
    assert torch.equal(before["_proto_tau_m"], after["_proto_tau_m"]), "τ_m is fixed in this config"
    assert torch.equal(before["tau_s"], after["tau_s"])


def test_inference_timer_leaves_parameters_alone():
    _, _, model = _tiny_model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seconds = tb.time_inference(model, np.ones((2, 6, 5)), steps=2, warmup=1)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_task_losses_follow_the_release_heads():
    rng = np.random.default_rng(0)
    Y = torch.tensor(rng.normal(size=(3, 4, 2)))
    spike = (rng.random((3, 4)) < 0.5).astype(np.float64)
    soma = rng.normal(size=(3, 4))
    logits, volts = Y[..., 0].numpy(), Y[..., 1].numpy()
    bce = np.mean(np.logaddexp(0, logits) - spike * logits)
    expected = 0.5 * bce + 0.5 * np.mean((volts - soma) ** 2)
    assert math.isclose(float(tb.neuronio_loss_fn(spike, soma)(Y)), expected, rel_tol=1e-12)

    labels = np.array([1, 0, 1])
    last = Y[:, -1].numpy()
    ce = np.mean(np.log(np.exp(last).sum(1)) - last[np.arange(3), labels])
    assert math.isclose(float(tb.last_step_cross_entropy_fn(labels)(Y)), ce, rel_tol=1e-12)


def test_module_imports_without_torch():
    # A None entry in sys.modules makes `import torch` fail, as on a machine without it.
    code = (
        "import sys, importlib.util; sys.modules['torch'] = None\n"
        f"spec = importlib.util.spec_from_file_location('tb', {str(BASELINE_PATH)!r})\n"
        "tb = importlib.util.module_from_spec(spec); spec.loader.exec_module(tb)\n"
        "assert tb.torch_available() is False\n"
        "from elmcore.errors import ELMError\n"
        "try:\n    tb.TorchELM({'num_input': 2, 'num_output': 1}, 'elm_v1', {})\n"
        "except ELMError as e:\n    assert 'PyTorch' in str(e); print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert tb.torch_available() is True
