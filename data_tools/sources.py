"""List the images of a source dataset: ImageFolder tree, per-class tar files, or a CSV/TSV list.

Listing only reads directory entries and tar headers, never image data: the
workers read and check the bytes. Every item is named by a source-relative path
``<class>/<file>`` (for a class tar ``n01440764.tar`` holding ``x.JPEG`` that is
``n01440764/x.JPEG``, the same name it has once unpacked), from which the sample
key is derived. Problems found while listing (an empty class folder, an unreadable
tar, a bad CSV row, a missing file) are returned, not raised, and end up in
``_errors.jsonl``.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

FORMATS = ("imagefolder", "classtars", "csv")


class Item(NamedTuple):
    """One source image (a NamedTuple: ImageNet-21k has 14 million of them)."""

    rel: str
    """Source-relative name ``<class>/<file>``; the key is derived from it and errors name it."""
    label: str
    """Class name; turned into an index with the class list."""
    size: int
    """Bytes of the source file (from the listing, used to plan shards by size)."""
    container: str = ""
    """Tar file (relative to the source root) holding the image, "" for a plain file."""
    offset: int = -1
    """Offset of the image bytes inside ``container``."""


@dataclass
class Listing:
    """What a source holds: its root, images, class names and listing problems."""

    root: Path
    """Directory that ``Item.rel`` (plain files) and ``Item.container`` are relative to."""
    items: list[Item]
    class_names: list[str]
    """Classes seen in the source, including empty class folders."""
    problems: list[dict] = field(default_factory=list)


def detect_format(source: Path) -> str:
    """``csv`` for a file, ``classtars`` for a directory of ``*.tar`` files, else ``imagefolder``."""
    if source.is_file():
        return "csv"
    with os.scandir(source) as entries:
        kinds = {(e.is_dir(), e.name.endswith(".tar")) for e in entries if not e.name.startswith(".")}
    return "classtars" if (False, True) in kinds and not any(is_dir for is_dir, _ in kinds) else "imagefolder"


def list_source(source: Path, fmt: Optional[str] = None) -> Listing:
    """List ``source`` read as ``fmt`` (detected when None), items sorted by name."""
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown source format {fmt!r}: use one of {', '.join(FORMATS)}")
    listing = {"imagefolder": _list_imagefolder, "classtars": _list_classtars, "csv": _list_csv}[fmt](source)
    items = sorted(listing.items)
    counts = Counter(item.rel for item in items)  # a CSV naming a file twice, a tar holding a name twice
    listing.problems += [{"path": rel, "reason": f"duplicate entry: listed {n} times, first one kept"}
                         for rel, n in sorted(counts.items()) if n > 1]
    listing.items = [item for i, item in enumerate(items) if i == 0 or item.rel != items[i - 1].rel]
    return listing


def _list_imagefolder(root: Path) -> Listing:
    if not root.is_dir():
        raise NotADirectoryError(f"ImageFolder source {root} is not a directory (expected root/<class>/<image>)")
    items, problems, classes = [], [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():
            problems.append({"path": entry.name, "reason": "not in a class folder (expected root/<class>/<image>)"})
            continue
        classes.append(entry.name)
        found = 0
        for dirpath, _, files in os.walk(entry.path, followlinks=True):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                try:
                    items.append(Item(rel, entry.name, os.stat(root / rel).st_size))
                    found += 1
                except OSError as err:  # e.g. a dangling symlink
                    problems.append({"path": rel, "reason": f"cannot read file: {err.strerror}"})
        if not found:
            problems.append({"path": entry.name + "/", "reason": "empty class folder (class kept in classes.json)"})
    return Listing(root, items, classes, problems)


def _list_classtars(root: Path) -> Listing:
    if not root.is_dir():
        raise NotADirectoryError(f"class-tar source {root} is not a directory (expected root/<class>.tar)")
    items, problems, classes = [], [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.name.endswith(".tar"):
            problems.append({"path": entry.name, "reason": "not a .tar file (expected root/<class>.tar)"})
            continue
        name = entry.name[: -len(".tar")]
        classes.append(name)
        found = 0
        try:
            with tarfile.open(entry.path, "r:") as archive:
                for member in archive:
                    if member.isfile():
                        rel = f"{name}/{posixpath.normpath(member.name)}"  # "./x.JPEG" -> "x.JPEG"
                        items.append(Item(rel, name, member.size, entry.name, member.offset_data))
                        found += 1
        except (tarfile.TarError, OSError) as err:
            problems.append({"path": entry.name, "reason": f"unreadable tar, rest of it skipped: {err}"})
        if not found:
            problems.append({"path": entry.name, "reason": "class tar holds no files (class kept in classes.json)"})
    return Listing(root, items, classes, problems)


def _list_csv(path: Path) -> Listing:
    """``path,label`` rows (tab-separated for ``.tsv``); paths relative to the list's folder."""
    if not path.is_file():
        raise FileNotFoundError(f"CSV source {path} is not a file (expected lines 'path,label')")
    root = path.parent
    items, problems = [], []
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheet BOMs
        for line, row in enumerate(csv.reader(handle, delimiter=delimiter), start=1):
            if line == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
                continue
            where = f"{path.name}:{line}"
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                problems.append({"path": where, "reason": f"expected 2 fields 'path{delimiter}label', got {row!r}"})
                continue
            rel, label = row[0].strip(), row[1].strip()
            try:
                size = os.stat(root / rel).st_size
            except OSError as err:
                problems.append({"path": rel, "reason": f"cannot read file: {err.strerror}"})
                continue
            items.append(Item(rel, label, size))
    labels = sorted({item.label for item in items})
    return Listing(root, items, labels, problems)


def read_bytes(root: Path, item: Item) -> bytes:
    """The source bytes of ``item`` (seeking into its class tar, nothing unpacked to disk)."""
    if not item.container:
        return (root / item.rel).read_bytes()
    with open(root / item.container, "rb") as handle:
        handle.seek(item.offset)
        return handle.read(item.size)


def load_class_map(path: Path) -> list[str]:
    """Class names by label index from a class-map file.

    Accepted: a JSON list (``classes.json``), a JSON object ``{name: index}`` or
    ``{"index": name}``, or a text file with one name per line (the 21k synset lists).
    """
    if not path.is_file():
        raise FileNotFoundError(f"class map {path} does not exist")
    if path.suffix.lower() != ".json":
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        data = json.loads(path.read_text())
        if isinstance(data, list):
            names = [str(n) for n in data]
        elif isinstance(data, dict) and all(str(k).isdigit() for k in data):
            names = _by_index({int(k): str(v) for k, v in data.items()}, path)
        elif isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
            names = _by_index({v: str(k) for k, v in data.items()}, path)
        else:
            raise ValueError(f"class map {path}: expected a list of names, {{name: index}} or {{'index': name}}")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"class map {path} names these classes more than once: {duplicates[:5]}")
    if not names:
        raise ValueError(f"class map {path} is empty")
    return names


def _by_index(mapping: dict[int, str], path: Path) -> list[str]:
    if sorted(mapping) != list(range(len(mapping))):
        raise ValueError(f"class map {path}: indices must be 0..{len(mapping) - 1} without gaps or repeats")
    return [mapping[i] for i in range(len(mapping))]


def sorted_class_names(names: list[str]) -> list[str]:
    """Class names in label order: sorted by name, numerically when every name is an integer."""
    unique = set(names)
    if unique and all(n.isdigit() for n in unique):
        return sorted(unique, key=int)
    return sorted(unique)
