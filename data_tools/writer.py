"""Write one shard durably: tar members streamed through sha256, fsync, record, link, folder fsync.

Crash safety: the tar is written under ``<name>.<writer>.partial``; when it is complete
it is fsynced, its record (count, sha256, bytes, skipped images, stats) is saved in the
work folder, and only then is the tar linked under its final name and the folder fsynced.
So a final ``train-000003.tar`` always has a record and, once the link is durable,
its full content: without the fsync a node crash can leave a truncated or empty
file under the final name (the link reached the disk before the data). A resumed
conversion still re-checks the size and sha256 of every shard it keeps
(``shard_matches``), so a shard damaged by anything else is rewritten too.

Concurrency: two processes may write the same shard at once (a part rerun while its
first run is still alive, a SLURM requeue that overlaps the old task). Each writes its
own partial file, named by ``writer_id`` (host, pid, random), so their bytes never
interleave. The final name is taken with ``os.link``, which fails when the name exists:
the first complete shard wins and stays in place (a reader hashing it is never switched
to another file), and a later writer deletes its partial and keeps the winner's shard
and index. Both wrote the same bytes (conversion is deterministic), so the record either
one saved describes the winner; should they differ (the source changed mid-run), the
merge's sha256 check names the shard. A partial whose writer died stays behind:
``stale_partials`` says which ones are safe to delete.

The tar is written with ``tarfile.TarInfo.tobuf`` (the standard library's header
encoding) rather than ``tarfile.TarFile``, which keeps every member's header in memory
for the life of the archive, and so that the checksum is computed while writing
instead of by reading the shard back.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import tarfile
from array import array
from pathlib import Path

from .images import Prepared
from .index import ShardIndex, index_path
from .manifest import shard_glob, write_json_atomic, write_text_atomic
from .stats import SplitStats

TAR_MTIME = 0
"""Fixed member mtime, so the same input gives byte-identical shards."""
TAR_MODE = 0o444
PARTIAL_SUFFIX = ".partial"
"""Ends the name of a shard being written: ``<name>.<writer_id>.partial``."""


def record_path(work: Path, name: str) -> Path:
    return work / f"{name}.json"


def writer_id() -> str:
    """``host~pid~random``: unique per writer, and says where to look for the process that owns a partial."""
    return f"{socket.gethostname()}~{os.getpid()}~{secrets.token_hex(4)}"


def stale_partials(out: Path, split: str) -> list[Path]:
    """Partial shards of ``split`` whose writer is known to be dead: it ran on this host and its pid is gone.

    A partial written on another host is left alone: its writer may be alive, and this
    process cannot tell. The merge removes those (``convert``), once every part has ended.
    The host name stands for the pid namespace: containers that share a host name but
    not their pids (``docker --uts=host`` without ``--pid=host``) must not convert into
    one folder at once (SLURM, enroot and Apptainer share both).
    """
    host = socket.gethostname()
    stale = []
    for path in out.glob(shard_glob(split, f".*{PARTIAL_SUFFIX}")):
        writer = path.name[path.name.index(".tar.") + 5:-len(PARTIAL_SUFFIX)].split("~")
        if len(writer) == 3 and writer[0] == host and writer[1].isdigit() and not _running(int(writer[1])):
            stale.append(path)
    return stale


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class ShardSink:
    """One shard being written: add samples and skipped files, then ``commit``."""

    def __init__(self, out: Path, work: Path, name: str, planned: int) -> None:
        self.out, self.work, self.name, self.planned = out, work, name, planned
        self.partial = out / f"{name}.{writer_id()}{PARTIAL_SUFFIX}"
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

    def commit(self) -> bool:
        """Close the tar durably, save its record, link it under its final name, index it.

        Returns False when another writer had already committed this shard: this one's
        bytes are deleted and the other's shard, record and index kept (module docstring).
        The sample index (``data_tools.index``) comes from the offsets counted while writing,
        so the training reader never has to read this shard's headers back. It is written
        after the link: a crash in between leaves a shard without an index, which the
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
        final = self.out / self.name
        won = not final.exists() and self._link(final, record)
        self.partial.unlink()
        if won:
            index = ShardIndex(self.keys, self.offsets, self.lengths, self.size)
            write_text_atomic(index_path(final), index.to_text())  # fsyncs the folder: the link is durable too
        return won

    def _link(self, final: Path, record: dict) -> bool:
        """Save the record, then give the shard its final name unless another writer took it first."""
        write_json_atomic(record_path(self.work, self.name), record)
        try:
            os.link(self.partial, final)
        except FileExistsError:
            return False
        return True

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
