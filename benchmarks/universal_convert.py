"""Time of the universal-checkpoint conversion a resume on another world size needs (ZeRO-3).

    python benchmarks/universal_convert.py                 # ViT-S/16: a checkpoint of a few hundred MB
    python benchmarks/universal_convert.py --variant B/16 --workers 8

Trains one step of a ZeRO-3 engine (one process, fp32 on CPU, bf16 on GPU), saves it with
``pretrain.checkpoint.save_deepspeed`` and converts it with ``convert_to_universal``, once with
one extract/merge worker (the former setting, the baseline) and once with ``--workers``. Prints
the checkpoint size, seconds and MB/s of each and their ratio; the last line is one JSON object.

Why it matters at scale: rank 0 converts while every other rank waits, which is why the wait is
on the file system, before the process group starts, with ``deepspeed.universal_timeout_min``.
At a measured rate R MB/s, ViT-H/14 at 21k classes (about 660 M parameters; fp32 master weights
and two Adam moments are 12 bytes each, plus 2-byte bf16 weights: about 9.2 GB) takes
9200 / R seconds; DeepSpeed's extraction also opens one file per old rank (512 at full scale).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.checkpoint import CheckpointDir, convert_to_universal, save_deepspeed
from pretrain.config import Config
from pretrain.distributed import DistEnv, init_distributed
from pretrain.engine import build_engine, deepspeed_config
from pretrain.model import build_vit


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="S/16")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    return parser.parse_args()


def saved_checkpoint(variant: str, root: Path, device: torch.device):
    """One optimizer step of a ZeRO-3 engine, saved as step 1 under ``root``."""
    cfg = Config()
    cfg.model.variant, cfg.model.img_size, cfg.model.num_classes = variant, 32, 1000
    cfg.data.global_batch_size = cfg.data.micro_batch_size = 2
    cfg.deepspeed.zero_stage = 3
    cfg.deepspeed.precision = "bf16" if device.type == "cuda" else "fp32"
    cfg.schedule.total_steps, cfg.schedule.warmup_steps = 10, 1
    engine = build_engine(build_vit(variant, img_size=32, num_classes=1000), cfg, deepspeed_config(cfg, 1))
    x = torch.randn(2, 3, 32, 32, device=device, dtype=engine.module.cls_token.dtype)
    engine.backward(F.cross_entropy(engine(x).float(), torch.tensor([1, 2], device=device)))
    engine.step()
    return save_deepspeed(engine, CheckpointDir(root), 1, {"step": 1}, {}, keep_last=1)


def main() -> None:
    args = parse_args()
    device = init_distributed(DistEnv.from_env())
    root = Path(args.dir or tempfile.mkdtemp(prefix="universal_"))
    try:
        checkpoint = saved_checkpoint(args.variant, root / "checkpoints", device)
        size_mb = sum(p.stat().st_size for p in checkpoint.path.rglob("*") if p.is_file()) / 1e6
        result: dict = {"variant": args.variant, "checkpoint_mb": round(size_mb, 1)}
        for workers in (1, args.workers):
            start = time.perf_counter()
            out = convert_to_universal(checkpoint, rank=0, timeout_s=0, workers=workers)
            seconds = time.perf_counter() - start
            shutil.rmtree(out)
            result[f"seconds_{workers}_workers"] = round(seconds, 2)
            result[f"mb_per_s_{workers}_workers"] = round(size_mb / seconds, 1)
            print(f"{workers:3d} workers: {seconds:7.2f} s for {size_mb:.0f} MB", flush=True)
        result["speedup"] = round(result["seconds_1_workers"] / result[f"seconds_{args.workers}_workers"], 2)
        print(json.dumps(result))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
