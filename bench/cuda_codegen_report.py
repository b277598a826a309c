"""Real GPU code generation for every CUDA kernel, without a GPU.

Each kernel of ``kernel_table`` is compiled to PTX for Hopper (sm_90) by the real
NVVM that numba-cuda loads, for every float type and weight placement it is
built for, and the PTX is assembled by the ``ptxas`` of the SAME toolkit (an
older ``ptxas`` on PATH rejects newer PTX). ``ptxas -v`` reports registers per
thread, spill stores/loads and static shared memory; the PTX itself is searched
for float64 instructions; ``nvdisasm`` of the same toolkit turns the cubin into
SASS, the machine code, whose instructions are counted (``sass_stats``). The
CUDA simulator compiles nothing, so this must run without ``NUMBA_ENABLE_CUDASIM``
(``tests/test_cuda_codegen.py`` runs it in a child process for that reason).

SASS per FMA (``sass_per_fma``): the instructions of the kernel's hot loops
divided by the fused multiply-adds (FFMA / DFMA) in them. A hot loop is an
innermost loop of the machine code (a backward branch whose range holds no other
loop) that accumulates in registers: its body is one straight run of code (no
branch but its own back edge, no call, no MUFU transcendental) and an FMA in it
adds to a value an FMA of the loop computed (acc = w·x + acc, unrolled or not).
Those are the dot products of the time walks, the recurrent gathers and the
weight-gradient sums, with their unrolled remainders. Left out: element-wise
loops (their FMAs add a loaded value, κ·b + e; most branch on the run-time
activation or φ's slow paths), copies of a loop that the compiler specialised
for an empty dot inside it, and an accumulation through memory (out[o] += w·x:
a load, an FMA and a store per step, no register chain; a time walk written that
way has no hot loop, which the budget test rejects). An ideal dot-product step
is one FMA, one or two loads with an address instruction each, and a little loop
overhead shared by the unrolled body; every wrapped-index check and 64-bit index
computation adds to it. Counting the hot loops rather than the whole kernel keeps
set-up code, activations and stores (run once per unit, not once per weight) out
of the figure; the whole kernel's counts are reported too (``sass_instructions``,
``fma_count``).

Needs the compiler wheels of the ``test`` extra (nvidia-nvvm, nvidia-cuda-nvrtc,
nvidia-cuda-nvcc, nvidia-cuda-nvdisasm). Usage:

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
    return dict(
        network_forward_kernel=(f(B, T, NB, N), f(NB, N), _i(N + 1), _i(R), _i(R), f(R), f(99), 1, 2, 3, 4, 5,
                                f(Dm, N), f(Dm, N), f(Dm, N), f(N), f(B, NB, N), f(B, Dm, N), f(B, N), ACT, x, x, L, H,
                                13, f(B, T, I0, N), f(L, B, T, H, N), f(B, T, Dm, N), f(B, T, Dm, N), f(B, T, N),
                                f(B, NB, N)),
        network_backward_kernel=(f(B, T, N), f(NB, N), _i(N + 1), np.zeros(R, np.uint32), f(R), f(99), 1, 2,
                                 f(Dm, N), f(Dm, N), f(Dm, N), f(B, Dm, N), f(L, B, T, H, N), f(B, T, Dm, N),
                                 f(B, T, Dm, N), ACT, x, x, L, H, 15, f(B, T, NB * N),
                                 f(L, B, T, H, N), f(B, T, Dm, N),
                                 f(B, T, N), f(L, B, T, H, N), f(B, Dm, N), f(B, Dm, N), f(B, NB, N),
                                 f(B, Dm, N), f(B, N)),
        neuron_weight_grad_kernel=(f(B * T * H * N), f(B * T * I0 * N), T, I0, H, N, 0, T, B * T, 2, f(3, I0 * H * N),
                                   f(3, H * N)),
        chunk_sum_kernel=(f(3, H * N), f(H * N)),
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

    def network(dt, in_shared):
        return NK.kernel_set(dt, bool(in_shared))

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
        entry("network_forward_kernel", network, _network_samples, NK.MAX_WALK_THREADS, (True, False),
              recurrence=True),
        entry("network_backward_kernel", network, _network_samples, NK.MAX_WALK_THREADS, (True, False),
              recurrence=True),
        entry("neuron_weight_grad_kernel", network, _network_samples, FLAT_THREADS),
        entry("chunk_sum_kernel", network, _network_samples, FLAT_THREADS),
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


def find_nvdisasm(ptxas):
    """The nvdisasm next to ``ptxas`` (same toolkit: an older one may not know the newer cubin)."""
    nvdisasm = pathlib.Path(ptxas).with_name("nvdisasm")
    if nvdisasm.is_file() and os.access(nvdisasm, os.X_OK):
        return str(nvdisasm)
    raise CompilersMissing(f"no nvdisasm next to {ptxas} (install nvidia-cuda-nvdisasm of the same version)")


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_F64 = re.compile(r"^\s*(?:@!?%p\d+\s+)?[a-z]+(?:\.[a-z0-9]+)*\.f64\b.*$", re.M)


def assemble(ptxas, ptx, max_registers=None, nvdisasm=None):
    """ptxas -v on one PTX text: {registers, spill_stores, spill_loads, stack, static_smem}, and with
    ``nvdisasm`` the machine code's text under "sass"."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as fh:
            fh.write(ptx)
        cmd = [ptxas, f"-arch=sm_{ARCH[0]}{ARCH[1]}", "-v", src, "-o", cubin]
        if max_registers:
            cmd.insert(1, f"-maxrregcount={max_registers}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed:\n{log[-2000:]}")
        sass = None
        if nvdisasm:
            dis = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
            if dis.returncode != 0:
                raise RuntimeError(f"nvdisasm failed:\n{(dis.stdout + dis.stderr)[-2000:]}")
            sass = dis.stdout
    used, spill, smem = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log), _PTXAS_SMEM.search(log)
    out = dict(registers=int(used.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
               spill_loads=int(spill.group(3)), static_smem=int(smem.group(1)) if smem else 0)
    if sass is not None:
        out["sass"] = sass
    return out


# nvdisasm -c lines: "/*0260*/   @!P1 FFMA R3, R2, R3, R4 ;" and labels ".L_x_2:".
_SASS_INSTRUCTION = re.compile(
    r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\b(.*)$", re.M)
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):", re.M)
_SASS_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_REGISTER = re.compile(r"^[-|!~]*R(\d+)\b")
FMA_OPCODES = frozenset({"FFMA", "DFMA"})
CONTROL_OPCODES = frozenset({"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "BREAK", "BPT"})


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str     # without modifiers: FFMA, LDG, ...
    modifiers: str  # ".E.64", ...
    operands: str

    def registers(self):
        """The R registers named by each operand (None where an operand names none)."""
        found = [_REGISTER.match(p.strip()) for p in self.operands.rstrip(" ;").split(",")]
        return [int(m.group(1)) if m else None for m in found]

    def written(self):
        """General registers this instruction writes (its first operand, 1, 2 or 4 wide)."""
        if self.opcode.startswith(("ST", "ATOM", "RED", "BRA", "EXIT", "CALL", "RET", "BAR", "ISETP", "FSETP",
                                   "DSETP", "PLOP3")):
            return set()
        regs = self.registers()
        if not regs or regs[0] is None:
            return set()
        width = 4 if "128" in self.modifiers else 2 if ("64" in self.modifiers or "WIDE" in self.modifiers
                                                        or self.opcode.startswith("D")) else 1
        return set(range(regs[0], regs[0] + width))


def _accumulates(body):
    """Whether an FMA of the loop body adds to a value an FMA of the loop computed (acc = w·x + acc):
    the addend's reaching definition, earlier in the body or carried from the previous iteration, is an FMA."""
    for n, ins in enumerate(body):
        regs = ins.registers() if ins.opcode in FMA_OPCODES else []
        addend = regs[3] if len(regs) > 3 else None
        if addend is None:
            continue
        writers = [w for w in body[:n][::-1] + body[n:][::-1] if addend in w.written()]
        if writers and writers[0].opcode in FMA_OPCODES:
            return True
    return False


def sass_stats(sass):
    """Instruction counts of one kernel's SASS text (``nvdisasm -c``).

    sass_instructions  every instruction but the NOP padding.
    fma_count          FFMA + DFMA in the whole kernel.
    hot_loops          [(instructions, fmas)] of each hot loop (module docstring), in address order.
    hot_instructions, hot_fma  their sums; sass_per_fma = hot_instructions / hot_fma (None: no hot loop).
    """
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        found = _SASS_INSTRUCTION.match(line)
        if found and found.group(2) != "NOP":
            ins = Instruction(int(found.group(1), 16), found.group(2), found.group(3), found.group(4))
            for name in pending:
                labels[name] = ins.address
            pending = []
            instructions.append(ins)
    # A loop: a branch back to a label at or before it; its body runs from the label to the branch.
    loops = set()
    for ins in instructions:
        target = _SASS_BRANCH_TARGET.search(ins.operands) if ins.opcode == "BRA" else None
        if target and target.group(1) in labels and labels[target.group(1)] <= ins.address:
            loops.add((labels[target.group(1)], ins.address))
    innermost = [lp for lp in loops
                 if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    hot = []
    for start, end in sorted(innermost):
        body = [i for i in instructions if start <= i.address <= end]
        fmas = sum(1 for i in body if i.opcode in FMA_OPCODES)
        straight = sum(1 for i in body if i.opcode in CONTROL_OPCODES) == 1  # the back edge only
        pointwise = any(i.opcode == "MUFU" for i in body)  # exp, tanh, reciprocal: element-wise math
        if fmas and straight and not pointwise and _accumulates(body):
            hot.append((len(body), fmas))
    hot_instructions, hot_fma = sum(n for n, _ in hot), sum(f for _, f in hot)
    return dict(sass_instructions=len(instructions),
                fma_count=sum(1 for i in instructions if i.opcode in FMA_OPCODES),
                hot_loops=hot, hot_instructions=hot_instructions, hot_fma=hot_fma,
                sass_per_fma=round(hot_instructions / hot_fma, 2) if hot_fma else None)


def report(only=None):
    """One row per compiled variant (of the kernels named in ``only``, default all); raises
    CompilersMissing when the compilers are."""
    if os.environ.get(SIM_ENV, "0") not in ("", "0"):
        raise RuntimeError(f"{SIM_ENV} is set: the simulator compiles nothing; run without it")
    nvvm, ptxas = find_compilers()
    nvdisasm = find_nvdisasm(ptxas)
    from numba import cuda, typeof
    # Device functions ask the current device for its compute capability; there is none here.
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: type("Hopper", (), {"compute_capability": ARCH})()
    from elmcore.kernels import cuda as K

    rows = []
    table = kernel_table()
    for k in table:
        if only and k.name not in only:
            continue
        for dt in (np.dtype(np.float32), np.dtype(np.float64)):
            for placement in k.placements:
                disp = k.build(dt, placement)[k.name]
                opts = disp.targetoptions
                sig = tuple(typeof(a) for a in k.samples(dt))
                ptx, _ = cuda.compile_ptx(disp.py_func, sig, cc=ARCH, fastmath=opts.get("fastmath", False),
                                          launch_bounds=opts.get("launch_bounds"))
                stats = assemble(ptxas, ptx, opts.get("max_registers"), nvdisasm)
                stats.update(sass_stats(stats.pop("sass")))
                f64 = _F64.findall(ptx) if dt == np.float32 else []
                rows.append(dict(
                    kernel=k.name, dtype=dt.name,
                    weights={None: "-", True: "shared", False: "global"}[placement],
                    recurrence=k.recurrence, **stats,
                    max_threads=K.max_threads_for_registers(stats["registers"]),
                    planned_threads=k.threads,
                    f64_instructions=[line.strip() for line in f64[:5]], f64_count=len(f64)))
    return dict(nvvm=nvvm, ptxas=ptxas, nvdisasm=nvdisasm, ptxas_version=_ptxas_version(ptxas),
                arch=f"sm_{ARCH[0]}{ARCH[1]}", rows=rows, uncovered=uncovered(table))


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
            ("smem B", 6), ("fits thr", 8), ("planned thr", 11), ("f64 ops", 7), ("SASS", 5), ("FMA", 4),
            ("SASS/FMA", 8)]
    lines = [f"{result['arch']}, ptxas {result['ptxas_version']} ({result['ptxas']})",
             "  ".join(f"{n:<{w}}" for n, w in cols)]
    for r in result["rows"]:
        values = [r["kernel"], r["dtype"], r["weights"], r["registers"],
                  f"{r['spill_stores']}/{r['spill_loads']}", r["static_smem"], r["max_threads"],
                  r["planned_threads"], r["f64_count"] if r["dtype"] == "float32" else "-",
                  r["sass_instructions"], r["fma_count"], "-" if r["sass_per_fma"] is None else r["sass_per_fma"]]
        lines.append("  ".join(f"{str(v):<{w}}" for v, (_, w) in zip(values, cols)))
    lines.append("regs: per thread; smem: static shared memory (the recurrence's dynamic shared memory is "
                 "planned per call); fits thr: largest block the register file allows; planned thr: the "
                 "largest block the launcher plans; SASS, FMA: machine instructions and FFMA/DFMA in the "
                 "whole kernel; SASS/FMA: instructions per FMA in its hot loops (innermost loops with an FMA).")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--kernel", action="append", help="compile only this kernel (repeatable; default: all)")
    args = parser.parse_args(argv)
    try:
        result = report(args.kernel)
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
