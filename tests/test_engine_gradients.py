"""Rung 2 of the verification ladder (docs/architecture.md §4):
central finite differences in float64 on randomised configurations."""

import zlib

import numpy as np
import pytest

from elmcore import ELM
from elmcore.errors import ELMError
from elmcore.verification.gradcheck import gradcheck, passes, random_test_params
from helpers import random_config, record_calls

FD_TOLERANCE = 1e-6


def _check(cfg, params=None, batch=2, steps=5, seed=0):
    rows = gradcheck(cfg, params=params, batch=batch, steps=steps, seed=seed, max_entries=8)
    model = ELM(cfg, dtype="float64")
    assert {r.name for r in rows} == set(model.trainable_keys) | {"X"}
    bad = [r for r in rows if not passes(r, FD_TOLERANCE)]
    assert not bad, bad


@pytest.mark.parametrize("seed", range(24))
def test_random_configs(seed):
    rng = np.random.default_rng(seed)
    cfg = random_config(rng)
    _check(cfg, batch=int(rng.integers(1, 3)), steps=int(rng.integers(1, 7)), seed=seed)


@pytest.mark.parametrize("version", ["elm_v1", "branch_elm_v2"])
@pytest.mark.parametrize("routing", [None, "random_routing", "neuronio_routing"])
@pytest.mark.parametrize("layers", [0, 1, 2, 3])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_every_axis(version, routing, layers, activation):
    rng = np.random.default_rng(zlib.crc32(f"{version}{routing}{layers}{activation}".encode()))
    cfg = random_config(rng, version=version, routing=routing, layers=layers, activation=activation)
    cfg = cfg.replace(learn_memory_tau=True)
    _check(cfg, seed=layers)


def test_batch_one_and_single_step():
    rng = np.random.default_rng(7)
    cfg = random_config(rng, version="elm_v1", routing="neuronio_routing", layers=2)
    _check(cfg, batch=1, steps=1)


def test_v1_nonuniform_tau_s_uses_per_synapse_traces():
    """τ_s differing inside a branch cannot collapse to a per-branch scan: the fallback path."""
    rng = np.random.default_rng(3)
    cfg = random_config(rng, version="elm_v1", routing="random_routing", layers=1).replace(
        num_branch=2, num_synapse_per_branch=3, learn_memory_tau=True)
    params = random_test_params(cfg, rng, nonuniform_tau_s=True)
    model = ELM(cfg, params=params, dtype="float64")
    assert model._per_synapse_scan
    _check(cfg, params=params)


def test_fd_detects_a_wrong_gradient():
    """The check can fail: corrupt one analytic gradient and the relative error explodes."""
    rng = np.random.default_rng(0)
    cfg = random_config(rng, layers=1)
    model = ELM(cfg, params=random_test_params(cfg, rng), dtype="float64")
    X = rng.normal(size=(1, 4, cfg.num_input))
    G = rng.normal(size=(1, 4, cfg.num_output))
    Y, cache = model.forward(X, return_cache=True)
    g = model.backward(G, cache)["w_y.bias"]
    eps = 1e-6
    model.params["w_y.bias"][0] += eps
    up = (model.forward(X) * G).sum()
    model.params["w_y.bias"][0] -= 2 * eps
    down = (model.forward(X) * G).sum()
    numeric = (up - down) / (2 * eps)
    assert abs(numeric - g[0]) < 1e-7
    assert abs(numeric - 1.01 * g[0]) > 1e-7 * abs(g[0]) or g[0] == 0


@pytest.mark.parametrize("version", ["elm_v1", "branch_elm_v2"])
@pytest.mark.parametrize("seed", range(3))
def test_gradients_from_a_nonzero_initial_state(version, seed):
    """Stateful training (truncated BPTT) starts each window from the last one's final state:
    with random non-zero scan channels u and memory m the gradients still equal central
    differences (the state is a constant, as in training)."""
    rng = np.random.default_rng(200 + seed)
    cfg = random_config(rng, version=version, layers=seed % 3).replace(learn_memory_tau=True)
    rows = gradcheck(cfg, batch=2, steps=5, seed=seed, max_entries=8, initial_state=True)
    assert {r.name for r in rows} == set(ELM(cfg, dtype="float64").trainable_keys) | {"X"}
    bad = [r for r in rows if not passes(r, FD_TOLERANCE)]
    assert not bad, bad


def test_forward_from_a_state_continues_the_stream_and_returns_its_final_state():
    rng = np.random.default_rng(11)
    cfg = random_config(rng, layers=1)
    model = ELM(cfg, params=random_test_params(cfg, rng), dtype="float64")
    X = rng.normal(size=(2, 9, cfg.num_input))
    Y = model.forward(X)
    Y1, cache1 = model.forward(X[:, :5], return_cache=True)
    Y2, cache2 = model.forward(X[:, 5:], return_cache=True, state=cache1["final_state"])
    np.testing.assert_allclose(np.concatenate([Y1, Y2], axis=1), Y, rtol=1e-12, atol=1e-13)
    _, state = model.run(X, model.init_state(2))
    for key in ("u", "m"):
        np.testing.assert_allclose(cache2["final_state"][key], state[key], rtol=1e-12, atol=1e-14)


# Every input path: dense (v2 and v1), sparse spikes with one shared decay, v1's per-synapse scan.
@pytest.mark.parametrize("path", ["dense", "dense_v1", "sparse", "per_synapse"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_a_pass_without_cache_gives_the_cached_passes_outputs_and_state_bit_for_bit(path, dtype, layers,
                                                                                     monkeypatch):
    from elmcore.kernels import cpu as cpu_kernels
    rng = np.random.default_rng(300 + layers)
    version = "elm_v1" if path in ("dense_v1", "per_synapse") else "branch_elm_v2"
    cfg = random_config(rng, version=version, routing="random_routing", layers=layers).replace(
        num_branch=2, num_synapse_per_branch=3)
    params = random_test_params(cfg, rng, nonuniform_tau_s=path == "per_synapse")
    key = "tau_b" if cfg.is_v2 else "tau_s"
    if path == "sparse":
        params[key] = np.full_like(params[key], 3.7)  # one decay for every channel
        monkeypatch.setattr(ELM, "SPARSE_FIRST_LAYER_DENSITY", 1.0)
    model = ELM(cfg, params=params, dtype=dtype)
    model.time_block = 2  # so that a pass in segments (below) has several
    assert model._per_synapse_scan == (path == "per_synapse")
    X = rng.normal(size=(19, 7, cfg.num_input)) * (rng.random((19, 7, cfg.num_input)) < 0.3)  # tiles and a rest
    state = {key: rng.normal(size=a.shape).astype(dtype) for key, a in model.init_state(19).items()}
    walks = record_calls(monkeypatch, cpu_kernels, ("recur_forward", "recur_forward_without_cache"))
    Y_cached, cache = model.forward(X, return_cache=True, state=state)
    assert cache["input_path"] == ("sparse" if path == "sparse" else "dense")
    Y = model.forward(X, state=state)
    Y_streamed, final = model.run(X, state)
    # In segments, as a sequence too long for memory runs: steps 0-3 and 4-6.
    Y_segments = model.forward(X, state=state, recompute_segment=3)
    assert walks == ["recur_forward"] + ["recur_forward_without_cache"] * 4
    assert np.array_equal(Y, Y_cached) and np.array_equal(Y_streamed, Y_cached)
    assert np.array_equal(Y_segments, Y_cached)
    assert all(np.array_equal(final[k], cache["final_state"][k]) for k in ("u", "m"))
    # Kernels without the capability (the CUDA module's): the cached pass, the same numbers.
    monkeypatch.setattr(cpu_kernels, "CAPABILITIES", cpu_kernels.CAPABILITIES - {"forward_without_cache"})
    walks.clear()
    Y_fallback, final_fallback = model.run(X, state)
    assert walks == ["recur_forward"] and np.array_equal(Y_fallback, Y_cached)
    assert all(np.array_equal(final_fallback[k], cache["final_state"][k]) for k in ("u", "m"))


@pytest.mark.parametrize("segment", [0, -3, 2.5, True, "4"])
def test_a_bad_recompute_segment_is_refused_without_a_cache_too(segment):
    cfg = random_config(np.random.default_rng(12), layers=1)
    with pytest.raises(ELMError, match="recompute_segment"):
        ELM(cfg, dtype="float64").forward(np.zeros((2, 5, cfg.num_input)), recompute_segment=segment)


@pytest.mark.parametrize("seed", range(8))
def test_sparse_first_layer_path_equals_dense_path(seed, monkeypatch):
    """Sparse spike input with one shared decay takes the sparse first-layer path; same numbers,
    from the zero state and from a non-zero one (whose part of the first layer's weight
    gradient the sparse path adds separately)."""
    rng = np.random.default_rng(100 + seed)
    cfg = random_config(rng, routing=[None, "random_routing", "neuronio_routing"][seed % 3]).replace(
        learn_memory_tau=True)
    params = random_test_params(cfg, rng)
    key = "tau_b" if cfg.is_v2 else "tau_s"
    params[key] = np.full_like(params[key], 3.7)  # one decay for every channel
    model = ELM(cfg, params=params, dtype="float64")
    X = rng.normal(size=(3, 9, cfg.num_input)) * (rng.random((3, 9, cfg.num_input)) < 0.04)
    G = rng.normal(size=(3, 9, cfg.num_output))
    state = model.init_state(3)
    state["u"] = rng.normal(size=state["u"].shape)
    results = []
    for threshold in (1.0, 0.0):  # everything sparse enough / nothing sparse enough
        monkeypatch.setattr(ELM, "SPARSE_FIRST_LAYER_DENSITY", threshold)
        Y, cache = model.forward(X, return_cache=True)
        assert cache["input_path"] == ("sparse" if threshold == 1.0 else "dense")
        assert ("R" in cache) == (threshold == 1.0)
        grads = model.backward(G, cache, input_grad=True)
        Ys, _ = model.run(X, state)  # streaming from a non-zero scan state
        _, cache = model.forward(X, return_cache=True, state=state)
        state_grads = model.backward(G, cache, input_grad=True)
        results.append((Y, grads, Ys, state_grads))
    (Y1, g1, S1, h1), (Y2, g2, S2, h2) = results
    np.testing.assert_allclose(Y1, Y2, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(S1, S2, rtol=1e-12, atol=1e-13)
    for k in g2:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-10, atol=1e-12, err_msg=k)
        np.testing.assert_allclose(h1[k], h2[k], rtol=1e-10, atol=1e-12, err_msg=k)
