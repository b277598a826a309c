"""Small models' passes: one thread below the trainer's work rule, the same numbers as on every
thread, and the walks' flat views of their buffers."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from numba import njit

from elmcore.engine.backend import BLAS_THREAD_ENV, blas_pools, get_backend
from elmcore.engine.factory import build_model, load_config_dict
from elmcore.kernels import cpu as cpu_kernels
from elmcore.kernels import network_cpu
from elmcore.training.losses import mse_last
from elmcore.training.threads import WORK_PER_THREAD
from helpers import record_calls

needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one Numba thread here")


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    for name in BLAS_THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    cpu = get_backend("cpu")
    monkeypatch.setattr(cpu, "one_blas_thread_below_work", None)
    monkeypatch.setattr(cpu, "one_numba_thread_below_work", 4_000_000)
    before = numba.get_num_threads()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    yield cpu
    numba.set_num_threads(before)


@needs_two_threads
def test_small_work_runs_on_one_thread_and_the_count_comes_back(backend, monkeypatch):
    every = numba.config.NUMBA_NUM_THREADS
    with backend.kernel_threads(backend.one_numba_thread_below_work - 1):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == every
    with backend.kernel_threads(backend.one_numba_thread_below_work):
        assert numba.get_num_threads() == every
    with backend.kernel_threads(2 * WORK_PER_THREAD - 1):  # below the GEMMs' rule, not the kernels'
        assert numba.get_num_threads() == every
    with backend.kernel_threads(10, numba_threads=False):
        assert numba.get_num_threads() == every
    with pytest.raises(ValueError):
        with backend.kernel_threads(10):
            raise ValueError("the count must come back after an error too")
    assert numba.get_num_threads() == every
    monkeypatch.setenv("NUMBA_NUM_THREADS", str(every))  # the user's count is kept
    with backend.kernel_threads(10):
        assert numba.get_num_threads() == every


def _train_pass(model, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((6, 23, model.config.num_input))
    Y, cache = model.forward(X, return_cache=True)
    _, dY = mse_last(Y, rng.random((6, model.config.num_output)))
    return Y, model.backward(dY, cache, input_grad=True)


@needs_two_threads
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_small_network_computes_the_same_numbers_on_one_thread(backend, monkeypatch, dtype):
    model = build_model(load_config_dict({"version": "elm_network", "num_input": 3, "num_output": 2,
                                          "num_neurons": 5, "num_memory": 2, "num_branch": 2,
                                          "num_synapse_per_branch": 3}), seed=1, dtype=dtype)
    seen = []
    walk = network_cpu.network_forward
    monkeypatch.setattr(network_cpu, "network_forward", lambda *a: (seen.append(numba.get_num_threads()), walk(*a)))
    backend.one_numba_thread_below_work = backend.one_blas_thread_below_work = 0
    Y_all, grads_all = _train_pass(model)
    backend.one_numba_thread_below_work, backend.one_blas_thread_below_work = 4_000_000, None
    Y_one, grads_one = _train_pass(model)
    assert seen == [numba.config.NUMBA_NUM_THREADS, 1]
    assert np.array_equal(Y_all, Y_one)
    assert grads_all.keys() == grads_one.keys()
    for key in grads_all:
        assert np.array_equal(grads_all[key], grads_one[key]), key


@needs_two_threads
def test_a_single_neuron_keeps_its_numba_threads(backend, monkeypatch):
    # Its sparse first layer keeps one partial sum per Numba thread: the count must not change under it.
    model = build_model(load_config_dict({"version": "branch_elm_v2", "num_input": 2, "num_output": 1,
                                          "num_memory": 3}), seed=0)
    pools = blas_pools().lib_controllers

    def blas_count():
        return max((pool.num_threads for pool in pools), default=None)
    seen = []
    recur = cpu_kernels.recur_forward
    monkeypatch.setattr(cpu_kernels, "recur_forward",
                        lambda *a: (seen.append((numba.get_num_threads(), blas_count())), recur(*a)))
    blas_before = blas_count()
    _train_pass(model)
    # Its GEMMs (NumPy's BLAS) run on one thread.
    assert seen == [(numba.config.NUMBA_NUM_THREADS, None if blas_before is None else 1)]
    assert blas_count() == blas_before


@njit(cache=False)
def _flat_and_mark(a):
    flat = network_cpu._flat(a)
    flat[flat.shape[0] - 1] = -1.0
    return flat.copy()


def test_the_walks_flat_view_is_the_array_in_order_and_writes_through():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    expect = a.reshape(-1).copy()
    expect[-1] = -1
    assert np.array_equal(_flat_and_mark(a), expect)
    assert a[1, 2, 3] == -1
    assert np.array_equal(_flat_and_mark(a[1]), expect[12:])  # a C-contiguous slice of a larger array


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, width, outputs", [(1, 4, 1), (3200, 4, 1), (333, 19, 7)])
def test_a_small_readout_product_on_the_calling_thread_has_the_parallel_ones_bits(dtype, rows, width, outputs,
                                                                                  monkeypatch):
    rng = np.random.default_rng(rows + width)
    A = rng.normal(size=(rows, width)).astype(dtype)
    Bt = rng.normal(size=(width, outputs)).astype(dtype)
    bias = rng.normal(size=outputs).astype(dtype)
    G = rng.normal(size=(rows, outputs)).astype(dtype)
    calls = []
    results = []
    for limit in (0, 10 ** 12):  # every product in parallel / every one on the calling thread
        monkeypatch.setattr(network_cpu, "SERIAL_BELOW_MACS", limit)
        these = record_calls(monkeypatch, network_cpu, ("_rows_product_serial", "_rows_product_parallel",
                                                         "_rows_transposed_product_serial",
                                                         "_rows_transposed_product_parallel"))
        out, grad = np.empty((rows, outputs), dtype), np.empty((width, outputs), dtype)
        network_cpu.rows_product(A, Bt, bias, out)
        network_cpu.rows_transposed_product(A, G, grad)
        results.append((out, grad))
        calls += these
        monkeypatch.undo()
    assert calls == ["_rows_product_parallel", "_rows_transposed_product_parallel", "_rows_product_serial",
                     "_rows_transposed_product_serial"]
    (out_parallel, grad_parallel), (out_serial, grad_serial) = results
    assert np.array_equal(out_serial, out_parallel) and np.array_equal(grad_serial, grad_parallel)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out_serial, A @ Bt + bias, **tolerance)
    np.testing.assert_allclose(grad_serial, A.T @ G, **tolerance)


@pytest.mark.parametrize("user, expected", [({}, ("PASSIVE", "10000")),
                                            ({"GOMP_SPINCOUNT": "5"}, ("PASSIVE", "5")),
                                            ({"ELMCORE_THREAD_DEFAULTS": "0"}, (None, None))])
def test_importing_elmcore_sets_the_openmp_thread_defaults_a_user_has_not_set(user, expected):
    # They must be in the environment before Numba loads its OpenMP layer: at import.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                             "ELMCORE_THREAD_DEFAULTS")}
    probe = "import os, elmcore; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", probe], env={**env, **user}, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert tuple(None if value == "None" else value for value in out) == expected
