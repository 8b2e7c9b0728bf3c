"""Per-shard statistics gathered while writing, merged per split for ``_info.json`` and ``info``.

Kept as counts and histograms (not per-image lists) so that a 14-million-image
split summarises in a few kilobytes and ``info`` never has to re-read the shards.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def side_bucket(side: int) -> str:
    """Power-of-two bucket of a side length: ``"256-511"``."""
    low = 1 << (max(side, 1).bit_length() - 1)
    return f"{low}-{2 * low - 1}"


@dataclass
class SplitStats:
    """Samples, bytes, samples per class and image sizes of some shards."""

    samples: int = 0
    image_bytes: int = 0
    reencoded: int = 0
    class_counts: Counter = field(default_factory=Counter)
    """Label index -> samples."""
    longer_side: Counter = field(default_factory=Counter)
    """``side_bucket`` of the longer image side -> samples."""
    width_sum: int = 0
    height_sum: int = 0
    min_side: int = 0
    max_side: int = 0

    def add(self, label: int, width: int, height: int, nbytes: int, reencoded: bool) -> None:
        self.samples += 1
        self.image_bytes += nbytes
        self.reencoded += int(reencoded)
        self.class_counts[label] += 1
        self.longer_side[side_bucket(max(width, height))] += 1
        self.width_sum += width
        self.height_sum += height
        short, long_ = min(width, height), max(width, height)
        self.min_side = short if self.samples == 1 else min(self.min_side, short)
        self.max_side = max(self.max_side, long_)

    def merge(self, other: "SplitStats") -> None:
        if other.samples:
            self.min_side = other.min_side if not self.samples else min(self.min_side, other.min_side)
        self.samples += other.samples
        self.image_bytes += other.image_bytes
        self.reencoded += other.reencoded
        self.class_counts.update(other.class_counts)
        self.longer_side.update(other.longer_side)
        self.width_sum += other.width_sum
        self.height_sum += other.height_sum
        self.max_side = max(self.max_side, other.max_side)

    def to_dict(self) -> dict:
        return {"samples": self.samples, "image_bytes": self.image_bytes, "reencoded": self.reencoded,
                "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())},
                "longer_side": dict(sorted(self.longer_side.items(), key=lambda kv: int(kv[0].split("-")[0]))),
                "width_sum": self.width_sum, "height_sum": self.height_sum,
                "min_side": self.min_side, "max_side": self.max_side}

    @classmethod
    def from_dict(cls, data: dict) -> "SplitStats":
        return cls(data["samples"], data["image_bytes"], data["reencoded"],
                   Counter({int(k): v for k, v in data["class_counts"].items()}), Counter(data["longer_side"]),
                   data["width_sum"], data["height_sum"], data["min_side"], data["max_side"])
