"""Images/s of the vitscale train stream vs torchvision ImageFolder vs a decode-only loop; resume cost.

All three read the same realistic JPEGs (about 500x375, quality 90, cut from
scikit-learn's two sample photos by random crops, flips and resizes): the stream
from webdataset shards, the others from the same images as loose files. The
stream and ImageFolder apply the same augmentation (224 px inception-style
RandomResizedCrop + horizontal flip, uint8 output); decode-only does full JPEG
decode + RGB conversion and nothing else, which bounds what any pipeline doing
full decodes can reach on these cores. Every pipeline uses the same DataLoader
worker count and batch size; each runs ``--repeats`` epochs, interleaved with the
others, timed from its first batch, and reports its best epoch.

    python benchmarks/data_throughput.py [--images 1000] [--workers 2]

The stream runs on each decode path (``data.decode``): ``stream`` (``cpu``, the default: JPEGs
decoded at a reduced DCT scale where the crop keeps its resolution, which at 224 px crops of
500x375 images is never), ``stream_cpu_full`` and ``stream_gpu_cpu_side`` (``gpu``: reading,
header parsing and crop drawing only; the decode runs on the GPU, not measured here). Each
reports ``*_cpu_cores_per_gpu_at_4200``: CPU ms/image x 4.2, the cores one GPU at the ViT-B/16
target of 4,200 img/s needs for its input. ``draft_half_scale_decode_speedup`` is what a
1/2-scale JPEG decode saves over a full one on these images, where a crop allows it.

Wall-clock images/s with workers is what training sees, but on a shared machine it
swings with other jobs; the same pipelines in one process (``num_workers=0``) also
report CPU milliseconds per image, which do not (each timed epoch there follows an untimed one of
the same pipeline: ``best_costs``). Time to the first step after a resume at
10, 50 and 90 % of an epoch (one process, shard indexes built ahead) and the bytes read
for it show that resume costs the same wherever it happens. Ratios ``a_vs_b`` compare
images/s (higher is better for ``a``), ``a_vs_b_cpu`` compare CPU cost per image
(``b``'s cost over ``a``'s: also higher is better for ``a``). The last line of
output is one JSON object with every figure and ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from sklearn.datasets import load_sample_images
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from data_tools.convert import convert
from pretrain.config import DataConfig
from pretrain.data.train_stream import build_train_stream
from pretrain.data.image_header import read_header
from pretrain.data.transforms import decode_rgb

IMG_SIZE = 224
CLASSES = 10
RESUME_AT = (10, 50, 90)
"""Positions (percent of an epoch) at which time to first step after a resume is measured."""
TARGET_IMAGES_PER_S = 4200
"""Issue 14's ViT-B/16 target per H100: CPU ms/image x 4.2 = CPU cores one GPU needs for its input."""


def make_images(root: Path, count: int, seed: int = 0) -> list[tuple[Path, int]]:
    """Write ``count`` distinct ImageNet-like JPEGs into an ImageFolder tree; return (path, label)."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    items = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = photo.size
        crop_w, crop_h = int(width * rng.uniform(0.55, 1.0)), int(height * rng.uniform(0.55, 1.0))
        left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        image = photo.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        size = (500, 375) if rng.random() < 0.75 else (375, 500)
        image = image.resize(size, Image.Resampling.BICUBIC)
        label = index % CLASSES
        path = root / f"class_{label:02d}" / f"img_{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        items.append((path, label))
    return items


class DecodeOnly(Dataset):
    """Full JPEG decode + RGB conversion, no augmentation: the decode ceiling."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, int]:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB").size


def epoch_cost(batches: Iterable, images: int) -> tuple[float, float]:
    """(images/s, CPU ms of this process per image) over one epoch, timed from the first batch.

    With ``num_workers=0`` the CPU time is the whole per-image cost, and unlike wall time
    it barely moves when other jobs share the cores.
    """
    batches = iter(batches)
    seen = len(next(batches)[1])
    wall, cpu, counted = time.perf_counter(), time.process_time(), 0
    while seen < images:
        size = len(next(batches)[1])
        seen, counted = seen + size, counted + size
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return counted / wall, 1000 * cpu / counted


def best_costs(pipelines: dict[str, Callable[[], Iterable]], images: int, repeats: int,
               warm: bool = False) -> dict[str, tuple[float, float]]:
    """Best (highest images/s, lowest CPU ms/image) of each pipeline over ``repeats`` epochs, run
    interleaved (A B C A B C ...) so a load change on a shared machine hits all of them alike.

    ``warm``: each timed epoch follows an untimed one of the same pipeline. In one process the
    first epoch after another pipeline's costs more than the same epoch after its own: on
    2026-12-07, with the stream's ``cpu`` and ``cpu_full`` paths (the same work on these images)
    timed first and second in each round, whichever ran first cost 0.11-0.13 ms per image more
    (1.706 vs 1.594, then swapped 1.759 vs 1.632). A training process runs the stream alone, so
    the warm figure is its cost; both are the same for every pipeline.
    """
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, make in pipelines.items():
            if warm:
                epoch_cost(make(), images)
            runs[name].append(epoch_cost(make(), images))
    return {name: (max(r for r, _ in values), min(c for _, c in values)) for name, values in runs.items()}


def draft_speedup(items: list[tuple[Path, int]], repeats: int) -> float:
    """CPU time of full-scale over 1/2-scale JPEG decodes of ``items`` (best of ``repeats`` each)."""
    datas = [path.read_bytes() for path, _ in items]
    costs = []
    for reduce in (1, 2):
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            for data in datas:
                decode_rgb(read_header(data), data, reduce)
            best = min(best, time.process_time() - start)
        costs.append(best)
    return costs[0] / costs[1]


def best_resume(cfg: DataConfig, percent: int, repeats: int) -> tuple[float, int]:
    """Fastest time (and bytes read) from building a stream resumed at ``percent`` % of epoch 3 to its
    first step's batch, in one process: the position is arithmetic, so this should not grow with ``percent``."""
    times, read = [], 0
    for _ in range(repeats):
        probe = build_train_stream(cfg, img_size=IMG_SIZE, seed=0, rank=0, world_size=1)
        position = probe.position()
        steps = probe.order.steps_per_epoch
        start = time.perf_counter()
        stream = build_train_stream(cfg, img_size=IMG_SIZE, seed=0, rank=0, world_size=1,
                                    position=replace(position, epoch=3, step=steps * percent // 100))
        next(stream)
        times.append(time.perf_counter() - start)
        read = stream.bytes_read
    return min(times), read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.images // 4 < 2 * args.batch:
        parser.error(f"--images {args.images} is too few for --batch {args.batch}: the single-process epochs time "
                     f"{args.images // 4} images after an untimed first batch; give --images >= {8 * args.batch}")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        items = make_images(root / "folder", args.images)
        convert(root / "folder", root / "shards", samples_per_shard=250, progress=False)
        mean_kb = float(np.mean([p.stat().st_size for p, _ in items]) / 1024)
        print(f"wrote {len(items)} JPEGs ({mean_kb:.0f} KB mean) as files and shards in {time.perf_counter() - t0:.1f}s")

        augment = v2.Compose([v2.RandomResizedCrop(IMG_SIZE, scale=(0.08, 1.0), antialias=True),
                              v2.RandomHorizontalFlip(), v2.PILToTensor()])
        folder = ImageFolder(str(root / "folder"), transform=augment)
        decode = DecodeOnly([p for p, _ in items])

        def pipelines(workers: int) -> dict[str, Callable[[], Iterable]]:
            def stream(decode: str) -> Callable[[], Iterable]:
                cfg = DataConfig(train_shards=str(root / "shards"), global_batch_size=args.batch,
                                 micro_batch_size=args.batch, num_workers=workers, decode=decode)
                return lambda: build_train_stream(cfg, img_size=IMG_SIZE, seed=0, rank=0, world_size=1, device=None)

            return {
                "stream": stream("cpu"),
                "stream_cpu_full": stream("cpu_full"),
                "stream_gpu_cpu_side": stream("gpu"),
                "imagefolder": lambda: DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=workers),
                "decode_only": lambda: DataLoader(decode, batch_size=args.batch, num_workers=workers),
            }

        resume = {at: best_resume(DataConfig(train_shards=str(root / "shards"), global_batch_size=args.batch,
                                             micro_batch_size=args.batch, num_workers=0), at, args.repeats)
                  for at in RESUME_AT}
        parallel = best_costs(pipelines(args.workers), args.images, args.repeats)
        single = best_costs(pipelines(0), args.images // 4, args.repeats, warm=True)
        draft = draft_speedup(items[:args.images // 4], args.repeats)
        print(f"{'':20s} {args.workers} workers: images/s   1 process: CPU ms/image   CPU cores per GPU at "
              f"{TARGET_IMAGES_PER_S} img/s")
        for name in parallel:
            print(f"{name:20s} {parallel[name][0]:20.1f} {single[name][1]:22.2f} "
                  f"{single[name][1] * TARGET_IMAGES_PER_S / 1000:20.1f}")
        print(f"JPEG decode at 1/2 DCT scale vs full: {draft:.2f}x faster (where a crop allows it)")
        for at, (seconds, read) in resume.items():
            print(f"resume at {at:3d} % of an epoch: first step after {seconds:.3f} s, {read / 1e6:.2f} MB read")

    figures = {"images": args.images, "workers": args.workers, "batch": args.batch, "img_size": IMG_SIZE,
               "mean_jpeg_kb": round(mean_kb, 1)}
    for name in parallel:
        figures[f"{name}_images_per_s"] = round(parallel[name][0], 1)
        figures[f"{name}_cpu_ms_per_image"] = round(single[name][1], 3)
        figures[f"{name}_cpu_cores_per_gpu_at_{TARGET_IMAGES_PER_S}"] = round(single[name][1] * TARGET_IMAGES_PER_S / 1000, 2)
    figures["draft_half_scale_decode_speedup"] = round(draft, 3)
    for a, b in (("stream", "imagefolder"), ("stream", "decode_only"), ("imagefolder", "decode_only")):
        figures[f"{a}_vs_{b}"] = round(parallel[a][0] / parallel[b][0], 3)
        figures[f"{a}_vs_{b}_cpu"] = round(single[b][1] / single[a][1], 3)
    for at, (seconds, read) in resume.items():
        figures[f"resume_{at}_first_step_s"] = round(seconds, 4)
        figures[f"resume_{at}_bytes_read"] = read
    figures["resume_90_vs_10_time"] = round(resume[90][0] / resume[10][0], 3)
    figures["resume_90_vs_10_bytes"] = round(resume[90][1] / resume[10][1], 3)
    figures.update(cpu_count=os.cpu_count(), load_avg_1min_at_end=round(os.getloadavg()[0], 2))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
