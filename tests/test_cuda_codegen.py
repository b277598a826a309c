"""Real GPU code generation, checked on machines without a GPU.

The simulator (``tests/test_cuda_sim.py``) runs the CUDA kernels as Python, so it
cannot see what only the compiler sees: typing, register pressure, spills, float64
arithmetic leaking into float32 kernels. ``bench/cuda_codegen_report.py`` compiles
every kernel of its table to PTX for sm_90 with the real NVVM and assembles it with
the ``ptxas`` of the same toolkit; it runs here in a child process without
``NUMBA_ENABLE_CUDASIM`` (the simulator, once imported, compiles nothing). The
compilers come with the ``test`` extra, so CI runs this file; it skips, saying
why, only where the wheels are absent. ``pytest -s`` prints the per-kernel table.
"""

import functools
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPORT_SCRIPT = ROOT / "bench" / "cuda_codegen_report.py"
SIM_ENV = "NUMBA_ENABLE_CUDASIM"


def _report_module():
    spec = importlib.util.spec_from_file_location("cuda_codegen_report", REPORT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def _report():
    env = {k: v for k, v in os.environ.items() if k != SIM_ENV}
    proc = subprocess.run([sys.executable, str(REPORT_SCRIPT), "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report():
    out = _report()
    if "unavailable" in out:
        pytest.skip(f"CUDA compilers not installed: {out['unavailable']}")
    return out


# ---- the register file rule the launcher follows -------------------------------------------
#
# As CUDA's occupancy calculator (cuda_occupancy.h, cudaOccMaxBlocksPerSMRegsLimit) states it
# for sm_70 … sm_120: a thread may use at most 255 registers; a warp's registers are allocated
# in units of 256; the 65,536 registers of a multiprocessor (and of a block) sit in 4
# sub-partitions, and the hardware check counts a block's warps rounded up to a multiple of 4.

def block_fits(registers, threads):
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(registers * 32 / 256) * 256
    return (registers <= 255 and threads <= 1024
            and per_warp * (math.ceil(warps / 4) * 4) <= 65536          # per-block hardware check
            and (65536 // 4 // per_warp) * 4 >= warps)                  # warps the sub-partitions hold


def test_launcher_rule_is_the_register_file_rule():
    from elmcore.kernels import cuda as K
    for registers in range(1, 256):
        largest = max(t for t in range(32, 1025, 32) if block_fits(registers, t))
        assert K.max_threads_for_registers(registers) == largest, registers
    # The figures of the issue: 151 registers do not allow 512 threads (77,312 > 65,536).
    assert K.max_threads_for_registers(128) == 512
    assert K.max_threads_for_registers(151) == 384 and not block_fits(151, 512)
    assert K.max_threads_for_registers(256) == 0


def test_float64_detector_reads_ptx_instructions():
    f64 = _report_module()._F64
    ptx = "\n".join(["\t.reg .f64 \t%fd<4>;", "\tadd.f32 \t%f3, %f1, %f2;", "\tld.global.f32 \t%f1, [%rd4];",
                     "\tcvt.f64.f32 \t%fd1, %f1;", "\tfma.rn.f64 \t%fd3, %fd1, %fd2, %fd1;",
                     "\t@%p1 cvt.rn.f32.f64 \t%f4, %fd3;", "\tmul.wide.s32 \t%rd5, %r1, 4;"])
    assert [line.split()[0] for line in f64.findall(ptx)] == ["cvt.f64.f32", "fma.rn.f64", "@%p1"]


# A hand-written SASS text, as ``nvdisasm -c`` prints it: a dot product accumulating in R9 (hot), an
# element-wise loop whose FMA adds a loaded value and reuses that register (not hot), a loop with
# a branch inside (not hot) and the closing self-branch.
SAMPLE_SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   IMAD.MOV.U32 R9, RZ, RZ, RZ ;
.L_x_1:
        /*0020*/                   IMAD.WIDE.U32 R2, R11, 0x4, R6 ;
        /*0030*/                   LDG.E R2, desc[UR6][R2.64] ;
        /*0040*/                   LEA R8, R0, UR4, 0x2 ;
        /*0050*/                   LDS R8, [R8] ;
        /*0060*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0070*/                   ISETP.NE.AND P0, PT, R0, R13, PT ;
        /*0080*/                   FFMA R9, R2, R8, R9 ;
        /*0090*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*00a0*/                   LDG.E R32, desc[UR6][R4.64] ;
        /*00b0*/                   FFMA R32, R39, R36, R32 ;
        /*00c0*/                   STS [R3], R32 ;
        /*00d0*/                   ISETP.NE.AND P0, PT, R0, R13, PT ;
        /*00e0*/               @P0 BRA `(.L_x_2) ;
.L_x_3:
        /*00f0*/                   FFMA R10, R2, R8, R10 ;
        /*0100*/               @P1 BRA `(.L_x_4) ;
        /*0110*/                   FADD R10, R10, 1 ;
.L_x_4:
        /*0120*/               @P0 BRA `(.L_x_3) ;
        /*0130*/                   STG.E desc[UR6][R4.64], R9 ;
        /*0140*/                   EXIT ;
.L_x_5:
        /*0150*/                   BRA `(.L_x_5);
        /*0160*/                   NOP;
"""


def test_sass_counter_finds_the_register_accumulating_loops():
    stats = _report_module().sass_stats(SAMPLE_SASS)
    assert stats["sass_instructions"] == 22 and stats["fma_count"] == 3
    assert stats["hot_loops"] == [(8, 1)] and stats["sass_per_fma"] == 8.0
    assert _report_module().sass_stats(SAMPLE_SASS.replace("FFMA R9, R2, R8, R9", "FMUL R9, R2, R8"))[
        "sass_per_fma"] is None


# ---- the compiled kernels --------------------------------------------------------------------

@pytest.mark.slow
def test_every_kernel_compiles_for_hopper(report):
    print("\n" + _report_module().format_table(report))
    assert report["arch"] == "sm_90" and report["uncovered"] == []
    compiled = {(r["kernel"], r["dtype"], r["weights"]) for r in report["rows"]}
    for kernel in ("zero_2d_kernel", "route_forward_kernel", "route_weight_grad_kernel", "route_input_grad_kernel",
                   "scan_forward_kernel", "scan_backward_kernel", "activate_kernel", "neuron_weight_grad_kernel",
                   "chunk_sum_kernel", "recurrent_weight_grad_kernel"):
        assert {(kernel, dt, "-") for dt in ("float32", "float64")} <= compiled
    for kernel in ("recur_forward_kernel", "recur_backward_kernel", "network_forward_kernel",
                   "network_backward_kernel"):
        assert {(kernel, dt, w) for dt in ("float32", "float64") for w in ("shared", "global")} <= compiled
    assert all(0 < r["registers"] <= 255 for r in report["rows"])


@pytest.mark.slow
def test_float32_kernels_have_no_float64_instructions(report):
    leaks = {f"{r['kernel']}/{r['weights']}": r["f64_instructions"]
             for r in report["rows"] if r["dtype"] == "float32" and r["f64_count"]}
    assert not leaks, f"float64 instructions in float32 kernels: {leaks}"


@pytest.mark.slow
def test_recurrence_kernels_do_not_spill(report):
    rows = [r for r in report["rows"] if r["recurrence"]]
    # recur_forward / recur_backward and network_forward / _backward x 2 dtypes x 2 weight placements
    # (the kernels, named *_kernel; their launchers carry the contract's names).
    assert len(rows) == 16
    spills = {f"{r['kernel']}/{r['dtype']}/{r['weights']}": (r["spill_stores"], r["spill_loads"])
              for r in rows if r["spill_stores"] or r["spill_loads"]}
    assert not spills, f"spill stores/loads (bytes) in the recurrence: {spills}"


# The time walks' machine-code budget (docs/architecture.md, "SASS per FMA"): a dot-product step of a
# float32 time walk may take at most this many SASS instructions per FMA in its hot loops. Indexing
# with signed int64 (Numba's wrap-around check on every load) costs 29-35; accumulating through
# global memory 40-48; uint32 offsets advanced by addition about 7.5.
SASS_PER_FMA_BUDGET = 10


@pytest.mark.slow
def test_float32_time_walks_meet_the_sass_per_fma_budget(report):
    rows = [r for r in report["rows"] if r["recurrence"] and r["dtype"] == "float32"]
    assert {(r["kernel"], r["weights"]) for r in rows} == {
        (k, w) for k in ("recur_forward_kernel", "recur_backward_kernel", "network_forward_kernel",
                         "network_backward_kernel") for w in ("shared", "global")}
    # No hot loop at all means the dot products no longer accumulate in registers: over budget too.
    over = {f"{r['kernel']}/{r['weights']}": (r["sass_per_fma"], r["hot_loops"]) for r in rows
            if r["sass_per_fma"] is None or r["sass_per_fma"] > SASS_PER_FMA_BUDGET}
    assert not over, f"SASS instructions per FMA in the hot loops over {SASS_PER_FMA_BUDGET}: {over}"
    for r in rows:
        assert 0 < r["hot_fma"] <= r["fma_count"] and r["hot_instructions"] < r["sass_instructions"]


@pytest.mark.slow
def test_planned_blocks_fit_the_compiled_register_counts(report):
    from elmcore.kernels import cuda as K
    too_big = {f"{r['kernel']}/{r['dtype']}/{r['weights']}": (r["registers"], r["planned_threads"])
               for r in report["rows"] if not block_fits(r["registers"], r["planned_threads"])}
    assert not too_big, f"(registers, planned threads) beyond the register file: {too_big}"
    # The recurrence launcher plans up to its thread cap whatever the layer width.
    plan = K.plan_recurrence(64, 4, 1000, 16, 16, 4, limits=(132, 227 * 1024))
    assert plan.rows_per_block * plan.unit_threads <= K._MAX_RECURRENCE_THREADS
    assert all(r["planned_threads"] == K._MAX_RECURRENCE_THREADS for r in report["rows"]
               if r["kernel"].startswith("recur_"))
    # The network's walks: a thread per neuron, blocks of up to 256.
    from elmcore.kernels import network_cuda as NK
    assert NK.MAX_WALK_THREADS == 256 and all(r["planned_threads"] == 256 for r in report["rows"]
                                              if r["kernel"].startswith("network_"))


def test_report_script_without_compilers_says_why(tmp_path):
    # A child that cannot find NVVM reports it instead of failing with a traceback.
    env = {k: v for k, v in os.environ.items() if k != SIM_ENV}
    code = ("import sys, runpy; import cuda.pathfinder as p\n"
            "def missing(name): raise p.DynamicLibNotFoundError(name + ' not found')\n"
            "p.load_nvidia_dynamic_lib = missing\n"
            f"sys.argv = ['report', '--json']; runpy.run_path({str(REPORT_SCRIPT)!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    if "No module named 'cuda.pathfinder'" in proc.stderr:
        pytest.skip("cuda-pathfinder is not installed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "nvvm not found" in out["unavailable"] and "pip install" in out["unavailable"]


def test_float_types_are_the_only_kernel_types():
    from elmcore import ELMError
    from elmcore.kernels.cuda_launch import float_type
    assert float_type("float32") is np.float32 and float_type(np.float64) is np.float64
    with pytest.raises(ELMError, match="float32 and float64"):
        float_type(np.float16)
