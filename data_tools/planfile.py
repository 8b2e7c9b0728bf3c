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
that creates ``plan.lock`` lists and plans; the others poll for the header every
``POLL_S``. The lock holds a random token: it is created complete (written under a
private name, then ``os.link``-ed, which fails when the name exists), and removed only
by compare-and-delete on a token (``_compare_and_delete``): the holder releases only a
lock that still holds its own token, and a waiter takes over only the lock whose token
it saw go stale, so neither can remove a live holder's lock. The holder refreshes the
lock's mtime every ``HEARTBEAT_S``; a lock not refreshed for ``STALE_S`` (its holder was
killed) is taken over, and the new holder deletes the killed planner's temporary files
(those not written for ``STALE_S``). Correctness never depends on the lock: two planners
write identical files with atomic renames, so a wrongly broken lock only costs a second
listing.
"""

from __future__ import annotations

import contextlib
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
        token = secrets.token_hex(8)
        if not _acquire(lock, token):
            _take_over_if_stale(lock)
            time.sleep(POLL_S)
            continue
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(lock, token, stop), daemon=True)
        beat.start()
        try:
            if not (work / HEADER).is_file():  # written between our check and the lock
                _remove_stale_tmp(work)
                build()
        finally:
            stop.set()
            beat.join()
            _compare_and_delete(lock, token, if_stale=False)
    return PlanFile(work)


def _acquire(lock: Path, token: str) -> bool:
    """Create ``lock`` holding ``token``, complete from its first instant; False when another process holds it.

    An ``EEXIST`` for a lock that holds our token is success: NFS may answer a
    retransmitted link that way.
    """
    mine = lock.with_name(f"{lock.name}.{token}")
    mine.write_text(f"{token} {socket.gethostname()} pid {os.getpid()}\n")
    try:
        os.link(mine, lock)
    except FileExistsError:
        return _token(lock) == token
    finally:
        mine.unlink()
    return True


def _token(lock: Path) -> str:
    """The token a lock file holds ('' when gone or empty)."""
    try:
        words = lock.read_text().split()
    except FileNotFoundError:
        return ""
    return words[0] if words else ""


def _compare_and_delete(lock: Path, token: str, *, if_stale: bool) -> bool:
    """Delete ``lock`` only if it holds ``token`` (and, with ``if_stale``, was not refreshed for ``STALE_S``).

    POSIX has no compare-and-delete; it is built from an atomic rename: the lock is moved
    to a name only this call uses, checked there, and linked back when it is not the one
    expected (``os.link`` fails if a new holder took the name meanwhile, so no lock is
    ever overwritten). In the instant the lock is aside a third process may create a new
    one; the holder of the moved lock then plans alongside it, which costs a second
    listing, never correctness (module docstring).
    """
    moved = lock.with_name(f"{lock.name}.{secrets.token_hex(8)}.check")
    try:
        os.rename(lock, moved)
    except FileNotFoundError:
        return False
    expected = _token(moved) == token and (not if_stale or time.time() - moved.stat().st_mtime > STALE_S)
    if not expected:
        with contextlib.suppress(FileExistsError):
            os.link(moved, lock)
    moved.unlink()
    return expected


def _heartbeat(lock: Path, token: str, stop: threading.Event) -> None:
    """Refresh the lock's mtime while it holds ``token``: never keep a lock taken over by another process alive."""
    while not stop.wait(HEARTBEAT_S):
        if _token(lock) == token:
            with contextlib.suppress(FileNotFoundError):
                os.utime(lock)


def _take_over_if_stale(lock: Path) -> None:
    """Remove ``lock`` when its holder stopped refreshing it (killed while planning), and only that lock."""
    try:
        age = time.time() - lock.stat().st_mtime
        if age <= STALE_S:
            return
        holder = lock.read_text().strip()
    except FileNotFoundError:
        return
    if _compare_and_delete(lock, holder.split()[0] if holder else "", if_stale=True):
        log.warning("plan lock %s (%s) not refreshed for %.0f s: its holder is gone, planning here", lock, holder, age)


def _remove_stale_tmp(work: Path) -> None:
    """Delete temporary plan files not written for ``STALE_S``: a killed planner's (a live one writes in chunks)."""
    for tmp in work.glob(".plan*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - tmp.stat().st_mtime > STALE_S:
                tmp.unlink()
