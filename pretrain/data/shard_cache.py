"""A node-local cache of whole remote shards, bounded in bytes, shared by every loader worker and rank of a node.

Why whole shards: the train reader fetches a sample by offset and length (the sample table);
against object storage one ranged GET per sample (~110 KB at ImageNet-21k) costs a request
each (14.2 M requests an epoch, each with tens of ms latency), while a 1 GB shard read front to back
takes 32 GETs of 32 MiB (``data_tools.storage.BLOCK``) at the link's rate. In window mode
(``data.window_samples``, ``pretrain.data.order``) a stream reads one window of consecutive
samples at a time, so the shards a node needs at once are bounded and each is fetched
about once per node and epoch.

How:

* ``<cache>/shards/<hash of url and version>-<name>``: a complete copy, written under a
  temporary name and renamed, so a reader never sees half a shard. The version (size and
  ETag or mtime, ``data_tools.storage.versions``) is part of the name: a rewritten remote
  shard is a new file.
* One fetch per shard and node: a process that misses takes the shard's lock file
  (``fcntl.flock``); the others wait on it and find the copy when it is released.
* In use = open: a reader holds a shared ``flock`` on each copy it has open (the train
  reader keeps descriptors of the shards it reads, ``pretrain.data.reader``). Before a
  download, copies are evicted least recently used first (mtime, touched at each open)
  until the new shard fits ``data.cache_limit_bytes``; a copy another process has open is
  never evicted (its exclusive ``flock`` would block). When the shards in use alone exceed
  the limit the cache grows past it and says so once; ``pretrain.preflight`` refuses a
  limit below the node's working set before launch.
* ``bytes_fetched`` counts what this process downloaded.

Cost at ImageNet-21k scale (1 GB shards, 14.2 M samples, 1,400 shards): an epoch downloads
the node's share once (1.4 TB over 1 node, 175 GB each over 8), 32 GETs a shard; the lock
and eviction scan are a few system calls per download, nothing per sample.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import Optional

from data_tools import storage

log = logging.getLogger(__name__)

CHUNK = 8 << 20
"""Bytes per read of a download's copy loop (the requests are ``data_tools.storage.BLOCK``)."""


class ShardCache:
    """Whole remote shards on local disk under ``root``, at most ``limit_bytes`` of them while not in use."""

    def __init__(self, root: Path, limit_bytes: int):
        self.dir = Path(root) / "shards"
        self.locks = self.dir / ".locks"
        self.limit = limit_bytes
        self.bytes_fetched = 0
        self._warned = False

    def path(self, url: str, version: str) -> Path:
        """Where the copy of ``url`` at ``version`` lives."""
        digest = hashlib.blake2b(f"{url}\0{version}".encode(), digest_size=8).hexdigest()
        return self.dir / f"{digest}-{url.rsplit('/', 1)[-1]}"

    def open(self, url: str, version: str, size: int) -> int:
        """A read-only descriptor of the local copy of ``url`` (fetched if missing), held in use until closed."""
        path = self.path(url, version)
        while True:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                fd = self._fetch(url, path, size)
                if fd is None:  # another process fetched it: open that copy
                    continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_nlink:  # not evicted between the open and the lock
                os.utime(fd)
                return fd
            os.close(fd)

    def _fetch(self, url: str, path: Path, size: int) -> Optional[int]:
        """Download ``url`` to ``path`` and return it open and in use; None when another process fetched it.

        The copy is locked in use before its rename: another process's eviction cannot remove it
        between the download and the first read."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with open(self.locks / f"{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.is_file():  # another worker or rank of this node fetched it while we waited
                return None
            self._make_room(size)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
            try:
                with storage.open_stream(url) as source, open(tmp, "xb") as sink:
                    while chunk := source.read(CHUNK):
                        sink.write(chunk)
                got = tmp.stat().st_size
                if got != size:
                    raise OSError(errno.EIO, f"{url} is {got:,} bytes, the sample table was built for {size:,}: "
                                             "the shard changed since launch; restart the run to re-check it")
                fd = os.open(tmp, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_SH)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self.bytes_fetched += size
            log.debug("fetched %s (%d bytes) into %s", url, size, path)
            return fd

    def _make_room(self, incoming: int) -> None:
        """Evict copies no process has open, least recently used first, until ``incoming`` bytes fit the limit."""
        with open(self.locks / "evict.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            copies = []
            for entry in os.scandir(self.dir):
                if entry.is_file() and not entry.name.startswith("."):
                    st = entry.stat()
                    copies.append((st.st_mtime_ns, entry.path, st.st_size))
            total = incoming + sum(size for _, _, size in copies)
            for _, path, size in sorted(copies):
                if total <= self.limit:
                    break
                if self._evict(path):
                    total -= size
            if total > self.limit and not self._warned:
                self._warned = True
                log.warning("the shard cache in %s holds %.1f GB of shards in use, over data.cache_limit_bytes="
                            "%d: raise it, or lower data.window_samples or the loader workers", self.dir,
                            total / 1e9, self.limit)

    @staticmethod
    def _evict(path: str) -> bool:
        """Remove ``path`` unless a reader holds it; True when removed."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
