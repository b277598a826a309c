"""Time one ELM Network training step (forward + backward) on the CPU, on the two shapes of
issue 10: SHD-Adding (700 spike inputs, N = 128, d_m = 8, 4 branches x 8 synapses, rho = 0.5,
B = 32, T = 100) and char-LM (256 one-hot byte inputs, N = 256, B = 32, T = 256).

Prints the median of a few steps (wall clock and process CPU time, which on a shared machine
says more than wall clock). The comparison with PyTorch is the benchmark's job.

    .venv/bin/python bench/network_step_time.py [shd] [lm]
"""

import sys
import time

import numpy as np

import elmcore  # noqa: F401  (thread settings before NumPy loads BLAS)
from elmcore import ELMNetwork
from elmcore.network.config import NetworkConfig


def time_step(name, cfg, X, reps=5):
    net = ELMNetwork(cfg, seed=0, dtype="float32")
    G = np.random.default_rng(1).normal(size=(X.shape[0], X.shape[1], cfg.num_output)).astype(np.float32)
    Y, cache = net.forward(X, return_cache=True)  # compile and warm up
    net.backward(G, cache)
    fwd, step, cpu = [], [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        Y, cache = net.forward(X, return_cache=True)
        t1 = time.perf_counter()
        net.backward(G, cache)
        fwd.append(t1 - t0)
        step.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(f"{name}: {net.num_parameters} parameters; forward {np.median(fwd) * 1e3:.0f} ms, "
          f"step {np.median(step) * 1e3:.0f} ms wall, {np.median(cpu) * 1e3:.0f} ms CPU (median of {reps})")


def main(which):
    rng = np.random.default_rng(0)
    if "shd" in which:
        cfg = NetworkConfig(num_input=700, num_output=19, num_neurons=128, num_memory=8, num_branch=4,
                            num_synapse_per_branch=8, recurrent_fraction=0.5)
        X = (rng.random((32, 100, 700)) < 0.02).astype(np.uint8)
        time_step("SHD-Adding shape (uint8 spikes, 2% density)", cfg, X)
    if "lm" in which:
        cfg = NetworkConfig(num_input=256, num_output=256, num_neurons=256)
        X = np.zeros((32, 256, 256), np.float32)
        np.put_along_axis(X, rng.integers(0, 256, (32, 256, 1)), 1, axis=2)
        time_step("char-LM shape (one-hot bytes)", cfg, X)


if __name__ == "__main__":
    main(sys.argv[1:] or ["shd", "lm"])
