#!/usr/bin/env bash
# Device checks for a lent GPU machine (no network; numba, numba-cuda, cupy, pytest,
# click and torch preinstalled). Run from anywhere; results land under $OUT:
#
#   env.txt                GPU, driver and package versions
#   <step>.log             full output of each step
#   cuda_tests.xml         JUnit report of tests/test_cuda_sim.py on the real GPU
#   network_cuda_tests.xml JUnit report of tests/test_network_cuda.py on the real GPU
#   verify_<case>_<dtype>.log  `elm verify --device cuda` per oracle file and precision
#   bench_cuda.json        bench/bench_step.py --device cuda
#   bench_network_cuda.json  bench/bench_network.py --device cuda (SHD-Adding- and char-LM-sized networks)
#   recurrence_floor*.json bench/recurrence_floor.py (shared- and global-weight configs)
#   summary.txt            one line per step: name, exit code, seconds
#
# Every step has its own timeout and the whole script stays under 8 minutes; a
# failing step does not stop the later ones (set -u, not set -e). The exit code
# is 0 only when every step passed.
set -u

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
unset NUMBA_ENABLE_CUDASIM  # the real GPU, not the simulator
START=$(date +%s)
BUDGET_S=480
failures=0

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME LIMIT_S CMD...: run CMD with min(LIMIT_S, time left) seconds, log it, record the verdict.
step() {
    local name=$1 limit=$2 rc t0
    shift 2
    local remaining
    remaining=$(left)
    if (( remaining < 10 )); then
        echo "$name SKIPPED (time budget spent)" | tee -a "$OUT/summary.txt"
        failures=$((failures + 1))
        return
    fi
    (( limit > remaining )) && limit=$remaining
    echo "== $name (limit ${limit}s)"
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
    tail -n 8 "$OUT/$name.log"
    (( rc == 0 )) || failures=$((failures + 1))
}

# The package, importable with or without an editable install: elm_cli lives in cli/.
PKG_LINKS="$(mktemp -d)"
ln -s "$PWD/cli" "$PKG_LINKS/elm_cli"
export PYTHONPATH="$PWD:$PKG_LINKS${PYTHONPATH:+:$PYTHONPATH}"

{
    date -u
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    timeout 60 python - <<'PY'
import importlib
for name in ("numpy", "numba", "numba_cuda", "cupy", "pytest", "click", "torch"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "unavailable:", type(e).__name__, e)
from elmcore.engine.cuda_backend import cuda_problem
print("cuda_problem:", cuda_problem())
PY
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Optional: PYTHONPATH above already makes the checkout importable, so a failed
# install (e.g. an old setuptools without network) is reported but not counted.
step install 60 python -m pip install --no-deps --no-build-isolation --no-index -e .
if ! tail -n 1 "$OUT/summary.txt" | grep -q "rc=0"; then
    failures=$((failures - 1))
fi

# Every CPU<->CUDA equivalence test runs directly on the GPU here, plus the gpu-marked ones;
# ELM_TEST_REQUIRE_GPU turns "no usable GPU" into failures instead of a simulator run.
step cuda_tests 150 env ELM_TEST_REQUIRE_GPU=1 python -m pytest tests/test_cuda_sim.py -q -rs \
    -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"

# The ELM Network's CUDA kernels against its CPU kernels and oracle files, directly on the GPU.
step network_cuda_tests 90 python -m pytest tests/test_network_cuda.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT/network_cuda_tests.xml"

# Every oracle file (single neuron and network) through `elm verify --device cuda`, in both precisions.
for oracle in tests/data/golden/*.npz tests/data/golden_network/*.npz; do
    case_name=$(basename "$oracle" .npz)
    for dtype in float64 float32; do
        step "verify_${case_name}_$dtype" 40 python -m elm_cli.main verify "$oracle" --device cuda --dtype "$dtype"
    done
done

step bench_cuda 150 python bench/bench_step.py --device cuda --configs neuronio-best shd pathfinder \
    --repeats 10 --torch-repeats 3 --json "$OUT/bench_cuda.json"

# ELM Network: SHD-Adding-sized (N=128, T=100) and char-LM-sized (N=256, T=256, B=32), against PyTorch.
step bench_network_cuda 120 python bench/bench_network.py --device cuda --repeats 5 --torch-repeats 2 \
    --json "$OUT/bench_network_cuda.json"

step recurrence_floor 30 python bench/recurrence_floor.py --json "$OUT/recurrence_floor.json"
# d_m = 150, h = 300 in float32: weights too big for shared memory, read from global.
step recurrence_floor_global 30 python bench/recurrence_floor.py --num-memory 150 --hidden 300 \
    --batch 384 --steps 256 --json "$OUT/recurrence_floor_global.json"

rm -rf "$PKG_LINKS"
echo "gpu_check: $failures failing step(s), $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
(( failures == 0 ))
