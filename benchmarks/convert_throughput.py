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

The last line of output is one JSON object with every figure and ratio. The default
mode also times ``verify`` of the copy-mode shards with 1 and 2 workers, ``--repeats``
times each (wall time; spread reported, since other jobs move it).

Scale mode (``--scale``): tiny JPEGs (a few hundred bytes; names like ImageNet-21k's)
in class tars of ``--per-tar`` files, at 30k and 120k files:

- listing + planning: wall and CPU seconds, and peak RSS of a fresh process that lists
  the source and writes the plan; the growth between the two sizes, per file, is the
  planner's memory per source file (the imports' fixed cost cancels out).
- part vs whole: CPU seconds (user + sys, every process) of one whole conversion with
  2 workers vs ``--parts`` ``--part`` runs with 2 workers each plus the ``--merge``, all
  as CLI processes on each source, run one after another as on separate nodes (the
  tests run parts concurrently); and (parts - 1) listings, what the parts would add if
  each listed the source itself. Each process costs ~0.2 CPU s of imports, so tiny
  sources overstate the ratio; a SLURM part of ImageNet-21k converts ~220k images.
- opens per tar: class-tar opens / tars read, per part (the converter's own count;
  the tests count them independently by wrapping ``open``).

    python benchmarks/convert_throughput.py --scale [--parts 4] [--per-tar 300]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from PIL import Image

from data_tools.convert import convert

RESIZE_MAX = 320
QUALITY = 90
SAMPLES_PER_SHARD = 250
SCALE_SIZES = (30_000, 120_000)
SCALE_PER_SHARD = 1000


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


def converter(source: Path, work: Path, workers: int, resize: bool) -> tuple[float, float, int, Path]:
    """Images per wall second, per CPU second, shard bytes and folder of one conversion into a fresh folder."""
    out = Path(tempfile.mkdtemp(dir=work))
    options = {"resize_max": RESIZE_MAX, "quality": QUALITY} if resize else {}
    wall, cpu = time.perf_counter(), cpu_seconds()
    summary = convert(source, out, samples_per_shard=SAMPLES_PER_SHARD, workers=workers, progress=False, **options)
    images = summary["num_samples"]
    return images / (time.perf_counter() - wall), images / (cpu_seconds() - cpu), summary["bytes"], out


def timed_verify(out: Path, workers: int) -> tuple[float, float]:
    """Wall and CPU seconds (this process and its workers) of one ``verify``."""
    from data_tools.verify import verify  # imports torch (webdataset): kept out of the --probe-plan child

    wall, cpu = time.perf_counter(), cpu_seconds()
    problems = verify(out, workers=workers)
    assert problems == [], problems[:3]
    return time.perf_counter() - wall, cpu_seconds() - cpu


def verify_figures(out: Path, repeats: int) -> dict:
    """``verify`` with 1 and 2 workers, alternated ``repeats`` times: wall ratio (median, spread) and CPU ratio.

    The CPU ratio (near 1: the second worker adds little work) holds on a loaded machine;
    the wall ratio only shows the speed-up where two cores are free: "cores used" (CPU
    over wall) says how many this run got.
    """
    runs = {1: [], 2: []}
    for _ in range(repeats):
        for workers in (1, 2):
            runs[workers].append(timed_verify(out, workers))
    ratios = sorted(two[0] / one[0] for one, two in zip(runs[1], runs[2]))
    cpu = {w: sum(c for _, c in r) for w, r in runs.items()}
    return {"verify_w1_s": [round(t, 2) for t, _ in runs[1]], "verify_w2_s": [round(t, 2) for t, _ in runs[2]],
            "verify_w2_vs_w1_median": round(ratios[len(ratios) // 2], 3),
            "verify_w2_vs_w1_min": round(ratios[0], 3), "verify_w2_vs_w1_max": round(ratios[-1], 3),
            "verify_w2_vs_w1_cpu": round(cpu[2] / cpu[1], 3),
            "verify_w1_cores_used": round(cpu[1] / sum(t for t, _ in runs[1]), 2),
            "verify_w2_cores_used": round(cpu[2] / sum(t for t, _ in runs[2]), 2)}


def make_class_tars(root: Path, files: int, per_tar: int) -> None:
    """``files`` tiny distinct-named JPEGs in ``root/n%08d.tar`` class tars of ``per_tar`` members."""
    rng = np.random.default_rng(0)
    variants = []
    for seed in range(64):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((16, 12), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=80)
        variants.append(buf.getvalue())
    root.mkdir(parents=True)
    for start in range(0, files, per_tar):
        wnid = f"n{start // per_tar:08d}"
        with tarfile.open(root / f"{wnid}.tar", "w") as archive:
            for index in range(start, min(start + per_tar, files)):
                data = variants[index % len(variants)]
                info = tarfile.TarInfo(f"{wnid}_{index}.JPEG")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def probe_plan(source: str, work: str) -> None:
    """(Child process) list ``source``, write its plan into ``work``, print CPU, wall and peak RSS as JSON."""
    from data_tools.plan import make_plan
    from data_tools.planfile import write_plan
    from data_tools.sources import list_source, sorted_class_names

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), cpu_seconds()
    listing = list_source(Path(source), "classtars")
    listed_cpu = cpu_seconds() - cpu
    plan = make_plan("train", listing, sorted_class_names(listing.class_names), seed=0,
                     samples_per_shard=SCALE_PER_SHARD, shard_size=None,
                     options={})
    Path(work).mkdir(parents=True)
    write_plan(Path(work), plan, {"settings": {}, "containers": listing.containers, "root": source}, [])
    print(json.dumps({"files": len(listing.files), "wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu,
                      "listing_cpu_s": listed_cpu, "rss_before_kb": before,
                      "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "plan_bytes": sum(p.stat().st_size for p in Path(work).iterdir())}))


def child_cpu(commands: list[list[str]]) -> tuple[float, list[str]]:
    """Run the commands one after another (niced like this process); CPU seconds of all of them, their outputs.

    One after another, as on separate nodes: run together on 2 cores, 4 parts x 3
    processes would also measure their contention with each other.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    outputs = []
    for command in commands:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert done.returncode == 0, done.stdout
        outputs.append(done.stdout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, outputs


def parts_vs_whole(work: Path, files: int, parts: int, plan: dict) -> dict:
    """CPU of a whole conversion vs ``parts`` parts + merge of the ``files`` source; opens per part."""
    cli = [sys.executable, "-m", "data_tools", "convert", str(work / f"src{files}")]
    opts = ["--samples-per-shard", str(SCALE_PER_SHARD), "--workers", "2", "--no-progress"]
    whole, _ = child_cpu([cli + [str(work / f"whole{files}")] + opts])
    parted, outputs = child_cpu([cli + [str(work / f"parts{files}")] + opts + ["--part", f"{i}/{parts}"]
                                 for i in range(parts)])
    merge, _ = child_cpu([cli + [str(work / f"parts{files}")] + opts + ["--merge"]])
    same = all((work / f"whole{files}" / p.name).read_bytes() == p.read_bytes()
               for p in (work / f"parts{files}").glob("*.tar"))
    opens = [line for text in outputs for line in text.splitlines() if line.startswith("read ")]
    figures = {"whole_cpu_s": round(whole, 2), "parts_cpu_s": round(parted, 2), "merge_cpu_s": round(merge, 2),
               "parts_plus_merge_vs_whole_cpu": round((parted + merge) / whole, 3),
               "relisting_would_add_cpu_s": round((parts - 1) * plan["listing_cpu_s"], 2),
               "parts_shards_identical": same, "opens_per_part": opens}
    print(f"{files} files, CPU: whole {whole:.1f} s; {parts} parts {parted:.1f} s + merge {merge:.1f} s = "
          f"{figures['parts_plus_merge_vs_whole_cpu']:.2f}x whole (relisting in every part would add "
          f"{figures['relisting_would_add_cpu_s']:.1f} s); shards identical: {same}; " + "; ".join(opens))
    return figures


def scale(parts: int, per_tar: int) -> dict:
    figures = {"parts": parts, "per_tar": per_tar, "cpu_cores": os.cpu_count(),
               "load_avg_1m": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for files in SCALE_SIZES:
            make_class_tars(work / f"src{files}", files, per_tar)
            probe = subprocess.run([sys.executable, __file__, "--probe-plan", str(work / f"src{files}"),
                                    str(work / f"plan{files}")], capture_output=True, text=True, check=True)
            got = json.loads(probe.stdout.splitlines()[-1])
            figures[f"plan_{files}"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in got.items()}
            print(f"{files} files: listing + planning {got['wall_s']:.1f} s wall, {got['cpu_s']:.1f} s CPU "
                  f"(listing {got['listing_cpu_s']:.1f} s), peak RSS {got['peak_rss_kb'] / 1024:.0f} MiB, "
                  f"plan {got['plan_bytes'] / 1e6:.1f} MB on disk")
        low, high = (figures[f"plan_{n}"] for n in SCALE_SIZES)
        figures["plan_rss_bytes_per_file"] = round((high["peak_rss_kb"] - low["peak_rss_kb"]) * 1024
                                                   / (SCALE_SIZES[1] - SCALE_SIZES[0]), 1)
        figures["plan_disk_bytes_per_file"] = round(high["plan_bytes"] / SCALE_SIZES[1], 1)
        print(f"planning memory: {figures['plan_rss_bytes_per_file']} bytes per source file "
              f"(peak RSS growth {SCALE_SIZES[0]} -> {SCALE_SIZES[1]} files)")

        for files in SCALE_SIZES:
            figures[f"parts_vs_whole_{files}"] = parts_vs_whole(work, files, parts, figures[f"plan_{files}"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="verify timings per worker count")
    parser.add_argument("--scale", action="store_true", help="scale mode (module docstring)")
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--per-tar", type=int, default=300)
    parser.add_argument("--probe-plan", nargs=2, metavar=("SOURCE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_plan:
        probe_plan(*args.probe_plan)
        return
    if args.scale:
        print(json.dumps(scale(args.parts, args.per_tar)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from data_throughput import make_images  # sibling script; imports torch, so not in the --probe-plan child

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
        shards = {}
        for mode in ("copy", "resize"):
            for workers in (1, 2):
                run = f"{mode}_w{workers}"
                rate, per_cpu, nbytes, out = converter(work / "src", work, workers, resize=mode == "resize")
                shards[run] = out
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
        figures.update(verify_figures(shards["copy_w1"], args.repeats))
        print(f"verify (wall, {args.repeats} runs each): 1 worker {figures['verify_w1_s']} s, 2 workers "
              f"{figures['verify_w2_s']} s, ratio median {figures['verify_w2_vs_w1_median']} "
              f"(range {figures['verify_w2_vs_w1_min']}-{figures['verify_w2_vs_w1_max']}), "
              f"CPU ratio {figures['verify_w2_vs_w1_cpu']}, cores used {figures['verify_w1_cores_used']} "
              f"(1 worker) and {figures['verify_w2_cores_used']} (2 workers)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
