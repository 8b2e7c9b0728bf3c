"""Convert a source dataset into one split of webdataset shards: plan, write in parallel, resume, manifest.

Order of work, chosen so that a kill at any point loses at most the shards being
written:

1. Check arguments, the source and the output (missing source, unwritable output,
   an output holding a different dataset: clear error, nothing written).
2. List the source and plan every shard (``plan.py``); write ``classes.json`` and the
   plan digest to ``OUT/_work/<split>/plan.json``.
3. Write the shards whose final file does not exist yet, over ``workers`` processes
   (``writer.py``); finished shards of an earlier, killed run are kept.
4. Last, write ``_errors.jsonl`` and the split's entry in ``_info.json``, and drop the
   work folder. A split present in ``_info.json`` is complete.

Splitting the work over independent processes or nodes (a SLURM array,
``launch/convert.sh``): every part runs the same command with ``part=Part(i, n)``
(``--part i/n``), plans exactly as above (the plan is deterministic, so all parts
agree), writes only its shards (index % n == i) and stops after step 3, keeping
the work folder. Then the same command with ``merge=True`` (``--merge``) writes no
image: it checks that every planned shard is there (naming the missing ones
otherwise) and does step 4. The merge is a separate flag, not "the command
without ``--part``", because that command converts whatever is missing in one
process, which is the right way to finish a single-process run but would silently
turn a failed part of a 21k-class conversion into hours of work on one node.
Parts started at the same moment all write the same ``plan.json`` and
``classes.json`` (atomic renames of identical content), and a part tells another
part's shards from a foreign dataset's by the plan digest in ``plan.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Optional, Union

from tqdm import tqdm

from .manifest import (CLASSES_FILE, ERRORS_FILE, INFO_FILE, read_classes, read_info, shard_name,
                       write_errors, write_json_atomic, write_split)
from .plan import Part, Plan, make_plan, parse_size
from .sources import Listing, list_source, load_class_map, sorted_class_names
from .stats import SplitStats
from .writer import ShardTask, record_path, write_shard

WORK_DIR = "_work"
DEFAULT_SHARD_SIZE = "1GB"
MISSING_SHOWN = 10
"""Missing shards named in a failed merge's message."""


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
    listing = list_source(source, fmt)
    classes = _classes(listing, source, out, class_map)
    plan = make_plan(split, listing.items, classes, seed=seed, samples_per_shard=samples_per_shard,
                     shard_size=shard_bytes, options={"resize_max": resize_max, "quality": quality})
    work = out / WORK_DIR / split
    if _already_converted(out, plan):
        _drop_work(out, work)  # left behind when a kill came between the manifest and its removal
        return _summary(out, split, read_info(out)["splits"][split], started, written=0)
    _check_unfinished(out, work, plan)
    tasks = [ShardTask(out, work, listing.root, shard_name(split, i), shard, resize_max, quality)
             for i, shard in enumerate(plan.shards)]
    mine = [t for i, t in enumerate(tasks) if part is None or part.owns(i)]
    pending = [t for t in mine if not (out / t.name).is_file() or not record_path(work, t.name).is_file()]
    if merge:
        _check_all_written(out, plan.split, tasks, pending)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "plan.json", {"digest": plan.digest, "source": str(source), "shards": len(plan.shards)})
    if read_classes(out) is None:
        write_json_atomic(out / CLASSES_FILE, classes)
    _write_shards(pending, workers, progress, split, _planned(mine), _planned(mine) - _planned(pending))
    if part is not None:
        return _part_summary(out, split, part, mine, started, written=len(pending))
    records = [json.loads(record_path(work, t.name).read_text()) for t in tasks]
    entry = _finish(out, plan, listing, records, name=name or _dataset_name(out, source))
    _drop_work(out, work)
    return _summary(out, split, entry, started, written=len(pending))


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
    """Create ``out`` and make sure files can be written there."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory: choose a folder for the shards")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConversionError(f"output {out} is not writable ({err.strerror}): choose another folder "
                              "or fix its permissions") from None


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
    unknown = sorted({item.label for item in listing.items} - set(classes))
    if unknown:
        raise ConversionError(f"{len(unknown)} classes of {source} are not in the class map {where}, "
                              f"e.g. {unknown[:5]}: use the class map of the same dataset, or a new output folder")
    return classes


def _already_converted(out: Path, plan: Plan) -> bool:
    """True when ``_info.json`` holds this exact split; error when it holds a different one."""
    if not (out / INFO_FILE).is_file():
        return False
    entry = read_info(out)["splits"].get(plan.split)
    if entry is None:
        return False
    if entry.get("plan_sha256") != plan.digest:
        raise ConversionError(f"{out} already holds split {plan.split!r} converted from other images or settings: "
                              f"write to another folder, or delete {out} to convert again")
    return True


def _check_unfinished(out: Path, work: Path, plan: Plan) -> None:
    """Refuse to mix shards of another, unfinished conversion (or foreign files) with this one.

    Shards are listed before ``plan.json`` is read: every conversion writes its plan
    before its first shard, so a part that sees shards written by a part started at
    the same moment also sees their plan, and compares digests instead of calling
    them foreign.
    """
    foreign = sorted(p.name for p in out.glob(f"{plan.split}-*.tar"))
    plan_file = work / "plan.json"
    if plan_file.is_file():
        if json.loads(plan_file.read_text())["digest"] != plan.digest:
            raise ConversionError(f"{out} holds an unfinished conversion of split {plan.split!r} with other images "
                                  f"or settings: rerun that exact command to finish it, or delete {out}")
        return
    if foreign:
        raise ConversionError(f"{out} already holds shards not written by this conversion ({foreign[0]}, ...): "
                              "write to another folder or delete them")


def _planned(tasks: list[ShardTask]) -> int:
    return sum(len(t.samples) for t in tasks)


def _check_all_written(out: Path, split: str, tasks: list[ShardTask], missing: list[ShardTask]) -> None:
    """Merge: every planned shard must have been written by its part."""
    if not missing:
        return
    shown = ", ".join(t.name for t in missing[:MISSING_SHOWN]) + (", ..." if len(missing) > MISSING_SHOWN else "")
    raise ConversionError(f"cannot merge split {split!r} of {out}: {len(missing)} of {len(tasks)} planned shards "
                          f"are missing ({shown}); shard i is written by part i % N: rerun the parts that failed "
                          "(the same command with --part I/N; their finished shards are kept), then merge again")


def _write_shards(tasks: list[ShardTask], workers: int, progress: bool, split: str, total: int, done: int) -> None:
    """Run ``write_shard`` over ``tasks`` (in this process for one worker), with a progress bar."""
    with tqdm(total=total, initial=done, unit="img", desc=f"convert {split}", disable=not progress,
              dynamic_ncols=True) as bar:
        if workers == 1:
            for task in tasks:
                write_shard(task)
                bar.update(len(task.samples))
            return
        with ProcessPoolExecutor(max_workers=min(workers, max(len(tasks), 1))) as pool:
            futures = {pool.submit(write_shard, task): len(task.samples) for task in tasks}
            for future in as_completed(futures):
                future.result()
                bar.update(futures[future])


def _finish(out: Path, plan: Plan, listing: Listing, records: list[dict], name: str) -> dict:
    """Write ``_errors.jsonl`` and the split's ``_info.json`` entry (the last step of a conversion)."""
    errors = listing.problems + [error for record in records for error in record["errors"]]
    write_errors(out, plan.split, errors)
    stats = SplitStats()
    for record in records:
        stats.merge(SplitStats.from_dict(record["stats"]))
    if stats.samples == 0:
        raise ConversionError(f"no image of split {plan.split!r} could be converted ({len(errors)} problems, "
                              f"see {out / ERRORS_FILE})")
    entry = {"name": plan.split, "filenames": [r["name"] for r in records],
             "shard_lengths": [r["num_samples"] for r in records], "num_samples": stats.samples,
             "sha256": [r["sha256"] for r in records], "plan_sha256": plan.digest,
             "stats": {**stats.to_dict(), "shard_bytes": sum(r["bytes"] for r in records), "skipped": len(errors),
                       "skipped_reasons": dict(Counter(e["reason"].split(":")[0] for e in errors).most_common())}}
    write_split(out, plan.split, entry, name)
    return entry


def _drop_work(out: Path, work: Path) -> None:
    """Remove a split's work folder, and ``OUT/_work`` once no split has one."""
    shutil.rmtree(work, ignore_errors=True)
    if (out / WORK_DIR).is_dir() and not any((out / WORK_DIR).iterdir()):
        (out / WORK_DIR).rmdir()


def _dataset_name(out: Path, source: Path) -> str:
    """The existing manifest's name, else the source's (folder or list file) name."""
    if (out / INFO_FILE).is_file():
        return read_info(out).get("name") or source.stem
    return source.resolve().stem


def _part_summary(out: Path, split: str, part: Part, tasks: list[ShardTask], started: float, written: int) -> dict:
    return {"split": split, "out": str(out), "part": str(part), "shards": len(tasks), "shards_written": written,
            "planned_samples": _planned(tasks), "seconds": round(time.perf_counter() - started, 3)}


def _summary(out: Path, split: str, entry: dict, started: float, written: int) -> dict:
    seconds = time.perf_counter() - started
    return {"split": split, "out": str(out), "num_samples": entry["num_samples"], "shards": len(entry["filenames"]),
            "shards_written": written, "skipped": entry["stats"]["skipped"],
            "skipped_reasons": entry["stats"]["skipped_reasons"], "bytes": entry["stats"]["shard_bytes"],
            "seconds": round(seconds, 3), "errors_file": str(out / ERRORS_FILE)}
