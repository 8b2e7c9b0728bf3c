"""Spread of the learning-outcome figures over seeds, CPU kernel paths and thread counts.

    python benchmarks/learning_spread.py                       # 5 seeds x {native, default} x {1, 2} threads
    python benchmarks/learning_spread.py --seeds 0 1 --threads 1 -k "accuracy"

Why: float results differ from CPU to CPU (AVX2 vs AVX-512 kernels, thread count, library
builds) and a training run amplifies the difference, so a fixed accuracy bar that lies
inside that spread passes on one machine and fails on the next. This reruns the tests
marked ``learning`` (``tests/learning.py``) once per grid point:

* ``VITSCALE_TEST_SEED``: the run seed (weights, data order, augmentation);
* ``ATEN_CPU_CAPABILITY``: ``native`` leaves torch's choice (AVX2 or AVX-512 kernels),
  ``default`` forces the generic kernels, which is how "another CPU" looks on this one;
* ``VITSCALE_TEST_THREADS``: ``OMP_NUM_THREADS`` of each training process.

Each test prints its figures on a ``LEARNING {...}`` line; this collects them, writes
every row to ``--out`` (JSON lines) and prints, per test and figure, the minimum and
maximum over the grid. The bars in the tests sit outside those ranges. A test that
fails at a grid point is reported (with its pytest exit status) rather than hidden.
The last line is one JSON object with the ranges.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from learning import REPORT_PREFIX  # noqa: E402

DEFAULT_SELECTION = ("tests/test_finetune_e2e.py::test_finetuned_accuracy_beats_a_random_init_with_the_same_budget",
                     "tests/test_pretrain_multiproc.py::test_zero_stages_train[1]",
                     "tests/test_pretrain_multiproc.py::test_bf16_runs[2]")
"""One test per kind of bar: ZeRO-2/3 runs the same fp32 math as ZeRO-1 (up to summation order)
and CI runs them under both kernel paths; the sweep keeps the grid within about an hour."""


def run_point(tests: list[str], seed: int, capability: str, threads: int) -> tuple[int, list[dict]]:
    """Run the selected tests at one grid point; return pytest's status and the reported rows."""
    env = {**os.environ, "VITSCALE_TEST_SEED": str(seed), "VITSCALE_TEST_THREADS": str(threads)}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    result = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", *tests],
                            cwd=REPO, env=env, capture_output=True, text=True)
    # With -q -s a report can follow pytest's progress dots on the same line.
    rows = [json.loads(line.split(REPORT_PREFIX, 1)[1]) for line in result.stdout.splitlines()
            if REPORT_PREFIX in line]
    for row in rows:
        row["capability"] = capability
    if result.returncode != 0:
        print(result.stdout[-3000:], file=sys.stderr)
    return result.returncode, rows


def ranges(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per test, per figure: [min, max] over every row."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for key, value in row.items():
            if key not in ("test", "seed", "threads", "capability"):
                values[row["test"]][key].append(value)
    return {test: {key: [min(v), max(v)] for key, v in figures.items()} for test, figures in values.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--capabilities", nargs="+", default=["native", "default"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_SELECTION), help="pytest node ids")
    parser.add_argument("--out", type=Path, default=Path("learning_spread.jsonl"))
    args = parser.parse_args()
    rows: list[dict] = []
    failures = []
    with open(args.out, "a") as out:
        for capability, threads, seed in itertools.product(args.capabilities, args.threads, args.seeds):
            start = time.monotonic()
            status, point = run_point(args.tests, seed, capability, threads)
            if status != 0:
                failures.append({"seed": seed, "capability": capability, "threads": threads, "status": status})
            for row in point:
                out.write(json.dumps(row) + "\n")
            out.flush()
            rows += point
            print(f"{capability:8s} threads {threads} seed {seed}: pytest {status}, {time.monotonic() - start:.0f} s, "
                  + "; ".join(f"{r['test']} " + " ".join(f"{k}={v:.4f}" for k, v in r.items()
                                                       if isinstance(v, float)) for r in point), flush=True)
    print(json.dumps({"points": len(rows), "failures": failures, "ranges": ranges(rows)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
