"""Cost of the representation monitors (``pretrain.fewshot``) at the i21k recipes' cadence, from measured figures.

    python benchmarks/monitor_cost.py                                      # CPU: Ti/16 at 112 px, batch 16
    python benchmarks/monitor_cost.py --variant B/16 --img-size 224 --batch 128   # on a GPU (bf16)

Measured on one device, alternating rounds (best of ``--repeats``):

* ``train_images_per_s``: the plain AdamW training step of ``benchmarks/train_step.py`` (forward,
  backward, clip, update);
* ``extract_images_per_s``: ``pretrain.fewshot.features.extract`` on the same model and batch
  (eval mode, no gradients, the pre-logits hook);
* ``probe_fit_s``: rank 0's work per evaluation for the largest probe set of the block, the
  12 ImageNet-1k probes (1, 5, 10, 25 shots x 3 seeds; 1,000 classes; D = ``--dim``, 768 for B/16),
  in float64 on the device the fit runs on in training.

Then the block's arithmetic (``configs/pretrain/vit_b16_i21k.yaml``): images forwarded per
evaluation, at most the union of every seed's picks (``seeds x max(shots) x classes``, capped at
the train split) plus the kNN bank plus every val image, against ``every_steps x global_batch``
training images in between. The monitors' share of the device time is

    images_per_eval / extract_images_per_s  /  (every_steps x global_batch / train_images_per_s)

(both terms per device: ranks share the monitor's images as they share the batch), plus the probe
fit, which waits for rank 0 alone and is reported in seconds per evaluation. The last line is one
JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import plain_step, timed_steps  # noqa: E402

from pretrain.config import DataConfig  # noqa: E402
from pretrain.data.transforms import BatchPreprocessor  # noqa: E402
from pretrain.fewshot.features import extract  # noqa: E402
from pretrain.fewshot.probe import fit_probe  # noqa: E402
from pretrain.metrics import finish_device_work  # noqa: E402
from pretrain.model import build_vit  # noqa: E402

BLOCK = {
    # name: (classes, train images, val images, max shots, kNN bank per class)
    "imagenet": (1000, 1_281_167, 50_000, 25, 100),
    "cifar100": (100, 50_000, 10_000, 25, 0),
    "pets": (37, 3_680, 3_669, 25, 0),
    "flowers": (102, 1_020, 6_149, 10, 0),
}
"""The commented ``eval.fewshot`` / ``eval.knn`` block of the i21k recipes (split sizes from the datasets' own)."""
SEEDS = 3
EVERY_STEPS = 10_000
GLOBAL_BATCH = 4096


def images_per_evaluation() -> dict[str, int]:
    """Upper bound of the images one evaluation forwards, per dataset: picks + kNN bank + val."""
    return {name: min(SEEDS * shots * classes + bank * classes, train) + val
            for name, (classes, train, val, shots, bank) in BLOCK.items()}


def probe_fit_seconds(dim: int, device: torch.device, classes: int = 1000) -> float:
    """Rank 0's fits for ImageNet-1k's 12 probes (1/5/10/25 shots x 3 seeds) on random features, on ``device``."""
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    for shots in (1, 5, 10, 25):
        for _ in range(SEEDS):
            labels = torch.arange(classes, device=device).repeat_interleave(shots)
            features = torch.randn(len(labels), dim, dtype=torch.float64, device=device, generator=generator)
            fit_probe(features, labels, classes, 1024.0)
    finish_device_work(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="Ti/16")
    parser.add_argument("--img-size", type=int, default=None, help="default 112 on CPU, 224 on GPU")
    parser.add_argument("--batch", type=int, default=None, help="default 16 on CPU, 128 on GPU")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dim", type=int, default=768, help="feature width of the probe-fit timing (B/16: 768)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    img_size, batch = args.img_size or (224 if gpu else 112), args.batch or (128 if gpu else 16)
    model = build_vit(args.variant, img_size=img_size, num_classes=1000).to(device)
    images = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8)
    preprocess = BatchPreprocessor(DataConfig(), 1)
    x, _ = preprocess(images, torch.zeros(0, dtype=torch.int64), device)
    y = torch.randint(0, 1000, (batch,), device=device)
    train = plain_step(model, x, y, bf16=gpu)
    dtype = torch.bfloat16 if gpu else torch.float32
    model_for_extract = model.to(dtype) if gpu else model

    def extract_batch() -> None:
        extract(model_for_extract, [(images, torch.arange(batch))], preprocess, device, dtype, img_size)

    train_s, extract_s = [], []
    for _ in range(args.repeats):
        train_s.append(timed_steps(train, args.steps, 1, device))
        extract_s.append(timed_steps(extract_batch, args.steps, 1, device))
    train_ips, extract_ips = args.steps * batch / min(train_s), args.steps * batch / min(extract_s)
    per_eval = images_per_evaluation()
    total = sum(per_eval.values())
    train_images = EVERY_STEPS * GLOBAL_BATCH
    share = (total / extract_ips) / (train_images / train_ips)
    fit_s = probe_fit_seconds(args.dim, device)
    print(f"{args.variant} {img_size}px batch {batch} on {device}: train {train_ips:.1f} img/s, "
          f"feature extraction {extract_ips:.1f} img/s ({extract_ips / train_ips:.2f}x)")
    print("images per evaluation: " + ", ".join(f"{k} {v:,}" for k, v in per_eval.items()) + f"; total {total:,}")
    print(f"every {EVERY_STEPS:,} steps x {GLOBAL_BATCH} = {train_images:,} training images: monitors "
          f"{100 * share:.3f} % of device time; rank-0 probe fit {fit_s:.1f} s per evaluation (D={args.dim})")
    print(json.dumps({"variant": args.variant, "img_size": img_size, "batch": batch, "device": str(device),
                      "train_images_per_s": train_ips, "extract_images_per_s": extract_ips,
                      "images_per_evaluation": per_eval, "share_of_training": share, "probe_fit_s": fit_s}))


if __name__ == "__main__":
    main()
