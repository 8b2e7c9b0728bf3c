"""Summarise a shard directory from its manifest: samples per split and class, bytes, image sizes.

Reads only ``_info.json`` and ``classes.json`` (the statistics were gathered while
converting), so it answers instantly even for a terabyte of shards.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

from .manifest import read_classes, read_info
from .stats import SplitStats

MAX_CLASSES_LISTED = 20


def info(out: Union[str, Path]) -> dict:
    """Per split: samples, shards, bytes, samples per class name, and image size statistics."""
    out = Path(out)
    manifest = read_info(out)
    classes = read_classes(out)
    splits = {}
    for split, entry in manifest["splits"].items():
        if "stats" not in entry:
            raise ValueError(f"{out}/_info.json split {split!r} has no stats: it was not written by "
                             "`python -m data_tools convert`, which records them")
        stats = SplitStats.from_dict(entry["stats"])
        per_class = {(classes[k] if classes and k < len(classes) else str(k)): v
                     for k, v in sorted(stats.class_counts.items())}
        splits[split] = {
            "samples": entry["num_samples"], "shards": len(entry["filenames"]),
            "bytes": entry["stats"]["shard_bytes"], "skipped": entry["stats"]["skipped"],
            "reencoded": stats.reencoded, "classes": per_class,
            "mean_width": round(stats.width_sum / max(stats.samples, 1), 1),
            "mean_height": round(stats.height_sum / max(stats.samples, 1), 1),
            "min_side": stats.min_side, "max_side": stats.max_side,
            "longer_side": entry["stats"]["longer_side"],
        }
    return {"name": manifest.get("name"), "num_classes": len(classes) if classes else None, "splits": splits}


def format_info(summary: dict) -> str:
    """``info()`` as text for the terminal."""
    lines = [f"dataset {summary['name']}: {summary['num_classes']} classes"]
    for split, s in summary["splits"].items():
        lines.append(f"split {split}: {s['samples']:,} samples in {s['shards']} shards, {_human(s['bytes'])}, "
                     f"{s['skipped']} skipped, {s['reencoded']} re-encoded")
        lines.append(f"  image size: mean {s['mean_width']} x {s['mean_height']}, "
                     f"shortest side {s['min_side']}, longest side {s['max_side']}")
        lines.append("  longer side: " + ", ".join(f"{k}: {v}" for k, v in s["longer_side"].items()))
        counts = sorted(s["classes"].items(), key=lambda kv: kv[1])
        if len(counts) <= MAX_CLASSES_LISTED:
            lines.append("  per class: " + ", ".join(f"{k}: {v}" for k, v in s["classes"].items()))
        else:
            lines.append(f"  per class: {len(counts)} classes, fewest {counts[0][0]} ({counts[0][1]}), "
                         f"most {counts[-1][0]} ({counts[-1][1]}), mean {s['samples'] / len(counts):.1f}")
    return "\n".join(lines)


def _human(nbytes: int) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    exponent = min(int(math.log10(max(nbytes, 1)) // 3), len(units) - 1)
    return f"{nbytes / 1000 ** exponent:.1f} {units[exponent]}"
