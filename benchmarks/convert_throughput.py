"""Images/s of ``data_tools.convert`` in copy and resize mode, 1 and 2 workers, vs a bare loop.

Input: a few thousand distinct ImageNet-like JPEGs (500x375 or 375x500, quality 90)
cut from scikit-learn's two real sample photos by random crops, flips and
resizes (``make_images`` of ``data_throughput.py``, so both benchmarks read the
same kind of files).

- copy mode: the converter's default; every image is read, verified and fully
  decoded as a check, and its original bytes are stored.
- resize mode: ``--resize-max 320 --quality 90``; every image is decoded (at
  reduced JPEG scale where possible), shrunk and re-encoded.
- baseline: a bare single-process loop over the same files doing read, full
  decode to RGB, the same shrink and JPEG encode into memory, no tar writing:
  the work a naive resize converter does per image.

Each figure is the wall time of one ``convert()`` call (listing, planning,
writing, checksums, manifest), after a warm-up conversion of a few images, also
given per CPU second (this process and its workers): on a shared, loaded machine
the wall-clock figures swing with other jobs, the per-CPU ones much less.

    python benchmarks/convert_throughput.py [--images 2000]

The last line of output is one JSON object with every figure and ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import make_images  # noqa: E402  (sibling benchmark script)

from data_tools.convert import convert  # noqa: E402

RESIZE_MAX = 320
QUALITY = 90
SAMPLES_PER_SHARD = 250


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bare_loop(paths: list[Path]) -> tuple[float, float]:
    """Images per wall second and per CPU second of read + full decode + shrink + JPEG encode."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    for path in paths:
        image = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
        image.thumbnail((RESIZE_MAX, RESIZE_MAX), Image.Resampling.BICUBIC)
        image.save(io.BytesIO(), format="JPEG", quality=QUALITY)
    return len(paths) / (time.perf_counter() - wall), len(paths) / (cpu_seconds() - cpu)


def converter(source: Path, work: Path, workers: int, resize: bool) -> tuple[float, float, int]:
    """Images per wall second, per CPU second, and shard bytes of one conversion into a fresh folder."""
    out = Path(tempfile.mkdtemp(dir=work))
    options = {"resize_max": RESIZE_MAX, "quality": QUALITY} if resize else {}
    wall, cpu = time.perf_counter(), cpu_seconds()
    summary = convert(source, out, samples_per_shard=SAMPLES_PER_SHARD, workers=workers, progress=False, **options)
    images = summary["num_samples"]
    return images / (time.perf_counter() - wall), images / (cpu_seconds() - cpu), summary["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        items = make_images(work / "src", args.images)
        paths = [path for path, _ in items]
        source_bytes = sum(p.stat().st_size for p in paths)
        print(f"made {len(paths)} JPEGs ({source_bytes / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
        warm = work / "warm"
        make_images(warm, 20, seed=1)
        converter(warm, work, workers=1, resize=True)

        figures = {"images": len(paths), "cpu_cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                   "source_mb": round(source_bytes / 1e6, 2)}
        rate, per_cpu = bare_loop(paths)
        figures.update(baseline_img_s=round(rate, 1), baseline_img_per_cpu_s=round(per_cpu, 1))
        print(f"baseline (read, decode, shrink, encode; 1 process): {rate:.1f} img/s, {per_cpu:.1f} img/CPU-s")
        for mode in ("copy", "resize"):
            for workers in (1, 2):
                rate, per_cpu, nbytes = converter(work / "src", work, workers, resize=mode == "resize")
                run = f"{mode}_w{workers}"
                figures.update({f"{run}_img_s": round(rate, 1), f"{run}_img_per_cpu_s": round(per_cpu, 1),
                                f"{run}_vs_baseline": round(rate / figures["baseline_img_s"], 3),
                                f"{run}_per_cpu_vs_baseline": round(per_cpu / figures["baseline_img_per_cpu_s"], 3),
                                f"{mode}_shard_mb": round(nbytes / 1e6, 2)})
                print(f"{mode:6s} workers={workers}: {rate:7.1f} img/s ({figures[f'{run}_vs_baseline']:.2f}x baseline),"
                      f" {per_cpu:.1f} img/CPU-s ({figures[f'{run}_per_cpu_vs_baseline']:.2f}x), "
                      f"shards {nbytes / 1e6:.1f} MB")
        for mode in ("copy", "resize"):
            figures[f"{mode}_w2_vs_w1"] = round(figures[f"{mode}_w2_img_s"] / figures[f"{mode}_w1_img_s"], 3)
        figures["resize_storage_ratio"] = round(figures["copy_shard_mb"] / figures["resize_shard_mb"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
