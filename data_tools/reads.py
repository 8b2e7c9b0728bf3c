"""Read the source images of a group of shards ("wave") with sequential reads, in worker processes.

Per-image opens and seeks into random class tars (what the global shuffle would
give if each shard were read on its own) make a 1.3 TB conversion seek-bound. Instead,
a part's pending shards are split into at most ``MAX_WAVES`` waves; within a wave every
class tar is opened once (one ``ReadTask``) and its members are read in file order,
each going to its planned shard. So a tar is opened at most ``MAX_WAVES`` times per
part, whatever the shard count, and the shard a sample lands in is still the plan's.

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
PLAIN_TASK = 32


class Entry(NamedTuple):
    """One sample to read: its shard, source name, label, and bytes ``offset:offset+size`` in the container."""

    shard: int
    name: str
    label: int
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
    """One container opened once (``container`` relative to ``root``; "" for plain files) and its entries."""

    root: Path
    container: str
    entries: list[Entry]
    resize_max: Optional[int]
    quality: int


def waves(pending: list[int], containers: bool) -> list[list[int]]:
    """Split pending shard indices into waves (module docstring)."""
    if not pending:
        return []
    size = min(math.ceil(len(pending) / MAX_WAVES) if containers else len(pending), MAX_OPEN_SHARDS)
    return [pending[i:i + size] for i in range(0, len(pending), size)]


def wave_tasks(plan: PlanFile, wave: list[int], root: Path, resize_max: Optional[int],
               quality: int) -> list[ReadTask]:
    """The read tasks of one wave, in the order their results must be written."""
    rows, entries = [], []
    for shard in wave:
        shard_rows, names = plan.shard(shard)
        rows.append(np.rec.fromarrays([np.full(len(shard_rows), shard), shard_rows["container"], shard_rows["offset"]],
                                      names="shard,container,offset"))
        entries += [Entry(shard, name, label, offset, size) for name, label, offset, size in
                    zip(names, shard_rows["label"].tolist(), shard_rows["offset"].tolist(), shard_rows["size"].tolist())]
    columns = np.concatenate(rows)
    containers = plan.header["containers"]
    task = lambda container, picked: ReadTask(root, container, [entries[i] for i in picked],  # noqa: E731
                                              resize_max, quality)
    plain = np.flatnonzero(columns["container"] < 0)
    tasks = [task("", run[i:i + PLAIN_TASK].tolist())  # a task feeds one shard: a slow file holds back only it
             for run in np.split(plain, np.flatnonzero(np.diff(columns["shard"][plain])) + 1)
             for i in range(0, len(run), PLAIN_TASK)]
    if len(plain) == len(columns):
        return tasks
    rank = np.random.default_rng(plan.header["settings"]["seed"]).permutation(len(containers))
    packed = np.flatnonzero(columns["container"] >= 0)
    packed = packed[np.lexsort((columns["offset"][packed], rank[columns["container"][packed]]))]
    starts = np.flatnonzero(np.diff(columns["container"][packed], prepend=-1))
    for group in np.split(packed, starts[1:]):
        tasks.append(task(containers[int(columns["container"][group[0]])], group.tolist()))
    return tasks


def read_task(task: ReadTask) -> list[Result]:
    """Read (one open of the container, forward seeks only) and check every entry of ``task``."""
    if not task.container:
        return [_prepared(task, entry, lambda e: (task.root / e.name).read_bytes()) for entry in task.entries]
    try:
        handle = open(task.root / task.container, "rb")
    except OSError as err:
        return [_skipped(entry, f"cannot read class tar {task.container}: {err.strerror}") for entry in task.entries]
    with handle:
        return [_prepared(task, entry, lambda e: _read_member(handle, e, task.container)) for entry in task.entries]


def _read_member(handle, entry: Entry, container: str) -> bytes:
    handle.seek(entry.offset)
    data = handle.read(entry.size)
    if len(data) != entry.size:
        raise OSError(f"class tar {container} ends {entry.size - len(data)} bytes early (changed since it was listed?)")
    return data


def _prepared(task: ReadTask, entry: Entry, read) -> Result:
    try:
        image = prepare(read(entry), task.resize_max, task.quality)
    except BadImage as err:
        return _skipped(entry, str(err))
    except OSError as err:
        return _skipped(entry, f"cannot read file: {err}")
    return Result(entry.shard, sample_key(entry.name), entry.name, entry.label, image, "")


def _skipped(entry: Entry, reason: str) -> Result:
    return Result(entry.shard, "", entry.name, entry.label, None, reason)
