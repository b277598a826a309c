"""Hostile model configs (ELM Networks above all) in config files, model files and --set: one `error:` line
naming the field at fault, exit 2, no warning printed, and refused before anything large is built."""

import json
import os
import zipfile

import numpy as np
import pytest

from elmcore.engine.factory import build_model
from elmcore.network.config import NetworkConfig
from elmcore.training.checkpoint import save_model
from hostile import assert_refused, invoke, run_elm

NETWORK = {"num_input": 2, "num_output": 1, "version": "elm_network", "num_neurons": 2, "num_memory": 2,
           "num_branch": 2, "num_synapse_per_branch": 2}
NEURON = {"num_input": 2, "num_output": 1, "version": "branch_elm_v2", "num_memory": 2}


@pytest.mark.parametrize("base,changes,field", [
    (NETWORK, {"num_neurons": 10 ** 9}, "num_neurons"),
    (NETWORK, {"num_synapse_per_branch": 10 ** 9}, "num_synapse_per_branch"),
    (NETWORK, {"num_branch": 10 ** 9}, "num_branch"),
    (NETWORK, {"num_input": 10 ** 10}, "num_input"),
    (NETWORK, {"num_output": 10 ** 10}, "num_output"),
    (NETWORK, {"num_layers": 10 ** 9}, "num_layers"),
    (NETWORK, {"num_memory": 10 ** 6}, "num_memory"),
    (NETWORK, {"mlp_hidden_size": 10 ** 5, "mlp_num_layers": 2}, "mlp_hidden_size"),
    (NETWORK, {"mlp_num_layers": 2 * 10 ** 7}, "mlp_num_layers"),
    (NETWORK, {"mlp_num_layers": 10 ** 9, "num_neurons": 1, "num_memory": 1, "mlp_hidden_size": 1}, "mlp_num_layers"),
    (NETWORK, {"mlp_num_layers": 10 ** 6}, "mlp_num_layers"),
    (NETWORK, {"num_neurons": 10 ** 4000}, "num_neurons"),
    (NETWORK, {"recurrent_fraction": 10 ** 400}, "recurrent_fraction"),
    (NETWORK, {"lambda_value": 10 ** 400}, "lambda_value"),
    (NETWORK, {"memory_tau_max": 1e308}, "memory_tau_max"),
    (NETWORK, {"memory_tau_min": 1e300, "memory_tau_max": 1e301}, "memory_tau_min"),
    (NEURON, {"mlp_num_layers": 10 ** 6, "mlp_hidden_size": 1, "num_memory": 1}, "mlp_num_layers"),
    (NEURON, {"num_memory": 10 ** 4000}, "num_memory"),
    (NEURON, {"w_s_value": 10 ** 400}, "w_s_value"),
    (NEURON, {"memory_tau_max": 1e308}, "memory_tau_max"),
    (dict(NEURON, version="elm_v1"), {"memory_tau_max": 1e308}, "memory_tau_max"),
])
def test_a_config_file_with_an_absurd_field_is_refused_at_once_naming_it(tmp_path, base, changes, field):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base, **changes}))
    assert_refused(invoke("info", path, seconds=20), f"'{field}'")
    assert_refused(invoke("train", "--task", "adding", "--task-option", "n=40", "--task-option", "length=4",
                          "--model-config", path, "--run-dir", tmp_path / "run", "--quiet", seconds=20), f"'{field}'")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_network_beyond_the_memory_limit_blames_the_field_that_made_it_so(tmp_path):
    # 1.5e9 parameters (under the element limit) need 48 GB to train; the subprocess may use 8 GiB.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**NETWORK, "num_memory": 10, "num_branch": 4, "num_synapse_per_branch": 4,
                                "mlp_num_layers": 900, "num_neurons": 4000}))
    assert_refused(run_elm("info", path), "'mlp_num_layers'", "memory")


@pytest.mark.parametrize("setting", ["memory_tau_max=1e308", "mlp_num_layers=1000000000", "num_neurons=1000000000"])
def test_set_of_an_absurd_network_field_is_refused_before_training(tmp_path, setting):
    field = setting.partition("=")[0]
    result = invoke("train", "--task", "adding", "--task-option", "n=40", "--task-option", "length=4",
                    "--set", "version=elm_network", "--set", setting, "--run-dir", tmp_path / "run", "--quiet",
                    seconds=20)
    assert_refused(result, f"'{field}'")


def test_an_integer_of_thousands_of_digits_in_a_config_file_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(NETWORK)[:-1] + ', "num_memory": ' + "9" * 5000 + "}")
    assert_refused(invoke("info", path), str(path))


def _model_file(tmp_path, **config_changes):
    cfg = NetworkConfig.from_dict(NETWORK)
    path = tmp_path / "model.npz"
    save_model(path, cfg, build_model(cfg, seed=0).state_dict())
    with zipfile.ZipFile(path) as z:
        arrays = {name[:-4]: np.lib.format.read_array(z.open(name)) for name in z.namelist()}
    text = json.dumps({**json.loads(str(arrays["config"])), **config_changes})
    for key, value in config_changes.items():
        if value == "HUGE":
            text = text.replace('"HUGE"', "9" * 5000)
    arrays["config"] = np.array(text)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize("changes,fragment", [
    ({"num_memory": "HUGE"}, "model.npz"),
    ({"mlp_num_layers": 10 ** 9}, "mlp_num_layers"),
    ({"num_neurons": 10 ** 9}, "num_neurons"),
    ({"memory_tau_max": 1e308}, "memory_tau_max"),
])
def test_a_model_file_with_a_damaged_config_is_refused(tmp_path, changes, fragment):
    path = _model_file(tmp_path, **changes)
    assert_refused(invoke("info", path, seconds=20), fragment)
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3, 2), np.float32))
    assert_refused(invoke("predict", path, "--input", x, "--output", tmp_path / "y.npy", seconds=20), fragment)


def test_an_input_beyond_float32_is_named_not_warned_about(tmp_path):
    path = _model_file(tmp_path)
    x = tmp_path / "x.npy"
    big = np.zeros((1, 3, 2))
    big[0, 1, 1] = 1e300
    np.save(x, big)
    line = assert_refused(invoke("predict", path, "--input", x, "--output", tmp_path / "y.npy"), "1e+300")
    assert "step 1" in line and "float32" in line
    assert not (tmp_path / "y.npy").exists()


# ---- oracle files whose expected values are not numbers --------------------------------------------

@pytest.mark.parametrize("oracle", ["golden/v1_basic.npz", "golden_network/net_basic.npz"])
@pytest.mark.parametrize("entry,value", [("Y", np.nan), ("G", np.inf), ("loss", -np.inf), ("grad", np.nan),
                                         ("trace", np.inf)])
def test_an_oracle_with_non_finite_expected_values_is_an_error(tmp_path, oracle, entry, value):
    from helpers import HERE
    with zipfile.ZipFile(os.path.join(HERE, "data", oracle)) as z:
        arrays = {name[:-4]: np.lib.format.read_array(z.open(name)) for name in z.namelist()}
    key = entry if entry in arrays else sorted(k for k in arrays if k.startswith(entry + "/") and arrays[k].size)[0]
    damaged = np.array(arrays[key], dtype=np.float64)
    damaged.reshape(-1)[-1] = value
    arrays[key] = damaged
    path = tmp_path / "oracle.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    assert_refused(invoke("verify", path), f"'{key}'", "oracle.npz")
