"""Rung 1 of the verification ladder (docs/architecture.md §4):
every oracle file of the official release, both precisions, library API and CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from elmcore import ELM
from elmcore.kernels import cpu as cpu_kernels
from elmcore.verification.oracle import TOLERANCE, load_oracle, relative_error, verify_case
from helpers import golden_files

CASES = golden_files()
IDS = [os.path.basename(p)[:-4] for p in CASES]


def test_all_oracle_cases_present():
    assert {"v1_basic", "v1_branch_neuronio_routing", "v2_random_routing", "v2_long_horizon",
            "official_best_elm_neuron"} <= set(IDS)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_oracle_every_array(path, dtype):
    case = load_oracle(path)
    results = dict(verify_case(case, dtype=dtype))
    # Y, loss, every gradient in the file and every trace.
    assert len(results) == 2 + len(case.grads) + len(case.traces)
    assert {f"grad/{k}" for k in case.grads} <= set(results)
    bad = {k: v for k, v in results.items() if not v <= TOLERANCE[dtype]}
    assert not bad, bad
    if dtype == "float64":
        assert max(results.values()) < 1e-10


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_oracle_gradients_cover_every_trainable_parameter(path):
    case = load_oracle(path)
    model = ELM(case.config, params=case.params, dtype="float64")
    assert set(model.trainable_keys) | {"X"} == set(case.grads)


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_streaming_matches_full_forward(path):
    case = load_oracle(path)
    model = ELM(case.config, params=case.params, dtype="float64")
    Y = model.forward(case.X)
    state = model.init_state(case.X.shape[0])
    steps = []
    for t in range(min(case.X.shape[1], 40)):
        y, state = model.step(state, case.X[:, t])
        steps.append(y)
    got = np.stack(steps, axis=1)
    assert relative_error(got, Y[:, :got.shape[1]]) < 1e-12
    # Chunked streaming continues the state across calls.
    state = model.init_state(case.X.shape[0])
    half = case.X.shape[1] // 2
    y1, state = model.run(case.X[:, :half], state)
    y2, _ = model.run(case.X[:, half:], state)
    assert relative_error(np.concatenate([y1, y2], axis=1), Y) < 1e-12


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_elm_verify_cli_exit_code_and_summary(dtype):
    path = [p for p in CASES if "v1_branch" in p][0]
    out = subprocess.run([sys.executable, "-m", "elm_cli.main", "verify", path, "--dtype", dtype],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("verify: 15/15 arrays within tolerance (worst ")


def test_elm_verify_cli_every_file():
    from click.testing import CliRunner
    from elm_cli.main import cli
    for path in CASES:
        result = CliRunner().invoke(cli, ["verify", path])
        assert result.exit_code == 0, result.output
        assert "FAIL" not in result.output


def test_elm_verify_fails_on_tampered_oracle(tmp_path):
    """A wrong reference must make verify exit non-zero: the check can fail."""
    from click.testing import CliRunner
    from elm_cli.main import cli
    src = [p for p in CASES if "v2_random" in p][0]
    with np.load(src) as d:
        data = {k: d[k] for k in d.files}
    data["grad/_proto_tau_m"] = data["grad/_proto_tau_m"] * 1.001
    bad = tmp_path / "tampered.npz"
    np.savez(bad, **data)
    result = CliRunner().invoke(cli, ["verify", str(bad)])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "grad/_proto_tau_m" in result.output.splitlines()[-1]


@pytest.mark.parametrize("content", [b"", b"not a zip file at all"])
def test_elm_verify_bad_file_is_a_clear_error(tmp_path, content):
    from click.testing import CliRunner
    from elm_cli.main import cli
    bad = tmp_path / "broken.npz"
    bad.write_bytes(content)
    result = CliRunner().invoke(cli, ["verify", str(bad)])
    assert result.exit_code == 2
    assert "broken.npz" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "missing.npz")])
    assert result.exit_code == 2 and "not found" in result.output


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_one_byte_spike_inputs_give_the_float_results(dtype):
    """int8 (±1 spikes) and bool inputs are read directly by the routing kernels."""
    case = load_oracle([p for p in CASES if "official" in p][0])
    model = ELM(case.config, params=case.params, dtype=dtype)
    signs = np.where(np.arange(case.X.shape[2]) < case.X.shape[2] // 2, 1, -1)
    X = (case.X != 0) * signs
    Y, cache = model.forward(X.astype(np.float64), return_cache=True)
    g = model.backward(case.G, cache, input_grad=True)
    Y8, cache8 = model.forward(X.astype(np.int8), return_cache=True)
    g8 = model.backward(case.G, cache8, input_grad=True)
    assert np.array_equal(Y, Y8)
    assert all(np.array_equal(g[k], g8[k]) for k in g)
    assert g8["X"].dtype == np.dtype(dtype)
    Yb = model.forward(case.X != 0)
    assert np.array_equal(Yb, model.forward(case.X.astype(dtype)))


@njit
def _nonzeros(X, words, out):
    """The flat positions of X's non-zeros, row by row, as the routing kernels find them."""
    B, T, D = X.shape
    idx = np.empty(D, np.int64)
    count = 0
    for b in range(B):
        for t in range(T):
            for q in range(cpu_kernels._row_nonzeros(X[b, t], words, (b * T + t) * D, idx)):
                out[count] = (b * T + t) * D + idx[q]
                count += 1
    return count


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.bool_, np.float32])
@pytest.mark.parametrize("num_input", [1, 7, 8, 9, 16, 37, 1278])
def test_the_routing_finds_every_nonzero_input_in_order(dtype, num_input):
    """Inputs of any bit pattern (255, 128, negative int8), several per 8-byte word, found in
    ascending order: the one-byte path locates them by trailing-zero counts."""
    rng = np.random.default_rng(num_input)
    values = rng.integers(-128, 256, (3, 5, num_input))
    X = np.where(rng.random(values.shape) < 0.3, values, 0).astype(dtype)
    X[0, 0] = 0 if dtype != np.bool_ else False
    X[2, 4] = 1  # a row of nothing but spikes
    out = np.empty(X.size, np.int64)
    count = _nonzeros(X, cpu_kernels._words(X), out)
    assert np.array_equal(out[:count], np.flatnonzero(X))


@pytest.mark.parametrize("num_input", [1, 7, 8, 13, 37])
def test_one_byte_inputs_of_any_width_route_like_floats(num_input):
    """The word-at-a-time zero test must handle rows that start and end off an 8-byte boundary."""
    from elmcore import ELMConfig
    cfg = ELMConfig(num_input=num_input, num_output=2, num_memory=3, num_branch=1,
                    num_synapse_per_branch=num_input + 2, input_to_synapse_routing="random_routing")
    model = ELM(cfg, seed=num_input, dtype="float64")
    rng = np.random.default_rng(num_input)
    X = ((rng.random((3, 11, num_input)) < 0.15) * rng.integers(1, 4, (3, 11, num_input))).astype(np.uint8)
    X[1, 3, -1] = 2  # a spike in the very last byte of a row
    G = rng.normal(size=(3, 11, 2))
    Yf, cf = model.forward(X.astype(np.float64), return_cache=True)
    Yb, cb = model.forward(X, return_cache=True)
    assert np.array_equal(Yf, Yb)
    gf, gb = model.backward(G, cf), model.backward(G, cb)
    assert all(np.array_equal(gf[k], gb[k]) for k in gf)
