"""The train split's sample table: every sample's byte offset and length in one file that every
loader worker and rank of a node memory-maps.

Why one table and not per-shard indexes in each worker: the order (``pretrain.data.order``)
sends a worker to every shard of its rank's streams all through an epoch, so per-worker
caches of per-shard indexes either hold them all or reload them over and over (at
ImageNet-21k scale with 8 ranks, about one index reload per three samples read). The table
holds exactly what a read needs, 12 bytes per sample (int64 offset, uint32 length; keys
come from the sample's own tar header), once per node: ImageNet-21k's 14.2 M samples
take 170 MB of page cache shared by every process, and a lookup is two array reads.

Built from the per-shard indexes (``data_tools.index``): the one beside a shard when there
is one, else one built from the shard's tar headers into ``<cache>/indexes/`` and logged,
so a read-only dataset folder works and training never writes into one. Every index is
checked against its shard and the manifest first (``check_index``): its recorded shard
size, the tar headers at its first and last sample, and its sample count against
``_info.json``; a mismatch raises ``StaleIndexError`` naming the shard and the command
that fixes it. ``python -m pretrain`` and the launchers build the table before any
process group starts, so that error exits 2 there and the ranks find the table ready.

Cost, ImageNet-21k (1,400 shards): parsing 1,400 index files (~560 MB of text, 0.7 µs a
sample: about 10 s) and 2,800 reads of 2 KiB, once per node and dataset state. The file
name holds a hash of the shard paths and of every shard's and index's (size, mtime,
inode): a rewritten or swapped shard gives a new table, checked again. Older tables of
the same shard list are removed when a new one is written, so the cache holds one table
per dataset. Processes of one node building at once take turns on a lock file.

Remote shards (``s3://``, ``gs://``, ``https://``): the index is ``<url>.idx`` when one was
uploaded, else built by one streaming read of the shard into ``<cache>/indexes/`` (logged; at
ImageNet-21k scale that is a download of the dataset, so ``python -m data_tools index URL
--out DIR`` and an upload are worth it). The state hash takes each shard's size and ETag (or
mtime) from one listing of the prefix, and the table carries them to the shard cache, whose
copies are named by them (``pretrain.data.shard_cache``).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from data_tools import storage
from data_tools.index import SUFFIX, ShardIndex, build_index, index_path, read_index, stale_reason
from data_tools.manifest import atomic_writer, write_text_atomic

log = logging.getLogger(__name__)

ENTRY = np.dtype([("offset", "<i8"), ("length", "<u4")])
"""One sample in the table: 12 bytes."""


class StaleIndexError(ValueError):
    """A shard's index does not describe the shard, or the shard not what ``_info.json`` says."""


def cache_root(cache_dir: str) -> Path:
    """``data.cache_dir``, or ``<tempdir>/vitscale-cache-<uid>`` (node-local on most clusters) when empty."""
    return Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / f"vitscale-cache-{os.getuid()}"


def _path_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _absolute(url: str) -> str:
    return url if storage.is_remote(url) else os.path.abspath(url)


def cached_index_path(shard: str, cache: Path) -> Path:
    """Where a shard's index built by training lives: the cache, never the dataset folder."""
    return cache / "indexes" / f"{_path_hash(_absolute(shard))}-{shard.rsplit('/', 1)[-1]}{SUFFIX}"


def check_index(shard: str, expected: int, cache: Path) -> ShardIndex:
    """The checked index of ``shard`` (beside it, else in ``cache``, else built into ``cache``)."""
    beside = read_index(shard)
    if beside is not None:
        index, where = beside, f"{shard}{SUFFIX}"
    else:
        cached = cached_index_path(shard, cache)
        index, where = read_index(shard, cached), cached
        if index is None or stale_reason(shard, index) is not None:
            log.info("%s has no sample index beside it: building one into %s (`python -m data_tools index DIR` "
                     "writes them beside the shards once)", shard, cached)
            index = build_index(shard)
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cached, index.to_text())
    reason = stale_reason(shard, index)
    folder = shard.rsplit("/", 1)[0]
    if reason is not None:
        fix = (f"`python -m data_tools index --force {folder} --out DIR` and upload DIR's indexes beside the shards"
               if storage.is_remote(shard) else f"`python -m data_tools index --force {folder}`")
        raise StaleIndexError(f"{where} is stale: {reason}; rebuild it with {fix} (or rewrite the shard if it is "
                              "the damaged one)")
    if len(index) != expected:
        raise StaleIndexError(f"{shard} holds {len(index)} samples but _info.json says {expected}: the shard or the "
                              f"manifest is damaged; run `python -m data_tools verify {folder}`")
    return index


@dataclass(frozen=True)
class SampleTable:
    """Offsets and lengths of every sample of a shard list, memory-mapped (shared by the node's processes)."""

    path: Path
    starts: np.ndarray
    """First sample id of each shard (manifest order)."""
    counts: np.ndarray
    """Samples in each shard."""
    versions: Optional[dict[str, tuple[int, str]]] = None
    """Remote shards: (size, version) of each, as the table was built for (the shard cache's keys)."""

    def entries(self) -> np.ndarray:
        """The (offset, length) records, memory-mapped: open it in the process that reads (after fork)."""
        return np.load(self.path, mmap_mode="r")


def _state_hash(urls: Sequence[str], versions: Optional[dict[str, tuple[int, str]]]) -> str:
    """Changes when any shard or its index beside it is rewritten, replaced or touched."""
    digest = hashlib.blake2b(digest_size=8)
    if versions is not None:
        digest.update(repr(sorted(versions.items())).encode())
        return digest.hexdigest()
    for url in urls:
        for path in (url, index_path(url)):
            try:
                st = os.stat(path)
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
            except FileNotFoundError:
                digest.update(f"{path}\0-\n".encode())
    return digest.hexdigest()


def remote_versions(urls: Sequence[str]) -> dict[str, tuple[int, str]]:
    """(size, version) of each remote shard that exists and of each ``.idx`` uploaded beside one.

    One listing per prefix for both (``storage.versions``): at 14,000 shards on S3 a listing
    is 14 paged requests, and every rank makes this one before its first step.
    """
    return storage.versions([*urls, *(f"{url}{SUFFIX}" for url in urls)], missing_ok=True)


def sample_table(urls: Sequence[str], lengths: Sequence[int], cache_dir: str = "",
                 versions: Optional[dict[str, tuple[int, str]]] = None) -> SampleTable:
    """The checked sample table of ``urls`` (``lengths`` from ``_info.json``), built on first use per node.

    Remote shards: ``versions`` is their ``remote_versions`` where the caller has listed them already.
    """
    cache = cache_root(cache_dir)
    counts = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    dataset = _path_hash("\n".join(_absolute(u) for u in urls))
    if any(storage.is_remote(u) for u in urls):
        versions = remote_versions(urls) if versions is None else versions
        missing = [url for url in urls if url not in versions]
        if missing:
            raise FileNotFoundError(f"{missing[0]} does not exist")
    else:
        versions = None
    path = cache / "tables" / f"{dataset}-{_state_hash(urls, versions)}.npy"
    table = SampleTable(path, starts, counts, versions)
    if path.is_file():
        return table
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(cache / "tables" / f"{dataset}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():  # another process of this node built it while we waited
            return table
        entries = np.empty(int(counts.sum()), dtype=ENTRY)
        for url, start, count in zip(urls, starts.tolist(), counts.tolist()):
            index = check_index(url, count, cache)
            entries["offset"][start:start + count] = np.frombuffer(index.offsets, dtype=np.int64)
            entries["length"][start:start + count] = np.frombuffer(index.lengths, dtype=np.int64)
        with atomic_writer(path, binary=True) as handle:
            np.save(handle, entries)
        for old in path.parent.glob(f"{dataset}-*.npy"):
            if old != path:
                old.unlink(missing_ok=True)
    log.info("sample table of %d shards (%d samples, %.1f MB) written to %s", len(urls), entries.size,
             entries.nbytes / 1e6, path)
    return table
