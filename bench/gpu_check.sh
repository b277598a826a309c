#!/usr/bin/env bash
# Device checks for a lent GPU machine (no network; numba, numba-cuda, cupy, pytest and
# click preinstalled). Run from anywhere; results land under $OUT as each step ends:
#
#   summary.txt              one verdict line per step, written when the step ends:
#                            "<step> PASS|FAIL|TIMEOUT|SKIPPED rc=<code> <seconds>s [tests: ...]"
#   <step>.log               full output of each step
#   smoke.log                one tiny kernel launch; driver, runtime and NVVM versions; packages
#   timing_neuron_{cuda,cpu}.json    bench/bench_step.py, the single neuron (NeuronIO-best, SHD)
#   timing_network_{cuda,cpu}.json   bench/bench_network.py, both network shapes (SHD-Adding, char-LM)
#   verify_all.log           every oracle file, both precisions, in one process (bench/verify_all.py)
#   cuda_tests.xml           JUnit report of tests/test_cuda_sim.py
#   network_cuda_tests.xml   JUnit report of tests/test_network_cuda.py
#   recompute_tests.xml      JUnit report of tests/test_recompute.py's CUDA cases (recomputed
#                            gradients equal to the cached ones bit for bit, on the device)
#   host_path_tests.xml      JUnit report of tests/test_train_host_reads.py and
#                            tests/test_neuronio_input.py (one device read per training step,
#                            pinned one-byte uploads, input dropout drawn on the device)
#
# Order: smoke test, timings (the only figures a short lease can give, so they come
# first), correctness, test files. A fresh machine compiles every kernel in every
# process, so each step is one process (or two) and the step limits add up to the
# budget. Each step gets SIGINT at its limit minus GRACE_S (pytest then still writes
# its JUnit report, Python its traceback) and SIGKILL at its limit. A failing step does
# not stop the later ones; the exit code is 0 only when every step passed.
#
#   bash bench/gpu_check.sh            # on the GPU
#   bash bench/gpu_check.sh --dry-run  # the same steps on the CUDA simulator, tiny shapes and limits
set -u

cd "$(dirname "$0")/.." || exit 2
DRY_RUN=0
case "${1:-}" in
    "") ;;
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
: >"$OUT/summary.txt"
# The checkout importable without an install (elm_cli sits beside elmcore).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
GRACE_S=10

if (( DRY_RUN )); then
    export NUMBA_ENABLE_CUDASIM=1
    unset ELM_TEST_REQUIRE_GPU
    GRACE_S=5
    # step limits (s); their sum is the budget
    # (the timing steps also compile the CPU kernels, minutes on a loaded machine with a cold cache)
    L_SMOKE=20 L_TIMING_NEURON=90 L_TIMING_NETWORK=100 L_VERIFY=45 L_CUDA_TESTS=30 L_NETWORK_TESTS=30
    L_RECOMPUTE_TESTS=60 L_HOST_TESTS=90
    NEURON_ARGS=(--configs shd --batch 1 --steps 2 --repeats 1 --warmup 0)
    NETWORK_ARGS=(--configs shd-adding char-lm --batch 1 --steps 2 --neurons 4 --repeats 1 --warmup 0)
    VERIFY_FILES=(tests/data/golden/v1_basic.npz tests/data/golden_network/net_basic.npz)
    # one test that runs on CUDA and one gpu-marked test (skipped on the simulator) per file
    CUDA_TEST_ARGS=(-k "test_backend_under_simulator_or_gpu or test_gpu_non_default_cupy_stream")
    NETWORK_TEST_ARGS=(-k "test_cuda_reads_one_byte_spikes or test_cuda_tests_pass_under_the_simulator")
    RECOMPUTE_TEST_ARGS=(-k "test_on_cuda_network_recomputes_exactly and 0")
    HOST_TEST_ARGS=(-k "test_on_cuda_a_training_step_reads_the_device_once and neuron")
else
    unset NUMBA_ENABLE_CUDASIM  # the real GPU, not the simulator
    # a silent fall-back to the simulator would hide a broken GPU
    export ELM_TEST_REQUIRE_GPU=1
    L_SMOKE=35 L_TIMING_NEURON=100 L_TIMING_NETWORK=100 L_VERIFY=70 L_CUDA_TESTS=85 L_NETWORK_TESTS=50
    L_RECOMPUTE_TESTS=40 L_HOST_TESTS=40
    NEURON_ARGS=(--configs neuronio-best shd --steps 100 --repeats 3 --warmup 1)
    NETWORK_ARGS=(--configs shd-adding char-lm --steps 64 --repeats 3 --warmup 1)
    VERIFY_FILES=()
    CUDA_TEST_ARGS=()
    NETWORK_TEST_ARGS=()
    RECOMPUTE_TEST_ARGS=(-k on_cuda)
    # one device read per training step, pinned one-byte uploads, dropout drawn on the device
    HOST_TEST_ARGS=()
fi
BUDGET_S=$(( L_SMOKE + L_TIMING_NEURON + L_TIMING_NETWORK + L_VERIFY + L_CUDA_TESTS + L_NETWORK_TESTS
             + L_RECOMPUTE_TESTS + L_HOST_TESTS ))
START=$(date +%s)
failures=0

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# junit_counts FILE: "tests: P passed, F failed, E errors, S skipped" from a JUnit report.
junit_counts() {
    python - "$1" <<'PY'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    print(f"tests: no report ({type(e).__name__})")
    sys.exit()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"tests: {passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
PY
}

# step NAME LIMIT_S CMD...: run CMD within min(LIMIT_S, time left), log it, append its verdict.
step() {
    local name=$1 limit=$2 rc t0 verdict extra=""
    shift 2
    local remaining
    remaining=$(left)
    if (( remaining < GRACE_S + 5 )); then
        echo "$name SKIPPED rc=- 0s (time budget spent)" | tee -a "$OUT/summary.txt"
        failures=$((failures + 1))
        return
    fi
    (( limit > remaining )) && limit=$remaining
    echo "== $name (limit ${limit}s)"
    t0=$(date +%s)
    timeout -s INT -k "$GRACE_S" "$(( limit - GRACE_S ))" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) verdict=PASS ;;
        124|137) verdict=TIMEOUT ;;
        *) verdict=FAIL ;;
    esac
    [[ -f "$OUT/$name.xml" ]] && extra=" $(junit_counts "$OUT/$name.xml")"
    echo "$name $verdict rc=$rc $(( $(date +%s) - t0 ))s$extra" | tee -a "$OUT/summary.txt"
    tail -n 8 "$OUT/$name.log"
    (( rc == 0 )) || failures=$((failures + 1))
}

# timing SCRIPT NAME ARGS...: the CUDA figures first (kept if the CPU run is cut), then the CPU's beside them.
TIMING='python "bench/$0" --device cuda --no-torch --json "$OUT/$1_cuda.json" "${@:2}" &&
        python "bench/$0" --device cpu --no-torch --json "$OUT/$1_cpu.json" "${@:2}"'
export OUT

pytest_step() {
    local name=$1 limit=$2 file=$3
    shift 3
    step "$name" "$limit" python -m pytest "$file" -q -rs -p no:cacheprovider --junitxml="$OUT/$name.xml" "$@"
}

echo "gpu_check: budget ${BUDGET_S}s$( (( DRY_RUN )) && echo ', dry run on the CUDA simulator')"

# One tiny launch: a driver older than the PTX fails here, in seconds, not in the timings.
step smoke "$L_SMOKE" python - <<'PY'
import importlib
import os
import subprocess

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
                             capture_output=True, text=True, timeout=20).stdout.strip())
    except (OSError, subprocess.TimeoutExpired) as e:
        print("nvidia-smi:", type(e).__name__, e)
for name in ("numpy", "numba", "numba_cuda", "cupy", "pytest", "click"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "unavailable:", type(e).__name__, e)
import numpy as np
from numba import cuda
from elmcore.engine.cuda_backend import cuda_problem

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    print("CUDA simulator: no driver, runtime or NVVM")
else:
    from numba.cuda.cudadrv import nvvm
    print("driver (CUDA API)", cuda.cudadrv.driver.driver.get_version())
    print("runtime", cuda.runtime.get_version())
    print("NVVM", nvvm.NVVM().get_version())
    print("device", cuda.get_current_device().name, "compute capability", cuda.get_current_device().compute_capability)


@cuda.jit
def add_one(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] += 1.0


a = cuda.to_device(np.arange(4, dtype=np.float32))
add_one[1, 32](a)
got = a.copy_to_host()
assert (got == np.arange(4) + 1).all(), got
print("tiny kernel launch: ok", got)
problem = cuda_problem()
print("cuda_problem:", problem)
raise SystemExit(1 if problem else 0)
PY

step timing_neuron "$L_TIMING_NEURON" bash -c "$TIMING" bench_step.py timing_neuron "${NEURON_ARGS[@]}"
step timing_network "$L_TIMING_NETWORK" bash -c "$TIMING" bench_network.py timing_network "${NETWORK_ARGS[@]}"
step verify_all "$L_VERIFY" python bench/verify_all.py --device cuda "${VERIFY_FILES[@]}"
pytest_step cuda_tests "$L_CUDA_TESTS" tests/test_cuda_sim.py "${CUDA_TEST_ARGS[@]}"
pytest_step network_cuda_tests "$L_NETWORK_TESTS" tests/test_network_cuda.py "${NETWORK_TEST_ARGS[@]}"
pytest_step recompute_tests "$L_RECOMPUTE_TESTS" tests/test_recompute.py "${RECOMPUTE_TEST_ARGS[@]}"
pytest_step host_path_tests "$L_HOST_TESTS" tests/test_train_host_reads.py tests/test_neuronio_input.py \
    "${HOST_TEST_ARGS[@]}"

echo "gpu_check: $failures failing step(s), $(( $(date +%s) - START ))s of ${BUDGET_S}s" | tee -a "$OUT/summary.txt"
(( failures == 0 ))
