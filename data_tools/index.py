"""Per-shard sample index: each sample's ``__key__`` and the byte range of its tar members.

Beside ``train-000003.tar`` lies ``train-000003.tar.idx``, a text file::

    # vitscale-shard-index 1 bytes=<shard size> samples=<n>
    <offset>\t<length>\t<key>        (one line per sample, in tar order)

``offset`` is where the sample's first tar header starts and ``length`` runs to the
end of its last member's padded data, so one positioned read fetches the whole
sample (every member: image, ``cls``, ``json``), which the train reader parses as a
small tar. One read per sample, not one per member: at ImageNet-21k scale a
sample is ~110 KB and the ``cls`` member a few bytes, so a second read would
double the number of I/O requests for nothing.

The index is built from tar headers only (``tarfile`` seeks over member data), so
indexing a 1 GB shard of ~9,000 samples reads ~9,000 x 1.5 KB of headers, not the
gigabyte. Members are grouped into samples as webdataset does (key = path up to the
first dot of the file name; consecutive members with one key).

An index can go stale when its shard is rewritten or replaced. ``stale_reason`` checks
what is cheap to check and catches what happens: the shard's byte size (recorded in the
header) and the tar headers at the first and last sample's offsets, which must name
those samples' keys. Two reads of 2 KiB per shard; a shard swapped for another of the
same size (tar padding makes sizes repeat) names other keys there. Not caught: the same
keys, in the same places, with other bytes of the same length (a re-encode with equal
sizes), which the manifest's sha256 (``python -m data_tools verify``) catches.

Shards on object storage (``s3://``, ``gs://``, ``https://``, through ``data_tools.storage``) are
indexed the same way: the index is read from ``<url>.idx`` when one was uploaded beside the
shard, else built by one streaming read of the shard (``python -m data_tools index URL --out
DIR`` writes them to DIR for an ``aws s3 sync DIR URL``); the stale check is one size from the
listing and two ranged reads of 2 KiB.

Standard library only, like ``manifest``: the training stream imports it (``storage`` imports
fsspec on first use, for remote shards only).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import tarfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from . import storage
from .manifest import read_info, write_text_atomic

SUFFIX = ".idx"
VERSION = 1
_HEADER = "# vitscale-shard-index"
_BLOCK = 512
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
"""webdataset's ``base_plus_ext``: key and extension of a member name."""

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ShardIndex:
    """Keys, offsets and lengths of one shard's samples (tar order)."""

    keys: list[str]
    offsets: array
    lengths: array
    shard_bytes: int

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        """Bytes of the index file this index was read from (or would be written to)."""
        return len(self.to_text().encode())

    def to_text(self) -> str:
        lines = [f"{_HEADER} {VERSION} bytes={self.shard_bytes} samples={len(self.keys)}"]
        lines += [f"{o}\t{n}\t{k}" for o, n, k in zip(self.offsets, self.lengths, self.keys)]
        return "\n".join(lines) + "\n"


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name as webdataset groups them; None for names without an extension."""
    match = _KEY.match(name)
    return (match.group(1), match.group(2)) if match else None


def index_path(shard: PathLike) -> Path:
    """Where the index of ``shard`` lives (``<shard>.idx``)."""
    return Path(f"{os.fspath(shard)}{SUFFIX}")


def shard_size(shard: PathLike) -> int:
    """Bytes of a local or remote shard."""
    return storage.filesystem(shard).size(shard) if storage.is_remote(shard) else os.path.getsize(shard)


def _open_tar(shard: PathLike) -> tarfile.TarFile:
    """Local shards seek over member data; remote ones are read front to back (``storage.open_stream``)."""
    if storage.is_remote(shard):
        return tarfile.open(fileobj=storage.open_stream(os.fspath(shard)), mode="r|")
    return tarfile.open(shard, "r:")


def build_index(shard: PathLike) -> ShardIndex:
    """Index ``shard`` by reading its tar headers; raises ``ValueError`` naming the shard if it is no tar."""
    keys: list[str] = []
    offsets, lengths = array("q"), array("q")
    try:
        with _open_tar(shard) as archive:
            for member in archive:
                parts = split_name(member.name)
                if not member.isfile() or parts is None:
                    continue
                end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if keys and keys[-1] == parts[0]:
                    lengths[-1] = end - offsets[-1]
                else:
                    keys.append(parts[0])
                    offsets.append(member.offset)
                    lengths.append(end - member.offset)
    except tarfile.TarError as err:
        raise ValueError(f"{shard} is not a readable tar file ({err}); re-write it with `python -m data_tools "
                         "convert`") from err
    return ShardIndex(keys, offsets, lengths, shard_size(shard))


def read_index(shard: PathLike, path: PathLike | None = None) -> ShardIndex | None:
    """The index of ``shard`` stored at ``path`` (default: beside it), or None when there is none.

    Not checked against the shard: ``stale_reason`` does that. A remote shard's default is ``<url>.idx``."""
    if path is None and storage.is_remote(shard):
        path = f"{os.fspath(shard)}{SUFFIX}"
    path = path if isinstance(path, str) and storage.is_remote(path) else Path(path or index_path(shard))
    try:
        text = storage.read_bytes(path).decode() if isinstance(path, str) else path.read_text()
    except FileNotFoundError:
        return None
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 5 or " ".join(head[:2]) != _HEADER or head[2] != str(VERSION):
        raise ValueError(f"{path} is not a vitscale shard index (version {VERSION}): delete it and run "
                         f"`python -m data_tools index {Path(shard).parent}`")
    shard_bytes = int(head[3].removeprefix("bytes="))
    keys, offsets, lengths = [], array("q"), array("q")
    for line in lines[1:]:
        offset, length, key = line.split("\t", 2)
        offsets.append(int(offset))
        lengths.append(int(length))
        keys.append(key)
    return ShardIndex(keys, offsets, lengths, shard_bytes)


def _first_member_name(shard: PathLike, offset: int) -> str | None:
    """The name of the tar member whose header starts at ``offset`` (long-name and pax headers followed)."""
    if storage.is_remote(shard):
        head = storage.read_range(os.fspath(shard), offset, 4 * _BLOCK)
    else:
        with open(shard, "rb") as f:
            f.seek(offset)
            head = f.read(4 * _BLOCK)
    try:
        with tarfile.open(fileobj=io.BytesIO(head), mode="r:") as archive:
            member = archive.next()
    except (tarfile.TarError, EOFError):
        return None
    return member.name if member is not None else None


def stale_reason(shard: PathLike, index: ShardIndex) -> str | None:
    """Why ``index`` does not describe ``shard`` (its size, or the keys at its first and last sample), or None."""
    size = shard_size(shard)
    if index.shard_bytes != size:
        return f"the shard is {size:,} bytes, its index was built for {index.shard_bytes:,}"
    for i in sorted({0, len(index) - 1} if len(index) else set()):
        name = _first_member_name(shard, index.offsets[i])
        parts = split_name(name) if name is not None else None
        if parts is None or parts[0] != index.keys[i]:
            found = f"names {name!r}" if name is not None else "is no tar header"
            return f"the tar header at byte {index.offsets[i]:,} {found}, its index says sample {i} is {index.keys[i]!r}"
    return None


def index_directory(out: PathLike, force: bool = False) -> dict[str, int]:
    """Index every shard of every split in ``out/_info.json``; returns counts of built and kept indexes."""
    out = Path(out)
    return _index_splits(read_info(out), str(out), lambda name: (out / name, index_path(out / name)), force,
                         "`python -m data_tools verify`")


def index_remote(prefix: str, out: PathLike, force: bool = False) -> dict[str, int]:
    """Index every shard of a remote shard directory into the local folder ``out`` (one streaming read each).

    Object storage is not written: upload ``out``'s ``*.idx`` beside the shards (``aws s3 sync OUT
    s3://BUCKET/PREFIX``, ``gsutil rsync``) and training reads them instead of indexing each shard itself.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return _index_splits(storage.read_info(prefix), prefix,
                         lambda name: (storage.join(prefix, name), out / f"{name}{SUFFIX}"), force,
                         f"`python -m data_tools verify {prefix}`")


def _index_splits(info: dict, where: str, locate: Callable[[str], tuple[PathLike, Path]], force: bool,
                  verify: str) -> dict[str, int]:
    """Build (into the local path ``locate`` gives) each index of ``info`` that is missing, stale or ``force``d."""
    counts = {"built": 0, "kept": 0}
    for split, entry in info["splits"].items():
        for name, length in zip(entry["filenames"], entry["shard_lengths"]):
            shard, local = locate(name)
            index = None if force else read_index(shard, local)
            if index is None or stale_reason(shard, index) is not None:
                index = build_index(shard)
                write_text_atomic(local, index.to_text())
                counts["built"] += 1
            else:
                counts["kept"] += 1
            if len(index) != length:
                raise ValueError(f"{shard} holds {len(index)} samples but {where}/_info.json says {length} "
                                 f"(split {split}): the shard or the manifest is damaged; run {verify}")
    return counts


def register(commands: "argparse._SubParsersAction") -> None:
    """Add ``python -m data_tools index OUT [--force] [--out DIR]``."""
    command = commands.add_parser("index", help="write each shard's sample index (key, byte offset, length)")
    command.add_argument("out", help="shard directory with _info.json, or an s3://, gs://, https:// prefix")
    command.add_argument("--out", dest="local", help="for a remote prefix: the local folder the indexes go to "
                                                     "(object storage is not written; upload them with aws s3 sync)")
    command.add_argument("--force", action="store_true", help="rebuild indexes that look current")


def run(args: argparse.Namespace) -> int:
    if storage.is_remote(args.out):
        storage.require_backend(args.out, "the shard prefix")
        if not args.local:
            raise ValueError(f"{args.out} is remote and object storage is not written: give --out DIR, then "
                             f"upload DIR's *.idx beside the shards (e.g. `aws s3 sync DIR {args.out}`)")
        counts = index_remote(args.out, args.local, force=args.force)
        print(f"{args.out}: {counts['built']} shard indexes written to {args.local}, {counts['kept']} already "
              f"current; upload them beside the shards, e.g. `aws s3 sync {args.local} {args.out}`")
        return 0
    counts = index_directory(args.out, force=args.force)
    print(f"{args.out}: {counts['built']} shard indexes written, {counts['kept']} already current")
    return 0
