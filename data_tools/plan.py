"""Decide, before any image is read, which sample goes into which shard.

The plan is a pure function of the listing, the class list, the seed and the
shard-size option: files are ordered by a seeded 64-bit hash of their name
(BLAKE2b keyed with the seed), so the shard a file lands in is a seeded random
function of it, independent of listing order, and no shard holds a single class;
the ordered files are cut into consecutive runs of ``samples_per_shard`` files or
of ``shard_size`` source bytes. A file listed twice (a CSV row repeated, a tar
holding a name twice) has one hash: the first listing is kept, the others become
problems. Two names with one hash (about 1 in 200,000 at 14 M files) are put in
name order, so the plan stays deterministic. The digest (which also covers the
encoding options) names the plan in ``_info.json``.

Why a hash order and not a shuffle of a sorted list: sorting 14 M names needs them
as Python strings (about 90 bytes each); hashing works on the name bytes of the
listing's columns, and the whole plan is numpy arrays: peak memory grows by ~75 bytes
a listed file (``benchmarks/convert_throughput.py --scale``; 1 GB at 14.2 M files).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .sources import NAME_ENCODING, Listing

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


SAMPLE_DTYPE = np.dtype([("label", "<i4"), ("container", "<i4"), ("offset", "<i8"), ("size", "<i8"),
                         ("name_end", "<i8")])
"""One planned sample: class index, container (-1: plain file), byte offset in it, bytes, end of its name."""
CHUNK = 1 << 13
"""Rows handled at once where a Python loop or a temporary copy is needed: memory stays a few MB."""


@dataclass
class Plan:
    """Shard assignment of one split: rows ``order[bounds[i]:bounds[i+1]]`` of the listing form shard i.

    It keeps the listing and an index into it rather than plan-order copies; ``rows``
    materialises a range, so writing the plan file streams (``planfile.write_plan``).
    """

    split: str
    classes: list[str]
    listing: Listing
    order: np.ndarray
    bounds: np.ndarray
    to_class: np.ndarray
    """Listing label -> index in ``classes``."""
    digest: str
    problems: list[dict]
    """Files listed twice."""

    @property
    def num_samples(self) -> int:
        return len(self.order)

    def rows(self, lo: int, hi: int) -> tuple[np.ndarray, bytes]:
        """Plan rows ``lo:hi`` as ``SAMPLE_DTYPE`` (``name_end`` relative to the returned names) and their names."""
        columns, picked = self.listing.files.columns(), self.order[lo:hi]
        samples = np.empty(len(picked), SAMPLE_DTYPE)
        for field in ("container", "offset", "size"):
            samples[field] = columns[field][picked]
        samples["label"] = self.to_class[columns["label"][picked]]
        ends = columns["name_end"][picked]
        starts = np.where(picked > 0, columns["name_end"][np.maximum(picked - 1, 0)], 0)
        samples["name_end"] = np.cumsum(ends - starts, dtype=np.int64)
        names = memoryview(self.listing.files.names)
        return samples, b"".join([names[s:e] for s, e in zip(starts.tolist(), ends.tolist())])


def sample_key(rel: str) -> str:
    """Stable, unique, dot-free key: the first 24 hex digits (96 bits) of the SHA-1 of the source name.

    webdataset splits a member name at its first dot into key and extension, so a
    key taken from a file name (``x.JPEG``) would break samples apart.
    """
    return hashlib.sha1(rel.encode(*NAME_ENCODING)).hexdigest()[:24]


def parse_size(text: str) -> int:
    """Bytes in ``"1GB"``, ``"500MiB"`` or ``"1048576"`` (decimal units, binary with ``i``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"shard size {text!r} not understood: write e.g. 1GB, 500MB or 256MiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def make_plan(split: str, listing: Listing, classes: list[str], *, seed: int,
              samples_per_shard: Optional[int], shard_size: Optional[int], options: dict) -> Plan:
    """Order the listed files by their seeded hash and cut them into shards (exactly one limit given)."""
    columns = listing.files.columns()
    names = memoryview(listing.files.names)
    ends = columns["name_end"]
    starts = np.concatenate(([0], ends[:-1])).astype(np.int64)
    hashes = _name_hashes(names, starts, ends, seed)
    order = np.argsort(hashes, kind="stable")
    order, problems = _drop_duplicates(order, hashes, names, starts, ends)
    del starts
    index = {name: i for i, name in enumerate(classes)}
    to_class = np.array([index.get(name, -1) for name in listing.class_names] or [-1], dtype=np.int32)
    bounds = _bounds(columns["size"], order, samples_per_shard, shard_size)
    digest = hashlib.sha256(repr((split, classes, sorted(options.items()))).encode())
    digest.update(memoryview(bounds))
    for lo in range(0, len(order), CHUNK):
        picked = order[lo:lo + CHUNK]
        digest.update(memoryview(np.ascontiguousarray(hashes[picked])))
        digest.update(memoryview(np.ascontiguousarray(to_class[columns["label"][picked]])))
    return Plan(split, classes, listing, order, bounds, to_class, digest.hexdigest(), problems)


def _name_hashes(names: memoryview, starts: np.ndarray, ends: np.ndarray, seed: int) -> np.ndarray:
    key = str(seed).encode()[:64]
    hashes = np.empty(len(ends), np.uint64)
    for lo in range(0, len(ends), CHUNK):
        hashes[lo:lo + CHUNK] = [int.from_bytes(hashlib.blake2b(names[s:e], digest_size=8, key=key).digest(), "little")
                                 for s, e in zip(starts[lo:lo + CHUNK].tolist(), ends[lo:lo + CHUNK].tolist())]
    return hashes


def _drop_duplicates(order: np.ndarray, hashes: np.ndarray, names: memoryview, starts: np.ndarray,
                     ends: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Keep the first listing of each name; put colliding distinct names in name order."""
    ordered = hashes[order]
    tied = np.flatnonzero(ordered[1:] == ordered[:-1])
    if not len(tied):
        return order, []
    drop, problems = [], []
    runs = np.split(tied, np.flatnonzero(np.diff(tied) > 1) + 1)
    for run in runs:
        positions = list(range(int(run[0]), int(run[-1]) + 2))
        rows = order[positions].tolist()
        by_name: dict[bytes, list[int]] = {}
        for row in rows:  # stable order: listing order, so the first listing comes first
            by_name.setdefault(bytes(names[starts[row]:ends[row]]), []).append(row)
        kept = [by_name[name][0] for name in sorted(by_name)]
        order[positions[:len(kept)]] = kept
        drop += positions[len(kept):]
        problems += [{"path": name.decode(*NAME_ENCODING), "reason": f"duplicate entry: listed {len(rows)} times, "
                      "first one kept"} for name, rows in sorted(by_name.items()) if len(rows) > 1]
    return np.delete(order, drop), problems


def _bounds(sizes: np.ndarray, order: np.ndarray, samples_per_shard: Optional[int],
            shard_size: Optional[int]) -> np.ndarray:
    """Shard boundaries: every ``samples_per_shard`` rows, or before a file that would overflow ``shard_size``."""
    if not len(order):
        return np.zeros(1, np.int64)
    if samples_per_shard:
        return np.append(np.arange(0, len(order), samples_per_shard), len(order)).astype(np.int64)
    bounds, current = [0], 0
    for lo in range(0, len(order), CHUNK):
        for row, size in enumerate(sizes[order[lo:lo + CHUNK]].tolist(), start=lo):
            if row > bounds[-1] and current + size > shard_size:
                bounds.append(row)
                current = 0
            current += size
    return np.array(bounds + [len(order)], dtype=np.int64)
