"""Write one shard durably: tar members streamed through sha256, fsync, record, rename, folder fsync.

Crash safety: the tar is written under ``<name>.partial``; when it is complete it is
fsynced, its record (count, sha256, bytes, skipped images, stats) is saved in the work
folder, and only then is the tar renamed to its final name and the folder fsynced.
So a final ``train-000003.tar`` always has a record and, once the rename is durable,
its full content: without the fsync a node crash can leave a truncated or empty
file under the final name (the rename reached the disk before the data). A resumed
conversion still re-checks the size and sha256 of every shard it keeps
(``shard_matches``), so a shard damaged by anything else is rewritten too.

The tar is written with ``tarfile.TarInfo.tobuf`` (the standard library's header
encoding) rather than ``tarfile.TarFile``, which keeps every member's header in memory
for the life of the archive, and so that the checksum is computed while writing
instead of by reading the shard back.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from array import array
from pathlib import Path

from .images import Prepared
from .index import ShardIndex, index_path
from .manifest import fsync_dir, write_json_atomic, write_text_atomic
from .stats import SplitStats

TAR_MTIME = 0
"""Fixed member mtime, so the same input gives byte-identical shards."""
TAR_MODE = 0o444


def record_path(work: Path, name: str) -> Path:
    return work / f"{name}.json"


class ShardSink:
    """One shard being written: add samples and skipped files, then ``commit``."""

    def __init__(self, out: Path, work: Path, name: str, planned: int) -> None:
        self.out, self.work, self.name, self.planned = out, work, name, planned
        self.partial = out / f"{name}.partial"
        self.handle = open(self.partial, "wb")
        self.digest = hashlib.sha256()
        self.size = 0
        self.stats = SplitStats()
        self.errors: list[dict] = []
        self.keys: list[str] = []
        self.offsets, self.lengths = array("q"), array("q")

    def add(self, key: str, image: Prepared, label: int, name: str) -> None:
        meta = json.dumps({"path": name, "width": image.width, "height": image.height}).encode()
        start = self.size
        for ext, payload in ((image.ext, image.data), ("cls", str(label).encode()), ("json", meta)):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), TAR_MTIME, TAR_MODE
            self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            self._write(payload)
            self._write(tarfile.NUL * (-len(payload) % tarfile.BLOCKSIZE))
        self.keys.append(key)
        self.offsets.append(start)
        self.lengths.append(self.size - start)
        self.stats.add(label, image.width, image.height, len(image.data), image.reencoded)

    def skip(self, name: str, reason: str) -> None:
        self.errors.append({"path": name, "reason": reason})

    def commit(self) -> dict:
        """Close the tar durably, save its record, move it to its final name, index it; return the record.

        The sample index (``data_tools.index``) comes from the offsets counted while writing,
        so the training reader never has to read this shard's headers back. It is written
        after the rename: a crash in between leaves a shard without an index, which the
        reader builds on first use.
        """
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        self._write(tarfile.NUL * (-self.size % tarfile.RECORDSIZE))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        record = {"name": self.name, "planned": self.planned, "num_samples": self.stats.samples,
                  "sha256": self.digest.hexdigest(), "bytes": self.size, "errors": self.errors,
                  "stats": self.stats.to_dict()}
        write_json_atomic(record_path(self.work, self.name), record)
        os.replace(self.partial, self.out / self.name)
        index = ShardIndex(self.keys, self.offsets, self.lengths, self.size)
        write_text_atomic(index_path(self.out / self.name), index.to_text())
        fsync_dir(self.out)
        return record

    def _write(self, data: bytes) -> None:
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)


def shard_matches(path: Path, record_file: Path) -> bool:
    """Whether the shard at ``path`` has the size and sha256 its record says (run in a worker)."""
    try:
        record = json.loads(record_file.read_text())
        return path.stat().st_size == record["bytes"] and file_sha256(path) == record["sha256"]
    except (OSError, ValueError, KeyError):
        return False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
