"""The plan on disk: written once by whichever process gets the lock, read by slices by every part.

Files in ``OUT/_work/<split>/`` (the header last, so its presence means the rest is complete):

- ``plan-samples.npy``: one ``plan.SAMPLE_DTYPE`` row per sample in plan order (32 bytes);
  ``np.load(mmap_mode="r")`` lets a part touch only its shards' rows.
- ``plan-names.bin``: the source names of those rows, concatenated (``name_end`` indexes it).
- ``plan-bounds.npy``: shard i is rows ``bounds[i]:bounds[i+1]``.
- ``plan-problems.json``: listing problems and duplicates (for ``_errors.jsonl``).
- ``plan.json``: header: digest, settings, classes, containers, source root, counts.

At ImageNet-21k scale (14.2 M files, names of about 30 bytes) that is about 0.9 GB,
written in chunks of ``plan.CHUNK`` rows: nothing of plan size is held in memory twice.

Concurrency: the SLURM array's tasks start together and none finds a plan. The one
that gets ``plan.lock`` (``lockfile.py``: a lock file with a token, a heartbeat, and a
take-over once stale) lists and plans; the others poll for the header every
``lockfile.POLL_S``. The planner that takes over a killed one's lock first deletes the
killed planner's temporary files (those not written for ``STALE_S``). Correctness never
depends on the lock: two planners write identical files with atomic renames, so a
wrongly broken lock only costs a second listing.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .lockfile import STALE_S, hold
from .manifest import atomic_writer, write_json_atomic
from .plan import CHUNK, SAMPLE_DTYPE, Plan
from .sources import NAME_ENCODING

HEADER, SAMPLES, NAMES, BOUNDS, PROBLEMS, LOCK = ("plan.json", "plan-samples.npy", "plan-names.bin",
                                                   "plan-bounds.npy", "plan-problems.json", "plan.lock")


def write_plan(work: Path, plan: Plan, header: dict, problems: list[dict]) -> None:
    """Write ``plan`` (streamed in chunks), its problems, then ``header`` plus the plan's own figures."""
    with atomic_writer(work / SAMPLES, binary=True) as samples, atomic_writer(work / NAMES, binary=True) as names:
        np.lib.format.write_array_header_1_0(samples, {"descr": np.lib.format.dtype_to_descr(SAMPLE_DTYPE),
                                                       "fortran_order": False, "shape": (plan.num_samples,)})
        written = 0
        for lo in range(0, plan.num_samples, CHUNK):
            rows, chunk_names = plan.rows(lo, lo + CHUNK)
            rows["name_end"] += written
            samples.write(rows.tobytes())
            names.write(chunk_names)
            written += len(chunk_names)
    with atomic_writer(work / BOUNDS, binary=True) as bounds:
        np.save(bounds, plan.bounds)
    write_json_atomic(work / PROBLEMS, problems)
    write_json_atomic(work / HEADER, {**header, "digest": plan.digest, "classes": plan.classes,
                                      "samples": plan.num_samples, "shards": len(plan.bounds) - 1})


class PlanFile:
    """A written plan: its header, and each shard's rows and names read on demand."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.header = json.loads((work / HEADER).read_text())
        self.bounds = np.load(work / BOUNDS)
        self.samples = np.load(work / SAMPLES, mmap_mode="r")

    @property
    def num_shards(self) -> int:
        return len(self.bounds) - 1

    def shard_length(self, index: int) -> int:
        return int(self.bounds[index + 1] - self.bounds[index])

    def shard(self, index: int) -> tuple[np.ndarray, list[str]]:
        """Rows of shard ``index`` (a copy) and their source names."""
        lo, hi = int(self.bounds[index]), int(self.bounds[index + 1])
        rows = np.array(self.samples[lo:hi])
        start = int(self.samples[lo - 1]["name_end"]) if lo else 0
        with open(self.work / NAMES, "rb") as handle:
            handle.seek(start)
            blob = handle.read(int(rows["name_end"][-1]) - start if len(rows) else 0)
        ends = (rows["name_end"] - start).tolist()
        return rows, [blob[s:e].decode(*NAME_ENCODING) for s, e in zip([0] + ends[:-1], ends)]

    def problems(self) -> list[dict]:
        return json.loads((self.work / PROBLEMS).read_text())


def load_or_build(work: Path, build: Callable[[], None]) -> PlanFile:
    """The plan in ``work``; ``build()`` writes it first when none exists, in one process at a time."""
    work.mkdir(parents=True, exist_ok=True)
    with hold(work / LOCK, give_up=(work / HEADER).is_file) as held:
        if held and not (work / HEADER).is_file():  # the header may have come between the look and the lock
            _remove_stale_tmp(work)
            build()
    return PlanFile(work)


def _remove_stale_tmp(work: Path) -> None:
    """Delete temporary plan files not written for ``STALE_S``: a killed planner's (a live one writes in chunks)."""
    for tmp in work.glob(".plan*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - tmp.stat().st_mtime > STALE_S:
                tmp.unlink()
