"""Write one planned shard: the job each worker process runs.

Crash safety: the tar is written under ``<name>.partial``; when it is complete
its record (count, sha256, skipped images, stats) is saved in the work folder and
only then is the tar renamed to its final name. So a final ``train-000003.tar``
always has a record and is never half-written; a kill at any moment leaves at
most a ``.partial`` file, which the rerun overwrites.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import webdataset as wds

from .images import BadImage, prepare
from .manifest import write_json_atomic
from .sources import Item, read_bytes
from .stats import SplitStats

TAR_MTIME = 0
"""Fixed member mtime, so the same input gives byte-identical shards."""


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard (picklable)."""

    out: Path
    work: Path
    """Folder of per-shard records for this split."""
    root: Path
    name: str
    samples: list[tuple[str, int, Item]]
    resize_max: Optional[int]
    quality: int


def record_path(work: Path, name: str) -> Path:
    return work / f"{name}.json"


def write_shard(task: ShardTask) -> dict:
    """Write ``task.name`` and return its record (also saved in ``task.work``)."""
    partial = task.out / f"{task.name}.partial"
    stats, errors = SplitStats(), []
    with wds.TarWriter(str(partial), encoder=False, mtime=TAR_MTIME) as sink:
        for key, label, item in task.samples:
            try:
                image = prepare(read_bytes(task.root, item), task.resize_max, task.quality)
            except BadImage as err:
                errors.append({"path": item.rel, "reason": str(err)})
                continue
            except OSError as err:
                errors.append({"path": item.rel, "reason": f"cannot read file: {err}"})
                continue
            meta = {"path": item.rel, "width": image.width, "height": image.height}
            sink.write({"__key__": key, image.ext: image.data, "cls": str(label).encode(),
                        "json": json.dumps(meta).encode()})
            stats.add(label, image.width, image.height, len(image.data), image.reencoded)
    record = {"name": task.name, "planned": len(task.samples), "num_samples": stats.samples,
              "sha256": file_sha256(partial), "bytes": partial.stat().st_size,
              "errors": errors, "stats": stats.to_dict()}
    write_json_atomic(record_path(task.work, task.name), record)
    os.replace(partial, task.out / task.name)
    return record


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
