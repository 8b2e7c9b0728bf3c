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
that creates ``plan.lock`` (``O_EXCL``) lists and plans; the others poll for the header
every ``POLL_S``. The holder refreshes the lock's mtime every ``HEARTBEAT_S``; a lock not
refreshed for ``STALE_S`` (its holder was killed) is taken over. Correctness never
depends on the lock: two planners write identical files with atomic renames, so a
wrongly broken lock only costs a second listing.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .manifest import atomic_writer, write_json_atomic
from .plan import CHUNK, SAMPLE_DTYPE, Plan
from .sources import NAME_ENCODING

HEADER, SAMPLES, NAMES, BOUNDS, PROBLEMS, LOCK = ("plan.json", "plan-samples.npy", "plan-names.bin",
                                                   "plan-bounds.npy", "plan-problems.json", "plan.lock")
POLL_S = 1.0
HEARTBEAT_S = 15.0
STALE_S = 120.0
log = logging.getLogger(__name__)


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
    lock = work / LOCK
    while not (work / HEADER).is_file():
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(lock)
            time.sleep(POLL_S)
            continue
        os.write(handle, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        os.close(handle)
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True)
        beat.start()
        try:
            if not (work / HEADER).is_file():  # written between our check and the lock
                build()
        finally:
            stop.set()
            beat.join()
            lock.unlink(missing_ok=True)
    return PlanFile(work)


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(lock)
        except FileNotFoundError:
            return


def _take_over_if_stale(lock: Path) -> None:
    """Remove ``lock`` when its holder stopped refreshing it (killed while planning)."""
    try:
        age = time.time() - lock.stat().st_mtime
        if age <= STALE_S:
            return
        holder = lock.read_text().strip()
        stale = lock.with_name(f"{lock.name}.stale-{secrets.token_hex(4)}")
        os.rename(lock, stale)  # only one waiter wins the rename
    except FileNotFoundError:
        return
    stale.unlink()
    log.warning("plan lock %s (%s) not refreshed for %.0f s: its holder is gone, planning here", lock, holder, age)
