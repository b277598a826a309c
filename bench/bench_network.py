"""Time an ELM Network training step (forward, loss, backward, Adam) and inference, elmcore
against the plain PyTorch-autograd network of bench/torch_network.py, in one run.

    python bench/bench_network.py                          # both configs on the CPU
    python bench/bench_network.py --configs char-lm --json out.json
    python bench/bench_network.py --device cuda
    python bench/bench_network.py --no-elmcore             # the PyTorch side only

Configs (docs/spec.md §7; the sizes the ELM Network follow-up uses for its two benchmarks):

* ``shd-adding``: 700 spike inputs (5 % of them active per step, as binned SHD spikes),
  N = 128 neurons, d_m = 8, 4 branches × 8 synapses, ρ = 0.5, 19 classes read at the last
  step, B = 32, T = 100.
* ``char-lm``: 256 one-hot byte inputs, the same neurons with N = 256, 256 outputs, next-byte
  cross-entropy at every step, B = 32, T = 256 (32 windows of 256 bytes: 8,192 characters
  per step, the usual order of magnitude for character-level training on one machine).

Both sides run the same parameters (elmcore's init, copied into PyTorch) on the same inputs;
elmcore gets the binary inputs as one byte per value (``--input-dtype``), PyTorch as float32.
PyTorch runs in a child process with the caller's thread environment (as bench_step.py).
The ratio printed is PyTorch's median time over elmcore's.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_step  # noqa: E402  (first: it records the user's thread environment before elmcore sets its own)
import numpy as np  # noqa: E402
from bench_step import summarise, timed, with_shape  # noqa: E402
from elmcore.training.losses import cross_entropy_all, cross_entropy_last  # noqa: E402
from elmcore.training.optim import Optimizer  # noqa: E402

NEURON = dict(num_memory=8, num_branch=4, num_synapse_per_branch=8, recurrent_fraction=0.5)
CONFIGS = {
    "shd-adding": dict(
        model=dict(version="elm_network", num_input=700, num_output=19, num_neurons=128, **NEURON),
        batch=32, steps=100, input="spikes", density=0.05, loss="last"),
    "char-lm": dict(
        model=dict(version="elm_network", num_input=256, num_output=256, num_neurons=256, **NEURON),
        batch=32, steps=256, input="one-hot", density=None, loss="all"),
}


def make_inputs(spec, rng, input_dtype):
    B, T = spec["batch"], spec["steps"]
    D, K = spec["model"]["num_input"], spec["model"]["num_output"]
    if spec["input"] == "one-hot":
        tokens = rng.integers(0, D, (B, T + 1))
        X = np.zeros((B, T, D), input_dtype)
        X[np.arange(B)[:, None], np.arange(T)[None, :], tokens[:, :-1]] = 1
        return X, tokens[:, 1:]
    X = (rng.random((B, T, D)) < spec["density"]).astype(input_dtype)
    return X, rng.integers(0, K, B)


def build_elmcore_network(model_fields, device, dtype="float32", seed=0):
    """elmcore's ELM Network for ``model_fields`` (a §7.1 dict with version="elm_network")."""
    from elmcore.engine.factory import load_config_dict
    from elmcore.engine.factory import build_model
    return build_model(load_config_dict(model_fields), seed=seed, dtype=dtype, device=device)


def elmcore_network_problem():
    """None when elmcore's network is importable, else why not (this branch may predate it)."""
    try:
        import elmcore.engine.factory  # noqa: F401
        import elmcore.network.model  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def bench_elmcore(spec, X, target, device, repeats, warmup):
    model = build_elmcore_network(spec["model"], device)
    xp = model.xp
    Xd, Td = xp.asarray(X), xp.asarray(target)
    loss_fn = cross_entropy_all if spec["loss"] == "all" else cross_entropy_last
    keys = list(model.trainable_keys)
    opt = Optimizer({k: model.params[k] for k in keys}, kind="adam", lr=1e-4)
    sync = model.backend.synchronize

    def train_step():
        Y, cache = model.forward(Xd, return_cache=True)
        _, dY = loss_fn(Y, Td)
        grads = model.backward(dY, cache)
        opt.step({k: grads[k] for k in keys})

    def infer():
        model.forward(Xd)

    return model, timed(train_step, repeats, warmup, sync), timed(infer, repeats, warmup, sync)


def bench_torch(spec_name, X, target, params, device, repeats, warmup, threads=None):
    """(train seconds, inference seconds) of the PyTorch network in a child process, or None."""
    import torch_baseline
    if not torch_baseline.torch_available():
        return None
    env = {k: v for k, v in os.environ.items() if k not in bench_step._ELMCORE_ENV_DEFAULTS}
    env.update({k: v for k, v in bench_step._USER_ENV.items() if v is not None})
    env["ELMCORE_THREAD_DEFAULTS"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "case.npz")
        np.savez(data, X=X, target=target, spec=np.array(json.dumps(CONFIGS[spec_name])),
                 **{f"param/{k}": v for k, v in params.items()})
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-worker", spec_name, data,
                              device, str(repeats), str(warmup), str(threads or 0)], env=env,
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"torch network baseline failed:\n{out.stderr}")
    times = json.loads(out.stdout.strip().splitlines()[-1])
    return times["train"], times["inference"], times["threads"]


def torch_worker(spec_name, data, device, repeats, warmup, threads=0):
    import torch
    if threads:
        torch.set_num_threads(threads)
    import torch_baseline as tb
    import torch_network as tn
    with np.load(data) as d:
        X, target, spec = d["X"], d["target"], json.loads(str(d["spec"]))
        params = {k[6:]: d[k] for k in d.files if k.startswith("param/")}
    tdev = "cuda" if device == "cuda" else "cpu"
    model = tn.TorchELMNetwork(spec["model"], params, device=tdev)
    if spec["loss"] == "all":
        loss_fn = tn.all_steps_cross_entropy_fn(target)
    else:
        loss_fn = tb.last_step_cross_entropy_fn(target)
    Xt = torch.as_tensor(X, device=tdev)
    train = tn.time_training_step(model, Xt, loss_fn, steps=repeats, warmup=warmup)
    infer = tn.time_inference(model, Xt, steps=repeats, warmup=warmup)
    print(json.dumps({"train": train, "inference": infer, "threads": torch.get_num_threads()}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-repeats", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="Skip the PyTorch baseline.")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="PyTorch intra-op threads (default: PyTorch's own choice). 1 keeps its many "
                         "small per-step ops from waiting on each other when the machine is busy.")
    ap.add_argument("--no-elmcore", action="store_true",
                    help="Time only the PyTorch baseline (its own spec init, seed 0).")
    ap.add_argument("--input-dtype", default="uint8", choices=["uint8", "float32"],
                    help="How elmcore receives the binary inputs (PyTorch always gets float32).")
    ap.add_argument("--json", help="Write results to this JSON file.")
    ap.add_argument("--batch", type=int, help="Override every config's batch size (short checks).")
    ap.add_argument("--steps", type=int, help="Override every config's sequence length (short checks).")
    ap.add_argument("--neurons", type=int, help="Override every config's neurons per layer (short checks: the "
                                                "CUDA simulator runs a Python thread per neuron).")
    args = ap.parse_args(argv)

    run_elmcore = not args.no_elmcore
    problem = elmcore_network_problem() if run_elmcore else None
    if problem:
        print(f"elmcore network not available ({problem}): timing the PyTorch baseline only")
        run_elmcore = False
    results = {"device": args.device, "configs": {}}
    for name in args.configs:
        spec = with_shape(CONFIGS[name], args.batch, args.steps)
        if args.neurons:
            spec = dict(spec, model=dict(spec["model"], num_neurons=args.neurons))
        B, T = spec["batch"], spec["steps"]
        X, target = make_inputs(spec, np.random.default_rng(0), args.input_dtype)
        row = {"batch": B, "steps": T, "input_dtype": args.input_dtype}
        print(f"{name}: B={B} T={T} N={spec['model']['num_neurons']} inputs={spec['model']['num_input']} "
              f"({args.device}, float32 model)")
        if run_elmcore:
            model, train, infer = bench_elmcore(spec, X, target, args.device, args.repeats, args.warmup)
            params = {k: np.asarray(model.backend.to_host(v)) for k, v in model.state_dict().items()}
            row.update(parameters=int(model.num_parameters), train=summarise(train, B * T),
                       inference=summarise(infer, B * T))
            print(f"  parameters {row['parameters']:,}")
            print(f"  elmcore  train step {row['train']['median_ms']:9.1f} ms   "
                  f"{row['train']['sample_steps_per_s']:12,.0f} sample-steps/s")
            print(f"  elmcore  inference  {row['inference']['median_ms']:9.1f} ms   "
                  f"{row['inference']['sample_steps_per_s']:12,.0f} sample-steps/s")
        else:
            import torch_network
            params = torch_network.init_network_params(spec["model"], seed=0)
        if not args.no_torch:
            torch_times = bench_torch(name, X.astype(np.float32), target, params, args.device,
                                      args.torch_repeats, 1, args.torch_threads)
            if torch_times is None:
                print("  torch    not installed: no baseline")
            else:
                row["torch_threads"] = torch_times[2]
                row["torch_train"] = summarise(torch_times[0], B * T)
                row["torch_inference"] = summarise(torch_times[1], B * T)
                print(f"  torch    {row['torch_threads']} thread(s)")
                line = {"train": f"  torch    train step {row['torch_train']['median_ms']:9.1f} ms",
                        "inference": f"  torch    inference  {row['torch_inference']['median_ms']:9.1f} ms"}
                if run_elmcore:
                    row["speedup_train"] = row["torch_train"]["median_ms"] / row["train"]["median_ms"]
                    row["speedup_inference"] = row["torch_inference"]["median_ms"] / row["inference"]["median_ms"]
                    line["train"] += f"   -> elmcore x{row['speedup_train']:.1f}"
                    line["inference"] += f"   -> elmcore x{row['speedup_inference']:.1f}"
                print(line["train"])
                print(line["inference"])
        results["configs"][name] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-worker":
        name, data, device, repeats, warmup, threads = sys.argv[2:8]
        torch_worker(name, data, device, int(repeats), int(warmup), int(threads))
    else:
        main()
