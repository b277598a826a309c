"""Real GPU code generation for every CUDA kernel, without a GPU.

Each kernel of ``kernel_table`` is compiled to PTX for Hopper (sm_90) by the real
NVVM that numba-cuda loads, for every float type and weight placement it is
built for, and the PTX is assembled by the ``ptxas`` of the SAME toolkit (an
older ``ptxas`` on PATH rejects newer PTX). ``ptxas -v`` reports registers per
thread, spill stores/loads and static shared memory; the PTX itself is searched
for float64 instructions. The CUDA simulator compiles nothing, so this must run
without ``NUMBA_ENABLE_CUDASIM`` (``tests/test_cuda_codegen.py`` runs it in a
child process for that reason).

Needs the compiler wheels of the ``test`` extra (nvidia-nvvm, nvidia-cuda-nvrtc,
nvidia-cuda-nvcc). Usage:

    python bench/cuda_codegen_report.py           # the per-kernel table
    python bench/cuda_codegen_report.py --json    # one JSON object (what the test reads)

A new kernel adds one ``Kernel`` entry to ``kernel_table``: its factory, sample
arguments and the largest block its launcher plans.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Callable, Tuple

import numpy as np

ARCH = (9, 0)
SIM_ENV = "NUMBA_ENABLE_CUDASIM"
# Tiny sample shapes: only the argument types matter for code generation.
B, T, D, C, S, Dm, H, L = 2, 3, 5, 4, 6, 3, 4, 2
ACT = 1  # an activation code: every code compiles into the same kernel, branching at run time


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One compiled kernel of a kernel module.

    name        the kernel's name in its factory's dict.
    build       (float type, weights_in_shared) -> that dict of CUDA dispatchers.
    samples     float type -> example arguments (they fix the signature).
    threads     the largest block its launcher plans (the compiled register count must allow it).
    placements  weight placements it is built for ((None,): the factory takes none).
    recurrence  True for the sequential kernels: spills are not allowed there.
    """
    name: str
    build: Callable
    samples: Callable
    threads: int
    placements: Tuple = (None,)
    recurrence: bool = False


def _f(dt):
    return lambda *s: np.zeros(s, dt)


def _i(*s):
    return np.zeros(s, np.int64)


def _routing_samples(dt):
    f = _f(dt)
    return dict(zero_2d_kernel=(f(B, S),),
                route_forward_kernel=(f(B, T, D), _i(D + 1), _i(S), f(S), 1, f(B, T, C)),
                route_weight_grad_kernel=(f(B, T, D), _i(D + 1), _i(S), f(S), 1, f(B, T, C), f(B, S)),
                route_input_grad_kernel=(f(B, T, C), _i(D + 1), _i(S), f(S), 1, f(B, T, D)))


def _scan_samples(dt):
    f = _f(dt)
    return dict(scan_forward_kernel=(f(B, T, C), f(C), f(B, C), f(B, T, C)),
                scan_backward_kernel=(f(B, T, C), f(C), f(B, C), f(B, T, C)))


def _recurrence_samples(dt):
    f, x = _f(dt), dt.type(1)
    return dict(recur_forward_kernel=(f(B, T, H), f(99), f(Dm), f(Dm), f(B, Dm), ACT, x, x, L, H, 1, 2, 3, 4,
                               f(B, T, Dm), f(L, B, T, H), f(B, T, Dm)),
                recur_backward_kernel=(f(B, T, Dm), f(99), f(Dm), f(Dm), f(B, Dm), f(B, T, Dm), f(L, B, T, H),
                                f(B, T, Dm), ACT, x, x, L, H, 1, 2, f(L, B, T, H), f(B, T, Dm), f(B, Dm),
                                f(B, Dm), f(B, Dm)))


# The network's sample shapes: nb branches, N neurons, R recurrent entries, I0 = nb + Dm first-layer inputs.
NB, N, R = 2, 3, 4
I0 = NB + Dm


def _activation_samples(dt):
    f = _f(dt)
    return dict(activate_kernel=(f(L * B * T * H), ACT, f(L * B * T * H)))


def _network_samples(dt):
    f, x = _f(dt), dt.type(1)
    entries = (_i(N + 1), _i(R), _i(R), _i(R), f(R))  # rec_ptr, rec_i, rec_k, rec_src, rec_w
    mlp_shapes = (f(I0, H, N), f(L - 1, H, H, N), f(H, Dm, N))  # W_in, W_hid, W_out
    return dict(
        network_forward_kernel=(f(B, T, NB, N), f(NB, N), *entries, mlp_shapes[0], f(H, N), mlp_shapes[1],
                         f(L - 1, H, N), mlp_shapes[2], f(Dm, N), f(Dm, N), f(Dm, N), f(Dm, N), f(N),
                         f(B, NB, N), f(B, Dm, N), f(B, N), ACT, x, x, L, H,
                         f(B, T, I0, N), f(L, B, T, H, N), f(B, T, Dm, N), f(B, T, Dm, N), f(B, T, N),
                         f(B, NB, N)),
        network_backward_kernel=(f(B, T, N), f(NB, N), *entries, _i(N + 1), _i(R), *mlp_shapes, f(Dm, N), f(Dm, N),
                          f(Dm, N), f(B, Dm, N), f(B, T, I0, N), f(L, B, T, H, N), f(B, T, Dm, N),
                          f(B, T, Dm, N), ACT, x, x, L, H, f(B, T, NB, N), f(L, B, T, H, N), f(B, T, Dm, N),
                          f(B, T, N), f(L, B, T, H, N), f(B, Dm, N), f(B, Dm, N), f(B, NB, N), f(B, Dm, N),
                          f(B, N)),
        neuron_weight_grad_kernel=(f(B * T, H, N), f(B * T, I0, N), f(I0, H, N), f(H, N)),
        recurrent_weight_grad_kernel=(f(B, T, NB, N), f(B, T, N), f(B, N), _i(R), _i(R), _i(R), f(B, R)))


def kernel_table():
    """Every CUDA kernel the engine launches (imported late: the module must see no simulator)."""
    from elmcore.kernels import cuda as K
    from elmcore.kernels import network_cuda as NK
    from elmcore.kernels.cuda_launch import FLAT_THREADS

    def entry(name, build, samples, threads=FLAT_THREADS, placements=(None,), recurrence=False):
        return Kernel(name, build, lambda dt: samples(dt)[name], threads, placements, recurrence)

    def routing(dt, _):
        return K._routing_kernels(dt.type)

    def scans(dt, _):
        return K._scan_kernels(dt.type)

    def recurrence(dt, in_shared):
        return K._recurrence_kernels(dt.type, in_shared)

    def activation(dt, _):
        return K._activation_kernels(dt.type)

    def network(dt, _):
        return NK.kernel_set(dt)

    return [
        entry("zero_2d_kernel", routing, _routing_samples),
        entry("route_forward_kernel", routing, _routing_samples, K._ROUTE_THREADS),
        entry("route_weight_grad_kernel", routing, _routing_samples),
        entry("route_input_grad_kernel", routing, _routing_samples),
        entry("scan_forward_kernel", scans, _scan_samples),
        entry("scan_backward_kernel", scans, _scan_samples),
        entry("recur_forward_kernel", recurrence, _recurrence_samples, K._MAX_RECURRENCE_THREADS, (True, False),
              recurrence=True),
        entry("recur_backward_kernel", recurrence, _recurrence_samples, K._MAX_RECURRENCE_THREADS, (True, False),
              recurrence=True),
        entry("activate_kernel", activation, _activation_samples),
        entry("network_forward_kernel", network, _network_samples, NK._NEURON_THREADS, recurrence=True),
        entry("network_backward_kernel", network, _network_samples, NK._NEURON_THREADS, recurrence=True),
        entry("neuron_weight_grad_kernel", network, _network_samples, FLAT_THREADS),
        entry("recurrent_weight_grad_kernel", network, _network_samples, FLAT_THREADS),
    ]


class CompilersMissing(RuntimeError):
    """The NVVM / NVRTC libraries or the matching ptxas are not installed."""


def find_compilers():
    """(libnvvm path, ptxas path of the same toolkit), or raise CompilersMissing saying what is missing."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        nvvm = load_nvidia_dynamic_lib("nvvm").abs_path  # the library numba-cuda compiles with
        load_nvidia_dynamic_lib("nvrtc")
    except Exception as e:
        raise CompilersMissing(f"no CUDA compiler libraries (NVVM, NVRTC) here: {type(e).__name__}: {e}; "
                           "install the test extra: pip install -e '.[test]'") from e
    # wheels: <root>/lib/libnvvm.so; a toolkit: <root>/nvvm/lib64/libnvvm.so. ptxas is <root>/bin/ptxas.
    for root in pathlib.Path(nvvm).resolve().parents[:3]:
        ptxas = root / "bin" / "ptxas"
        if ptxas.is_file() and os.access(ptxas, os.X_OK):
            return nvvm, str(ptxas)
    raise CompilersMissing(f"no ptxas in the toolkit of {nvvm} (install nvidia-cuda-nvcc of the same version)")


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_F64 = re.compile(r"^\s*(?:@!?%p\d+\s+)?[a-z]+(?:\.[a-z0-9]+)*\.f64\b.*$", re.M)


def assemble(ptxas, ptx, max_registers=None):
    """ptxas -v on one PTX text: {registers, spill_stores, spill_loads, stack, static_smem}."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        cmd = [ptxas, f"-arch=sm_{ARCH[0]}{ARCH[1]}", "-v", src, "-o", os.path.join(tmp, "k.cubin")]
        if max_registers:
            cmd.insert(1, f"-maxrregcount={max_registers}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log[-2000:]}")
    used, spill, smem = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log), _PTXAS_SMEM.search(log)
    return dict(registers=int(used.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)), static_smem=int(smem.group(1)) if smem else 0)


def report():
    """One row per compiled variant; raises CompilersMissing when the compilers are."""
    if os.environ.get(SIM_ENV, "0") not in ("", "0"):
        raise RuntimeError(f"{SIM_ENV} is set: the simulator compiles nothing; run without it")
    nvvm, ptxas = find_compilers()
    from numba import cuda, typeof
    # Device functions ask the current device for its compute capability; there is none here.
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: type("Hopper", (), {"compute_capability": ARCH})()
    from elmcore.kernels import cuda as K

    rows = []
    table = kernel_table()
    for k in table:
        for dt in (np.dtype(np.float32), np.dtype(np.float64)):
            for placement in k.placements:
                disp = k.build(dt, placement)[k.name]
                opts = disp.targetoptions
                sig = tuple(typeof(a) for a in k.samples(dt))
                ptx, _ = cuda.compile_ptx(disp.py_func, sig, cc=ARCH, fastmath=opts.get("fastmath", False),
                                          launch_bounds=opts.get("launch_bounds"))
                stats = assemble(ptxas, ptx, opts.get("max_registers"))
                f64 = _F64.findall(ptx) if dt == np.float32 else []
                rows.append(dict(
                    kernel=k.name, dtype=dt.name,
                    weights={None: "-", True: "shared", False: "global"}[placement],
                    recurrence=k.recurrence, **stats,
                    max_threads=K.max_threads_for_registers(stats["registers"]),
                    planned_threads=k.threads,
                    f64_instructions=[line.strip() for line in f64[:5]], f64_count=len(f64)))
    return dict(nvvm=nvvm, ptxas=ptxas, ptxas_version=_ptxas_version(ptxas), arch=f"sm_{ARCH[0]}{ARCH[1]}",
                rows=rows, uncovered=uncovered(table))


def uncovered(table):
    """Kernels that a factory of the table builds but that have no entry of their own."""
    listed = {k.name for k in table}
    missing = set()
    for k in table:
        for placement in k.placements:
            missing |= set(k.build(np.dtype(np.float32), placement)) - listed
    return sorted(missing)


def _ptxas_version(ptxas):
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+)", out)
    return found.group(1) if found else out.strip()[-40:]


def format_table(result):
    cols = [("kernel", 28), ("dtype", 7), ("weights", 7), ("regs", 4), ("spill st/ld B", 13),
            ("smem B", 6), ("fits thr", 8), ("planned thr", 11), ("f64 ops", 7)]
    lines = [f"{result['arch']}, ptxas {result['ptxas_version']} ({result['ptxas']})",
             "  ".join(f"{n:<{w}}" for n, w in cols)]
    for r in result["rows"]:
        values = [r["kernel"], r["dtype"], r["weights"], r["registers"],
                  f"{r['spill_stores']}/{r['spill_loads']}", r["static_smem"], r["max_threads"],
                  r["planned_threads"], r["f64_count"] if r["dtype"] == "float32" else "-"]
        lines.append("  ".join(f"{str(v):<{w}}" for v, (_, w) in zip(values, cols)))
    lines.append("regs: per thread; smem: static shared memory (the recurrence's dynamic shared memory is "
                 "planned per call); fits thr: largest block the register file allows; planned thr: the "
                 "largest block the launcher plans.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    try:
        result = report()
    except CompilersMissing as e:
        if args.json:
            print(json.dumps({"unavailable": str(e)}))
            return 0
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    sys.exit(main())
