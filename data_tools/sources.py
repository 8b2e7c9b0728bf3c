"""List the images of a source dataset: ImageFolder tree, per-class tar files, or a CSV/TSV list.

Listing only reads directory entries and tar headers, never image data: the
workers read and check the bytes. Every file is named by a source-relative path
``<class>/<file>`` (for a class tar ``n01440764.tar`` holding ``x.JPEG`` that is
``n01440764/x.JPEG``, the same name it has once unpacked), from which the sample
key is derived. Problems found while listing (an empty class folder, an unreadable
tar, a bad CSV row, a missing file) are returned, not raised, and end up in
``_errors.jsonl``.

The files are kept in columns (``FileTable``), not one Python object each:
ImageNet-21k lists 14.2 M files, and a tuple of five Python objects per file costs
about 300 bytes (4 GB), columns about 30 bytes plus the name (about 60 bytes a file,
0.9 GB; ``benchmarks/convert_throughput.py --scale`` measures it).
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import tarfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

FORMATS = ("imagefolder", "classtars", "csv")
NAME_ENCODING = ("utf-8", "surrogateescape")
"""File names are stored as bytes; undecodable file-system names survive the round trip."""


class FileTable:
    """Listed files as columns: names (one byte string plus end offsets), label, size, container, offset.

    ``label`` indexes ``Listing.class_names``; ``container`` indexes ``Listing.containers``
    (-1 for a plain file) and ``offset`` is where the image bytes start inside it.
    ``array`` columns grow in place, and ``columns()`` views them as numpy arrays without a copy.
    """

    def __init__(self) -> None:
        self.names = bytearray()
        self.name_ends, self.sizes, self.offsets = array("q"), array("q"), array("q")
        self.labels, self.containers = array("i"), array("i")

    def add(self, name: str, label: int, size: int, container: int = -1, offset: int = -1) -> None:
        self.names += name.encode(*NAME_ENCODING)
        self.name_ends.append(len(self.names))
        self.labels.append(label)
        self.sizes.append(size)
        self.containers.append(container)
        self.offsets.append(offset)

    def __len__(self) -> int:
        return len(self.name_ends)

    def columns(self) -> dict[str, np.ndarray]:
        """Zero-copy numpy views: ``name_end``, ``label``, ``size``, ``container``, ``offset``."""
        return {"name_end": _view(self.name_ends, np.int64), "label": _view(self.labels, np.int32),
                "size": _view(self.sizes, np.int64), "container": _view(self.containers, np.int32),
                "offset": _view(self.offsets, np.int64)}


def _view(column: array, dtype: type) -> np.ndarray:
    return np.frombuffer(column, dtype=dtype) if len(column) else np.zeros(0, dtype)


@dataclass
class Listing:
    """What a source holds: its root, files, class names, containers and listing problems."""

    root: Path
    """Directory that plain file names and ``containers`` are relative to."""
    files: FileTable
    class_names: list[str]
    """Classes seen in the source (``FileTable.labels`` index it), including empty class folders."""
    containers: list[str] = field(default_factory=list)
    """Class tars (relative to ``root``) that ``FileTable.containers`` index."""
    problems: list[dict] = field(default_factory=list)


def detect_format(source: Path) -> str:
    """``csv`` for a file, ``classtars`` for a directory of ``*.tar`` files, else ``imagefolder``."""
    if source.is_file():
        return "csv"
    with os.scandir(source) as entries:
        kinds = {(e.is_dir(), e.name.endswith(".tar")) for e in entries if not e.name.startswith(".")}
    return "classtars" if (False, True) in kinds and not any(is_dir for is_dir, _ in kinds) else "imagefolder"


def list_source(source: Path, fmt: Optional[str] = None) -> Listing:
    """List ``source`` read as ``fmt`` (detected when None); duplicates are found by the plan."""
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown source format {fmt!r}: use one of {', '.join(FORMATS)}")
    return {"imagefolder": _list_imagefolder, "classtars": _list_classtars, "csv": _list_csv}[fmt](source)


def _list_imagefolder(root: Path) -> Listing:
    if not root.is_dir():
        raise NotADirectoryError(f"ImageFolder source {root} is not a directory (expected root/<class>/<image>)")
    files, problems, classes = FileTable(), [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():
            problems.append({"path": entry.name, "reason": "not in a class folder (expected root/<class>/<image>)"})
            continue
        label, found = len(classes), 0
        classes.append(entry.name)
        for dirpath, _, names in os.walk(entry.path, followlinks=True):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                try:
                    files.add(rel, label, os.stat(root / rel).st_size)
                    found += 1
                except OSError as err:  # e.g. a dangling symlink
                    problems.append({"path": rel, "reason": f"cannot read file: {err.strerror}"})
        if not found:
            problems.append({"path": entry.name + "/", "reason": "empty class folder (class kept in classes.json)"})
    return Listing(root, files, classes, problems=problems)


def _list_classtars(root: Path) -> Listing:
    if not root.is_dir():
        raise NotADirectoryError(f"class-tar source {root} is not a directory (expected root/<class>.tar)")
    files, problems, classes = FileTable(), [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.name.endswith(".tar"):
            problems.append({"path": entry.name, "reason": "not a .tar file (expected root/<class>.tar)"})
            continue
        name, label, found = entry.name[: -len(".tar")], len(classes), 0
        classes.append(name)
        try:
            with tarfile.open(entry.path, "r:") as archive:
                for member in archive:
                    if member.isfile():
                        rel = f"{name}/{posixpath.normpath(member.name)}"  # "./x.JPEG" -> "x.JPEG"
                        files.add(rel, label, member.size, label, member.offset_data)
                        found += 1
        except (tarfile.TarError, OSError) as err:
            problems.append({"path": entry.name, "reason": f"unreadable tar, rest of it skipped: {err}"})
        if not found:
            problems.append({"path": entry.name, "reason": "class tar holds no files (class kept in classes.json)"})
    return Listing(root, files, classes, [f"{c}.tar" for c in classes], problems)


def _list_csv(path: Path) -> Listing:
    """``path,label`` rows (tab-separated for ``.tsv``); paths relative to the list's folder."""
    if not path.is_file():
        raise FileNotFoundError(f"CSV source {path} is not a file (expected lines 'path,label')")
    root = path.parent
    files, problems, labels = FileTable(), [], {}
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
            files.add(rel, labels.setdefault(label, len(labels)), size)
    return Listing(root, files, list(labels), problems=problems)


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
