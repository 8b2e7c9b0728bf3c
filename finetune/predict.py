"""Top-5 classes of images, and attention-rollout maps; ``python -m finetune.predict``.

Usage::

    python -m finetune.predict CHECKPOINT image.jpg [more.png ...] [--attention-map OUT.png] [--top-k 5]

CHECKPOINT is anything ``finetune.export.load_finetuned`` accepts. Images get the
run's eval transform (resize, center crop to the model's resolution) and
normalisation, exactly as in ``finetune.evaluate``, and run on the first visible GPU
if there is one (else the CPU). Class names come from the
``classes.json`` exported with the model (label indices when there is none).

``--attention-map OUT.png`` writes, per image, the model's input crop and its
attention rollout overlay side by side; with several images the files are
``OUT_<image stem>.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from pretrain.config import ConfigError
from pretrain.data.image_header import CorruptImageError
from pretrain.data.transforms import BatchPreprocessor, build_eval_transform
from pretrain.distributed import single_process_device

from .attention import attention_panel, predict_with_rollout
from .export import load_finetuned


def map_path(out: Path, image: Path, many: bool) -> Path:
    """Where the attention map of ``image`` goes (see module docstring)."""
    return out.with_name(f"{out.stem}_{image.stem}{out.suffix or '.png'}") if many else out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="export directory, model.safetensors, finetune run or step directory")
    parser.add_argument("images", nargs="+", type=Path, help="image files (any format PIL reads)")
    parser.add_argument("--attention-map", type=Path, metavar="OUT.png", help="write attention-rollout overlays")
    parser.add_argument("--top-k", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"error: no such image file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        finetuned = load_finetuned(args.checkpoint)
    except (FileNotFoundError, ConfigError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    device = single_process_device()
    model, data = finetuned.model.to(device), finetuned.cfg.data
    transform = build_eval_transform(data, model.img_size)
    crops = []
    for path in args.images:
        try:
            crops.append(transform(path.read_bytes()))
        except CorruptImageError as exn:
            print(f"error: {path}: {exn}", file=sys.stderr)
            return 2
    crops = torch.stack(crops)
    x, _ = BatchPreprocessor(data, model.num_classes)(crops, torch.zeros(len(crops), dtype=torch.int64),
                                                      device, train=False)
    logits, maps = predict_with_rollout(model, x)
    probs = logits.float().softmax(dim=-1).cpu()
    names = finetuned.class_names or [str(i) for i in range(model.num_classes)]
    top = probs.topk(min(args.top_k, model.num_classes), dim=-1)
    for i, path in enumerate(args.images):
        print(f"{path}:")
        for rank, (p, c) in enumerate(zip(top.values[i].tolist(), top.indices[i].tolist()), start=1):
            print(f"  {rank}. {names[c]} ({c})  {p:.4f}")
        if args.attention_map:
            out = map_path(args.attention_map, path, many=len(args.images) > 1)
            out.parent.mkdir(parents=True, exist_ok=True)
            attention_panel(Image.fromarray(crops[i].permute(1, 2, 0).numpy()), maps[i].cpu()).save(out)
            print(f"  attention map: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
