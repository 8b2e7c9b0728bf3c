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
gigabyte. The shard's size is recorded: an index whose shard changed is stale and is
rebuilt rather than trusted. Members are grouped into samples as webdataset does
(key = path up to the first dot of the file name; consecutive members with one key).

Standard library only, like ``manifest``: the training stream imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tarfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .manifest import read_info, write_text_atomic

log = logging.getLogger(__name__)

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


def build_index(shard: PathLike) -> ShardIndex:
    """Index ``shard`` by reading its tar headers; raises ``ValueError`` naming the shard if it is no tar."""
    keys: list[str] = []
    offsets, lengths = array("q"), array("q")
    try:
        with tarfile.open(shard, "r:") as archive:
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
    return ShardIndex(keys, offsets, lengths, os.path.getsize(shard))


def write_index(shard: PathLike) -> ShardIndex:
    """Build the index of ``shard`` and write it beside the shard (atomically)."""
    index = build_index(shard)
    write_text_atomic(index_path(shard), index.to_text())
    return index


def read_index(shard: PathLike) -> ShardIndex | None:
    """The index beside ``shard``, or None when there is none or it is stale (the shard's size changed)."""
    path = index_path(shard)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 5 or " ".join(head[:2]) != _HEADER or head[2] != str(VERSION):
        raise ValueError(f"{path} is not a vitscale shard index (version {VERSION}): delete it and run "
                         f"`python -m data_tools index {Path(shard).parent}`")
    shard_bytes = int(head[3].removeprefix("bytes="))
    if shard_bytes != os.path.getsize(shard):
        return None
    keys, offsets, lengths = [], array("q"), array("q")
    for line in lines[1:]:
        offset, length, key = line.split("\t", 2)
        offsets.append(int(offset))
        lengths.append(int(length))
        keys.append(key)
    return ShardIndex(keys, offsets, lengths, shard_bytes)


def load_index(shard: PathLike) -> ShardIndex:
    """The shard's index, built and written first (logged) when it is missing or stale."""
    index = read_index(shard)
    if index is None:
        log.debug("building the sample index of %s (missing or stale; `python -m data_tools index` builds all "
                 "of them ahead of training)", shard)
        index = write_index(shard)
    return index


def index_directory(out: PathLike, force: bool = False) -> dict[str, int]:
    """Index every shard of every split in ``out/_info.json``; returns counts of built and kept indexes."""
    out = Path(out)
    counts = {"built": 0, "kept": 0}
    for split, entry in read_info(out)["splits"].items():
        for name, length in zip(entry["filenames"], entry["shard_lengths"]):
            shard = out / name
            index = None if force else read_index(shard)
            if index is None:
                index = write_index(shard)
                counts["built"] += 1
            else:
                counts["kept"] += 1
            if len(index) != length:
                raise ValueError(f"{shard} holds {len(index)} samples but {out}/_info.json says {length} "
                                 f"(split {split}): the shard or the manifest is damaged; run "
                                 "`python -m data_tools verify`")
    return counts


def register(commands: "argparse._SubParsersAction") -> None:
    """Add ``python -m data_tools index OUT [--force]``."""
    command = commands.add_parser("index", help="write each shard's sample index (key, byte offset, length)")
    command.add_argument("out", help="shard directory with _info.json")
    command.add_argument("--force", action="store_true", help="rebuild indexes that look current")


def run(args: argparse.Namespace) -> int:
    counts = index_directory(args.out, force=args.force)
    print(f"{args.out}: {counts['built']} shard indexes written, {counts['kept']} already current")
    return 0
