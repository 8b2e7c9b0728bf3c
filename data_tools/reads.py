"""Read the source images of a group of shards ("wave") with sequential reads, in worker processes.

Per-image opens and seeks into random class tars (what the global shuffle would
give if each shard were read on its own) make a 1.3 TB conversion seek-bound. Instead,
a part's pending shards are split into at most ``MAX_WAVES`` waves; within a wave every
class tar is opened once (one ``ReadTask``) and its members are read in file order,
each going to its planned shard (several tars' runs make one task, ``TASK_ENTRIES``).
So a tar is opened at most ``MAX_WAVES`` times per part, whatever the shard count,
and the shard a sample lands in is still the plan's.

Inside a shard the samples then come grouped by tar, the tars in a seeded random
order (not sorted: labels would rise through every shard). At ImageNet-21k scale a
1 GB shard holds ~9,000 samples from ~7,000 classes, so a group is ~1.3 samples long;
readers shuffle across shards and samples on top. Plain files (ImageFolder, CSV) need
no grouping: they are read in plan order, in tasks of ``PLAIN_TASK`` files.

A wave keeps at most ``MAX_OPEN_SHARDS`` shards open (file handles, and its samples'
names and rows in memory: ~150 bytes a sample); beyond ``MAX_WAVES * MAX_OPEN_SHARDS``
pending shards in one part the waves multiply. A SLURM part of ImageNet-21k (64 parts
of ~20 shards) has 4 waves of ~5 shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from .images import BadImage, Prepared, prepare
from .plan import sample_key
from .planfile import PlanFile

MAX_WAVES = 4
MAX_OPEN_SHARDS = 256
TASK_ENTRIES = 32
"""Entries per read task at least (whole tar runs are never split): a part of ImageNet-21k takes
only ~2.5 images from a tar per wave, and a task per tar would spend more on task overhead."""


class Entry(NamedTuple):
    """One sample to read: its shard, source name, label, container ("" for a plain file) and byte range."""

    shard: int
    name: str
    label: int
    container: str
    offset: int
    size: int


class Result(NamedTuple):
    """What a worker returns for one entry: the prepared image, or the reason it was skipped."""

    shard: int
    key: str
    name: str
    label: int
    image: Optional[Prepared]
    reason: str


@dataclass(frozen=True)
class ReadTask:
    """Entries to read in order; each container's entries are consecutive and ascending, so it is opened once."""

    root: Path
    entries: list[Entry]
    resize_max: Optional[int]
    quality: int

    @property
    def containers(self) -> list[str]:
        """The containers this task opens, in order."""
        return [e.container for i, e in enumerate(self.entries)
                if e.container and (i == 0 or self.entries[i - 1].container != e.container)]


def waves(pending: list[int], containers: bool) -> list[list[int]]:
    """Split pending shard indices into waves (module docstring)."""
    if not pending:
        return []
    size = min(math.ceil(len(pending) / MAX_WAVES) if containers else len(pending), MAX_OPEN_SHARDS)
    return [pending[i:i + size] for i in range(0, len(pending), size)]


def wave_tasks(plan: PlanFile, wave: list[int], root: Path, resize_max: Optional[int],
               quality: int) -> list[ReadTask]:
    """The read tasks of one wave, in the order their results must be written."""
    containers = plan.header["containers"]
    rows, entries = [], []
    for shard in wave:
        shard_rows, names = plan.shard(shard)
        rows.append(np.rec.fromarrays([np.full(len(shard_rows), shard), shard_rows["container"], shard_rows["offset"]],
                                      names="shard,container,offset"))
        entries += [Entry(shard, name, label, containers[container] if container >= 0 else "", offset, size)
                    for name, label, container, offset, size in
                    zip(names, *(shard_rows[f].tolist() for f in ("label", "container", "offset", "size")))]
    columns = np.concatenate(rows)
    task = lambda picked: ReadTask(root, [entries[i] for i in picked], resize_max, quality)  # noqa: E731
    plain = np.flatnonzero(columns["container"] < 0)
    tasks = [task(run[i:i + TASK_ENTRIES].tolist())  # a task feeds one shard: a slow file holds back only it
             for run in np.split(plain, np.flatnonzero(np.diff(columns["shard"][plain])) + 1)
             for i in range(0, len(run), TASK_ENTRIES)]
    if len(plain) == len(columns):
        return tasks
    rank = np.random.default_rng(plan.header["settings"]["seed"]).permutation(len(containers))
    packed = np.flatnonzero(columns["container"] >= 0)
    packed = packed[np.lexsort((columns["offset"][packed], rank[columns["container"][packed]]))]
    runs = np.flatnonzero(np.diff(columns["container"][packed], prepend=-1))  # where each tar's run starts
    cuts, size = [0], 0
    for start, end in zip(runs.tolist(), runs[1:].tolist() + [len(packed)]):
        if size >= TASK_ENTRIES:
            cuts.append(start)
            size = 0
        size += end - start
    return tasks + [task(packed[lo:hi].tolist()) for lo, hi in zip(cuts, cuts[1:] + [len(packed)])]


def read_task(task: ReadTask) -> list[Result]:
    """Read and check every entry of ``task``: one open per container, forward seeks only."""
    results, handle, opened = [], None, ""
    try:
        for entry in task.entries:
            if entry.container and entry.container != opened:
                _close(handle)
                handle, opened = _open(task.root / entry.container), entry.container
            results.append(_prepared(task, entry, handle))
    finally:
        _close(handle)
    return results


def _open(path: Path):
    """The open container, or the error that kept it closed (each of its entries is then skipped with it)."""
    try:
        return open(path, "rb")
    except OSError as err:
        return err


def _close(handle) -> None:
    if handle is not None and not isinstance(handle, OSError):
        handle.close()


def _read(task: ReadTask, entry: Entry, handle) -> bytes:
    if not entry.container:
        return (task.root / entry.name).read_bytes()
    if isinstance(handle, OSError):
        raise OSError(f"class tar {entry.container} cannot be opened: {handle.strerror}")
    handle.seek(entry.offset)
    data = handle.read(entry.size)
    if len(data) != entry.size:
        raise OSError(f"class tar {entry.container} ends {entry.size - len(data)} bytes early "
                      "(changed since it was listed?)")
    return data


def _prepared(task: ReadTask, entry: Entry, handle) -> Result:
    try:
        image = prepare(_read(task, entry, handle), task.resize_max, task.quality)
    except BadImage as err:
        return _skipped(entry, str(err))
    except OSError as err:
        return _skipped(entry, f"cannot read file: {err}")
    return Result(entry.shard, sample_key(entry.name), entry.name, entry.label, image, "")


def _skipped(entry: Entry, reason: str) -> Result:
    return Result(entry.shard, "", entry.name, entry.label, None, reason)
