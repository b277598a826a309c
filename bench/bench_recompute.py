"""Peak memory and step time of a training step with and without recomputation in segments.

    python bench/bench_recompute.py                    # every case below, float32, on the CPU
    python bench/bench_recompute.py --steps 1000 --family neuron

Each case (model family, T, segment) runs in a subprocess of its own, so that its peak
memory is its own: the kernels are compiled first on a short sequence, then one step
(forward with the cache, backward) is timed (best of --repeat), then one more step runs
under tracemalloc, whose peak counts every NumPy array the step allocates (the Python
heap too; not Numba's compiled code). ru_maxrss, the process's resident peak, is printed
beside it (it includes the interpreter, NumPy, Numba and LLVM: a floor of a few hundred MB).

The models: a Path-X-like single neuron (8 one-hot grey levels, 2 classes) and an ELM
Network of 16 neurons, both at a small batch so that T = 16,384 with the whole cache fits
a small machine. "segment none" keeps the whole cache; a number recomputes the backward
in segments of that many steps (docs/architecture.md, "Long sequences in bounded memory").
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

NEURON = dict(version="branch_elm_v2", num_input=8, num_output=2, num_memory=100, mlp_num_layers=1,
              mlp_hidden_size=100, num_branch=16, num_synapse_per_branch=4,
              input_to_synapse_routing="random_routing", memory_tau_max=1000.0)
NETWORK = dict(version="elm_network", num_input=8, num_output=2, num_neurons=32, num_layers=1, num_memory=8,
               mlp_num_layers=1, mlp_hidden_size=16, num_branch=4, num_synapse_per_branch=4,
               recurrent_fraction=0.5, memory_tau_max=1000.0)
BATCH = {"neuron": 8, "network": 4}
CASES = [(family, steps, segment) for family in ("neuron", "network")
         for steps, segments in ((1000, (None, 250)), (16384, (None, 4096, 1024))) for segment in segments]
# T = 1000 fits one default time block (1024 steps), which no segment splits: its two cases
# both use blocks of 250 steps, so that they compute the same bits and compare like with like.
TIME_BLOCK = {1000: 250}


def run_case(family, steps, segment, repeat, dtype):
    """One case in this process; prints one JSON line."""
    sys.path.insert(0, REPO)
    import resource
    import tracemalloc

    import numpy as np

    from elmcore.engine.factory import build_model, load_config_dict
    cfg = load_config_dict(NEURON if family == "neuron" else NETWORK)
    model = build_model(cfg, seed=0, dtype=dtype)
    model.time_block = TIME_BLOCK.get(steps, model.time_block)
    B = BATCH[family]
    rng = np.random.default_rng(0)

    def batch(T):
        pixels = rng.integers(0, cfg.num_input, size=(B, T))
        X = np.eye(cfg.num_input, dtype=dtype)[pixels]
        return X, rng.normal(size=(B, T, cfg.num_output)).astype(dtype)

    def step(X, dY, k):
        Y, cache = model.forward(X, return_cache=True, recompute_segment=k)
        model.backward(dY, cache)

    X, dY = batch(64)
    step(X, dY, 64)  # compiles the kernels (a recomputing step calls the same ones)
    X, dY = batch(steps)
    k = steps if segment is None else segment
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step(X, dY, k)
        times.append(time.perf_counter() - t0)
    if getattr(model, "_spare", None):
        model._spare.clear()  # the network's recycled buffers: count what the step needs, not what it reuses
    tracemalloc.start()
    step(X, dY, k)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(family=family, steps=steps, batch=B, block=model.time_block, segment=segment,
                          seconds=min(times),
                          traced_peak=peak, maxrss=rss, input_bytes=X.nbytes)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["neuron", "network"], help="only this family")
    parser.add_argument("--steps", type=int, help="only this T")
    parser.add_argument("--repeat", type=int, default=2, help="timed steps per case (best is reported)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--case", nargs=3, metavar=("FAMILY", "T", "SEGMENT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        family, steps, segment = args.case
        run_case(family, int(steps), None if segment == "none" else int(segment), args.repeat, args.dtype)
        return
    print(f"{'family':8} {'T':>6} {'B':>2} {'block':>6} {'segment':>8} {'step s':>8} {'traced peak MiB':>16} "
          f"{'maxrss MiB':>11}")
    for family, steps, segment in CASES:
        if (args.family and family != args.family) or (args.steps and steps != args.steps):
            continue
        proc = subprocess.run([sys.executable, __file__, "--case", family, str(steps), str(segment or "none"),
                               "--repeat", str(args.repeat), "--dtype", args.dtype],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{family:8} {steps:>6} failed:\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{family:8} {steps:>6} {r['batch']:>2} {r['block']:>6} {str(segment or 'none'):>8} {r['seconds']:>8.2f} "
              f"{r['traced_peak'] / 2 ** 20:>16.1f} {r['maxrss'] / 2 ** 20:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
