"""Read and write the files that describe a shard directory.

A shard directory holds, next to the ``{split}-{000000..N}.tar`` shards:

- ``_info.json`` in timm's webdataset-reader layout, ``{"name", "splits": {split:
  {"name", "filenames", "shard_lengths", "num_samples"}}}``. Each split entry also
  carries ``sha256`` (one hex digest per shard, same order as ``filenames``),
  ``plan_sha256`` (identifies the conversion that wrote it, so a rerun can tell
  "already done" from "a different dataset") and ``stats`` (bytes, samples per
  class, image sizes, skipped count). timm reads only the keys it knows, so the
  extras keep it compatible.
- ``classes.json``: a JSON list, label index -> class name (WordNet id for ImageNet).
- ``_errors.jsonl``: one JSON object per skipped source item (``split``, ``path``, ``reason``).
- ``.manifest.lock``, only while one of the three files above is read, changed and written
  back (``manifest_lock``): two splits merged at once (two jobs, two nodes) would otherwise
  both read the old ``_info.json``, and the last to write would drop the other's split.

The training stream imports this module, so it depends on the standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Iterator, NamedTuple, Optional, Union

from .lockfile import hold

INFO_FILE = "_info.json"
CLASSES_FILE = "classes.json"
ERRORS_FILE = "_errors.jsonl"
LOCK_FILE = ".manifest.lock"

PathLike = Union[str, os.PathLike]


class SplitFiles(NamedTuple):
    """One split of a shard directory: shard paths, samples per shard, class names."""

    shards: list[Path]
    lengths: list[int]
    classes: Optional[list[str]]
    """Label index -> class name from ``classes.json``; None when the directory has none."""


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split`` (``train-000003.tar``)."""
    return f"{split}-{index:06d}.tar"


def shard_glob(split: str, suffix: str = "") -> str:
    """Glob of ``split``'s shard names (``shard_name``) plus ``suffix``: exactly six digits, so split ``val``'s
    pattern never matches split ``val-hard``'s files (a cleanup of one split must not touch another's)."""
    return f"{split}-{'[0-9]' * 6}.tar{suffix}"


@contextlib.contextmanager
def atomic_writer(path: Path, binary: bool = False) -> Iterator[IO]:
    """A file handle whose content appears at ``path`` only once complete, durably.

    Written under a random temporary name in the same folder, so several processes,
    on several nodes, may write the same file at once (the parts of a conversion all
    write the same plan): each rename is atomic and the last one wins. (Not
    ``tempfile.mkstemp``: its files are private to the owner, and a shared dataset must
    keep the umask's permissions.) The data is fsynced before the rename and the folder
    after it: otherwise a node crash soon after can leave an empty or truncated file
    under the final name (ext4 and XFS may persist the rename before the data), or lose
    the rename. Checkpoint markers and ``latest`` pointers rely on this too.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "xb" if binary else "x") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make the entries (creations, renames) of ``folder`` durable."""
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that readers never see half a file, even after a crash (``atomic_writer``)."""
    with atomic_writer(path) as handle:
        handle.write(text)


def write_json_atomic(path: Path, data: object) -> None:
    """``data`` as indented JSON, written atomically (``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def read_info(out: PathLike) -> dict:
    """The parsed ``_info.json`` of shard directory ``out``."""
    path = Path(out) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {out} is not a converted shard directory "
            "(write one with `python -m data_tools convert SOURCE OUT`)"
        )
    info = json.loads(path.read_text())
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise ValueError(f"{path} is not in timm's layout: expected {{'name', 'splits': {{split: ...}}}}")
    return info


def read_classes(out: PathLike) -> Optional[list[str]]:
    """``classes.json`` of ``out`` as a list indexed by label, or None when there is none."""
    path = Path(out) / CLASSES_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        return [str(data[str(i)]) for i in range(len(data))]
    return [str(name) for name in data]


def read_split(out: PathLike, split: str) -> SplitFiles:
    """Shard files, their sample counts and the class names of ``split`` in ``out``."""
    out = Path(out)
    splits = read_info(out)["splits"]
    if split not in splits:
        raise KeyError(f"{out / INFO_FILE} has no split {split!r}; it has {sorted(splits)}")
    entry = splits[split]
    return SplitFiles([out / name for name in entry["filenames"]], list(entry["shard_lengths"]), read_classes(out))


@contextlib.contextmanager
def manifest_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.manifest.lock`` (``lockfile.hold``); on entry, delete the temporary files of a killed holder.

    Only the holder writes ``_info.json``, ``_errors.jsonl`` and ``classes.json``, so
    their temporary files found by the next holder are a killed writer's. A holder killed
    with the lock keeps the next merge waiting ``lockfile.STALE_S``. Not reentrant: one
    ``with`` per update.
    """
    with hold(out / LOCK_FILE):
        for name in (INFO_FILE, ERRORS_FILE, CLASSES_FILE):
            for tmp in out.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        yield


def write_split(out: Path, split: str, entry: dict, name: str) -> None:
    """Add or replace ``split`` in ``out/_info.json``, keeping the other splits (under ``manifest_lock``)."""
    path = out / INFO_FILE
    with manifest_lock(out):
        info = read_info(out) if path.is_file() else {"name": name, "splits": {}}
        info["splits"][split] = entry
        write_json_atomic(path, info)


def write_classes(out: Path, classes: list[str]) -> None:
    """Write ``classes.json`` unless a concurrent part already has (every part plans the same classes)."""
    with manifest_lock(out):
        if not (out / CLASSES_FILE).is_file():
            write_json_atomic(out / CLASSES_FILE, classes)


def read_errors(out: PathLike) -> list[dict]:
    """All entries of ``out/_errors.jsonl`` (empty when nothing was skipped)."""
    path = Path(out) / ERRORS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_errors(out: Path, split: str, errors: list[dict]) -> None:
    """Replace ``split``'s entries in ``out/_errors.jsonl``, keeping the other splits' (under ``manifest_lock``)."""
    with manifest_lock(out):
        kept = [e for e in read_errors(out) if e.get("split") != split]
        lines = [json.dumps(e) for e in kept + [{"split": split, **e} for e in errors]]
        write_text_atomic(out / ERRORS_FILE, "".join(line + "\n" for line in lines))
