"""Read train samples by byte offset: one positioned read per sample, through the per-shard index.

Why: the order (``pretrain.data.order``) names samples by (shard, index), so a worker
fetches exactly the bytes of the samples it decodes, wherever they lie; nothing is
read to skip ahead, so a resume at 90 % of an epoch reads what one at 10 % reads.

Memory is bounded in bytes: one encoded sample at a time, at most ``MAX_OPEN_FILES``
file descriptors, and shard indexes in an LRU holding at most ``index_budget`` bytes
(``estimate_index_bytes`` per index; a rank's streams touch a few shards per epoch at
scale, see ``pretrain.data.order``). A shard without an index (or with a stale one) gets one
built from its tar headers on first use, logged (``data_tools.index.load_index``).

``bytes_read`` counts every byte this reader read (samples and index files): the
measure of resume cost.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import OrderedDict
from typing import Any

from data_tools.index import ShardIndex, index_path, load_index, split_name

MAX_OPEN_FILES = 16
"""File descriptors kept open per reader (LRU); a rank's streams span a few shards at a time."""

INDEX_BYTES_PER_SAMPLE = 128
"""Estimate of one index entry in memory: two 8-byte ints and a short Python string."""


class CorruptSampleError(ValueError):
    """A sample's bytes do not parse as the tar members its index promises."""


def estimate_index_bytes(index: ShardIndex) -> int:
    return len(index) * INDEX_BYTES_PER_SAMPLE


class ShardReader:
    """Samples of ``urls`` (local shard files) by (shard, index in shard)."""

    def __init__(self, urls: list[str], index_budget: int):
        self.urls = urls
        self.index_budget = index_budget
        self.bytes_read = 0
        self._files: OrderedDict[int, int] = OrderedDict()
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()
        self._index_bytes = 0

    def index(self, shard: int) -> ShardIndex:
        """The index of shard ``shard`` (read, or built, on first use; least recently used ones evicted)."""
        if shard in self._indexes:
            self._indexes.move_to_end(shard)
            return self._indexes[shard]
        index = load_index(self.urls[shard])
        self.bytes_read += index_path(self.urls[shard]).stat().st_size
        self._indexes[shard] = index
        self._index_bytes += estimate_index_bytes(index)
        while self._index_bytes > self.index_budget and len(self._indexes) > 1:
            _, dropped = self._indexes.popitem(last=False)
            self._index_bytes -= estimate_index_bytes(dropped)
        return index

    def key(self, shard: int, index: int) -> str:
        return self.index(shard).keys[index]

    def _fd(self, shard: int) -> int:
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            self._files[shard] = os.open(self.urls[shard], os.O_RDONLY)
            if len(self._files) > MAX_OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
        return self._files[shard]

    def read(self, shard: int, index: int) -> dict[str, Any]:
        """Sample ``index`` of shard ``shard`` as webdataset gives it: ``__key__``, ``__url__``, one entry a member."""
        entry = self.index(shard)
        key, offset, length = entry.keys[index], entry.offsets[index], entry.lengths[index]
        data = os.pread(self._fd(shard), length, offset)
        self.bytes_read += len(data)
        sample: dict[str, Any] = {"__key__": key, "__url__": self.urls[shard]}
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
                for member in archive:
                    parts = split_name(member.name)
                    if member.isfile() and parts is not None and parts[0] == key:
                        sample[parts[1].lower()] = archive.extractfile(member).read()
        except tarfile.TarError as err:
            raise CorruptSampleError(f"bytes {offset}..{offset + length} of {self.urls[shard]} are not the tar "
                                     f"members of {key} ({err}); rebuild the index: python -m data_tools "
                                     "index --force") from err
        if len(sample) == 2:
            raise CorruptSampleError(f"no member of {key} at bytes {offset}..{offset + length} of "
                                     f"{self.urls[shard]}; rebuild the index: python -m data_tools index --force")
        return sample

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
