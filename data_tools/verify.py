"""Re-read every shard of a shard directory and report what does not match its manifest.

Checked per shard: the file exists, its sha256 equals the one in ``_info.json``,
it reads as a tar (through webdataset, the reader training uses), it holds
``shard_lengths`` samples, and every sample has exactly one ``jpg|png|webp``
image that fully decodes and a ``cls`` label in ``range(len(classes.json))``.
Keys must be unique within a split.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import webdataset as wds
from PIL import Image

from .manifest import read_classes, read_info
from .writer import file_sha256

IMAGE_EXTS = ("jpg", "png", "webp")


def verify(out: Union[str, Path]) -> list[str]:
    """Problems found in ``out``, one line each naming the shard (and sample); empty when all is well."""
    out = Path(out)
    info = read_info(out)
    classes = read_classes(out)
    problems = []
    for split, entry in info["splits"].items():
        checksums = entry.get("sha256") or [None] * len(entry["filenames"])
        keys: set[str] = set()
        for name, length, checksum in zip(entry["filenames"], entry["shard_lengths"], checksums):
            problems += _verify_shard(out / name, length, checksum, classes, keys)
        if sum(entry["shard_lengths"]) != entry["num_samples"]:
            problems.append(f"split {split}: num_samples {entry['num_samples']} != sum of shard_lengths")
    return problems


def _verify_shard(path: Path, length: int, checksum: str | None, classes: list[str] | None,
                  keys: set[str]) -> list[str]:
    if not path.is_file():
        return [f"{path.name}: missing"]
    problems = []
    if checksum is not None and file_sha256(path) != checksum:
        problems.append(f"{path.name}: sha256 differs from _info.json (file changed or damaged)")
    count = 0
    try:
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            count += 1
            problems += [f"{path.name} sample {sample['__key__']}: {p}" for p in _sample_problems(sample, classes)]
            if sample["__key__"] in keys:
                problems.append(f"{path.name} sample {sample['__key__']}: key used twice in this split")
            keys.add(sample["__key__"])
    except Exception as err:  # a damaged tar header surfaces as tarfile/ValueError/OSError from the reader
        problems.append(f"{path.name}: unreadable after {count} samples: {err}")
    if count != length:
        problems.append(f"{path.name}: holds {count} samples, _info.json says {length}")
    return problems


def _sample_problems(sample: dict, classes: list[str] | None) -> list[str]:
    images = [ext for ext in IMAGE_EXTS if ext in sample]
    if len(images) != 1:
        return [f"expected one image (jpg|png|webp), found {images or 'none'}"]
    problems = []
    try:
        with Image.open(io.BytesIO(sample[images[0]])) as image:
            image.load()
    except Exception as err:  # PIL's decode errors have many types
        problems.append(f"image does not decode: {err}")
    label = sample.get("cls", b"").decode("ascii", "replace").strip()
    if not label.isdigit():
        problems.append(f"cls {label!r} is not an integer label")
    elif classes is not None and int(label) >= len(classes):
        problems.append(f"cls {label} is outside classes.json ({len(classes)} classes)")
    return problems
