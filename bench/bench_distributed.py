"""One node, two ways to use its cores: data-parallel ranks against threads, and sweeps.

    python bench/bench_distributed.py step     # NeuronIO-best training step: 1 process x 1 thread,
                                               # 1 process x 2 threads, mpiexec -n 2 x 1 thread (B = 32
                                               # split 16 + 16)
    python bench/bench_distributed.py sweep    # 8 small models: serial, --jobs 2, mpiexec -n 2
    python bench/bench_distributed.py step sweep --ranks 2 --json out.json

The step is what `elm train` runs per batch: forward, loss, backward, the one
all-reduce of the flat gradient buffer (ranks only) and Adam, on the same global
batch. Each timing runs in fresh processes; the thread counts are set in their
environment before NumPy loads. Run it on an otherwise idle machine: on a shared
one the spread between repeats shows the noise.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def _env(threads):
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update({k: str(threads) for k in THREAD_VARIABLES})
    return env


# ---- the training step --------------------------------------------------------------------------

def step_worker(config, repeats, warmup):
    """Runs in every rank (or the one process): time `repeats` data-parallel steps; rank 0 prints JSON."""
    sys.path.insert(0, HERE)
    from bench_step import CONFIGS, loss_and_grad, make_inputs  # noqa: E402  (imports elmcore first)
    import numpy as np
    from elmcore import ELM, ELMConfig
    from elmcore.training.distributed import communicator
    from elmcore.training.optim import Optimizer
    spec = CONFIGS[config]
    comm = communicator()
    X, target = make_inputs(spec, np.random.default_rng(0), "uint8")
    model = ELM(ELMConfig.from_dict(spec["model"]), seed=0, dtype="float32")
    opt = Optimizer({k: model.params[k] for k in model.trainable_keys}, kind="adam", lr=1e-4, clip_norm=1.0)

    def step():
        Xs, ts, weight = comm.shard_batch(X, target)
        Y, cache = model.forward(Xs, return_cache=True)
        loss, dY = loss_and_grad(spec, Y, ts)
        grads = model.backward(dY, cache)
        loss, grads, _ = comm.allreduce_gradients(grads, loss, weight)
        opt.step(grads)

    times = []
    for i in range(warmup + repeats):
        comm.allreduce_sum([0.0])  # start together
        t0 = time.perf_counter()
        step()
        comm.allreduce_sum([0.0])  # the step ends when the slowest rank is through
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if comm.is_root:
        print(json.dumps({"times": times, "ranks": comm.size, "batch": spec["batch"], "steps": spec["steps"]}))


def time_step(config, ranks, threads, repeats, warmup):
    cmd = [sys.executable, os.path.abspath(__file__), "_step_worker", config, str(repeats), str(warmup)]
    if ranks > 1:
        cmd = [_mpiexec(), "-n", str(ranks)] + cmd
    out = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    med = statistics.median(r["times"])
    return {"ranks": ranks, "threads_per_rank": threads, "median_ms": 1e3 * med,
            "min_ms": 1e3 * min(r["times"]), "max_ms": 1e3 * max(r["times"]),
            "sample_steps_per_s": r["batch"] * r["steps"] / med}


# ---- the sweep ----------------------------------------------------------------------------------

SWEEP = """
sweep_dir = "{dir}"
[base]
task = "adding"
task_options = {{length = 100, n = 600}}
epochs = 2
batch_size = 32
model = {{version = "branch_elm_v2", memory_tau_max = 100.0}}

[grid]
num_memory = [4, 8, 16, 32]
seed = [0, 1]
"""


def time_sweep(how, ranks, tmp):
    sweep_dir = os.path.join(tmp, how)
    path = os.path.join(tmp, f"{how}.toml")
    with open(path, "w") as f:
        f.write(SWEEP.format(dir=sweep_dir))
    elm = [sys.executable, "-m", "elm_cli.launch", "sweep", path]
    cmd = {"serial": elm, "jobs": elm + ["--jobs", str(ranks)],
           "mpiexec": [_mpiexec() or "mpiexec", "-n", str(ranks)] + elm}[how]
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}  # each way picks its default
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return {"how": how, "wall_s": seconds, "points": 8}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="+", choices=["step", "sweep"])
    ap.add_argument("--config", default="neuronio-best")
    ap.add_argument("--ranks", type=int, default=2, help="Ranks (and cores) to compare on.")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="Also write the results here.")
    args = ap.parse_args(argv)
    if _mpiexec() is None:
        sys.exit("no mpiexec: pip install -e '.[mpi]'")
    results = {}
    if "step" in args.what:
        single = time_step(args.config, 1, 1, args.repeats, args.warmup)
        one = time_step(args.config, 1, args.ranks, args.repeats, args.warmup)
        many = time_step(args.config, args.ranks, 1, args.repeats, args.warmup)
        results["step"] = [single, one, many]
        print(f"{args.config} training step, global batch as in bench_step.py:")
        for r in (single, one, many):
            print(f"  {r['ranks']} process(es) x {r['threads_per_rank']} thread(s): median {r['median_ms']:7.1f} ms "
                  f"(min {r['min_ms']:.1f}, max {r['max_ms']:.1f})  {r['sample_steps_per_s']:10,.0f} sample-steps/s")
        print(f"  ranks / threads: x{one['median_ms'] / many['median_ms']:.2f}")
    if "sweep" in args.what:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [time_sweep(how, args.ranks, tmp) for how in ("serial", "jobs", "mpiexec")]
        results["sweep"] = rows
        print("sweep of 8 small models (adding, T=100, 2 epochs):")
        for r in rows:
            print(f"  {r['how']:<8} {r['wall_s']:7.1f} s   x{rows[0]['wall_s'] / r['wall_s']:.2f} vs serial")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_step_worker":
        step_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
