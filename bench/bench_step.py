"""Time a full training step (forward, loss, backward, Adam) and an inference pass.

    python bench/bench_step.py                       # NeuronIO-best and SHD on the CPU
    python bench/bench_step.py --device cuda --configs neuronio-best shd pathfinder
    python bench/bench_step.py --json results.json
    python bench/bench_step.py --release ~/elmneuron   # the official release, side by side

Reports median milliseconds and sample-steps per second (B·T per second). When
PyTorch is importable it also times ``bench/torch_baseline.py`` (plain autograd,
looping over time like the release) on identical inputs and parameters and
prints elmcore's speed-up over it. With ``--release PATH`` (a checkout of
github.com/AaronSpieler/elmneuron) it times the release's own TorchScript ELM
instead, loaded with the same parameters, in the same run.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_ELMCORE_ENV_DEFAULTS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT")
_USER_ENV = {k: os.environ.get(k) for k in _ELMCORE_ENV_DEFAULTS}  # before elmcore adds its defaults

from elmcore import ELM, ELMConfig  # noqa: E402  (before NumPy: it tunes OpenBLAS's threads)
import numpy as np  # noqa: E402
from elmcore.data.neuronio import neuronio_loss  # noqa: E402
from elmcore.training.losses import cross_entropy_last  # noqa: E402
from elmcore.training.optim import Optimizer  # noqa: E402

CONFIGS = {
    # The release's best_elm_neuron: 45 branches x 100 synapses over 1278 NeuronIO inputs.
    "neuronio-best": dict(
        model=dict(num_input=1278, num_output=2, num_memory=100, mlp_activation="silu",
                   num_branch=45, num_synapse_per_branch=100, input_to_synapse_routing="neuronio_routing",
                   memory_tau_max=150.0, version="elm_v1"),
        batch=32, steps=500, density=0.01, loss="neuronio"),
    "shd": dict(
        model=dict(num_input=700, num_output=20, num_memory=100, memory_tau_min=1.0, memory_tau_max=500.0,
                   delta_t=10.0, version="elm_v1"),
        batch=32, steps=100, density=0.05, loss="classes"),
    # Pathfinder-like: 16 one-hot grey levels per pixel, one pixel per step.
    "pathfinder": dict(
        model=dict(num_input=16, num_output=2, num_memory=150, mlp_hidden_size=300, version="branch_elm_v2",
                   memory_tau_max=1000.0),
        batch=384, steps=1024, density=None, loss="classes"),
}


def make_inputs(spec, rng, input_dtype="float32"):
    """Binary inputs (spikes, or one-hot pixels) as ``input_dtype``; the same values either way."""
    B, T = spec["batch"], spec["steps"]
    D = spec["model"]["num_input"]
    if spec["density"] is None:  # one-hot rows
        X = np.zeros((B, T, D), input_dtype)
        X[np.arange(B)[:, None], np.arange(T)[None, :], rng.integers(0, D, (B, T))] = 1
    else:
        X = (rng.random((B, T, D)) < spec["density"]).astype(input_dtype)
    if spec["loss"] == "neuronio":
        target = np.stack([(rng.random((B, T)) < 0.01), rng.normal(0, 1, (B, T))], -1).astype(np.float32)
    else:
        target = rng.integers(0, spec["model"]["num_output"], B)
    return X, target


def loss_and_grad(spec, Y, target):
    if spec["loss"] == "neuronio":
        return neuronio_loss(Y, target)
    return cross_entropy_last(Y, target)


def timed(fn, repeats, warmup, sync=lambda: None):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def bench_elmcore(spec, X, target, device, repeats, warmup):
    cfg = ELMConfig.from_dict(spec["model"])
    model = ELM(cfg, seed=0, dtype="float32", device=device)
    xp = model.xp
    Xd, Td = xp.asarray(X), xp.asarray(target)
    opt = Optimizer({k: model.params[k] for k in model.trainable_keys}, kind="adam", lr=1e-4)
    sync = model.backend.synchronize

    def train_step():
        Y, cache = model.forward(Xd, return_cache=True)
        _, dY = loss_and_grad(spec, Y, Td)
        grads = model.backward(dY, cache)
        opt.step(grads)

    def infer():
        model.forward(Xd)

    return model, timed(train_step, repeats, warmup, sync), timed(infer, repeats, warmup, sync)


def bench_torch(spec_name, X, target, params, device, repeats, warmup, release=None):
    """Time the PyTorch baseline in a child process with the caller's original environment.

    elmcore sets OMP_WAIT_POLICY / GOMP_SPINCOUNT / OPENBLAS_THREAD_TIMEOUT defaults for its own
    kernels; PyTorch's many small per-step ops are slower with sleeping OpenMP
    threads, so the baseline must not inherit them. Returns None without PyTorch.
    """
    import subprocess
    import tempfile
    import torch_baseline as tb
    if not tb.torch_available():
        return None
    env = {k: v for k, v in os.environ.items() if k not in _ELMCORE_ENV_DEFAULTS}
    env.update({k: v for k, v in _USER_ENV.items() if v is not None})
    env["ELMCORE_THREAD_DEFAULTS"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "case.npz")
        np.savez(data, X=X, target=target, **{f"param/{k}": v for k, v in params.items()})
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-worker", spec_name, data,
                              device, str(repeats), str(warmup), release or ""],
                             env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"torch baseline failed:\n{out.stderr}")
    times = json.loads(out.stdout.strip().splitlines()[-1])
    return times["train"], times["inference"]


def release_model(release, cfg, version, params, device):
    """The release's own ELM class from a checkout at ``release``, holding ``params``."""
    import torch
    sys.path.insert(0, os.path.abspath(os.path.expanduser(release)))
    module = "expressive_leaky_memory_neuron" + ("_v2" if version == "branch_elm_v2" else "")
    ReleaseELM = __import__(f"src.{module}", fromlist=["ELM"]).ELM
    model = ReleaseELM(**cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in params and own[k].numel()]
    if missing:
        raise RuntimeError(f"the release's model has {missing}, elmcore's parameters do not")
    # Each tensor in the release's own dtype (routing indices int64, the mask as the release keeps it);
    # an unrouted model's empty routing tensors stay as the release made them.
    model.load_state_dict({k: torch.as_tensor(np.asarray(params[k])).to(own[k].dtype) if k in params else own[k]
                           for k in own})
    return model.to(device)


def torch_worker(spec_name, data, device, repeats, warmup, release=""):
    import torch
    import torch_baseline as tb
    spec = CONFIGS[spec_name]
    with np.load(data) as d:
        X, target = d["X"], d["target"]
        params = {k[6:]: d[k] for k in d.files if k.startswith("param/")}
    cfg = dict(spec["model"])
    version = cfg.pop("version")
    tdev = "cuda" if device == "cuda" else "cpu"
    if release:
        model = release_model(release, cfg, version, params, tdev)
    else:
        model = tb.TorchELM(cfg, version, params, device=tdev)
    if spec["loss"] == "neuronio":
        loss_fn = tb.neuronio_loss_fn(torch.as_tensor(target[..., 0], device=tdev),
                                      torch.as_tensor(target[..., 1], device=tdev))
    else:
        loss_fn = tb.last_step_cross_entropy_fn(torch.as_tensor(target, device=tdev))
    Xt = torch.as_tensor(X, device=tdev)
    train = tb.time_training_step(model, Xt, loss_fn, steps=repeats, warmup=warmup)
    infer = tb.time_inference(model, Xt, steps=repeats, warmup=warmup)
    print(json.dumps({"train": train, "inference": infer}))


def with_shape(spec, batch=None, steps=None):
    """``spec`` with its batch size and sequence length replaced where given."""
    return dict(spec, batch=batch or spec["batch"], steps=steps or spec["steps"])


def summarise(times, samples_steps):
    med = statistics.median(times)
    return {"median_ms": 1e3 * med, "min_ms": 1e3 * min(times), "sample_steps_per_s": samples_steps / med}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["neuronio-best", "shd"], choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-repeats", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="Skip the PyTorch baseline.")
    ap.add_argument("--release", metavar="PATH",
                    help="Time the official release (a checkout of AaronSpieler/elmneuron) as the baseline "
                         "instead of bench/torch_baseline.py.")
    ap.add_argument("--input-dtype", default="uint8", choices=["uint8", "float32"],
                    help="How elmcore receives the binary inputs: one byte per value (as spike data is "
                         "stored) or float32. The PyTorch baseline always gets float32.")
    ap.add_argument("--json", help="Write results to this JSON file.")
    ap.add_argument("--batch", type=int, help="Override every config's batch size (short checks).")
    ap.add_argument("--steps", type=int, help="Override every config's sequence length (short checks).")
    args = ap.parse_args(argv)
    if args.release and not os.path.isfile(os.path.join(os.path.expanduser(args.release), "src",
                                                        "expressive_leaky_memory_neuron.py")):
        ap.exit(2, f"error: --release {args.release}: not a checkout of the release "
                   "(no src/expressive_leaky_memory_neuron.py)\n")

    results = {"device": args.device, "configs": {}}
    for name in args.configs:
        spec = with_shape(CONFIGS[name], args.batch, args.steps)
        rng = np.random.default_rng(0)
        X, target = make_inputs(spec, rng, args.input_dtype)
        model, train, infer = bench_elmcore(spec, X, target, args.device, args.repeats, args.warmup)
        bt = spec["batch"] * spec["steps"]
        row = {"batch": spec["batch"], "steps": spec["steps"], "parameters": model.num_parameters,
               "input_dtype": args.input_dtype,
               "train": summarise(train, bt), "inference": summarise(infer, bt)}
        print(f"{name}: B={spec['batch']} T={spec['steps']} params={model.num_parameters} "
              f"({args.device}, float32 model, {args.input_dtype} input)")
        print(f"  elmcore  train step {row['train']['median_ms']:9.1f} ms   "
              f"{row['train']['sample_steps_per_s']:12,.0f} sample-steps/s")
        print(f"  elmcore  inference  {row['inference']['median_ms']:9.1f} ms   "
              f"{row['inference']['sample_steps_per_s']:12,.0f} sample-steps/s")
        if not args.no_torch:
            torch_times = bench_torch(name, X.astype(np.float32), target, model.state_dict(), args.device,
                                      args.torch_repeats, 1, args.release)
            if torch_times is None:
                print("  torch    not installed: no baseline")
            else:
                row["torch_train"] = summarise(torch_times[0], bt)
                row["torch_inference"] = summarise(torch_times[1], bt)
                row["speedup_train"] = row["torch_train"]["median_ms"] / row["train"]["median_ms"]
                row["speedup_inference"] = row["torch_inference"]["median_ms"] / row["inference"]["median_ms"]
                label = "release" if args.release else "torch  "
                row["baseline"] = "release" if args.release else "torch_baseline"
                print(f"  {label}  train step {row['torch_train']['median_ms']:9.1f} ms   "
                      f"-> elmcore x{row['speedup_train']:.1f}")
                print(f"  {label}  inference  {row['torch_inference']['median_ms']:9.1f} ms   "
                      f"-> elmcore x{row['speedup_inference']:.1f}")
        results["configs"][name] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-worker":
        name, data, device, repeats, warmup, release = sys.argv[2:8]
        torch_worker(name, data, device, int(repeats), int(warmup), release)
    else:
        main()
