"""A training step on the cuda backend reads the device to the host once: one copy of every scalar it needs.

No GPU is needed: under the CUDA simulator the cuda backend's array module is NumPy, and here it is
swapped for one whose arrays count every value read from them to the host (float(), bool(), int(),
.item(), .tolist(), formatting, and the backend's to_host), as each of those is a wait for the
device on a GPU. Reductions stay arrays, as CuPy's do.
"""

import sys

import numpy as np
import pytest

from elmcore.data.base import ArrayTask
from elmcore.engine import backend as backend_module
from elmcore.engine.backend import get_backend, host_scalars
from elmcore.training.train import Trainer, TrainingDiverged, TrainSettings
from helpers import CUDA_HERE, needs_cuda, run_under_simulator


class DeviceArray(np.ndarray):
    """A NumPy array standing in for device memory: every read of its values to the host is counted."""
    reads = 0

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return np.ndarray.__array_wrap__(self, arr, context, False)  # a reduction stays a 0-d array

    def __array_function__(self, func, types, args, kwargs):
        return on_device(super().__array_function__(func, types, args, kwargs))

    def _read(self):
        DeviceArray.reads += 1
        return np.asarray(self)

    def __float__(self):
        return float(self._read())

    def __int__(self):
        return int(self._read())

    def __index__(self):
        return int(self._read())

    def __bool__(self):
        return bool(self._read())

    def __format__(self, spec):
        return format(self._read()[()], spec)

    def item(self, *args):
        return self._read().item(*args)

    def tolist(self):
        return self._read().tolist()


def on_device(value):
    if isinstance(value, (tuple, list)):
        return type(value)(on_device(v) for v in value)
    if isinstance(value, (np.ndarray, np.generic)) and not isinstance(value, DeviceArray):
        return np.asarray(value).view(DeviceArray)
    return value


class DeviceNumPy:
    """NumPy whose functions return DeviceArrays (types, constants and submodules as NumPy's own)."""
    ndarray = DeviceArray

    def __getattr__(self, name):
        attr = getattr(np, name)
        if not callable(attr) or isinstance(attr, type):
            return attr
        return lambda *args, **kwargs: on_device(attr(*args, **kwargs))


def counting_backend(monkeypatch):
    """The cuda backend with DeviceNumPy as its array module, which every ``array_module(a)`` of the
    library (imported by name in many modules) also gives for a DeviceArray, as it gives CuPy for CuPy's."""
    backend = get_backend("cuda")
    device_numpy = DeviceNumPy()
    monkeypatch.setattr(backend, "xp", device_numpy)
    real_array_module = backend_module.array_module

    def array_module(a):
        return device_numpy if isinstance(a, DeviceArray) else real_array_module(a)

    for module in list(sys.modules.values()):
        if getattr(module, "array_module", None) is real_array_module:
            monkeypatch.setattr(module, "array_module", array_module)
    real_to_host = backend.to_host

    def to_host(a):
        if isinstance(a, DeviceArray):
            DeviceArray.reads += 1
        return real_to_host(np.asarray(a))

    monkeypatch.setattr(backend, "to_host", to_host)
    return backend


def tiny_task(n=12, T=4, D=3):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, T, D)).astype(np.float32)
    y = (X[:, :, 0].sum(1) > 0).astype(np.int64)
    return ArrayTask("tiny", {"train": (X[:8], y[:8]), "valid": (X[8:], y[8:])}, num_output=2,
                     defaults={"num_memory": 2, "mlp_hidden_size": 3, "version": "branch_elm_v2"})


NETWORK = {"version": "elm_network", "num_layers": 1, "num_neurons": 3, "num_memory": 2, "mlp_hidden_size": 3}


def reads_per_step(tmp_path, model=None, **kw):
    trainer = Trainer(TrainSettings(task="tiny", epochs=2, batch_size=4, device="cuda", model=model or {},
                                    run_dir=str(tmp_path / "run"), **kw),
                      task=tiny_task(), progress=False, log=lambda m: None)
    real_step, counts = trainer._train_step, []

    def counted_step(*args):
        before = DeviceArray.reads
        result = real_step(*args)
        counts.append(DeviceArray.reads - before)
        return result

    trainer._train_step = counted_step
    trainer.run()
    return trainer, counts


@needs_cuda
@pytest.mark.parametrize("model", [None, NETWORK], ids=["neuron", "network"])
def test_on_cuda_a_training_step_reads_the_device_once(tmp_path, monkeypatch, model):
    counting_backend(monkeypatch)
    trainer, counts = reads_per_step(tmp_path, model=model, input_dropout=0.2, clip_norm=1e-3)
    # the model did live on the "device"
    assert all(isinstance(trainer.model.params[k], DeviceArray) for k in trainer.model.trainable_keys)
    assert counts == [1] * 4


@needs_cuda
def test_on_cuda_the_count_sees_every_read(tmp_path, monkeypatch):
    """Clipping on the host (the optimiser's own norm) reads each gradient's squared norm alone: counted."""
    from elmcore.training.optim import Optimizer
    counting_backend(monkeypatch)
    step = Optimizer.step
    monkeypatch.setattr(Optimizer, "step", lambda self, grads, lr=None, squares=None: step(self, grads, lr=lr))
    trainer, counts = reads_per_step(tmp_path, clip_norm=1e-3)
    assert counts == [1 + len(trainer.model.trainable_keys)] * 4


@needs_cuda
def test_on_cuda_a_diverged_step_is_named_after_its_one_read(tmp_path, monkeypatch):
    """The checks read from that copy still name what failed (here: the outputs, step 3)."""
    counting_backend(monkeypatch)
    trainer = Trainer(TrainSettings(task="tiny", epochs=2, batch_size=4, device="cuda",
                                    run_dir=str(tmp_path / "run")), task=tiny_task(), progress=False,
                      log=lambda m: None)
    real_new_state = trainer._new_state

    def new_state():
        real_new_state()
        real_forward = trainer.model.forward

        def poisoned(X, return_cache=False, state=None):
            Y, cache = real_forward(X, return_cache=True, state=state)
            if trainer.position["step"] >= 2:
                Y = Y * np.float32(np.inf)
            return (Y, cache) if return_cache else Y

        trainer.model.forward = poisoned

    trainer._new_state = new_state
    with np.errstate(invalid="ignore"), pytest.raises(TrainingDiverged, match="outputs are not finite at step 3"):
        trainer.run()


def test_host_scalars_copies_the_device_values_once_and_exactly(monkeypatch):
    backend = type("Backend", (), {})()
    backend.xp = DeviceNumPy()
    copies = []
    backend.to_host = lambda a: copies.append(a.shape) or np.asarray(a)
    device = on_device(np.array([3.25, 1e-30], np.float32))
    values = [device.sum(), 2.5, np.float32(0.1), on_device(np.array(True)), device[1:].reshape(()), 7]
    DeviceArray.reads = 0
    got = host_scalars(backend, values)
    assert copies == [(3,)] and DeviceArray.reads == 0
    assert got == [float(np.float32(3.25) + np.float32(1e-30)), 2.5, float(np.float32(0.1)), 1.0,
                   float(np.float32(1e-30)), 7.0]


@pytest.mark.slow
@pytest.mark.skipif(CUDA_HERE, reason="CUDA is usable in this process: the CUDA checks above run directly")
def test_simulator_runs_the_cuda_checks():
    returncode, tail, passed = run_under_simulator(__file__, "-k", "on_cuda", timeout=1500)
    assert returncode == 0, tail
    assert passed == 4, tail
