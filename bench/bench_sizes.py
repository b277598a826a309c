"""Step time against model size: a training step (forward, loss, backward, Adam) and an inference
pass for single neurons and ELM Networks of 10^2 to 10^5 trainable parameters, on the CPU.

    python bench/bench_sizes.py                     # both families, B = 32, T = 100
    python bench/bench_sizes.py --family network --repeats 15 --json sizes.json

Budget sweeps train many small models, so what a step costs besides its arithmetic (kernel
starts, threads, allocation, Python) matters as much as the large models' throughput. Every
model reads the adding problem's shape (2 float inputs, 1 output, the last step's squared
error). The SHD-Adding network of bench/bench_network.py is timed in the same run, and the
smallest network's step is printed as a share of it: the fixed costs made that 173-parameter
network, 0.3 % of SHD-Adding's parameters, cost 11 % of its step.

Shapes are timed one after another, each as the median of ``--repeats`` steps after
``--warmup`` (which also compiles); ``--rounds`` repeats the whole table, alternating shapes, so
that a change of machine load hits every shape alike (medians over all rounds). Per
parameter-step is the train step over batch × steps × parameters.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_network  # noqa: E402  (imports elmcore before NumPy, as the other benchmarks)
import elmcore  # noqa: E402
import numpy as np  # noqa: E402
from elmcore.engine.factory import build_model, load_config_dict  # noqa: E402
from elmcore.training.losses import cross_entropy_last, mse_last  # noqa: E402
from elmcore.training.optim import Optimizer  # noqa: E402

ADDING = dict(num_input=2, num_output=1)
# (label, model fields): about half a decade apart in parameters.
NEURONS = [(f"d_m {d_m}" + (f", H {hidden}" if hidden else ""),
            dict(version="branch_elm_v2", num_memory=d_m, **({"mlp_hidden_size": hidden} if hidden else {})))
           for d_m, hidden in ((6, None), (10, None), (20, None), (30, None), (50, None), (100, None),
                               (150, None))]
NETWORKS = [(f"N {n}, d_m {d_m}, {nb}x{spb} syn",
             dict(version="elm_network", num_neurons=n, num_memory=d_m, num_branch=nb, num_synapse_per_branch=spb))
            for n, d_m, nb, spb in ((4, 2, 1, 13), (4, 4, 2, 8), (8, 4, 4, 8), (16, 4, 4, 8), (16, 8, 4, 8),
                                    (32, 8, 4, 8), (64, 8, 4, 8), (128, 8, 4, 8), (96, 16, 4, 8))]
SMALLEST_NETWORK = NETWORKS[0][0]  # 173 parameters


class Case:
    """One model with its inputs, optimiser and the two timed functions."""

    def __init__(self, family, label, fields, batch, steps, rng):
        self.family, self.label = family, label
        if family == "shd-adding":
            spec = bench_network.with_shape(bench_network.CONFIGS["shd-adding"], batch, steps)
            X, target = bench_network.make_inputs(spec, rng, "uint8")
            self.model = bench_network.build_elmcore_network(spec["model"], "cpu")
            loss = cross_entropy_last
        else:
            self.model = build_model(load_config_dict({**ADDING, **fields}), seed=0, dtype="float32")
            X = rng.random((batch, steps, ADDING["num_input"])).astype(np.float32)
            target = rng.random((batch, ADDING["num_output"])).astype(np.float32)
            loss = mse_last
        self.parameters = int(self.model.num_parameters)
        self.work = X.shape[0] * X.shape[1]
        keys = list(self.model.trainable_keys)
        optimizer = Optimizer({k: self.model.params[k] for k in keys}, kind="adam", lr=1e-4)

        def train():
            Y, cache = self.model.forward(X, return_cache=True)
            _, dY = loss(Y, target)
            grads = self.model.backward(dY, cache)
            optimizer.step({k: grads[k] for k in keys})

        def infer():
            self.model.forward(X)

        self.functions = {"train": train, "inference": infer}
        self.times = {"train": [], "inference": []}

    def run(self, repeats, warmup):
        for name, fn in self.functions.items():
            for _ in range(warmup):
                fn()
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                self.times[name].append(time.perf_counter() - t0)

    def row(self):
        train, infer = (statistics.median(self.times[k]) for k in ("train", "inference"))
        return dict(family=self.family, shape=self.label, parameters=self.parameters, train_ms=train * 1e3,
                    inference_ms=infer * 1e3, train_ns_per_parameter_step=train * 1e9 / (self.work * self.parameters),
                    samples=len(self.times["train"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", default=["neuron", "network"], choices=["neuron", "network"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5, help="Timed steps per shape and round.")
    ap.add_argument("--rounds", type=int, default=3, help="Passes over all shapes (medians over all of them).")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-shd", action="store_true", help="Skip the SHD-Adding reference network.")
    ap.add_argument("--json", help="Write the table to this JSON file.")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    cases = []
    for family, shapes in (("neuron", NEURONS), ("network", NETWORKS)):
        if family in args.family:
            cases += [Case(family, label, fields, args.batch, args.steps, rng) for label, fields in shapes]
    if not args.no_shd:
        # SHD-Adding keeps its own shape (B = 32, T = 100): the reference the small networks are compared to.
        cases.append(Case("shd-adding", "SHD-Adding (bench_network.py)", None, None, None, rng))
    for case in cases:  # compiles and warms every shape before any is timed
        case.run(0, args.warmup)
    for _ in range(args.rounds):
        for case in cases:
            case.run(args.repeats, 1)

    rows = [case.row() for case in cases]
    print(f"B = {args.batch}, T = {args.steps} (SHD-Adding: B = 32, T = 100); medians of "
          f"{args.rounds} x {args.repeats} steps; load average {os.getloadavg()[0]:.2f}; elmcore from "
          f"{os.path.dirname(os.path.dirname(os.path.abspath(elmcore.__file__)))}")
    print(f"{'family':<11} {'shape':<28} {'parameters':>10} {'train ms':>9} {'infer ms':>9} {'ns/param-step':>13}")
    for r in rows:
        print(f"{r['family']:<11} {r['shape']:<28} {r['parameters']:>10,} {r['train_ms']:>9.2f} "
              f"{r['inference_ms']:>9.2f} {r['train_ns_per_parameter_step']:>13.3f}")
    result = {"batch": args.batch, "steps": args.steps, "rows": rows, "load_average": os.getloadavg()[0]}
    smallest = next((r for r in rows if r["shape"] == SMALLEST_NETWORK), None)
    shd = next((r for r in rows if r["family"] == "shd-adding"), None)
    if smallest and shd:
        share = {k: 100 * smallest[k] / shd[k] for k in ("train_ms", "inference_ms")}
        result["smallest_network_share_of_shd_adding_percent"] = share
        print(f"the {smallest['parameters']}-parameter network ({SMALLEST_NETWORK}): train step "
              f"{share['train_ms']:.1f} % of SHD-Adding's ({100 * smallest['parameters'] / shd['parameters']:.2f} % "
              f"of its parameters), inference {share['inference_ms']:.1f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
