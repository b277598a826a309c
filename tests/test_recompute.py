"""Recomputation in segments (docs/architecture.md, "Long sequences in bounded memory").

A forward that keeps only the state every k steps, and a backward that recomputes each
segment's cache from it (last segment first), must give the cached backward's gradients
bit for bit in float64: every k (not dividing T, 1, T), both families, zero and non-zero
initial state, every input path. The time block is made small here so that short
sequences have many blocks and segments; the cached backward with small blocks must
still equal the plain reference (a wrong blocked sum would otherwise pass unnoticed).
"""

import json
import os

import numpy as np
import pytest

from elmcore import ELM, ELMError, ELMNetwork
from elmcore.engine import segments
from elmcore.neuron import params as P
from elmcore.training.checkpoint import load_file
from elmcore.training.train import TrainSettings
from elmcore.verification.oracle import relative_error
from helpers import CUDA_HERE, needs_cuda, run_under_simulator
from test_reference import KERNEL_TOL, SEVERAL_PER_BRANCH, _engine_state, _network_setup, _neuron_setup, _reference_run

HERE = os.path.dirname(__file__)
STEPS = 11
# (time block, recompute segments): segments 1 and T, segments not dividing T, segments
# rounded up to whole blocks.
SCHEDULES = [(1, (1, 2, 4, 5, 10)), (3, (1, 3, 4, 6, 9)), (4, (4, 8))]


def _run(model, X, G, state, segment):
    Y, cache = model.forward(X, return_cache=True, state=state, recompute_segment=segment)
    recomputed = "segments" in cache or any("segments" in layer for layer in cache.get("layers", ()))
    grads = model.backward(G, cache, input_grad=True)
    host = model.backend.to_host
    out = {"Y": host(Y), **{f"grad/{k}": host(v) for k, v in grads.items()},
           **{f"final/{k}": host(v) for k, v in cache["final_state"].items()}}
    return {k: np.asarray(v) for k, v in out.items()}, recomputed, cache


def _assert_recompute_is_exact(cfg, params, X, G, state, device="cpu", schedules=SCHEDULES, path=None):
    family = ELMNetwork if cfg.is_network else ELM
    for block, segment_list in schedules:
        model = family(cfg, params=params, dtype="float64", device=device)
        model.time_block = block
        start = None if state is None else _engine_state(model, state)
        cached, recomputed, cache = _run(model, X, G, start, segment=X.shape[1])
        assert not recomputed
        if path is not None:
            assert cache["input_path"] == path
        # The blocked sums are still the gradients: the cached backward equals the reference.
        ref = _reference_run(cfg, params, X, G, state)
        bad = {k: e for k in ref if k.startswith("grad/")
               if not (e := relative_error(cached[k], ref[k])) <= KERNEL_TOL}
        assert not bad, f"time block {block}: beyond {KERNEL_TOL} of the reference: {bad}"
        for segment in segment_list:
            got, recomputed, cache = _run(model, X, G, start, segment)
            assert recomputed == (segments.aligned_segment(segment, block) < X.shape[1])
            if path is not None:
                assert cache["input_path"] == path
            assert set(got) == set(cached)
            differ = [k for k in cached if not np.array_equal(got[k], cached[k])]
            assert not differ, f"time block {block}, segment {segment}: {differ} differ from the cached pass"


NEURON_CASES = [(version, routing, layers, activation) for version in ("elm_v1", "branch_elm_v2")
                for routing, layers, activation in ((None, 0, "relu"), ("random_routing", 1, "silu"),
                                                    ("neuronio_routing", 2, "silu"), ("random_routing", 3, "relu"))]


@pytest.mark.parametrize("version,routing,layers,activation", NEURON_CASES,
                         ids=[f"{v}-{r or 'none'}-L{n}-{a}" for v, r, n, a in NEURON_CASES])
def test_neuron_recomputed_gradients_are_the_cached_ones(version, routing, layers, activation):
    cfg, params, X, G, state = _neuron_setup(31 + layers, version, routing, layers, activation, steps=STEPS)
    for start in (None, state):
        _assert_recompute_is_exact(cfg, params, X, G, start, path="dense")


def test_neuron_per_synapse_path_recomputes_exactly():
    cfg, params, X, G, state = _neuron_setup(7, "elm_v1", "random_routing", 2, "silu", per_synapse=True,
                                             steps=STEPS, **SEVERAL_PER_BRANCH["random_routing"])
    assert ELM(cfg, params=params)._per_synapse_scan
    for start in (None, state):
        _assert_recompute_is_exact(cfg, params, X, G, start, path="dense")


@pytest.mark.parametrize("version", ["elm_v1", "branch_elm_v2"])
@pytest.mark.parametrize("layers", [0, 2])
def test_neuron_sparse_first_layer_recomputes_exactly(version, layers, monkeypatch):
    monkeypatch.setattr(ELM, "SPARSE_FIRST_LAYER_DENSITY", 1.0)
    cfg, params, X, G, state = _neuron_setup(11 + layers, version, "random_routing", layers, "silu", steps=STEPS)
    key = P.input_tau_key(cfg)
    params[key] = np.full_like(params[key], 3.7)
    X = X * (np.random.default_rng(1).random(X.shape) < 0.3)
    for start in (None, state):
        _assert_recompute_is_exact(cfg, params, X, G, start, path="sparse")


NETWORK_CASES = [0, 1, 2, 3, 5, 6]  # test_reference's: 1–3 layers, ρ from 0 to 1, 0–3 hidden layers, N up to 17


@pytest.mark.parametrize("case", NETWORK_CASES)
def test_network_recomputed_gradients_are_the_cached_ones(case):
    cfg, params, X, G, state = _network_setup(case, steps=STEPS)
    for start in (None, state):
        _assert_recompute_is_exact(cfg, params, X, G, start)


def test_a_different_order_of_the_block_sums_is_caught(monkeypatch):
    """Adding the blocks first to last instead changes the last bits: np.array_equal sees it."""
    cfg, params, X, G, _ = _neuron_setup(33, "branch_elm_v2", "random_routing", 1, "silu", steps=STEPS)
    model = ELM(cfg, params=params, dtype="float64")
    model.time_block = 1
    cached, _, _ = _run(model, X, G, None, STEPS)
    bounds = segments.block_bounds
    monkeypatch.setattr(segments, "block_bounds", lambda t0, t1, block: _ForwardOnReverse(bounds(t0, t1, block)))
    reordered, _, _ = _run(model, X, G, None, STEPS)
    assert any(not np.array_equal(reordered[k], cached[k]) for k in cached if k.startswith("grad/"))
    assert all(relative_error(reordered[k], cached[k]) <= KERNEL_TOL for k in cached)


class _ForwardOnReverse(list):
    """A list of blocks whose reversal (``[::-1]``) keeps time order: the sums then run first to last."""

    def __getitem__(self, index):
        if isinstance(index, slice) and index.step == -1:
            return list(self)
        return list.__getitem__(self, index)


def test_segment_steps_follow_the_memory_estimate(monkeypatch):
    cfg, params, X, G, _ = _neuron_setup(33, "branch_elm_v2", "random_routing", 1, "silu", steps=STEPS)
    model = ELM(cfg, params=params, dtype="float64")
    model.time_block = 2
    B, T = 3, 1000
    step = cfg.activation_bytes(B, 1, 8)
    kept = 2 * B * T * (cfg.num_input + cfg.num_output) * 8
    monkeypatch.setattr("elmcore.engine.memory.memory_limit_bytes", lambda: step * T)
    assert model.segment_steps(B, T) is None  # the whole cache fits: no recomputation
    monkeypatch.setattr("elmcore.engine.memory.memory_limit_bytes", lambda: kept + step * 101)
    assert model.segment_steps(B, T) == 100  # the largest whole number of blocks that fits
    monkeypatch.setattr("elmcore.engine.memory.memory_limit_bytes", lambda: 1)
    assert model.segment_steps(B, T) == 2  # one block at least; the memory check then names the shortfall
    assert model.segment_steps(B, T, recompute_segment=7) == 8
    assert model.segment_steps(B, T, recompute_segment=5000) is None
    model.recompute_segment = 3
    assert model.segment_steps(B, T) == 4
    with pytest.raises(ELMError, match="recompute_segment"):
        model.segment_steps(B, T, recompute_segment=0)


# -- the CUDA kernels (a real GPU, or the simulator's child process) --

CUDA_NEURON_CASES = [("elm_v1", "random_routing", 1, "relu"), ("branch_elm_v2", "neuronio_routing", 2, "silu"),
                     ("branch_elm_v2", None, 0, "silu")]
CUDA_NETWORK_CASES = [0, 1, 3]
CUDA_SCHEDULES = [(1, (1, 3)), (2, (2, 4))]


@needs_cuda
@pytest.mark.parametrize("case", range(len(CUDA_NEURON_CASES)))
def test_on_cuda_neuron_recomputes_exactly(case):
    version, routing, layers, activation = CUDA_NEURON_CASES[case]
    cfg, params, X, G, state = _neuron_setup(60 + case, version, routing, layers, activation, batch=2, steps=5)
    for start in (None, state):
        _assert_recompute_is_exact(cfg, params, X, G, start, "cuda", CUDA_SCHEDULES)


@needs_cuda
@pytest.mark.parametrize("case", CUDA_NETWORK_CASES)
def test_on_cuda_network_recomputes_exactly(case):
    cfg, params, X, G, state = _network_setup(case, batch=2, steps=5)
    for start in (None, state):
        _assert_recompute_is_exact(cfg, params, X, G, start, "cuda", CUDA_SCHEDULES)


@pytest.mark.slow
@pytest.mark.skipif(CUDA_HERE, reason="CUDA is usable in this process: the CUDA checks above run directly")
def test_simulator_runs_the_cuda_checks():
    returncode, tail, passed = run_under_simulator(__file__, "-k", "on_cuda", timeout=1500)
    assert returncode == 0, tail
    assert passed == len(CUDA_NEURON_CASES) + len(CUDA_NETWORK_CASES), tail


def test_training_with_recomputation_follows_the_same_trajectory(tmp_path, monkeypatch):
    """The run setting reaches the model (and run.json); the parameters after training are the same bits."""
    from test_train import run, sign_task
    monkeypatch.setattr(ELM, "time_block", 2)
    run(tmp_path, "cached", task=sign_task(T=9), epochs=2)
    run(tmp_path, "recomputed", task=sign_task(T=9), epochs=2, recompute_segment=3)
    assert json.loads((tmp_path / "recomputed" / "run.json").read_text())["recompute_segment"] == 3
    a, b = load_file(tmp_path / "cached" / "last.npz"), load_file(tmp_path / "recomputed" / "last.npz")
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    with pytest.raises(ELMError, match="recompute_segment"):
        TrainSettings(task="sign", recompute_segment=0).validate()


def test_cli_flag_reaches_run_json_and_may_change_on_resume(tmp_path):
    from test_cli_train import SMALL, invoke
    rd = tmp_path / "run"
    result = invoke("train", *SMALL, "--epochs", "1", "--batches-per-epoch", "2", "--recompute-segment", "4",
                    "--run-dir", rd)
    assert result.exit_code == 0, result.output
    assert json.loads((rd / "run.json").read_text())["recompute_segment"] == 4
    result = invoke("train", "--resume", rd, "--recompute-segment", "8")
    assert result.exit_code == 0, result.output
    assert "--recompute-segment" not in result.output
    result = invoke("train", *SMALL, "--recompute-segment", "0", "--run-dir", tmp_path / "bad")
    assert result.exit_code == 2 and "--recompute-segment" in result.output
