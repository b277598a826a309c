"""Configuration validation, JSON round trips, release configs and parameter counts."""

import glob
import json
import os

import numpy as np
import pytest

from elmcore import ELM, ELMConfig
from elmcore.neuron import params as P
from elmcore.errors import ConfigError, ELMError
from helpers import REFERENCE_DIR

SPEC_COUNTS = {1: 4601, 2: 4708, 3: 4823, 5: 5077, 7: 5363, 10: 5852, 15: 6827, 20: 8002, 25: 9377,
               30: 10952, 40: 14702, 50: 19252, 75: 34127, 100: 54002}


def test_release_model_configs_load_as_they_are_with_spec_counts():
    paths = sorted(glob.glob(os.path.join(REFERENCE_DIR, "*", "model_config.json")))
    assert len(paths) == 15
    seen = {}
    for path in paths:
        cfg = ELMConfig.load(path)
        with open(os.path.join(os.path.dirname(path), "model_stats.json")) as f:
            stats = json.load(f)
        count = P.count_trainable(cfg)
        assert count == stats["model_param_count"]
        seen[cfg.num_memory] = count
        assert cfg.version == "elm_v1"
    assert {k: seen[k] for k in SPEC_COUNTS} == SPEC_COUNTS


def test_json_round_trip_both_versions(tmp_path):
    for version in ("elm_v1", "branch_elm_v2"):
        cfg = ELMConfig(num_input=10, num_output=3, num_branch=5, num_synapse_per_branch=2,
                        mlp_num_layers=2, mlp_activation="silu", learn_memory_tau=True, version=version)
        path = tmp_path / f"{version}.json"
        cfg.save(path)
        again = ELMConfig.load(path)
        assert again == cfg
        keys = json.loads(path.read_text())
        assert ("tau_b_value" in keys) == (version == "branch_elm_v2")
        assert ("tau_s_value" in keys) == (version == "elm_v1")


@pytest.mark.parametrize("changes, field", [
    (dict(num_input=6, num_branch=4), "num_synapse_per_branch"),            # 4 synapses != 6 inputs
    (dict(num_input=10, num_branch=2, num_synapse_per_branch=4,
          input_to_synapse_routing="neuronio_routing"), "num_synapse_per_branch"),  # needs 5
    (dict(mlp_activation="softmax"), "mlp_activation"),
    (dict(input_to_synapse_routing="clever"), "input_to_synapse_routing"),
    (dict(tau_s_value=0.0), "tau_s_value"),
    (dict(memory_tau_min=-1.0), "memory_tau_min"),
    (dict(memory_tau_min=10.0, memory_tau_max=10.0), "memory_tau_max"),
    (dict(memory_tau_min=10.0, memory_tau_max=5.0), "memory_tau_max"),
    (dict(num_memory=0), "num_memory"),
    (dict(mlp_num_layers=-1), "mlp_num_layers"),
    (dict(mlp_hidden_size=0), "mlp_hidden_size"),
    (dict(delta_t=float("nan")), "delta_t"),
    (dict(num_output=2.5), "num_output"),
    (dict(learn_memory_tau="yes"), "learn_memory_tau"),
    (dict(version="elm_v3"), "version"),
    (dict(lambda_value=0), "lambda_value"),
])
def test_impossible_configs_name_the_field(changes, field):
    base = dict(num_input=6, num_output=2)
    with pytest.raises(ConfigError) as e:
        ELMConfig.from_dict({**base, **changes})
    assert e.value.field == field
    assert field in str(e.value)


def test_unknown_and_wrong_version_fields_are_rejected():
    with pytest.raises(ConfigError, match="num_memroy"):
        ELMConfig.from_dict(dict(num_input=3, num_output=1, num_memroy=4))
    with pytest.raises(ConfigError, match="tau_b_value"):
        ELMConfig.from_dict(dict(num_input=3, num_output=1, tau_b_value=4.0))
    with pytest.raises(ConfigError, match="tau_s_value"):
        ELMConfig.from_dict(dict(num_input=3, num_output=1, tau_s_value=4.0, version="branch_elm_v2"))
    with pytest.raises(ConfigError, match="num_input"):
        ELMConfig.from_dict(dict(num_output=1))


def test_bad_config_files(tmp_path):
    with pytest.raises(ELMError, match="not found"):
        ELMConfig.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ELMError, match="not valid JSON"):
        ELMConfig.load(bad)


def test_v2_widens_a_degenerate_tau_range_like_the_release():
    cfg = ELMConfig.from_dict(dict(num_input=2, num_output=1, memory_tau_min=5.0, memory_tau_max=5.000001,
                                   version="branch_elm_v2"))
    assert cfg.effective_tau_max == pytest.approx(5.0 + 3e-6)


def test_neuronio_routing_matches_spec_formula():
    idx, mask = P.neuronio_routing(20, 4, 6)
    inter = np.array([(i % 2) * 10 + i // 2 for i in range(20)])
    expect_idx, expect_mask = [], []
    for k in range(4):
        for e in range(6):
            ov = k * 5 + e
            expect_mask.append(ov < 20)
            expect_idx.append(inter[min(ov, 19)])
    assert idx.tolist() == expect_idx and mask.tolist() == expect_mask


def test_initialisation_is_seeded_and_follows_the_release_distributions():
    cfg = ELMConfig(num_input=30, num_output=4, num_memory=20, mlp_num_layers=2,
                    input_to_synapse_routing="random_routing", num_branch=5, num_synapse_per_branch=7)
    a, b, c = (P.init_params(cfg, seed=s, dtype=np.float64) for s in (1, 1, 2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["mlp.network.0.weight"], c["mlp.network.0.weight"])
    for (wk, bk), (out, inp) in zip(P.mlp_layer_keys(2), P.mlp_layer_shapes(cfg)):
        assert a[wk].shape == (out, inp)
        assert np.abs(a[wk]).max() <= 1 / np.sqrt(inp) and np.abs(a[wk]).max() > 0.8 / np.sqrt(inp)
    assert np.all(a["_proto_w_s"] == 0.5) and np.all(a["tau_s"] == 5.0)
    tau_m = 999 / (1 + np.exp(-a["_proto_tau_m"])) + 1
    assert tau_m[0] == pytest.approx(1 + 1e-6, rel=1e-6) and tau_m[-1] == pytest.approx(1000 - 1e-6, rel=1e-9)
    assert np.allclose(np.diff(np.log(tau_m)), np.log(tau_m[1] / tau_m[0]))  # log-spaced
    assert a["input_to_synapse_indices"].dtype == np.int64
    assert a["input_to_synapse_indices"].min() >= 0 and a["input_to_synapse_indices"].max() < 30


def test_model_rejects_bad_parameters_and_inputs():
    cfg = ELMConfig(num_input=4, num_output=2, num_memory=3)
    p = P.init_params(cfg)
    with pytest.raises(ELMError, match="w_y.weight"):
        ELM(cfg, params={**p, "w_y.weight": np.zeros((3, 3))})
    with pytest.raises(ELMError, match="_proto_w_s"):
        ELM(cfg, params={k: v for k, v in p.items() if k != "_proto_w_s"})
    bad = dict(p)
    bad["mlp.network.0.bias"] = bad["mlp.network.0.bias"].copy()
    bad["mlp.network.0.bias"][0] = np.nan
    with pytest.raises(ELMError, match="NaN"):
        ELM(cfg, params=bad)
    model = ELM(cfg)
    with pytest.raises(ELMError, match=r"\(batch, time, 4\)"):
        model.forward(np.zeros((2, 3, 5)))
    X = np.zeros((2, 3, 4))
    X[1, 2, 3] = np.nan
    with pytest.raises(ELMError, match="batch 1, step 2, input 3"):
        model.forward(X)
