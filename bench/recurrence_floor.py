"""How close the fused recurrence kernel runs to the latency floor of its own launch shape.

    python bench/recurrence_floor.py                          # the official model's size
    python bench/recurrence_floor.py --num-memory 150 --hidden 300 --batch 384 --steps 1024
    python bench/recurrence_floor.py --json floor.json

The recurrence is sequential in time: each step costs at least its block-wide
barriers. This times ``kernels.cuda.recur_forward`` and an "empty" kernel with
the same grid, block and dynamic shared memory that only loops T times through
the same number of ``cuda.syncthreads()`` per step (L + 1; 1 when L = 0), and
prints microseconds per step for both and their ratio. A ratio near 1 means
the arithmetic hides behind the barriers; a large one points at the loops.
Needs a real GPU (CuPy + numba-cuda); without one it says what is missing.
"""

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from elmcore.kernels.pointwise import ACTIVATIONS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-memory", type=int, default=100, help="d_m (default: the official model's 100)")
    ap.add_argument("--hidden", type=int, default=200, help="MLP hidden width h (default 2·d_m = 200)")
    ap.add_argument("--layers", type=int, default=1, choices=range(0, 5), help="hidden layers L")
    ap.add_argument("--activation", default="silu", choices=ACTIVATIONS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500, help="time steps T")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    for name in ("num_memory", "hidden", "batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _time_ms(cupy, fn, repeats):
    """Median milliseconds of ``fn()`` on CuPy's current stream (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def _device_name(device):
    name = device.name
    return name.decode() if isinstance(name, bytes) else str(name)


def measure(args):
    from numba import cuda, float32

    from elmcore.neuron import params as P
    from elmcore.kernels import cuda as K
    from elmcore.kernels import cuda_launch
    from elmcore.kernels.pointwise import activation_code
    import cupy

    dt = np.dtype(args.dtype)
    B, T, Dm, H, L = args.batch, args.steps, args.num_memory, args.hidden, args.layers
    W0 = H if L else Dm
    rng = np.random.default_rng(0)

    def dev(*shape, scale=0.3):
        return cupy.asarray(rng.normal(scale=scale, size=shape).astype(dt))

    Zb, W0mT = dev(B, T, W0), dev(Dm, W0, scale=1 / np.sqrt(Dm))
    WhT, ch = dev(max(L - 1, 0), H, H, scale=1 / np.sqrt(H)), dev(max(L - 1, 0), H)
    WoT = dev(H, Dm, scale=1 / np.sqrt(H)) if L else cupy.zeros((1, 1), dt)
    co = dev(Dm)
    kappa_m = cupy.asarray(rng.uniform(0.5, 0.999, Dm).astype(dt))
    c_m = cupy.asarray(rng.uniform(0.01, 1.0, Dm).astype(dt))
    m0 = cupy.zeros((B, Dm), dt)
    M, DM, Z = cupy.empty((B, T, Dm), dt), cupy.empty((B, T, Dm), dt), cupy.empty((L, B, T, H), dt)
    KM = cupy.empty((B, T, Dm), dt)  # κ_m ⊙ m_{t−1}: one elementwise pass after the kernel, counted in the time
    plan_box = []

    def recurrence():
        plan_box[:] = [K.recur_forward(Zb, W0mT, WhT, ch, WoT, co, kappa_m, c_m, m0, activation_code(args.activation),
                                       dt.type(P.PHI_SCALE), dt.type(P.PHI_SLOPE), K.batch_tile(B), M, Z, DM, KM)]

    recurrence_ms = _time_ms(cupy, recurrence, args.repeats)
    plan = plan_box[0]
    syncs = L + 1 if L else 1

    @cuda.jit
    def barrier_loop(steps, syncs_per_step, out):
        # Touch the dynamic shared memory so the launch reserves what the real kernel does.
        smem = cuda.shared.array(0, float32)
        lane = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        if smem.shape[0] > 0 and lane == 0:
            smem[0] = 0
        for step in range(steps):
            for barrier in range(syncs_per_step):
                cuda.syncthreads()
        if lane == 0:
            out[cuda.blockIdx.x] = steps

    out = cupy.zeros(plan.blocks, np.int64)
    dev_out = cuda.as_cuda_array(out, sync=False)
    floor_kernel = barrier_loop.specialize(T, syncs, dev_out)
    if plan.shared_bytes > K._DEFAULT_SHARED_BYTES and not K._allow_large_shared(floor_kernel):
        raise SystemExit("cannot reserve the recurrence's shared memory for the floor kernel")
    stream = cuda_launch.stream()

    def floor():
        floor_kernel[plan.blocks, (plan.unit_threads, plan.rows_per_block), stream, plan.shared_bytes](
            T, syncs, dev_out)

    floor_ms = _time_ms(cupy, floor, args.repeats)
    assert int(out.min()) == T, "the floor kernel did not run every block"
    return {
        "config": {"num_memory": Dm, "hidden": H, "layers": L, "activation": args.activation,
                   "batch": B, "steps": T, "dtype": args.dtype},
        "launch": {"blocks": plan.blocks, "threads": [plan.unit_threads, plan.rows_per_block],
                   "shared_bytes": plan.shared_bytes, "weights_in_shared": plan.weights_in_shared,
                   "syncthreads_per_step": syncs},
        "device": _device_name(cuda.get_current_device()),
        "recurrence_us_per_step": 1000 * recurrence_ms / T,
        "floor_us_per_step": 1000 * floor_ms / T,
        "ratio": recurrence_ms / floor_ms,
    }


def main(argv=None):
    args = parse_args(argv)
    from elmcore.engine.cuda_backend import cuda_problem
    problem = cuda_problem()
    if problem is None:
        from elmcore.kernels.cuda_launch import SIMULATOR
        if SIMULATOR:
            problem = "the CUDA simulator has no meaningful timings (unset NUMBA_ENABLE_CUDASIM)"
    if problem is not None:
        print(f"recurrence_floor: needs a real GPU: {problem}", file=sys.stderr)
        return 2
    result = measure(args)
    cfg, launch = result["config"], result["launch"]
    print(f"{result['device']}: d_m={cfg['num_memory']} h={cfg['hidden']} L={cfg['layers']} B={cfg['batch']} "
          f"T={cfg['steps']} {cfg['dtype']}; {launch['blocks']} blocks x {launch['threads']} threads, "
          f"{launch['shared_bytes']} B shared, weights in {'shared' if launch['weights_in_shared'] else 'global'}")
    print(f"recurrence {result['recurrence_us_per_step']:.2f} us/step, "
          f"barrier floor {result['floor_us_per_step']:.2f} us/step, ratio {result['ratio']:.2f}")
    if args.json:
        from elmcore.storage.fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
