"""Read train samples by byte offset: one positioned read per sample, through the sample table.

Why: the order (``pretrain.data.order``) names samples by (shard, index), so a worker
fetches exactly the bytes of the samples it decodes, wherever they lie; nothing is
read to skip ahead, so a resume at 90 % of an epoch reads what one at 10 % reads.

Cost per worker and epoch, at every world size:

* **Index**: none read. Offsets and lengths come from the node's memory-mapped sample
  table (``pretrain.data.sample_table``, 12 bytes a sample, shared): two array reads a
  sample, no parsing.
* **Opens**: each shard at most once per epoch while the shards a worker touches fit in
  its descriptor budget. A worker touches the shards of its rank's streams' regions:
  ``S / W + C / W`` of them at most (``S`` shards, ``C`` streams, ``W`` ranks), e.g. 1,400 +
  4,096 at ``W = 1`` for ImageNet-21k in 1,400 shards, 18 at ``W = 512``. The budget is the
  process's ``RLIMIT_NOFILE``, raised to its hard limit (``open_file_budget``), less a
  reserve; beyond it the least recently used descriptor closes, and the run logs how many
  it needs (``benchmarks/reader_scale.py`` counts opens at 1 to 512 ranks).
* **Memory**: one encoded sample at a time and the descriptors; nothing grows with the dataset.

``bytes_read`` counts the sample bytes read (the measure of resume cost); ``opened`` lists
the shards opened since the caller last emptied it.

Remote shards (``CachedShardReader``): the same reads, on the node's local copies
(``pretrain.data.shard_cache``); an open fetches a shard the node lacks, and the descriptors
kept are capped at the rank's working set (``Order.rank_shard_bound``), so the copies of
shards the order is done with are released for eviction.
"""

from __future__ import annotations

import io
import logging
import os
import resource
import tarfile
from collections import OrderedDict
from typing import Any, Optional, Sequence

import numpy as np

from data_tools.index import split_name
from pretrain.data.sample_table import SampleTable
from pretrain.data.shard_cache import ShardCache

log = logging.getLogger(__name__)

RESERVED_FILES = 256
"""Descriptors left to everything but shards (DataLoader pipes, logs, libraries)."""


class CorruptSampleError(ValueError):
    """A sample's bytes do not parse as the tar members of one sample."""


def open_file_budget() -> int:
    """Shard descriptors this process may keep open: ``RLIMIT_NOFILE`` raised to its hard limit, less a reserve."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    return max(16, limit - RESERVED_FILES)


_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_EXTENDED_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                   tarfile.GNUTYPE_LONGLINK)
"""Pax and GNU headers that change the next member's name or size: parsed by ``tarfile``."""


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, payload) of each regular file in ``data``, the tar blocks of one sample.

    Why not ``tarfile``: it parses every header into a ``TarInfo`` (fourteen fields, four
    number conversions), about a tenth of a sample's whole CPU cost in the stream. Here a
    header costs its checksum, name and size. Anything else goes through ``tarfile`` itself,
    which raises its own error on bad bytes: a header whose unsigned checksum fails (what a
    stale sample table lands on), pax or GNU extended headers (names over 100 bytes,
    non-ASCII names) and base-256 sizes, all rare in shards.
    """
    members: list[tuple[str, bytes]] = []
    pos = 0
    while pos + tarfile.BLOCKSIZE <= len(data):
        header = data[pos:pos + tarfile.BLOCKSIZE]
        if not any(header):
            break
        kind, size = header[156:157], _octal(header[124:136])
        if (kind in _EXTENDED_TYPES or size < 0
                or _octal(header[148:156]) != 256 + sum(header) - sum(header[148:156])):
            return _tarfile_members(data)  # raises tarfile's own error if the checksum is bad
        start = pos + tarfile.BLOCKSIZE
        if start + size > len(data):
            raise tarfile.ReadError(f"member at byte {pos} needs {size} bytes, {len(data) - start} are left")
        if kind in _FILE_TYPES:
            name = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and header[345]:
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            members.append((name.decode("utf-8", "surrogateescape"), data[start:start + size]))
        pos = start + size + (-size % tarfile.BLOCKSIZE)
    return members


def _octal(field: bytes) -> int:
    """A tar header's octal number field, read as ``tarfile.nti`` reads it (up to the first NUL)."""
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return -1  # base-256 or not a number: left to tarfile


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive if member.isfile()]


class ShardReader:
    """Samples of ``urls`` (local shard files) by (shard, index in shard)."""

    def __init__(self, urls: Sequence[str], table: SampleTable, max_open: Optional[int] = None):
        self.urls, self.table = urls, table
        self.max_open = max_open if max_open is not None else open_file_budget()
        self.bytes_read = 0
        self.opened: list[int] = []
        self._entries: Optional[np.ndarray] = None
        self._files: OrderedDict[int, int] = OrderedDict()

    @property
    def bytes_fetched(self) -> int:
        """Bytes this process fetched from remote storage (none: local shards are read in place)."""
        return 0

    def locate(self, shard: int, index: int) -> tuple[int, int]:
        """(byte offset, length) of sample ``index`` of ``shard``."""
        if not 0 <= index < self.table.counts[shard]:
            raise ValueError(f"sample {index} is past the end of {self.urls[shard]}, which holds "
                             f"{self.table.counts[shard]} samples: the manifest and the sample table disagree; "
                             "run `python -m data_tools verify` on the shard directory")
        if self._entries is None:
            self._entries = self.table.entries()
        entry = self._entries[self.table.starts[shard] + index]
        return int(entry["offset"]), int(entry["length"])

    def _open(self, path: str) -> int:
        return os.open(path, os.O_RDONLY)

    def _close(self, fd: int) -> None:
        os.close(fd)

    def handle(self, shard: int) -> int:
        """An open descriptor of ``shard`` (opened on first use; least recently used closed past the budget)."""
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        self._files[shard] = self._open(self.urls[shard])
        self.opened.append(shard)
        if len(self._files) > self.max_open:
            self._close(self._files.popitem(last=False)[1])
        return self._files[shard]

    def read(self, shard: int, index: int) -> dict[str, Any]:
        """Sample ``index`` of shard ``shard`` as webdataset gives it: ``__key__``, ``__url__``, one entry a member."""
        offset, length = self.locate(shard, index)
        data = os.pread(self.handle(shard), length, offset)
        self.bytes_read += len(data)
        url = self.urls[shard]
        sample: dict[str, Any] = {"__url__": url}
        try:
            for name, payload in tar_members(data):
                parts = split_name(name)
                if parts is None:
                    continue
                if sample.setdefault("__key__", parts[0]) != parts[0]:
                    raise CorruptSampleError(f"bytes {offset}..{offset + length} of {url} hold members of "
                                             f"{sample['__key__']} and {parts[0]}: the sample table is stale")
                sample[parts[1].lower()] = payload
        except tarfile.TarError as err:
            raise CorruptSampleError(f"bytes {offset}..{offset + length} of {url} are not the tar members of "
                                     f"sample {index} ({err})") from err
        if "__key__" not in sample:
            raise CorruptSampleError(f"no member of sample {index} at bytes {offset}..{offset + length} of {url}")
        return sample

    def close(self) -> None:
        for fd in self._files.values():
            self._close(fd)
        self._files.clear()


class CachedShardReader(ShardReader):
    """Remote shards (``table.versions``), read by offset from their copies in the node's ``cache``."""

    def __init__(self, urls: Sequence[str], table: SampleTable, cache: ShardCache, max_open: int):
        super().__init__(urls, table, max_open)
        self.cache = cache

    @property
    def bytes_fetched(self) -> int:
        return self.cache.bytes_fetched

    def _open(self, path: str) -> int:
        size, version = self.table.versions[path]
        return self.cache.open(path, version, size)
