"""Re-read every shard of a shard directory and report what does not match its manifest.

Checked per shard: the file exists, its sha256 equals the one in ``_info.json``,
it reads as a tar (through webdataset, the reader training uses), it holds
``shard_lengths`` samples, and every sample has exactly one ``jpg|png|webp``
image that fully decodes and a ``cls`` label in ``range(len(classes.json))``.
Keys must be unique within a split.

Shards are checked in ``workers`` processes (one shard a task, results in manifest
order, so the report is the same for any worker count); the key check runs on the
keys the workers return. ``part=Part(i, n)`` checks only shards ``j % n == i`` of
every split, for a SLURM array: 14.2 M images take ~12 CPU-hours to decode, an hour
on 16 cores, minutes over 16 nodes. A part checks keys only among its own shards, and
that each shard's index (``index.py``) lists the keys the shard holds.

``verify_merge`` (``verify --merge``), run once after every part, checks what no part
can see: keys repeated across parts, and the split's counts (shard lengths adding up to
``num_samples``, as do the per-class counts). It reads the shards' indexes, not the
shards: at ImageNet-21k scale ~600 MB of index text instead of 1.3 TB, minutes on one CPU.

``out`` may be an ``s3://``, ``gs://`` or ``https://`` prefix (``data_tools.storage``): each shard
is then read once, front to back, in one sequential read that feeds the sha256 and the tar
reader together (local shards go the same way, one read each instead of two). ``verify_merge``
reads local indexes: run it where the converter wrote, before ``aws s3 sync``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import webdataset as wds  # imported before the pool forks: each worker would spend ~2 s importing torch
from PIL import Image, UnidentifiedImageError

from . import storage
from .index import build_index, index_path, read_index, stale_reason
from .manifest import read_classes, read_info
from .plan import Part

IMAGE_EXTS = ("jpg", "png", "webp")


class ShardJob(NamedTuple):
    """One shard to check (picklable for the workers)."""

    path: Union[Path, str]
    """A local file, or a remote URL."""
    length: int
    checksum: Optional[str]
    classes: Optional[list[str]]


def verify(out: Union[str, Path], workers: int = 1, part: Optional[Part] = None) -> list[str]:
    """Problems found in ``out``, one line each naming the shard (and sample); empty when all is well."""
    remote = storage.is_remote(str(out))
    out = str(out) if remote else Path(out)
    if remote:
        storage.require_backend(out, "the shard prefix")
    info = storage.read_info(out) if remote else read_info(out)
    classes = storage.read_classes(out) if remote else read_classes(out)

    def jobs(entry: dict) -> list[ShardJob]:
        checksums = entry.get("sha256") or [None] * len(entry["filenames"])
        return [ShardJob(storage.join(out, name) if remote else out / name, length, checksum, classes)
                for i, (name, length, checksum) in enumerate(zip(entry["filenames"], entry["shard_lengths"], checksums))
                if part is None or part.owns(i)]

    return _check_splits(info, jobs, check_shard, workers, counts=part is None)


def verify_merge(out: Union[str, Path], workers: int = 1) -> list[str]:
    """After ``verify --part`` runs: keys repeated across shards of a split, and its counts (module docstring).

    A shard's keys come from its index; one missing or stale (its shard's size or first
    and last keys differ) is rebuilt in memory from the tar headers, so a damaged index
    cannot hide a repeat. Problems are one line each, like ``verify``'s.
    """
    if storage.is_remote(str(out)):
        raise ValueError(f"verify --merge reads the shards' local indexes; {out} is remote: run it on the folder "
                         "the converter wrote, or `python -m data_tools verify` on the prefix")
    out = Path(out)
    return _check_splits(read_info(out), lambda entry: [ShardJob(out / name, length, None, None) for name, length
                                                        in zip(entry["filenames"], entry["shard_lengths"])],
                         indexed_keys, workers)


def _check_splits(info: dict, jobs: Callable[[dict], list[ShardJob]],
                  check: Callable[[ShardJob], tuple[list[str], np.ndarray]], workers: int, counts: bool = True
                  ) -> list[str]:
    """``check`` over each split's shard ``jobs`` on ``workers`` processes: the shards' problems, keys repeated
    across them and, with ``counts``, the split's totals against ``_info.json``."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    problems = []
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext()
    with pool as executor:
        for split, entry in info["splits"].items():
            split_jobs = jobs(entry)
            results = list((executor.map if executor else map)(check, split_jobs))
            for shard_problems, _ in results:
                problems += shard_problems
            problems += _duplicate_keys([(_name(job.path), keys) for job, (_, keys) in zip(split_jobs, results)])
            if counts:
                problems += _count_problems(split, entry)
    return problems


def indexed_keys(job: ShardJob) -> tuple[list[str], np.ndarray]:
    """The keys of one shard from its index (rebuilt from tar headers when missing or stale), and problems."""
    name = job.path.name
    if not job.path.is_file():
        return [f"{name}: missing"], np.array([], dtype="S1")
    try:
        index = read_index(job.path)
        if index is None or stale_reason(job.path, index) is not None:
            index = build_index(job.path)
    except ValueError as err:
        return [f"{name}: {err}"], np.array([], dtype="S1")
    return _length_problem(name, len(index), job.length), np.array([k.encode() for k in index.keys], dtype="S")


def _count_problems(split: str, entry: dict) -> list[str]:
    """The split's totals: shard lengths (and per-class counts, where recorded) add up to ``num_samples``."""
    total, problems = entry["num_samples"], []
    if len(entry["shard_lengths"]) != len(entry["filenames"]):
        problems.append(f"split {split}: {len(entry['filenames'])} filenames but {len(entry['shard_lengths'])} "
                        "shard_lengths in _info.json")
    if sum(entry["shard_lengths"]) != total:
        problems.append(f"split {split}: num_samples {total} != sum of shard_lengths ({sum(entry['shard_lengths'])})")
    classes = entry.get("stats", {}).get("class_counts")
    if classes is not None and sum(classes.values()) != total:
        problems.append(f"split {split}: num_samples {total} != sum of per-class counts ({sum(classes.values())})")
    return problems


def _length_problem(name: str, found: int, expected: int) -> list[str]:
    return [] if found == expected else [f"{name}: holds {found} samples, _info.json says {expected}"]


def _name(path: Union[Path, str]) -> str:
    return str(path).rsplit("/", 1)[-1]


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes what passes through it (one read of a shard for both checks)."""

    def __init__(self, stream):
        self.stream, self.digest = stream, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def hexdigest(self) -> str:
        while self.read(1 << 20):  # the tar reader stops at the end-of-archive blocks
            pass
        return self.digest.hexdigest()


def check_shard(job: ShardJob) -> tuple[list[str], np.ndarray]:
    """Problems of one shard and the keys it holds (run in a worker)."""
    name, remote = _name(job.path), storage.is_remote(str(job.path))
    if not (storage.exists(job.path) if remote else job.path.is_file()):
        return [f"{name}: missing"], np.array([], dtype="S1")
    problems, keys = [], []
    with storage.open_stream(job.path) if remote else open(job.path, "rb") as raw:
        stream = _Hashing(raw)
        try:
            files = wds.tariterators.tar_file_expander([{"url": str(job.path), "stream": stream}])
            for sample in wds.tariterators.group_by_keys(files):
                keys.append(sample["__key__"])
                problems += [f"{name} sample {sample['__key__']}: {p}" for p in _sample_problems(sample, job.classes)]
        except Exception as err:  # a damaged tar header surfaces as tarfile/ValueError/OSError from the reader
            problems.append(f"{name}: unreadable after {len(keys)} samples: {err}")
        if job.checksum is not None and stream.hexdigest() != job.checksum:
            problems.insert(0, f"{name}: sha256 differs from _info.json (file changed or damaged)")
    problems += _length_problem(name, len(keys), job.length)
    if not remote:  # remote indexes are checked against their shards by the sample table before training
        problems += _index_problem(job.path, keys)
    return problems, np.array([k.encode() for k in keys], dtype="S")


def _index_problem(path: Path, keys: list[str]) -> list[str]:
    """The shard's index, where there is one, must list the keys the shard holds (``verify_merge`` relies on it)."""
    fix = f"rebuild it with `python -m data_tools index {path.parent} --force`"
    try:
        index = read_index(path)
    except ValueError as err:
        return [f"{path.name}: {err}"]
    if index is None or index.keys == keys:
        return []
    return [f"{path.name}: its index {index_path(path).name} lists other keys than the shard holds: {fix}"]


def _duplicate_keys(shard_keys: list[tuple[str, np.ndarray]]) -> list[str]:
    """A line for every repeat of a key after its first occurrence (in manifest order).

    Keys travel and are compared as fixed-width byte arrays (24 bytes a key, ~0.5 GB
    for 14.2 M keys with the sort), not as a set of Python strings (~1.5 GB).
    """
    arrays = [keys for _, keys in shard_keys if len(keys)]
    if not arrays:
        return []
    keys = np.concatenate([a.astype(f"S{max(k.dtype.itemsize for k in arrays)}") for a in arrays])
    names = [name for name, k in shard_keys if len(k)]
    shard = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])
    order = np.argsort(keys, kind="stable")
    repeats = np.sort(order[np.flatnonzero(keys[order][1:] == keys[order][:-1]) + 1])
    return [f"{names[shard[i]]} sample {keys[i].decode()}: key used twice in this split" for i in repeats.tolist()]


def _sample_problems(sample: dict, classes: list[str] | None) -> list[str]:
    images = [ext for ext in IMAGE_EXTS if ext in sample]
    if len(images) != 1:
        return [f"expected one image (jpg|png|webp), found {images or 'none'}"]
    problems = []
    try:
        with Image.open(io.BytesIO(sample[images[0]])) as image:
            image.load()
    except UnidentifiedImageError:  # its message holds a memory address: keep reports comparable
        problems.append("image does not decode: PIL cannot identify the format")
    except Exception as err:  # PIL's decode errors have many types
        problems.append(f"image does not decode: {err}")
    label = sample.get("cls", b"").decode("ascii", "replace").strip()
    if not label.isdigit():
        problems.append(f"cls {label!r} is not an integer label")
    elif classes is not None and int(label) >= len(classes):
        problems.append(f"cls {label} is outside classes.json ({len(classes)} classes)")
    return problems
