"""bench/network_floor.py: its probes compute the products they time, and it counts the MACs
of the network it is given (a floor built on wrong products or counts would mean nothing)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from elmcore.network.config import NetworkConfig, network_parameter_count

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def floor():
    spec = importlib.util.spec_from_file_location("network_floor", REPO / "bench" / "network_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_batch_lanes_probe_computes_each_neurons_product(floor):
    rng = np.random.default_rng(0)
    J, K_out, lanes, stride = 3, 2, 5, 7
    W = rng.normal(size=(1, J, K_out))
    c = rng.normal(size=(1, K_out))
    buf = rng.normal(size=(J + K_out) * stride)
    a = buf[:J * stride].reshape(J, stride)[:, :lanes].copy()
    floor._batch_lanes_kernel(J, K_out)(buf, W, c, lanes, stride, 1)
    out = buf[J * stride:].reshape(K_out, stride)[:, :lanes]
    np.testing.assert_allclose(out, c[0][:, None] + W[0].T @ a, rtol=1e-12)


@pytest.mark.slow
def test_shared_weight_probe_accumulates_each_neurons_product(floor):
    rng = np.random.default_rng(1)
    A = rng.normal(size=(2, 4, 3))
    W = rng.normal(size=(2, 3, 5))
    out = np.zeros((2, 4, 5))
    A0 = A.copy()
    floor._shared_weight(A, W, out, 1)
    np.testing.assert_allclose(out, np.einsum("nrj,njo->nro", A0, W), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["_numba_loops", "_elmcore"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_neuron_vector_probes_compute_each_neurons_product(floor, probe, dtype):
    """Rows and outputs beyond 4 x 4 blocks, neurons beyond whole vectors."""
    rng = np.random.default_rng(2)
    rows, J, K_out, N = 5, 3, 6, 16 + 16 + 3
    a = rng.normal(size=(rows, J, N)).astype(dtype)
    W = rng.normal(size=(J, K_out, N)).astype(dtype)
    c = rng.normal(size=(K_out, N)).astype(dtype)
    out = np.empty((rows, K_out, N), dtype)
    a0 = a.copy()
    getattr(floor, probe)(a, W, c, out, rows, 1)
    ref = c[None] + np.einsum("rji,joi->roi", a0.astype(np.float64), W.astype(np.float64))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)


def test_mlp_shapes_count_every_per_neuron_weight(floor):
    cfg = NetworkConfig(num_input=5, num_output=3, num_neurons=4, num_memory=6, num_branch=3,
                        num_synapse_per_branch=2, mlp_num_layers=2, mlp_hidden_size=7)
    shapes = floor.mlp_shapes(cfg)
    assert shapes[0] == (3 + 6, 7) and shapes[-1] == (6, 1)
    weights = sum(j * o + o for j, o in shapes)  # each product's weights and biases (w_o's bias too)
    per_neuron = (network_parameter_count(3, 4, 6, 3, 2, mlp_num_layers=2, mlp_hidden_size=7) - 3 * (4 + 1)) // 4
    assert weights == per_neuron - 3 * 2  # all but the synapse weights
