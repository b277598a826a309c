"""Verify every oracle file in both precisions in ONE process (one compile of each kernel).

    python bench/verify_all.py --device cuda                 # tests/data/golden*/*.npz
    python bench/verify_all.py --device cuda --dtypes float32 tests/data/golden/v1_basic.npz

`elm verify` checks one file per process; on a fresh GPU machine each such process
compiles every kernel again, which is where bench/gpu_check.sh's budget used to go.
Prints one line per file and precision (the worst array and its error against
``elmcore.verification.oracle.TOLERANCE``), then a total; exits 1 when any file fails.
"""

import argparse
import glob
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from elmcore.errors import ELMError  # noqa: E402
from elmcore.verification.oracle import TOLERANCE, load_oracle, verify_case  # noqa: E402


def oracle_files():
    return sorted(glob.glob(os.path.join(ROOT, "tests", "data", "golden*", "*.npz")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="Oracle files (default: every tests/data/golden*/*.npz).")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=sorted(TOLERANCE))
    args = ap.parse_args(argv)

    files = args.files or oracle_files()
    if not files:
        print("verify_all: no oracle files found")
        return 1
    failed = 0
    for path in files:
        name = os.path.relpath(path, ROOT) if os.path.isabs(path) else path
        for dtype in args.dtypes:
            t0 = time.perf_counter()
            try:
                results = verify_case(load_oracle(path), dtype=dtype, device=args.device)
            except (ELMError, RuntimeError, ValueError) as e:  # one line per file, and go on with the next
                failed += 1
                print(f"FAIL {name} {dtype}: {type(e).__name__}: {' '.join(str(e).split())}", flush=True)
                continue
            tol = TOLERANCE[dtype]
            worst_name, worst = max(results, key=lambda r: r[1])
            bad = sum(not err <= tol for _, err in results)
            verdict = "ok  " if bad == 0 else "FAIL"
            failed += bad > 0
            print(f"{verdict} {name} {dtype} on {args.device}: {len(results) - bad}/{len(results)} arrays within "
                  f"{tol:g} (worst {worst:.1e}: {worst_name}) {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"verify_all: {failed} failing of {len(files) * len(args.dtypes)} file-precision pairs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
