"""Decide, before any image is read, which sample goes into which shard.

The plan is a pure function of the listing, the class list, the seed and the
shard-size option: items sorted by name, shuffled with ``random.Random(seed)``
(so no shard holds a single class), then cut into consecutive runs of
``samples_per_shard`` items or of ``shard_size`` source bytes. Because it is
deterministic, a rerun after a crash recomputes the same plan, and its digest
(which also covers the encoding options) tells whether the shards already in the
output belong to it.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Optional

from .sources import Item

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count``: the shards ``i`` with ``i % count == index``.

    Round-robin rather than contiguous ranges, so every part gets a similar mix of
    shard sizes and a part's share stays balanced whatever the shard count.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"part {self}: the number of parts must be at least 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"part {self}: the part index must be in 0..{self.count - 1} (parts are numbered "
                             "from 0, like SLURM_ARRAY_TASK_ID with --array=0-N-1)")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> "Part":
        """``Part`` from ``"I/N"`` (e.g. ``"3/16"``)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"part {text!r} not understood: write INDEX/COUNT, e.g. 3/16 for the fourth of 16 parts")
        return cls(int(match.group(1)), int(match.group(2)))

    def owns(self, shard_index: int) -> bool:
        return shard_index % self.count == self.index


@dataclass(frozen=True)
class Plan:
    """Shard assignment of one split; ``shards[i]`` lists ``(key, label index, item)`` of shard i."""

    split: str
    classes: list[str]
    shards: list[list[tuple[str, int, Item]]]
    digest: str


def sample_key(rel: str) -> str:
    """Stable, unique, dot-free key: the first 24 hex digits (96 bits) of the SHA-1 of the source name.

    webdataset splits a member name at its first dot into key and extension, so a
    key taken from a file name (``x.JPEG``) would break samples apart.
    """
    return hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def parse_size(text: str) -> int:
    """Bytes in ``"1GB"``, ``"500MiB"`` or ``"1048576"`` (decimal units, binary with ``i``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"shard size {text!r} not understood: write e.g. 1GB, 500MB or 256MiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def make_plan(split: str, items: list[Item], classes: list[str], *, seed: int,
              samples_per_shard: Optional[int], shard_size: Optional[int], options: dict) -> Plan:
    """Shuffle ``items`` with ``seed`` and cut them into shards (exactly one of the two limits given)."""
    index = {name: i for i, name in enumerate(classes)}
    order = list(items)
    random.Random(seed).shuffle(order)
    shards, current, current_bytes = [], [], 0
    for item in order:
        full = len(current) >= samples_per_shard if samples_per_shard else current_bytes + item.size > shard_size
        if current and full:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((sample_key(item.rel), index[item.label], item))
        current_bytes += item.size
    if current:
        shards.append(current)
    digest = hashlib.sha256(repr((split, classes, sorted(options.items()))).encode())
    for number, shard in enumerate(shards):
        digest.update(f"\n#{number}".encode())
        for key, label, _ in shard:
            digest.update(f"\n{key} {label}".encode())
    return Plan(split, classes, shards, digest.hexdigest())
