"""The PyTorch-autograd ELM Network baseline (bench/torch_network.py) against the network oracle files.

PyTorch is not an elmcore dependency, so this whole file is skipped where it is not installed.
"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (the baseline is optional)")

from elmcore.errors import ConfigError, DataError, ELMError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOLDEN_FILES = sorted((REPO / "tests" / "data" / "golden_network").glob("*.npz"))
FLOAT64_RTOL = 1e-9


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tn = _load("torch_network")


def relative_error(got, ref):
    """Largest deviation relative to the reference's largest entry (absolute where it is all zero:
    ∂/∂X when every synapse is recurrent)."""
    scale = float(np.max(np.abs(ref)))
    deviation = float(np.max(np.abs(got - ref)))
    return deviation / scale if scale > 0 else deviation


def run_with_grads(model, X, G):
    X = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    Y = model(X)
    (Y * torch.tensor(G, dtype=torch.float64)).sum().backward()
    grads = {k: p.grad.numpy() for k, p in model.named_parameters() if p.requires_grad}
    grads["X"] = X.grad.numpy()
    return Y.detach().numpy(), grads


def test_network_oracle_files_are_present():
    assert [p.stem for p in GOLDEN_FILES] == ["net_basic", "net_silu_deep_learned_tau", "net_two_layers"]


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_matches_network_oracle_in_float64(path):
    with np.load(path, allow_pickle=False) as data:
        golden = {k: data[k] for k in data.files}
    assert str(golden["version"]) == "elm_network"
    params = {k[len("param/"):]: v for k, v in golden.items() if k.startswith("param/")}
    model = tn.TorchELMNetwork(json.loads(str(golden["config"])), params, dtype=torch.float64)
    Y, grads = run_with_grads(model, golden["X"], golden["G"])

    assert relative_error(Y, golden["Y"]) < FLOAT64_RTOL
    assert math.isclose(float((Y * golden["G"]).sum()), float(golden["loss"]), rel_tol=FLOAT64_RTOL)
    golden_grad_keys = {k[len("grad/"):] for k in golden if k.startswith("grad/")}
    assert set(grads) == golden_grad_keys, "the baseline must train exactly the spec's trainable parameters"
    for key in golden_grad_keys:
        assert relative_error(grads[key], golden[f"grad/{key}"]) < FLOAT64_RTOL, key
    # The per-layer traces: each layer's o and m after every step.
    X = torch.tensor(golden["X"])
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            o = layer(X)
            assert relative_error(o.numpy(), golden[f"trace/layers.{i}.o"]) < FLOAT64_RTOL
            X = o


def test_own_init_follows_the_spec():
    cfg = dict(num_input=10, num_output=3, num_neurons=7, num_branch=2, num_synapse_per_branch=5,
               recurrent_fraction=0.3, num_layers=2, num_memory=4)
    params = tn.init_network_params(cfg, seed=1)
    for layer, D in ((0, 10), (1, 7)):
        src = params[f"layers.{layer}.synapse_source"]
        assert src.shape == (7, 10) and src.dtype == np.int64
        assert ((src >= D).sum(axis=1) == 3).all() and src.max() < D + 7   # round(0.3·10) recurrent
        assert np.abs(params[f"layers.{layer}.w_s"]).max() <= 1 / math.sqrt(10)
        assert params[f"layers.{layer}.mlp.0.weight"].shape == (7, 8, 6)
        assert params[f"layers.{layer}.mlp.1.weight"].shape == (7, 4, 8)
    model = tn.TorchELMNetwork(cfg, params)
    assert sorted(model.state_dict()) == sorted(params)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_neuron = 10 + (8 * 6 + 8) + (4 * 8 + 4) + 4 + 1
    assert trainable == 2 * 7 * per_neuron + 3 * 8


def test_bad_configs_params_and_inputs_are_named():
    cfg = dict(num_input=4, num_output=2, num_neurons=3, num_branch=2, num_synapse_per_branch=2)
    params = tn.init_network_params(cfg)
    model = tn.TorchELMNetwork(cfg, params)
    with pytest.raises(DataError, match=r"\(batch, time, 4\)"):
        model(torch.zeros(2, 3, 5))
    with pytest.raises(ConfigError, match="recurrent_fraction"):
        tn.TorchELMNetwork(dict(cfg, recurrent_fraction=1.5), params)
    with pytest.raises(ConfigError, match="num_hidden"):
        tn.TorchELMNetwork(dict(cfg, num_hidden=2), params)
    bad = dict(params, **{"layers.0.synapse_source": np.full((3, 4), 7)})
    with pytest.raises(ELMError, match=r"synapse_source' must hold integers in \[0, 7\)"):
        tn.TorchELMNetwork(cfg, bad)
    with pytest.raises(ELMError, match="missing 'readout.bias'"):
        tn.TorchELMNetwork(cfg, {k: v for k, v in params.items() if k != "readout.bias"})
    with pytest.raises(ELMError, match="'layers.0.w_s' holds NaN"):
        tn.TorchELMNetwork(cfg, dict(params, **{"layers.0.w_s": np.full((3, 4), np.nan)}))


def test_all_steps_cross_entropy_and_a_training_step():
    rng = np.random.default_rng(0)
    Y = torch.tensor(rng.normal(size=(2, 3, 4)))
    targets = rng.integers(0, 4, (2, 3))
    picked = np.take_along_axis(Y.numpy(), targets[..., None], 2)[..., 0]
    expected = np.mean(np.log(np.exp(Y.numpy()).sum(-1)) - picked)
    assert math.isclose(float(tn.all_steps_cross_entropy_fn(targets)(Y)), expected, rel_tol=1e-12)

    cfg = dict(num_input=5, num_output=5, num_neurons=4, num_branch=2, num_synapse_per_branch=2,
               learn_memory_tau=False)
    model = tn.TorchELMNetwork(cfg, tn.init_network_params(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X = np.eye(5, dtype=np.float32)[rng.integers(0, 5, (3, 6))]
    seconds = tn.time_training_step(model, X, tn.all_steps_cross_entropy_fn(rng.integers(0, 5, (3, 6))),
                                    steps=2, warmup=0)
    after = model.state_dict()
    assert len(seconds) == 2
    assert not torch.equal(before["layers.0.w_s"], after["layers.0.w_s"])
    assert torch.equal(before["layers.0._proto_tau_m"], after["layers.0._proto_tau_m"])
    assert torch.equal(before["layers.0.synapse_source"], after["layers.0.synapse_source"])


def test_network_benchmark_times_the_baseline_in_a_child_process(monkeypatch, tmp_path):
    bench = _load("bench_network")
    tiny = dict(model=dict(version="elm_network", num_input=6, num_output=6, num_neurons=3, num_memory=2,
                           num_branch=2, num_synapse_per_branch=2),
                batch=2, steps=4, input="one-hot", density=None, loss="all")
    monkeypatch.setitem(bench.CONFIGS, "tiny", tiny)
    X, target = bench.make_inputs(tiny, np.random.default_rng(0), "uint8")
    assert X.dtype == np.uint8 and X.shape == (2, 4, 6) and (X.sum(-1) == 1).all() and target.shape == (2, 4)
    results = bench.main(["--configs", "tiny", "--no-elmcore", "--torch-repeats", "2", "--torch-threads", "1",
                          "--json", str(tmp_path / "out.json")])
    row = results["configs"]["tiny"]
    assert row["torch_threads"] == 1 and row["torch_train"]["median_ms"] > 0
    assert json.loads((tmp_path / "out.json").read_text())["configs"]["tiny"]["batch"] == 2


# Configurations the oracle files do not cover: no hidden MLP layer, every synapse recurrent,
# three stacked layers, Δt ≠ 1. Run once elmcore's network (elmcore.network.model) is present.
ENGINE_CASES = {
    "all_recurrent_no_hidden": dict(num_input=4, num_output=3, num_neurons=5, num_memory=3, mlp_num_layers=0,
                                    num_branch=2, num_synapse_per_branch=3, recurrent_fraction=1.0,
                                    learn_memory_tau=True, memory_tau_max=30.0, delta_t=0.5),
    "three_layers_silu": dict(num_input=6, num_output=2, num_neurons=4, num_layers=3, num_memory=2,
                              mlp_num_layers=2, mlp_hidden_size=3, mlp_activation="silu", num_branch=3,
                              num_synapse_per_branch=2, recurrent_fraction=0.5, tau_b_value=2.0),
}


@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_matches_elmcore_network_engine(case):
    from elmcore.engine.factory import load_config_dict
    from elmcore.engine.factory import build_model
    fields = dict(ENGINE_CASES[case], version="elm_network")
    engine = build_model(load_config_dict(fields), seed=4, dtype="float64")
    rng = np.random.default_rng(11)
    params = {k: np.array(v) for k, v in engine.state_dict().items()}
    for key in params:   # off the initial values, so every transform is exercised
        if key.endswith("_proto_tau_m") or key.endswith("tau_b"):
            params[key] = params[key] + rng.uniform(0.1, 1.0, params[key].shape)
    engine = build_model(load_config_dict(fields), params=params, dtype="float64")
    X = rng.normal(size=(2, 9, fields["num_input"]))
    G = rng.normal(size=(2, 9, fields["num_output"]))
    Y_ref, cache = engine.forward(X, return_cache=True)
    grads_ref = engine.backward(G, cache, input_grad=True)
    Y, grads = run_with_grads(tn.TorchELMNetwork(fields, params, dtype=torch.float64), X, G)

    assert relative_error(Y, np.asarray(Y_ref)) < FLOAT64_RTOL
    assert set(grads) == set(grads_ref)
    for key in grads_ref:
        assert relative_error(grads[key], np.asarray(grads_ref[key])) < FLOAT64_RTOL, key
