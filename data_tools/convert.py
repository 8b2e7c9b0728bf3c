"""Convert a source dataset into one split of webdataset shards: plan once, write in waves, resume, manifest.

Order of work, chosen so that a kill at any point loses at most the shards being
written:

1. Check arguments, the source and the output (missing source, unwritable output,
   an output holding a different dataset: clear error, nothing written).
2. Plan, once: the first process to get ``OUT/_work/<split>/plan.lock`` lists the
   source and writes the plan (``plan.py``, ``planfile.py``); every later process
   (the other parts of a SLURM array, a resumed run, the merge) reads it, and a part
   reads only its own shards' rows. Also ``classes.json``.
3. Re-check the size and sha256 of the shards already there (a killed earlier run's),
   rewrite any that do not match, and write the missing ones in waves over ``workers``
   processes, each class tar read sequentially once per wave (``reads.py``,
   ``pipeline.py``, ``writer.py``: fsync before rename).
4. Last, write ``_errors.jsonl`` and the split's entry in ``_info.json`` (with the
   settings, so a rerun answers "done" without listing), and drop the work folder. A
   split present in ``_info.json`` is complete.

Splitting the work over independent processes or nodes (a SLURM array,
``launch/convert.sh``): every part runs the same command with ``part=Part(i, n)``
(``--part i/n``), writes only its shards (index % n == i) and stops after step 3,
keeping the work folder. Then the same command with ``merge=True`` (``--merge``)
writes no image: it checks that every planned shard is there with the size and sha256
its part recorded (naming the missing or changed ones otherwise) and does step 4. The
merge is a separate flag, not "the command without ``--part``", because that command
converts whatever is missing in one process, which is the right way to finish a
single-process run but would silently turn a failed part of a 21k-class conversion
into hours of work on one node.

Cost at ImageNet-21k scale (14.2 M files, 21,841 tars, 64 parts): the source is listed
once (14.2 M tar headers, not 64 x 14.2 M = 909 M), by one part while the others wait;
a part reads ~1/64 of the 0.9 GB plan; each tar is opened at most 4 times per part.
The plan records the settings: a part or merge run with other settings is refused.
The plan is a snapshot of the source: files added after it was made are not converted
(delete ``OUT/_work/<split>`` to plan again).

Concurrency: parts may overlap (a part rerun while its first run still lives): every
writer has its own partial file and the first complete shard keeps the final name
(``writer.py``). Splits may be merged at once: ``_info.json`` and ``_errors.jsonl`` are
updated under ``manifest.manifest_lock``. What a killed process leaves behind is
deleted where that is safe: partial shards of a dead process of this host when a part
starts; every partial shard and index temporary file of the split when the work folder
is dropped (the merge runs once every part has ended, so no writer is left);
temporary manifest files by the next holder of the manifest lock; a killed planner's
temporary plan files by the next planner (``planfile.py``).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import time
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import numpy as np
from tqdm import tqdm

from .manifest import (CLASSES_FILE, ERRORS_FILE, INFO_FILE, read_classes, read_info, shard_glob, shard_name,
                       write_classes, write_errors, write_split)
from .pipeline import run_tasks
from .plan import Part, make_plan, parse_size
from .planfile import HEADER, PlanFile, load_or_build, write_plan
from .reads import Result, wave_tasks, waves
from .sources import Listing, detect_format, list_source, load_class_map, sorted_class_names
from .stats import SplitStats
from .writer import PARTIAL_SUFFIX, ShardSink, record_path, shard_matches, stale_partials

WORK_DIR = "_work"
DEFAULT_SHARD_SIZE = "1GB"
PROBE_PREFIX = ".write-test-"
MISSING_SHOWN = 10
"""Missing shards named in a failed merge's message."""
WINDOW_PER_WORKER = 4
"""Read tasks in flight or waiting to be written, per worker (bounds memory, keeps workers busy)."""


class ConversionError(ValueError):
    """The conversion cannot start or produced nothing; the message says why and what to do."""


def convert(source: Union[str, Path], out: Union[str, Path], *, split: str = "train", fmt: Optional[str] = None,
            class_map: Optional[Union[str, Path]] = None, samples_per_shard: Optional[int] = None,
            shard_size: Optional[Union[int, str]] = None, workers: int = 1, resize_max: Optional[int] = None,
            quality: int = 95, seed: int = 0, name: Optional[str] = None, part: Optional[Part] = None,
            merge: bool = False, progress: bool = True) -> dict:
    """Convert ``source`` into split ``split`` of shard directory ``out`` and return a summary.

    Shards hold ``samples_per_shard`` samples, or ``shard_size`` source bytes
    (``"1GB"`` when neither is given). ``name`` is the dataset name in ``_info.json``
    (default: the existing one, else the source folder's name). Rerunning the same call after a crash
    finishes the missing shards; rerunning it after success does nothing.
    ``part`` writes only that part's shards and no manifest; ``merge`` writes no shard and
    the manifest, once every part has finished (module docstring).
    """
    started = time.perf_counter()
    source, out = Path(source), Path(out)
    if part is not None and merge:
        raise ValueError("give either part (--part I/N) or merge (--merge), not both: "
                         "run the parts first, then the merge")
    shard_bytes = _check_arguments(split, samples_per_shard, shard_size, workers, resize_max, quality)
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist: give an ImageFolder root, a folder of class "
                                "tars or a CSV/TSV list")
    _check_output(out)
    settings = {"source": str(source.resolve()), "format": fmt or detect_format(source), "split": split,
                "seed": seed, "samples_per_shard": samples_per_shard, "shard_size": shard_bytes,
                "resize_max": resize_max, "quality": quality,
                "class_map": str(Path(class_map).resolve()) if class_map is not None else None}
    work = out / WORK_DIR / split
    if _already_converted(out, split, settings):
        _drop_work(out, work)  # left behind when a kill came between the manifest and its removal
        return _summary(out, split, read_info(out)["splits"][split], started, written=0)
    if merge and not (work / HEADER).is_file():
        raise ConversionError(f"nothing to merge for split {split!r} in {out}: no plan in {work}; run the "
                              "--part I/N commands first (the first one plans), then --merge")
    plan = load_or_build(work, lambda: _build_plan(source, out, work, settings, class_map))
    if plan.header["settings"] != settings:
        raise ConversionError(f"{out} holds an unfinished conversion of split {split!r} with other images "
                              f"or settings: rerun that exact command to finish it, or delete {out}")
    if read_classes(out) is None:
        write_classes(out, plan.header["classes"])
    mine = [i for i in range(plan.num_shards) if part is None or part.owns(i)]
    if merge:
        _check_all_written(out, work, split, plan.num_shards, workers)
        written = {"shards_written": 0}
    else:
        with _executor(workers) as executor:
            written = _write_missing(plan, out, work, mine, executor, workers, progress)
    if part is not None:
        return _part_summary(out, split, part, plan, mine, started, written)
    records = [json.loads(record_path(work, shard_name(split, i)).read_text()) for i in range(plan.num_shards)]
    entry = _finish(out, plan, records, settings, name=name or _dataset_name(out, source))
    _drop_work(out, work)
    return {**_summary(out, split, entry, started, written=written["shards_written"]), **written}


def _check_arguments(split: str, samples_per_shard: Optional[int], shard_size: Optional[Union[int, str]],
                     workers: int, resize_max: Optional[int], quality: int) -> Optional[int]:
    """Validate the options; return the shard size in bytes (None when planning by sample count)."""
    if not split or not split.replace("_", "").isalnum():
        raise ValueError(f"split name {split!r} must be letters, digits or '_' (it prefixes the shard names)")
    if samples_per_shard is not None and shard_size is not None:
        raise ValueError("give either samples_per_shard (--samples-per-shard) or shard_size (--shard-size), not both")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if resize_max is not None and resize_max < 1:
        raise ValueError(f"resize_max must be a positive number of pixels, got {resize_max}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100 (JPEG quality of resized images), got {quality}")
    if samples_per_shard is not None:
        return None
    size = shard_size if shard_size is not None else DEFAULT_SHARD_SIZE
    return parse_size(size) if isinstance(size, str) else int(size)


def _check_output(out: Path) -> None:
    """Create ``out`` and make sure files can be written there (a probe file, which ``_drop_work`` also removes).

    The probe is removed here tolerating its absence: a process killed between the two
    steps leaves it, and the run that completes the split removes every probe then.
    """
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory: choose a folder for the shards")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{PROBE_PREFIX}{secrets.token_hex(8)}"
        probe.touch(exist_ok=False)
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise ConversionError(f"output {out} is not writable ({err.strerror}): choose another folder "
                              "or fix its permissions") from None


def _build_plan(source: Path, out: Path, work: Path, settings: dict, class_map: Optional[Union[str, Path]]) -> None:
    """List the source and write the plan (``planfile.load_or_build`` calls this under the plan lock).

    Shards are looked for before the plan header: every conversion writes its header
    before its first shard, so shards seen here with no header are a foreign dataset's,
    and shards of a concurrent planner (a lock taken over) come with its header.
    """
    split = settings["split"]
    foreign = sorted(p.name for p in out.glob(shard_glob(split)))
    if (work / HEADER).is_file():
        return
    if foreign:
        raise ConversionError(f"{out} already holds shards not written by this conversion ({foreign[0]}, ...): "
                              "write to another folder or delete them")
    listing = list_source(source, settings["format"])
    classes = _classes(listing, source, out, class_map)
    plan = make_plan(split, listing, classes, seed=settings["seed"], samples_per_shard=settings["samples_per_shard"],
                     shard_size=settings["shard_size"],
                     options={"resize_max": settings["resize_max"], "quality": settings["quality"]})
    write_plan(work, plan, {"settings": settings, "containers": listing.containers, "root": str(listing.root)},
               listing.problems + plan.problems)


def _classes(listing: Listing, source: Path, out: Path, class_map: Optional[Union[str, Path]]) -> list[str]:
    """Class list: the given map, else ``out/classes.json`` (a later split), else the source's sorted names."""
    existing = read_classes(out)
    if class_map is not None:
        classes, where = load_class_map(Path(class_map)), str(class_map)
        if existing is not None and existing != classes:
            raise ConversionError(f"class map {class_map} differs from {out / CLASSES_FILE}, which the splits "
                                  f"already in {out} use: pass --class-map {out / CLASSES_FILE} or another output")
    elif existing is not None:
        classes, where = existing, str(out / CLASSES_FILE)
    else:
        return sorted_class_names(listing.class_names)
    used = np.unique(listing.files.columns()["label"]).tolist()
    unknown = sorted({listing.class_names[i] for i in used} - set(classes))
    if unknown:
        raise ConversionError(f"{len(unknown)} classes of {source} are not in the class map {where}, "
                              f"e.g. {unknown[:5]}: use the class map of the same dataset, or a new output folder")
    return classes


def _already_converted(out: Path, split: str, settings: dict) -> bool:
    """True when ``_info.json`` holds this split converted with these settings; error when with others."""
    if not (out / INFO_FILE).is_file():
        return False
    entry = read_info(out)["splits"].get(split)
    if entry is None:
        return False
    if entry.get("plan_settings") != settings:
        raise ConversionError(f"{out} already holds split {split!r} converted from other images or settings: "
                              f"write to another folder, or delete {out} to convert again")
    return True


def _executor(workers: int) -> contextlib.AbstractContextManager:
    """A process pool for ``workers`` > 1; None (work in this process) for one."""
    return ProcessPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext()


def _write_missing(plan: PlanFile, out: Path, work: Path, mine: list[int], executor: Optional[Executor],
                   workers: int, progress: bool) -> dict:
    """Re-check the shards of ``mine`` already written, then write the missing or damaged ones."""
    settings = plan.header["settings"]
    split = settings["split"]
    for path in stale_partials(out, split):
        path.unlink(missing_ok=True)
    good, rechecked, damaged = _recheck(out, work, split, mine, executor)
    pending = [i for i in mine if i not in good]
    sinks: dict[int, ShardSink] = {}
    kept: list[bool] = []
    opens, tars = 0, set()
    total = sum(plan.shard_length(i) for i in mine)
    with tqdm(total=total, initial=total - sum(plan.shard_length(i) for i in pending), unit="img",
              desc=f"convert {split}", disable=not progress, dynamic_ncols=True) as bar:
        def write(result: Result) -> None:
            if result.shard not in sinks:
                name = shard_name(split, result.shard)
                sinks[result.shard] = ShardSink(out, work, name, plan.shard_length(result.shard))
            if result.image is None:
                sinks[result.shard].skip(result.name, result.reason)
            else:
                sinks[result.shard].add(result.key, result.image, result.label, result.name)
            bar.update(1)

        for wave in waves(pending, bool(plan.header["containers"])):
            tasks = wave_tasks(plan, wave, Path(plan.header["root"]), settings["resize_max"], settings["quality"])
            opens += sum(len(task.containers) for task in tasks)
            tars.update(container for task in tasks for container in task.containers)
            run_tasks(tasks, executor, WINDOW_PER_WORKER * workers, write,
                      lambda shard: kept.append(sinks.pop(shard).commit()))
    return {"shards_written": sum(kept), "shards_lost_to_another_writer": kept.count(False),
            "shards_rechecked": rechecked, "damaged_rewritten": damaged, "tar_opens": opens, "tars_read": len(tars)}


def _recheck(out: Path, work: Path, split: str, mine: list[int],
             executor: Optional[Executor]) -> tuple[set[int], int, list[str]]:
    """Shards of ``mine`` already there whose size and sha256 match their record; damaged ones are removed.

    A shard without a record counts as damaged: a writer saves the record before the
    shard takes its name, so only a concurrent removal can leave one (and ``os.link``
    would never replace it). Removal tolerates a part that overlaps this one removing
    the same files. Returns the good shard indices, how many were checked, and the
    damaged shards' names.
    """
    kept = [i for i in mine if (out / shard_name(split, i)).is_file()]
    paths = [out / shard_name(split, i) for i in kept]
    checks = list((executor.map if executor else map)(shard_matches, paths, [record_path(work, p.name) for p in paths]))
    for path, ok in zip(paths, checks):
        if not ok:
            path.unlink(missing_ok=True)
            record_path(work, path.name).unlink(missing_ok=True)
    return ({i for i, ok in zip(kept, checks) if ok}, len(kept),
            [path.name for path, ok in zip(paths, checks) if not ok])


def _check_all_written(out: Path, work: Path, split: str, num_shards: int, workers: int) -> None:
    """Merge: every planned shard must be there, with its record, and the size and sha256 it records.

    The sha256 is read again here because a part's record says what it wrote, not what
    is on disk now: a shard changed afterwards, or (parts overlapping while the source
    changed) bytes other than the recorded ones, would otherwise enter ``_info.json``.
    ``workers`` threads hash at once (hashlib releases the GIL): at ImageNet-21k scale
    (1.3 TB) about 15 minutes on 16 cores where the storage delivers 1.5 GB/s.
    """
    names = [shard_name(split, index) for index in range(num_shards)]
    missing = [name for name in names if not (out / name).is_file() or not record_path(work, name).is_file()]
    if missing:
        raise ConversionError(f"cannot merge split {split!r} of {out}: {len(missing)} of {num_shards} planned "
                              f"shards are missing ({_shown(missing)}); shard i is written by part i % N: rerun the "
                              "parts that failed (the same command with --part I/N; their finished shards are kept, "
                              "damaged ones rewritten), then merge again")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        matches = list(pool.map(shard_matches, [out / name for name in names],
                                [record_path(work, name) for name in names]))
    changed = [name for name, ok in zip(names, matches) if not ok]
    if changed:
        raise ConversionError(f"cannot merge split {split!r} of {out}: {len(changed)} of {num_shards} shards differ "
                              f"in size or sha256 from what their part recorded ({_shown(changed)}): they changed "
                              "after being written; rerun the part of each (shard i belongs to part i % N: the "
                              "same command with --part I/N rewrites the shards that do not match), then merge again")


def _shown(names: list[str]) -> str:
    return ", ".join(names[:MISSING_SHOWN]) + (", ..." if len(names) > MISSING_SHOWN else "")


def _finish(out: Path, plan: PlanFile, records: list[dict], settings: dict, name: str) -> dict:
    """Write ``_errors.jsonl`` and the split's ``_info.json`` entry (the last step of a conversion)."""
    split = settings["split"]
    errors = plan.problems() + [error for record in records for error in record["errors"]]
    write_errors(out, split, errors)
    stats = SplitStats()
    for record in records:
        stats.merge(SplitStats.from_dict(record["stats"]))
    if stats.samples == 0:
        raise ConversionError(f"no image of split {split!r} could be converted ({len(errors)} problems, "
                              f"see {out / ERRORS_FILE})")
    entry = {"name": split, "filenames": [r["name"] for r in records],
             "shard_lengths": [r["num_samples"] for r in records], "num_samples": stats.samples,
             "sha256": [r["sha256"] for r in records], "plan_sha256": plan.header["digest"],
             "plan_settings": settings,
             "stats": {**stats.to_dict(), "shard_bytes": sum(r["bytes"] for r in records),
                       "planned": sum(r["planned"] for r in records), "skipped": len(errors),
                       "skipped_reasons": dict(Counter(e["reason"].split(":")[0] for e in errors).most_common())}}
    write_split(out, split, entry, name)
    return entry


def _drop_work(out: Path, work: Path) -> None:
    """Remove a split's work folder, its partial shards and index temporary files, write probes, ``OUT/_work``.

    Called when the split is complete: the merge runs once every part has ended, so the
    partial files left are those of killed writers (on any host), never a live one's.
    """
    split = work.name
    for leftover in [*out.glob(shard_glob(split, f"*{PARTIAL_SUFFIX}")), *out.glob("." + shard_glob(split, "*.tmp")),
                     *out.glob(f"{PROBE_PREFIX}*")]:
        leftover.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    if (out / WORK_DIR).is_dir() and not any((out / WORK_DIR).iterdir()):
        (out / WORK_DIR).rmdir()


def _dataset_name(out: Path, source: Path) -> str:
    """The existing manifest's name, else the source's (folder or list file) name."""
    if (out / INFO_FILE).is_file():
        return read_info(out).get("name") or source.stem
    return source.resolve().stem


def _part_summary(out: Path, split: str, part: Part, plan: PlanFile, mine: list[int], started: float,
                  written: dict) -> dict:
    return {"split": split, "out": str(out), "part": str(part), "shards": len(mine),
            "planned_samples": sum(plan.shard_length(i) for i in mine),
            "seconds": round(time.perf_counter() - started, 3), **written}


def _summary(out: Path, split: str, entry: dict, started: float, written: int) -> dict:
    seconds = time.perf_counter() - started
    return {"split": split, "out": str(out), "num_samples": entry["num_samples"], "shards": len(entry["filenames"]),
            "shards_written": written, "skipped": entry["stats"]["skipped"],
            "skipped_reasons": entry["stats"]["skipped_reasons"], "bytes": entry["stats"]["shard_bytes"],
            "seconds": round(seconds, 3), "errors_file": str(out / ERRORS_FILE)}
