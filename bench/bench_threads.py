"""Where a second Numba thread starts to pay: a training step at 1 and at N threads, over model sizes.

    python bench/bench_threads.py                 # the sizes below, 1 against every core
    python bench/bench_threads.py --repeats 15

For each shape it times a full training step (forward, loss, backward, Adam) with
``numba.set_num_threads(1)`` and with all threads, alternating the two so that a
change of machine load hits both alike, and prints the work per step (batch × time
steps × trainable parameters, what ``elmcore.training.threads`` decides on) with the
median times. The trainer's rule (``choose_threads``) sits between the largest shape
that one thread wins and the smallest that all threads win.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from elmcore.engine.backend import get_backend  # noqa: E402
from elmcore.engine.factory import build_model  # noqa: E402
from elmcore.neuron.config import ELMConfig  # noqa: E402
from elmcore.training.losses import mse_last  # noqa: E402
from elmcore.training.optim import Optimizer  # noqa: E402

# (name, model fields, batch, time steps); the adding problem's two inputs and one output throughout.
SHAPES = [
    ("branch d_m 6, T 12", dict(version="branch_elm_v2", num_memory=6), 16, 12),
    ("branch d_m 8, T 60", dict(version="branch_elm_v2", num_memory=8), 16, 60),
    ("branch d_m 30, T 200 (bare elm train)", dict(version="branch_elm_v2", num_memory=30), 32, 200),
    ("branch d_m 100, T 200", dict(version="branch_elm_v2", num_memory=100, mlp_hidden_size=200), 32, 200),
    ("branch d_m 200, T 500", dict(version="branch_elm_v2", num_memory=200, mlp_hidden_size=400), 32, 500),
    ("network N 16, T 100", dict(version="elm_network", num_neurons=16, num_memory=8), 32, 100),
    ("network N 64, T 200", dict(version="elm_network", num_neurons=64, num_memory=8), 32, 200),
    ("network N 128, T 200", dict(version="elm_network", num_neurons=128, num_memory=8), 32, 200),
]


def step_time(model, optimizer, X, target):
    t0 = time.perf_counter()
    Y, cache = model.forward(X, return_cache=True)
    loss, dY = mse_last(Y, target)
    optimizer.step(model.backward(dY, cache))
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    args = parser.parse_args()
    # The models drop to one thread by themselves below the rule's work; this times every size as set.
    get_backend("cpu").one_blas_thread_below_work = get_backend("cpu").one_numba_thread_below_work = 0
    rng = np.random.default_rng(0)
    print(f"{'shape':<40} {'work/step':>10} {'1 thread':>10} {f'{args.threads} threads':>11} {'ratio':>6}")
    for name, fields, B, T in SHAPES:
        cfg = ELMConfig.from_dict({"num_input": 2, "num_output": 1, **fields})
        model = build_model(cfg, seed=0, dtype="float32")
        optimizer = Optimizer({k: model.params[k] for k in model.trainable_keys}, kind="adam", lr=1e-4)
        X = rng.random((B, T, 2)).astype(np.float32)
        target = rng.random((B, 1)).astype(np.float32)
        times = {1: [], args.threads: []}
        for threads in (1, args.threads):  # compiles, and warms the caches
            numba.set_num_threads(threads)
            step_time(model, optimizer, X, target)
        for _ in range(args.repeats):
            for threads in times:
                numba.set_num_threads(threads)
                times[threads].append(step_time(model, optimizer, X, target))
        one, many = statistics.median(times[1]), statistics.median(times[args.threads])
        work = B * T * model.num_parameters
        print(f"{name:<40} {work / 1e6:>9.1f}M {one * 1e3:>8.2f}ms {many * 1e3:>9.2f}ms {one / many:>6.2f}",
              flush=True)


if __name__ == "__main__":
    main()
