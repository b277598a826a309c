"""How fast could an ELM Network training step be on this CPU? A lower bound from its matrix
products, measured next to elmcore's step and the PyTorch step in one run.

    python bench/network_floor.py                      # both bench_network.py configs
    python bench/network_floor.py --configs char-lm --json floor.json

Every neuron of an ELM Network has its own MLP, so its products are many tiny ones (per
neuron and step: B rows times an (n_b + d_m) x h, h x d_m, ... matrix) that cannot be batched
into large GEMMs as the single neuron's shared MLP is. A training step does each of them three
times (forward, the backward through the MLP, the weight gradient), over all B x T rows and
N neurons. This script

1. measures the best rate at which Numba-compiled code on this machine computes such
   per-neuron products, one core, data hot in L1/L2 (optimistic: the real walk streams its
   caches from memory). Four formulations, the best one counts:
   * ``elmcore``: the engine's kernel (``network_cpu._dense_rows``): vectors over neurons,
     4 rows x 4 outputs of accumulator vectors held in registers through the whole sum,
     written as LLVM vector code (``kernels/simd.py``), a tile of ``batch_tile(B)`` rows;
   * ``numba-loops``: the same layout as plain Numba loops (the engine's kernel until
     2026-12-01): four inputs per pass over each output row, accumulators in memory;
   * ``shared-weight``: per neuron, the tile's rows times that neuron's weight matrix with the
     register-blocked product of the single-neuron engine (``cpu._accumulate_product``):
     vectors over outputs, each weight reused by all rows;
   * ``batch-lanes``: per neuron, straight-line generated code over the batch rows as vector
     lanes, the neuron's weights held in registers;
2. times the readout's three products the way the engine runs them (all threads);
3. adds them up as if every core ran at that best rate with perfect scaling: the *floor*, a
   step that did nothing but its products (no recurrence, activations, memory traffic, Adam);
4. runs bench_network.py for elmcore's and PyTorch's measured steps, and prints the floor
   against the issue's target of a tenth of the PyTorch step.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_network  # noqa: E402  (first: bench_step records the user's thread environment)
import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from elmcore.engine.factory import load_config_dict  # noqa: E402
from elmcore.kernels import network_cpu  # noqa: E402
from elmcore.kernels.cpu import _accumulate_product  # noqa: E402
from elmcore.network.params import mlp_widths  # noqa: E402

_JIT = dict(error_model="numpy", fastmath={"contract"})


@njit(**_JIT)
def _elmcore(a, W, c, out, rows, passes):
    for p in range(passes):
        network_cpu._dense_rows(a, W, c, out, rows)
        a[0, 0, 0] = out[0, 0, 0] * 1e-30  # a data dependence, so no pass can be skipped


@njit(**_JIT)
def _numba_loops(a, W, c, out, rows, passes):
    J, K_out, N = W.shape
    for p in range(passes):
        for r in range(rows):
            for o in range(K_out):
                for i in range(N):
                    out[r, o, i] = c[o, i]
        j = 0
        while j + 4 <= J:
            for o in range(K_out):
                w0, w1, w2, w3 = W[j, o], W[j + 1, o], W[j + 2, o], W[j + 3, o]
                for r in range(rows):
                    row = out[r, o]
                    a0, a1, a2, a3 = a[r, j], a[r, j + 1], a[r, j + 2], a[r, j + 3]
                    for i in range(N):
                        row[i] = (((row[i] + w0[i] * a0[i]) + w1[i] * a1[i]) + w2[i] * a2[i]) + w3[i] * a3[i]
            j += 4
        while j < J:
            for o in range(K_out):
                w = W[j, o]
                for r in range(rows):
                    row = out[r, o]
                    aj = a[r, j]
                    for i in range(N):
                        row[i] += w[i] * aj[i]
            j += 1
        a[0, 0, 0] = out[0, 0, 0] * 1e-30


@njit(**_JIT)
def _shared_weight(A, W, out, passes):
    N = W.shape[0]
    for p in range(passes):
        for i in range(N):
            _accumulate_product(A[i], W[i], out[i])
        A[0, 0, 0] = out[0, 0, 0] * 1e-30


def _batch_lanes_kernel(J, K_out):
    """Straight-line code for one neuron's product over a block of lanes (batch rows):
    out[o, l] = c[o] + Σ_j W[j, o] · a[j, l]. ``a`` and ``out`` share one buffer at fixed
    offsets, so LLVM proves them disjoint and vectorises the lane loop without runtime checks."""
    lines = ["def product(buf, W, c, lanes, stride):"]
    lines += [f"    w{j}_{o} = W[{j}, {o}]" for o in range(K_out) for j in range(J)]
    lines += [f"    c{o} = c[{o}]" for o in range(K_out)]
    lines.append("    for l in range(lanes):")
    lines += [f"        a{j} = buf[{j} * stride + l]" for j in range(J)]
    for o in range(K_out):
        lines.append(f"        buf[{J + o} * stride + l] = c{o}" + "".join(f" + w{j}_{o} * a{j}" for j in range(J)))
    namespace = {}
    exec("\n".join(lines), namespace)
    product = njit(inline="always", **_JIT)(namespace["product"])

    @njit(**_JIT)
    def run(buf, W, c, lanes, stride, passes):
        N = W.shape[0]
        for p in range(passes):
            for i in range(N):
                product(buf, W[i], c[i], lanes, stride)
            buf[0] = buf[J * stride] * 1e-30
    return run


def _rate(fn, args, macs_per_pass, seconds=0.3):
    """Best GMAC/s of ``fn(*args, passes)`` over a few timed runs of about ``seconds``."""
    fn(*args, 1)
    passes = 1
    while True:
        t0 = time.perf_counter()
        fn(*args, passes)
        took = time.perf_counter() - t0
        if took > seconds / 5:
            break
        passes *= 4
    best = min(_timed(fn, args, passes) for _ in range(5))
    return macs_per_pass * passes / best / 1e9


def _timed(fn, args, passes):
    t0 = time.perf_counter()
    fn(*args, passes)
    return time.perf_counter() - t0


def product_rates(rows, neurons, J, K_out, dtype=np.float32):
    """GMAC/s on one core of each formulation for an (rows x J) -> (rows x K_out) product per neuron."""
    rng = np.random.default_rng(0)
    macs = rows * neurons * J * K_out
    tile = network_cpu.batch_tile(rows)
    a = rng.random((tile, J, neurons)).astype(dtype)
    W = (rng.random((J, K_out, neurons)) * 0.1).astype(dtype)
    tile_args = (a, W, np.zeros((K_out, neurons), dtype), np.empty((tile, K_out, neurons), dtype), tile)
    rates = {"elmcore": _rate(_elmcore, tile_args, macs * tile / rows),
             "numba-loops": _rate(_numba_loops, tile_args, macs * tile / rows)}
    A = rng.random((neurons, rows, J)).astype(dtype)
    Wn = (rng.random((neurons, J, K_out)) * 0.1).astype(dtype)
    rates["shared-weight"] = _rate(_shared_weight, (A, Wn, np.zeros((neurons, rows, K_out), dtype)), macs)
    stride = rows
    buf = rng.random((J + K_out) * stride).astype(dtype)
    rates["batch-lanes"] = _rate(_batch_lanes_kernel(J, K_out),
                                 (buf, Wn, np.zeros((neurons, K_out), dtype), rows, stride), macs)
    return rates


@njit(**_JIT)
def _large_product(A, W, out, passes):
    for p in range(passes):
        _accumulate_product(A, W, out)
        A[0, 0] = out[0, 0] * 1e-30


def large_product_rate(dtype=np.float32):
    """GMAC/s on one core of the same register-blocked product on a large shared matrix (64 x 128
    by 128 x 256): what Numba code reaches on this machine when the shapes are not tiny."""
    rng = np.random.default_rng(0)
    A, W = rng.random((64, 128)).astype(dtype), (rng.random((128, 256)) * 0.1).astype(dtype)
    return _rate(_large_product, (A, W, np.zeros((64, 256), dtype)), 64 * 128 * 256)


def mlp_shapes(cfg):
    """(in, out) of every per-neuron MLP layer, and w_o as a (d_m -> 1) product."""
    widths = mlp_widths(cfg)
    return list(zip(widths[:-1], widths[1:])) + [(cfg.num_memory, 1)]


def readout_ms(R, N, K, repeats=5):
    """Wall time of the readout's three products (Y, dO, dW) as elmcore runs them."""
    rng = np.random.default_rng(0)
    outputs = rng.random((R, N)).astype(np.float32)
    W = rng.random((K, N)).astype(np.float32)
    dY = rng.random((R, K)).astype(np.float32)
    Y, dO, gW = np.empty((R, K), np.float32), np.empty((R, N), np.float32), np.empty((K, N), np.float32)
    WT, zero_k, zero_n = np.ascontiguousarray(W.T), np.zeros(K, np.float32), np.zeros(N, np.float32)

    def products():
        network_cpu.rows_product(outputs, WT, zero_k, Y)
        network_cpu.rows_product(dY, W, zero_n, dO)
        network_cpu.rows_transposed_product(dY, outputs, gW)
    products()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        products()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def floor(name, threads):
    spec = bench_network.CONFIGS[name]
    cfg = load_config_dict(spec["model"])
    B, T, N, K = spec["batch"], spec["steps"], cfg.num_neurons, cfg.num_output
    layers = []
    for J, K_out in mlp_shapes(cfg):
        rates = product_rates(B, N, J, K_out)
        best = max(rates, key=rates.get)
        macs = 3 * B * T * N * J * K_out  # forward, backward through the layer, weight gradient
        layers.append(dict(shape=f"{J}->{K_out}", rates=rates, best=best, macs=macs,
                           ms=macs / (rates[best] * 1e9 * threads) * 1e3))
    read = readout_ms(B * T, N, K)
    return dict(layers=layers, readout_ms=read, floor_ms=sum(x["ms"] for x in layers) + read)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(bench_network.CONFIGS), choices=list(bench_network.CONFIGS))
    ap.add_argument("--json", help="Write results to this JSON file.")
    args = ap.parse_args(argv)
    threads = numba.get_num_threads()
    steps = bench_network.main(["--configs", *args.configs])
    large = large_product_rate()
    out = {"threads": threads, "large_product_gmacs": large, "configs": {}}
    print(f"\nfloor: the per-neuron MLP products alone (x3 for a training step) at the best one-core rate "
          f"measured below, times {threads} threads with perfect scaling, plus the readout's products\n"
          f"(for scale: the same product on large shared matrices runs at {large:.1f} GMAC/s on one core)")
    for name in args.configs:
        f = floor(name, threads)
        row = steps["configs"][name]
        print(f"{name}:")
        for x in f["layers"]:
            rates = ", ".join(f"{k} {v:.1f}" for k, v in x["rates"].items())
            print(f"  layer {x['shape']:>7}: GMAC/s on one core: {rates}; {x['macs'] / 1e6:,.0f} M MAC "
                  f"-> {x['ms']:6.1f} ms")
        print(f"  readout products (as run):                {f['readout_ms']:6.1f} ms")
        print(f"  floor                                      {f['floor_ms']:6.1f} ms")
        if "torch_train" in row:
            target = row["torch_train"]["median_ms"] / 10
            f["target_ms"] = target
            print(f"  target (PyTorch step / 10)                 {target:6.1f} ms  -> floor / target "
                  f"{f['floor_ms'] / target:.2f}")
        if "train" in row:
            print(f"  elmcore step (measured above)              {row['train']['median_ms']:6.1f} ms")
        out["configs"][name] = dict(f, step=row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
