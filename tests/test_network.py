"""The ELM Network (docs/spec.md §7): oracle files, finite differences, streaming, init, config
checks, and the rest of the tool chain (info, gradcheck, checkpoints, training, eval, predict)."""

import json
import math
import os

import numpy as np
import pytest
from click.testing import CliRunner

from elm_cli.main import cli
from elmcore import ELM, ELMNetwork, build_model
from elmcore.network import params as NP
from elmcore.training.checkpoint import load_file, load_model, save_model
from elmcore.neuron.config import ELMConfig
from elmcore.network.config import NetworkConfig
from elmcore.engine.factory import load_config_dict
from elmcore.errors import ConfigError, DataError, ELMError
from elmcore.verification.gradcheck import gradcheck, passes
from elmcore.verification.oracle import TOLERANCE, load_oracle, verify_case
from helpers import record_calls, run_killed_after

HERE = os.path.dirname(__file__)
GOLDEN_NETWORK_DIR = os.path.join(HERE, "data", "golden_network")


def network_files():
    return sorted(os.path.join(GOLDEN_NETWORK_DIR, f) for f in os.listdir(GOLDEN_NETWORK_DIR) if f.endswith(".npz"))


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def random_network_config(rng, **fixed):
    d = dict(num_input=int(rng.integers(1, 6)), num_output=int(rng.integers(1, 4)),
             num_neurons=int(rng.integers(1, 5)), num_layers=int(rng.integers(1, 4)),
             num_memory=int(rng.integers(1, 4)), mlp_num_layers=int(rng.integers(0, 3)),
             mlp_hidden_size=int(rng.integers(1, 5)), mlp_activation=str(rng.choice(["relu", "silu"])),
             num_branch=int(rng.integers(1, 4)), num_synapse_per_branch=int(rng.integers(1, 4)),
             recurrent_fraction=float(rng.choice([0.0, 0.5, 1.0])), learn_memory_tau=bool(rng.random() < 0.7),
             lambda_value=float(rng.uniform(1, 6)), memory_tau_min=float(rng.uniform(0.5, 2)),
             memory_tau_max=float(rng.uniform(10, 100)), tau_b_value=float(rng.uniform(2, 8)),
             delta_t=float(rng.choice([1.0, 2.0])), version="elm_network")
    d.update(fixed)
    return ELMConfig.from_dict(d)


# ---- oracle files -----------------------------------------------------------------------

def test_public_network_oracle_cases_present():
    names = {os.path.basename(p) for p in network_files()}
    assert {"net_basic.npz", "net_silu_deep_learned_tau.npz", "net_two_layers.npz"} <= names


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("path", network_files(), ids=os.path.basename)
def test_network_oracle_every_array(path, dtype):
    case = load_oracle(path)
    assert isinstance(case.config, NetworkConfig)
    results = verify_case(case, dtype=dtype)
    # Y, loss, every gradient in the file (X included) and every trace.
    assert len(results) == 2 + len(case.grads) + len(case.traces)
    assert "X" in case.grads and case.traces
    bad = [(name, err) for name, err in results if not err <= TOLERANCE[dtype]]
    assert not bad, bad


@pytest.mark.parametrize("path", network_files(), ids=os.path.basename)
def test_network_oracle_gradients_cover_every_trainable_parameter(path):
    case = load_oracle(path)
    assert set(case.grads) == set(NP.trainable_keys(case.config)) | {"X"}
    assert set(case.params) == set(NP.ordered_keys(case.config))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_elm_verify_cli_on_every_network_file(dtype):
    for path in network_files():
        result = invoke("verify", path, "--dtype", dtype)
        assert result.exit_code == 0, result.output
        assert "arrays within tolerance" in result.output and "FAIL" not in result.output


def test_elm_verify_fails_on_a_tampered_network_oracle(tmp_path):
    data = dict(np.load(network_files()[0]))
    data["grad/layers.0.w_s"] = data["grad/layers.0.w_s"] * 1.001
    bad = tmp_path / "tampered.npz"
    np.savez(bad, **data)
    result = invoke("verify", bad)
    assert result.exit_code == 1 and "FAIL" in result.output and "grad/layers.0.w_s" in result.output


# ---- finite differences -------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch, steps", [(1, 1), (2, 4)])
def test_gradcheck_random_networks(seed, batch, steps):
    """1–3 layers, ρ ∈ {0, 0.5, 1}, 0–2 hidden layers, relu and silu, learned τ_m; every
    trainable tensor and X against central differences in float64."""
    rng = np.random.default_rng(100 + seed)
    cfg = random_network_config(rng, num_layers=1 + seed % 3, recurrent_fraction=(0.0, 0.5, 1.0)[seed % 3],
                                mlp_num_layers=seed % 3, mlp_activation=("relu", "silu")[seed % 2],
                                learn_memory_tau=True)
    rows = gradcheck(cfg, batch=batch, steps=steps, seed=seed)
    assert {r[0] for r in rows} == set(NP.trainable_keys(cfg)) | {"X"}
    bad = [r for r in rows if not passes(r)]
    assert not bad, bad


def test_gradcheck_with_neurons_in_vector_blocks():
    """N = 21 in float64: two full vectors of 8 neurons for the products' vector blocks and a
    tail of 5 for their loop (the random configs above have N ≤ 4, below one vector)."""
    cfg = ELMConfig.from_dict(dict(version="elm_network", num_input=3, num_output=2, num_neurons=21,
                                   num_memory=2, num_branch=2, num_synapse_per_branch=2, mlp_num_layers=2,
                                   mlp_hidden_size=5, recurrent_fraction=0.5, learn_memory_tau=True))
    rows = gradcheck(cfg, batch=5, steps=3, seed=4)
    assert {r[0] for r in rows} == set(NP.trainable_keys(cfg)) | {"X"}
    bad = [r for r in rows if not passes(r)]
    assert not bad, bad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, neurons", [(7, 37), (4, 16), (3, 5), (5, 29), (2, 8), (4, 4), (3, 14)])
def test_per_neuron_products_match_einsum(dtype, rows, neurons):
    """The walks' products: vector blocks of 4 rows x 4 outputs, their 1-row / 1-output
    remainders, vectors of 64, 32 and 16 bytes (29 float32 neurons: 16 + 8 + 4 and one left)
    and the loop over the neurons past the last whole vector."""
    from elmcore.kernels import network_cpu
    rng = np.random.default_rng(rows * neurons)
    J, K_out = 6, 5
    a = rng.normal(size=(rows + 1, J, neurons)).astype(dtype)  # one spare row the call must not use
    W = rng.normal(size=(J, K_out, neurons)).astype(dtype)
    c = rng.normal(size=(K_out, neurons)).astype(dtype)
    dz = rng.normal(size=(rows + 1, K_out, neurons)).astype(dtype)
    out, back = np.full((rows + 1, K_out, neurons), 7, dtype), np.full((rows + 1, J, neurons), 7, dtype)
    network_cpu._dense_rows(a, W, c, out, rows)
    network_cpu._dense_transposed_rows(dz, W, back, rows)
    a64, W64, dz64 = a.astype(np.float64), W.astype(np.float64), dz.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out[:rows], c + np.einsum("rji,joi->roi", a64[:rows], W64), rtol=tol, atol=tol)
    np.testing.assert_allclose(back[:rows], np.einsum("roi,joi->rji", dz64[:rows], W64), rtol=tol, atol=tol)
    assert np.all(out[rows] == 7) and np.all(back[rows] == 7)


def test_gradcheck_sees_the_recurrent_path():
    """With T > 1 the recurrent synapses carry gradient: a backward that dropped it would fail."""
    cfg = NetworkConfig(num_input=2, num_output=2, num_neurons=3, num_memory=2, mlp_hidden_size=3, num_branch=2,
                        num_synapse_per_branch=2, recurrent_fraction=1.0, memory_tau_max=20.0)
    rows = {r[0]: r for r in gradcheck(cfg, batch=2, steps=5, seed=3)}
    name, shape, n, diff, scale, rel, noise = rows["layers.0.w_s"]
    assert scale > 1e-3 and passes(rows["layers.0.w_s"])


@pytest.mark.parametrize("seed", range(3))
def test_gradcheck_from_a_nonzero_initial_state(seed):
    """Stateful training (truncated BPTT) starts each window from the last one's final state:
    with a random non-zero b, m and o in every layer the gradients still equal central
    differences (the state is a constant, as in training)."""
    rng = np.random.default_rng(300 + seed)
    cfg = random_network_config(rng, num_layers=1 + seed % 2, recurrent_fraction=(0.5, 1.0, 0.5)[seed],
                                mlp_num_layers=seed % 3, learn_memory_tau=True)
    rows = gradcheck(cfg, batch=2, steps=4, seed=seed, initial_state=True)
    assert {r[0] for r in rows} == set(NP.trainable_keys(cfg)) | {"X"}
    bad = [r for r in rows if not passes(r)]
    assert not bad, bad


def test_forward_from_a_state_continues_the_stream_and_returns_its_final_state():
    """Windows chained through forward(..., state=cache["final_state"]) give the one-pass outputs,
    and the final state survives the backward (a stateful trainer reads it after)."""
    rng = np.random.default_rng(4)
    cfg = random_network_config(rng, num_layers=2, recurrent_fraction=0.5, mlp_num_layers=1)
    net = ELMNetwork(cfg, seed=2, dtype="float64")
    X = rng.normal(size=(2, 10, cfg.num_input))
    Y = net.forward(X)
    Y1, cache1 = net.forward(X[:, :6], return_cache=True)
    net.backward(np.ones_like(Y1), cache1)
    Y2, cache2 = net.forward(X[:, 6:], return_cache=True, state=cache1["final_state"])
    got = np.concatenate([Y1, Y2], axis=1)
    assert np.max(np.abs(got - Y)) <= 1e-12 * np.max(np.abs(Y))
    _, state = net.run(X, net.init_state(2))
    for key in ("b", "m", "o"):
        np.testing.assert_allclose(cache2["final_state"][key], state[key], rtol=1e-12, atol=1e-14)
    with pytest.raises(DataError, match="state"):
        net.forward(X[:1], state=cache1["final_state"])


# ---- streaming, inputs --------------------------------------------------------------------

def test_run_and_step_continue_the_stream_exactly():
    rng = np.random.default_rng(0)
    cfg = random_network_config(rng, num_layers=2, recurrent_fraction=0.5, mlp_num_layers=1)
    net = ELMNetwork(cfg, seed=1, dtype="float64")
    X = rng.normal(size=(3, 9, cfg.num_input))
    Y = net.forward(X)
    state = net.init_state(3)
    Y1, state = net.run(X[:, :4], state)
    Y2, state = net.run(X[:, 4:8], state)
    y3, state = net.step(state, X[:, 8])
    got = np.concatenate([Y1, Y2, y3[:, None]], axis=1)
    assert np.max(np.abs(got - Y)) <= 1e-12 * np.max(np.abs(Y))
    with pytest.raises(DataError, match="state"):
        net.run(X[:2, :2], net.init_state(3))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_one_byte_spike_input_equals_float_input(dtype):
    rng = np.random.default_rng(1)
    cfg = NetworkConfig(num_input=20, num_output=2, num_neurons=5, num_memory=3, num_branch=2,
                        num_synapse_per_branch=3)
    net = ELMNetwork(cfg, seed=2, dtype=dtype)
    spikes = (rng.random((2, 11, 20)) < 0.1)
    ref = net.forward(spikes.astype(dtype))
    for X in (spikes, spikes.astype(np.uint8), spikes.astype(np.int8)):
        assert np.array_equal(net.forward(X), ref)
    Y, cache = net.forward(spikes.astype(np.uint8), return_cache=True)
    assert cache["layers"][0]["X"].dtype == np.uint8  # read as bytes, not widened
    G = rng.normal(size=Y.shape)
    g_byte = net.backward(G, cache, input_grad=True)
    g_float = net.backward(G, net.forward(spikes.astype(dtype), return_cache=True)[1], input_grad=True)
    for key in g_float:
        assert np.array_equal(g_byte[key], g_float[key]), key


def test_bad_input_is_a_data_error():
    net = ELMNetwork(NetworkConfig(num_input=3, num_output=1, num_neurons=2), seed=0)
    with pytest.raises(DataError, match="shape"):
        net.forward(np.zeros((2, 5, 4)))
    X = np.zeros((1, 4, 3))
    X[0, 2, 1] = np.nan
    with pytest.raises(DataError, match="step 2, input 1"):
        net.forward(X)


def test_one_neuron_without_recurrence_is_a_branch_elm():
    """N = 1, ρ = 0: the network's o_t is the Branch-ELM's output with w_y = w_o, routed by synapse_source."""
    rng = np.random.default_rng(4)
    cfg = NetworkConfig(num_input=5, num_output=1, num_neurons=1, num_memory=4, mlp_num_layers=2,
                        mlp_hidden_size=6, mlp_activation="silu", num_branch=3, num_synapse_per_branch=2,
                        recurrent_fraction=0.0, learn_memory_tau=True, memory_tau_max=40.0)
    p = NP.init_params(cfg, seed=3, dtype=np.float64)
    p["layers.0.w_s"] = rng.uniform(0.1, 1.0, p["layers.0.w_s"].shape)  # the neuron's w_s = relu(·) ≥ 0
    p["layers.0.tau_b"] = rng.uniform(2, 8, p["layers.0.tau_b"].shape)
    p["readout.weight"] = np.ones((1, 1))
    p["readout.bias"] = np.zeros(1)
    single_cfg = ELMConfig(num_input=5, num_output=1, num_memory=4, mlp_num_layers=2, mlp_hidden_size=6,
                           mlp_activation="silu", num_branch=3, num_synapse_per_branch=2,
                           input_to_synapse_routing="random_routing", learn_memory_tau=True, memory_tau_max=40.0,
                           version="branch_elm_v2")
    single = {f"mlp.network.{2 * j}.{kind}": p[f"layers.0.mlp.{j}.{kind}"][0] for j in range(3)
              for kind in ("weight", "bias")}
    single.update({"_proto_w_s": p["layers.0.w_s"][0], "w_y.weight": p["layers.0.w_o.weight"],
                   "w_y.bias": p["layers.0.w_o.bias"], "tau_b": p["layers.0.tau_b"][0],
                   "_proto_tau_m": p["layers.0._proto_tau_m"][0],
                   "input_to_synapse_indices": p["layers.0.synapse_source"][0],
                   "valid_indices_mask": np.ones(6, np.int64)})
    X = rng.normal(size=(2, 13, 5))
    y_net = ELMNetwork(cfg, params=p, dtype="float64").forward(X)
    y_one = ELM(single_cfg, params=single, dtype="float64").forward(X)
    assert np.max(np.abs(y_net - y_one)) <= 1e-12 * np.max(np.abs(y_one))


# ---- init, count, config checks -------------------------------------------------------------

def test_seeded_init_follows_the_spec():
    cfg = NetworkConfig(num_input=7, num_output=3, num_neurons=40, num_layers=2, num_memory=5, num_branch=4,
                        num_synapse_per_branch=5, recurrent_fraction=0.3)
    a, b, c = (NP.init_params(cfg, seed=s) for s in (5, 5, 6))
    assert list(a) == NP.ordered_keys(cfg)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["layers.0.w_s"], c["layers.0.w_s"])
    k_c = 20
    n_rec = round(0.3 * k_c)
    for layer, D in ((0, 7), (1, 40)):
        src = a[f"layers.{layer}.synapse_source"]
        assert src.dtype == np.int64 and src.shape == (40, k_c)
        assert src.min() >= 0 and src.max() < D + 40
        assert np.all((src >= D).sum(1) == n_rec)  # exactly round(ρ·k_c) recurrent synapses per neuron
        # shuffled: recurrent synapses are not all in the first branch
        assert len({tuple(np.nonzero(row >= D)[0]) for row in src}) > 1
    w = a["layers.0.w_s"]
    assert np.abs(w).max() <= 1 / math.sqrt(k_c) and w.min() < 0 < w.max()
    assert np.all(a["layers.0.tau_b"] == 5.0)
    assert np.abs(a["layers.1.mlp.0.weight"]).max() <= 1 / math.sqrt(4 + 5)
    assert np.array_equal(a["layers.0._proto_tau_m"][0], a["layers.0._proto_tau_m"][-1])


@pytest.mark.parametrize("learn_tau", [False, True])
def test_parameter_count_and_split(learn_tau):
    N, K, d_m, h, n_b, spb, layers = 6, 3, 4, 7, 2, 3, 2
    cfg = NetworkConfig(num_input=5, num_output=K, num_neurons=N, num_layers=layers, num_memory=d_m,
                        mlp_hidden_size=h, num_branch=n_b, num_synapse_per_branch=spb, learn_memory_tau=learn_tau)
    k_c = n_b * spb
    k_e = (n_b + d_m + 1) * h + (h + 1) * d_m + (d_m + 1) + (d_m if learn_tau else 0)
    expected = layers * N * (k_c + k_e) + K * (N + 1)
    net = ELMNetwork(cfg)
    assert net.num_parameters == expected == sum(net.params[k].size for k in net.trainable_keys)
    split = NP.parameter_split(cfg)
    assert (split["k_c"], split["k_e"]) == (k_c, k_e)
    assert split["connectivity"] + split["complexity"] + split["readout"] == expected


@pytest.mark.parametrize("change, field", [
    ({"recurrent_fraction": 1.5}, "recurrent_fraction"),
    ({"recurrent_fraction": -0.1}, "recurrent_fraction"),
    ({"recurrent_fraction": float("nan")}, "recurrent_fraction"),
    ({"num_synapse_per_branch": 0}, "num_synapse_per_branch"),
    ({"num_branch": 0}, "num_branch"),
    ({"num_neurons": 0}, "num_neurons"),
    ({"num_layers": 0}, "num_layers"),
    ({"num_neurons": 10 ** 6, "num_memory": 100}, "num_neurons"),
    ({"num_synapse_per_branch": 10 ** 9}, "num_synapse_per_branch"),
    ({"mlp_activation": "softmax"}, "mlp_activation"),
    ({"tau_s_value": 5.0}, "tau_s_value"),
    ({"input_to_synapse_routing": "random_routing"}, "input_to_synapse_routing"),
    ({"memory_tau_min": -1.0}, "memory_tau_min"),
    ({"num_input": 0}, "num_input"),
])
def test_impossible_network_configs_name_the_field(change, field):
    with pytest.raises(ConfigError) as info:
        load_config_dict({"version": "elm_network", "num_input": 3, "num_output": 2, **change})
    assert info.value.field == field


def test_config_round_trips_through_json_and_the_factory(tmp_path):
    cfg = NetworkConfig(num_input=3, num_output=2, num_layers=2, recurrent_fraction=0.25)
    path = tmp_path / "net.json"
    cfg.save(path)
    assert ELMConfig.load(path) == cfg
    assert isinstance(build_model(cfg), ELMNetwork)
    assert isinstance(build_model(ELMConfig(num_input=2, num_output=1, num_memory=3)), ELM)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.__setitem__("layers.0.synapse_source", p["layers.0.synapse_source"] + 100), "sources outside"),
    (lambda p: p["layers.0.synapse_source"].__setitem__((0, 0), -1), "sources outside"),
    (lambda p: p["layers.0.w_s"].__setitem__((0, 0), np.nan), "NaN"),
    (lambda p: p.pop("readout.bias"), "missing parameter 'readout.bias'"),
    (lambda p: p.__setitem__("layers.0.w_o.weight", np.zeros((2, 2))), "shape"),
    (lambda p: p.__setitem__("layers.0.tau_b", -p["layers.0.tau_b"]), "positive"),
    (lambda p: p.__setitem__("extra", np.zeros(2)), "unexpected"),
])
def test_bad_parameters_are_one_clear_error(damage, message):
    cfg = NetworkConfig(num_input=3, num_output=2, num_neurons=4)
    p = NP.init_params(cfg, seed=0)
    damage(p)
    with pytest.raises(ELMError, match=message):
        ELMNetwork(cfg, params=p)


# ---- info, gradcheck, checkpoints, training -------------------------------------------------

def test_elm_info_shows_the_parameter_split(tmp_path):
    path = tmp_path / "net.json"
    path.write_text(json.dumps({"version": "elm_network", "num_input": 700, "num_output": 20, "num_neurons": 128,
                                "num_memory": 8, "num_branch": 4, "num_synapse_per_branch": 8}))
    result = invoke("info", path)
    assert result.exit_code == 0, result.output
    cfg = ELMConfig.load(path)
    assert f"parameters: {NP.count_trainable(cfg)} = connectivity 4096 (N x k_c = 128 x 32" in result.output
    assert "k_e" in result.output and "readout 2580" in result.output
    path.write_text(json.dumps({"version": "elm_network", "num_input": 7, "num_output": 2,
                                "recurrent_fraction": 2}))
    result = invoke("info", path)
    assert result.exit_code == 2 and "recurrent_fraction" in result.output


def test_elm_gradcheck_network():
    result = invoke("gradcheck", "--version", "elm_network", "--steps", "3")
    assert result.exit_code == 0, result.output
    assert "layers.1.w_s" in result.output and "FAIL" not in result.output


def test_checkpoint_round_trip(tmp_path):
    cfg = NetworkConfig(num_input=3, num_output=2, num_neurons=4, num_layers=2, learn_memory_tau=True)
    net = ELMNetwork(cfg, seed=3, dtype="float64")
    save_model(tmp_path / "m.npz", cfg, net.state_dict(), dtype="float64")
    loaded = load_file(tmp_path / "m.npz")
    assert loaded.config == cfg
    again = load_model(tmp_path / "m.npz")
    X = np.random.default_rng(0).normal(size=(2, 5, 3))
    assert isinstance(again, ELMNetwork) and np.array_equal(again.forward(X), net.forward(X))
    assert invoke("info", tmp_path / "m.npz").exit_code == 0


def _adding_run(tmp_path, name, epochs=8, **kw):
    from elmcore.data.synthetic import make_synthetic
    from elmcore.training.train import Trainer, TrainSettings
    task = make_synthetic("adding", n=3000, seed=0, length=10)
    model = dict(version="elm_network", num_neurons=16, num_memory=8, mlp_hidden_size=16, num_branch=2,
                 num_synapse_per_branch=4, recurrent_fraction=0.5, memory_tau_max=30.0)
    s = TrainSettings(task="adding", epochs=epochs, batch_size=32, lr=1e-2, run_dir=str(tmp_path / name),
                      checkpoint_every=5, model=model, **kw)
    return Trainer(s, task=task, progress=False, log=lambda m: None), task


@pytest.mark.slow
def test_a_network_learns_the_adding_problem(tmp_path):
    """~8 s: 16 neurons, 750 Adam steps on length-10 sequences; seeds 0–3 all end below 0.003."""
    trainer, task = _adding_run(tmp_path, "run")
    summary = trainer.run()
    target = task.splits["test"][1]
    chance = float(np.var(target))  # predicting the mean: ≈ 1/6
    assert summary["test"]["mse"] < 0.1 * chance, (summary["test"], chance)


def test_network_kill_and_resume_is_bit_identical(tmp_path):
    from elmcore.training.train import Trainer
    _adding_run(tmp_path, "full", epochs=1, batches_per_epoch=12)[0].run()
    trainer, task = _adding_run(tmp_path, "killed", epochs=1, batches_per_epoch=12)
    run_killed_after(trainer, 7)
    Trainer.resume(str(tmp_path / "killed"), task=task, progress=False, log=lambda m: None).run()
    full, again = load_file(tmp_path / "full" / "last.npz"), load_file(tmp_path / "killed" / "last.npz")
    assert full.meta["step"] == again.meta["step"] == 12
    for key in full.params:
        assert np.array_equal(full.params[key], again.params[key]), key
    for key in full.optim_state:
        assert np.array_equal(full.optim_state[key], again.optim_state[key]), key


def test_elm_train_eval_predict_a_network(tmp_path):
    rd = tmp_path / "run"
    task_opts = ["--task", "adding", "--task-option", "n=200", "--task-option", "length=12"]
    result = invoke("train", *task_opts, "--set", "version=elm_network", "--set", "num_neurons=16",
                    "--epochs", "1", "--batches-per-epoch", "3", "--run-dir", rd, "--quiet")
    assert result.exit_code == 0, result.output
    assert load_file(rd / "last.npz").config.num_neurons == 16
    result = invoke("eval", rd / "best.npz", *task_opts, "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    assert "mse" in json.loads((tmp_path / "m.json").read_text())["metrics"]
    X = np.random.default_rng(0).uniform(size=(2, 12, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    result = invoke("predict", rd / "best.npz", "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(tmp_path / "y.npy"), load_model(rd / "best.npz").forward(X))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batch_tiling_does_not_change_the_numbers(dtype, monkeypatch):
    """Full tiles of 8 rows (simd.ROW_LANES) move between rows and row vectors in 8 × 8 blocks and
    take the recurrent synapses as row vectors, other tiles item by item and entry by entry: the
    same bits either way. 11 neurons in 2 branches: whole blocks and items left over."""
    from elmcore.kernels import network_cpu, simd
    rng = np.random.default_rng(5)
    cfg = random_network_config(rng, num_layers=2, mlp_num_layers=1, recurrent_fraction=0.5, num_neurons=11,
                                num_branch=2)
    net = ELMNetwork(cfg, seed=0, dtype=dtype)
    X = rng.normal(size=(9, 6, cfg.num_input))
    G = rng.normal(size=(9, 6, cfg.num_output))
    results = []
    for rows in (1, 3, simd.ROW_LANES, 9):
        monkeypatch.setattr(network_cpu, "tile_rows", rows)
        Y, cache = net.forward(X, return_cache=True)
        results.append((Y, net.backward(G, cache, input_grad=True)))
    for Y, grads in results[1:]:
        assert np.array_equal(Y, results[0][0])
        assert all(np.array_equal(grads[k], results[0][1][k]) for k in grads)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_cache_written_with_non_temporal_stores_holds_the_same_bits(dtype, monkeypatch):
    from elmcore.kernels import network_cpu
    rng = np.random.default_rng(9)
    # 7 neurons: rows of 7·k items, so most rows start and end off the 32-byte vectors.
    cfg = random_network_config(rng, num_neurons=7, num_layers=2, mlp_num_layers=2, recurrent_fraction=0.5)
    net = ELMNetwork(cfg, seed=3, dtype=dtype)
    X, G = rng.normal(size=(5, 9, cfg.num_input)), rng.normal(size=(5, 9, cfg.num_output))
    results, streamed = [], []
    walk = network_cpu._network_forward
    monkeypatch.setattr(network_cpu, "_network_forward", lambda *a: (streamed.append(a[25]), walk(*a)))
    for limit in (network_cpu.STREAM_CACHE_BYTES, 0):
        monkeypatch.setattr(network_cpu, "STREAM_CACHE_BYTES", limit)
        Y, cache = net.forward(X, return_cache=True)
        kept = {key: cache["layers"][0][key].copy() for key in ("A0", "Z", "DM", "M", "O")}
        results.append((Y, kept, net.backward(G, cache, input_grad=True)))
    assert streamed == [False, False, True, True]  # two layers, each pass
    (Y, kept, grads), (Y_streamed, kept_streamed, grads_streamed) = results
    assert np.array_equal(Y, Y_streamed)
    assert all(np.array_equal(kept[key], kept_streamed[key]) for key in kept)
    assert all(np.array_equal(grads[key], grads_streamed[key]) for key in grads)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mlp_layers", [0, 1, 2])
def test_a_pass_without_cache_gives_the_cached_walks_outputs_and_state_bit_for_bit(dtype, mlp_layers, monkeypatch):
    from elmcore.kernels import network_cpu
    rng = np.random.default_rng(60 + mlp_layers)
    cfg = random_network_config(rng, num_neurons=7, num_layers=2, mlp_num_layers=mlp_layers, recurrent_fraction=0.5)
    net = ELMNetwork(cfg, seed=5, dtype=dtype)
    X = rng.normal(size=(9, 6, cfg.num_input))  # 9 rows: whole tiles and a rest
    state = {key: rng.normal(size=a.shape).astype(dtype) for key, a in net.init_state(9).items()}
    walks = record_calls(monkeypatch, network_cpu, ("network_forward", "network_forward_without_cache"))
    Y_cached, cache = net.forward(X, return_cache=True, state=state)
    final_cached = {key: a.copy() for key, a in cache["final_state"].items()}
    Y = net.forward(X, state=state)
    Y_streamed, final = net.run(X, state)
    assert walks == ["network_forward"] * 2 + ["network_forward_without_cache"] * 4  # two layers, three passes
    assert np.array_equal(Y, Y_cached) and np.array_equal(Y_streamed, Y_cached)
    # In segments, as a sequence too long for memory runs (steps 0-3 and 4-5): every layer carries its state.
    net.time_block = 2
    Y_segments = net.forward(X, state=state, recompute_segment=3)
    assert walks[6:] == ["network_forward_without_cache"] * 4 and np.array_equal(Y_segments, Y_cached)
    assert all(np.array_equal(final[key], final_cached[key]) for key in final_cached)
    # Kernels without the capability (the CUDA module's): the cached walk, the same numbers.
    del net.time_block  # back to the class default
    monkeypatch.setattr(network_cpu, "CAPABILITIES", network_cpu.CAPABILITIES - {"forward_without_cache"})
    walks.clear()
    Y_fallback, final_fallback = net.run(X, state)
    assert walks == ["network_forward"] * 2 and np.array_equal(Y_fallback, Y_cached)
    assert all(np.array_equal(final_fallback[key], final_cached[key]) for key in final_cached)


@pytest.mark.parametrize("return_cache", [False, True])
@pytest.mark.parametrize("segment", [0, -3, 2.5, True, "4"])
def test_a_bad_recompute_segment_is_refused_with_or_without_a_cache(return_cache, segment):
    cfg = random_network_config(np.random.default_rng(80), num_layers=1)
    net = ELMNetwork(cfg, seed=1, dtype="float64")
    with pytest.raises(ELMError, match="recompute_segment"):
        net.forward(np.zeros((2, 5, cfg.num_input)), return_cache=return_cache, recompute_segment=segment)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mlp_layers", [0, 1, 2])
def test_a_cache_of_b_alone_gives_the_gradients_of_the_whole_first_layer_input_bit_for_bit(dtype, mlp_layers):
    rng = np.random.default_rng(70 + mlp_layers)
    cfg = random_network_config(rng, num_neurons=5, num_layers=2, mlp_num_layers=mlp_layers, recurrent_fraction=0.5,
                                learn_memory_tau=True)
    net = ELMNetwork(cfg, seed=2, dtype=dtype)
    net.time_block = 4  # 11 steps in three blocks: a block's first step reads m_{t−1} from the block before
    X, G = rng.normal(size=(6, 11, cfg.num_input)), rng.normal(size=(6, 11, cfg.num_output))
    # A state to start from, so the rebuilt κ_m ⊙ m_{t−1} of step 0 comes from m0, not from zeros.
    state = {key: rng.normal(size=a.shape).astype(dtype) for key, a in net.init_state(6).items()}
    Y, cache = net.forward(X, return_cache=True, state=state)
    assert [layer["A0"].shape[2] for layer in cache["layers"]] == [cfg.num_branch] * 2
    rebuilt = net.backward(G, cache, input_grad=True)
    net.separate_weight_grads = True  # a forward that keeps the whole a_0 …
    Y_whole, cache = net.forward(X, return_cache=True, state=state)
    assert [layer["A0"].shape[2] for layer in cache["layers"]] == [cfg.num_branch + cfg.num_memory] * 2
    for layer in cache["layers"]:
        layer["weight_grads_in_walk"] = True  # … read by the same walk
    whole = net.backward(G, cache, input_grad=True)
    assert np.array_equal(Y, Y_whole)
    assert set(rebuilt) == set(whole) and all(np.array_equal(rebuilt[key], whole[key]) for key in whole)


@pytest.mark.parametrize("seed", range(4))
def test_weight_gradients_summed_in_the_walk_equal_the_sums_after_it(seed, monkeypatch):
    from elmcore.kernels import network_cpu
    rng = np.random.default_rng(40 + seed)
    # 0 … 3 MLP layers (no hidden layer, one, and hidden-to-hidden weights); 1 … 9 rows: groups of 4 and a rest.
    cfg = random_network_config(rng, mlp_num_layers=seed, recurrent_fraction=0.5)
    net = ELMNetwork(cfg, seed=seed, dtype="float64")
    net.time_block = 4  # 11 steps: three time blocks, each walked by its own call
    X, G = rng.normal(size=(2 * seed + 3, 11, cfg.num_input)), rng.normal(size=(2 * seed + 3, 11, cfg.num_output))
    blocks = []
    walk = network_cpu.network_backward_block
    monkeypatch.setattr(network_cpu, "network_backward_block", lambda *a: (blocks.append(a[23:25]), walk(*a)))
    grads = {}
    for separate in (False, True):
        net.separate_weight_grads = separate
        Y, cache = net.forward(X, return_cache=True)
        grads[separate] = net.backward(G, cache, input_grad=True)
    assert blocks == [(8, 11), (4, 8), (0, 4)] * cfg.num_layers
    for key in grads[True]:
        scale = max(np.abs(grads[True][key]).max(), 1e-300)
        assert np.abs(grads[False][key] - grads[True][key]).max() <= 1e-13 * scale, key


@pytest.mark.parametrize("batch, steps, t0, t1", [(1, 1, 0, 1), (1, 3, 0, 3), (13, 1, 0, 1), (4, 10, 0, 10),
                                                 (3, 11, 4, 9), (2, 7, 6, 7)])
def test_neuron_weight_grad_is_the_per_neuron_outer_product_sum(batch, steps, t0, t1):
    from elmcore.kernels import network_cpu
    rng = np.random.default_rng(batch * 100 + steps)
    G, A = rng.normal(size=(batch, steps, 5, 7)), rng.normal(size=(batch, steps, 3, 7))
    out, bias = np.empty((3, 5, 7)), np.empty((5, 7))
    network_cpu.neuron_weight_grad(G, A, t0, t1, out, bias)
    Gb, Ab = G[:, t0:t1], A[:, t0:t1]
    assert np.allclose(out, np.einsum("btji,btoi->joi", Ab, Gb), rtol=1e-13, atol=1e-13)
    assert np.allclose(bias, Gb.sum((0, 1)), rtol=1e-13, atol=1e-13)
    # In place over a time block, the same bits as over a copy of the block's rows.
    copy_out, copy_bias = np.empty_like(out), np.empty_like(bias)
    network_cpu.neuron_weight_grad(np.ascontiguousarray(Gb), np.ascontiguousarray(Ab), 0, t1 - t0, copy_out,
                                   copy_bias)
    assert np.array_equal(out, copy_out) and np.array_equal(bias, copy_bias)
