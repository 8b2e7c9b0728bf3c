"""Knobs and reporting of the tests that assert a learning outcome (pytest marker ``learning``).

Float results differ between CPUs (AVX2 vs AVX-512 kernels, thread counts, library builds)
and a training run amplifies the difference, so every accuracy or loss bar in these tests
sits outside a spread that was measured, not guessed: ``benchmarks/learning_spread.py``
reruns them over seeds (``VITSCALE_TEST_SEED``), kernel paths (``ATEN_CPU_CAPABILITY``) and
thread counts (``VITSCALE_TEST_THREADS``) and collects the figures each test reports with
``report``. The measured range is written next to each bar.
"""

from __future__ import annotations

import json
import os

SEED = int(os.environ.get("VITSCALE_TEST_SEED", "0"))
"""``run.seed`` of the learning runs (weights, data order, augmentation)."""
THREADS = os.environ.get("VITSCALE_TEST_THREADS", "1")
"""``OMP_NUM_THREADS`` of each training process."""
REPORT_PREFIX = "LEARNING "


def worker_env() -> dict[str, str]:
    """Environment of a training subprocess: the sweep's thread count, unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": THREADS, "PYTHONUNBUFFERED": "1"}


def report(test: str, **figures: float) -> None:
    """Print one line of figures for the sweep to collect (visible with ``pytest -s``)."""
    print(REPORT_PREFIX + json.dumps({"test": test, "seed": SEED, "threads": int(THREADS), **figures}))
