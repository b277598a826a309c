"""NeuronIO's training input on its way to the model: one-byte spikes, uploaded pinned on a GPU, input
dropout drawn on the model's device; on the CPU the same numbers as float32 batches with host dropout."""

import json
import types

import numpy as np
import pytest

import elmcore.data.neuronio as N
from elmcore.engine.backend import get_backend
from elmcore.engine.cuda_backend import CUDABackend, PinnedUpload
from elmcore.neuron.config import ELMConfig
from elmcore.neuron.model import ELM
from elmcore.training.checkpoint import load_file
from elmcore.training.train import Trainer, TrainSettings, input_keep_mask
from test_data_neuronio import make_dir


@pytest.fixture
def neuronio_dir(tmp_path):
    return make_dir(tmp_path / "data", ["train/sim__a.p", "train/sim__b.p", "valid/sim__c.p"], n_sims=4,
                    duration_ms=40)


def neuronio_task(data_dir, float32_batches=False):
    task = N.NeuronIOTask(data_dir, window=16, burn_in=4, file_load_fraction=0.5, ignore_time_from_start=5)
    if float32_batches:  # the batches as they were before they kept one byte per spike
        one_byte = task._assemble

        def as_float32(plan, batch_size, stop):
            for batch in one_byte(plan, batch_size, stop):
                yield type(batch)(batch.X.astype(np.float32), batch.target)

        task._assemble = as_float32
    return task


def test_spikes_stay_one_byte_from_the_batch_to_the_routing(neuronio_dir):
    task = neuronio_task(neuronio_dir)
    batch = next(iter(task.batches("train", 3, rng=np.random.default_rng(1), shuffle=True)))
    assert batch.X.dtype == np.int8 and set(np.unique(batch.X)) <= {-1, 0, 1}
    cpu = get_backend("cpu")
    assert cpu.upload(batch.X) is batch.X  # no copy on the CPU
    model = ELM(ELMConfig(num_input=6, num_output=2, num_memory=3, mlp_hidden_size=4), seed=3)
    assert model.prepare_input(batch.X).dtype == np.int8
    # The routing reads ±1 bytes to exactly the numbers of ±1 floats.
    assert np.array_equal(model.forward(batch.X), model.forward(batch.X.astype(np.float32)))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_on_one_byte_spikes_follows_the_float32_trajectory(tmp_path, neuronio_dir, dropout):
    def train(name, float32_batches):
        settings = TrainSettings(task="neuronio", epochs=2, batch_size=3, batches_per_epoch=3, lr=1e-2,
                                 input_dropout=dropout, eval_batch_size=4, run_dir=str(tmp_path / name),
                                 model={"num_memory": 3, "mlp_hidden_size": 4})
        Trainer(settings, task=neuronio_task(neuronio_dir, float32_batches), progress=False,
                log=lambda m: None).run()
        steps = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return load_file(tmp_path / name / "last.npz"), [r["loss"] for r in steps if r["type"] == "step"]

    (one_byte, losses), (float32, float32_losses) = train("int8", False), train("float32", True)
    assert losses == float32_losses and len(losses) == 6
    for k in float32.params:
        assert np.array_equal(one_byte.params[k], float32.params[k]), k


def test_on_the_cpu_input_dropout_draws_as_it_always_did():
    shape, rate = (4, 7, 5), 0.3
    rng, before = np.random.default_rng([9, 0, 1]), np.random.default_rng([9, 0, 1])
    keep = input_keep_mask(get_backend("cpu"), rng, shape, rate)
    assert np.array_equal(keep, before.random(shape) >= rate)
    assert rng.bit_generator.state == before.bit_generator.state  # the checkpointed state moved alike


class FakeDeviceBackend:
    """A GPU-like backend: its array module is not NumPy, its uniform draws record their seeds."""
    xp = types.SimpleNamespace(ndarray=np.ndarray)

    def __init__(self):
        self.seeds = []

    def random_uniform(self, seed, shape):
        self.seeds.append(seed)
        return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_on_a_gpu_the_mask_is_drawn_on_the_device_from_one_seed_per_step():
    shape, rate = (4, 7, 5), 0.3
    backend, rng, twin = FakeDeviceBackend(), np.random.default_rng(5), np.random.default_rng(5)
    first = input_keep_mask(backend, rng, shape, rate)
    assert backend.seeds == [int(twin.integers(2 ** 63))]  # one integer from the host generator, nothing more
    assert rng.bit_generator.state == twin.bit_generator.state
    again = input_keep_mask(FakeDeviceBackend(), np.random.default_rng(5), shape, rate)
    assert np.array_equal(first, again) and 0.5 < first.mean() < 0.9
    assert not np.array_equal(first, input_keep_mask(backend, rng, shape, rate))  # the next step: another mask


class FakeCuPy:
    """Just what PinnedUpload uses of CuPy, recording the page-locked allocations, copies and waits."""

    def __init__(self):
        self.pinned, self.copies, self.waits = [], [], []
        stream = types.SimpleNamespace(record=self._record)
        self.stream = stream
        self.cuda = types.SimpleNamespace(alloc_pinned_memory=self._alloc, get_current_stream=lambda: stream)

    def _alloc(self, nbytes):
        memory = bytearray(nbytes)
        self.pinned.append(memory)
        return memory

    def _record(self):
        event = types.SimpleNamespace(synchronize=lambda: self.waits.append(event))
        return event

    def empty(self, shape, dtype):
        fake = self

        class DeviceArray(np.ndarray):
            def set(self, host, stream=None):
                fake.copies.append((host, stream))
                self[...] = host

        return np.empty(shape, dtype).view(DeviceArray)


def _is_staged_in(host, memory):
    return np.shares_memory(host, np.ndarray((len(memory),), np.uint8, buffer=memory))


def test_batches_reach_a_gpu_through_pinned_memory_on_the_current_stream():
    cupy = FakeCuPy()
    upload = PinnedUpload(cupy)
    batch = np.random.default_rng(0).integers(-1, 2, size=(3, 5, 4)).astype(np.int8)
    out = upload(batch)
    assert out.dtype == np.int8 and np.array_equal(out, batch)
    host, stream = cupy.copies[-1]
    assert stream is cupy.stream and _is_staged_in(host, cupy.pinned[0])  # copied from page-locked memory
    assert cupy.waits == []
    smaller = batch[:2] * np.int8(-1)
    assert np.array_equal(upload(smaller), smaller)
    assert len(cupy.pinned) == 1 and len(cupy.waits) == 1  # the buffer reused, after the last copy had passed
    larger = np.ones((4, 5, 4), np.float32)
    assert np.array_equal(upload(larger), larger) and len(cupy.pinned) == 2
    assert _is_staged_in(cupy.copies[-1][0], cupy.pinned[1])


def test_only_a_real_gpu_takes_the_pinned_path():
    batch = np.zeros((2, 3, 4), np.int8)
    simulated = object.__new__(CUDABackend)
    simulated.simulated, simulated._upload, simulated.xp = True, None, np
    assert simulated.upload(batch) is batch  # the simulator's arrays are host arrays
    gpu = object.__new__(CUDABackend)
    gpu.simulated, gpu._upload, gpu.xp = False, None, FakeCuPy()
    out = gpu.upload(batch)
    assert isinstance(gpu._upload, PinnedUpload) and len(gpu.xp.copies) == 1 and out.dtype == np.int8
