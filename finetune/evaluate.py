"""Top-1/top-5 with exact counts and per-class accuracy; ``python -m finetune.evaluate``.

Why counts and not averaged accuracies: every eval sample is seen exactly once
over all processes, but processes may see different numbers of batches, so the
only exact reduction is a sum of integer counts (correct top-1, correct top-5,
seen, per class), all-reduced once at the end.

Usage::

    python -m finetune.evaluate CHECKPOINT --data SHARDS [--split val] [--csv per_class.csv]

CHECKPOINT is anything ``finetune.export.load_finetuned`` accepts: a finetune run
directory, one of its ``checkpoints/step_N`` directories, or an exported
finetuned model (``model.safetensors`` with ``config.json`` and ``finetune.yaml``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import ConfigError
from pretrain.data import build_eval_stream
from pretrain.transforms import BatchPreprocessor

from .export import load_finetuned

TOP_K = 5


@dataclass
class EvalResult:
    """Exact counts over the whole eval set."""

    correct_top1: int
    correct_top5: int
    total: int
    class_correct: list[int]
    class_total: list[int]

    @property
    def top1(self) -> float:
        return self.correct_top1 / max(self.total, 1)

    @property
    def top5(self) -> float:
        return self.correct_top5 / max(self.total, 1)

    def summary(self) -> str:
        return (f"top-1 {self.top1:.4f} ({self.correct_top1}/{self.total})  "
                f"top-5 {self.top5:.4f} ({self.correct_top5}/{self.total})")

    def write_csv(self, path: Path, class_names: Optional[Sequence[str]] = None) -> None:
        """One row per class: index, name, correct, total, accuracy (empty when the class is absent)."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "name", "correct", "total", "accuracy"])
            for index, (correct, total) in enumerate(zip(self.class_correct, self.class_total)):
                name = class_names[index] if class_names else str(index)
                writer.writerow([index, name, correct, total, f"{correct / total:.6f}" if total else ""])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def evaluate_model(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   preprocess: BatchPreprocessor, num_classes: int, img_size: int, device: torch.device,
                   max_batches: int = 0) -> EvalResult:
    """Count correct predictions over this process' ``batches``, then sum over all processes.

    With several processes, all of them agree before every batch whether anyone still
    has one, and those that ran out forward a dummy image: under ZeRO-3 a forward is a
    collective that every rank must join (plain DDP would not need it).
    """
    was_training = model.training
    model.eval()
    k = min(TOP_K, num_classes)
    # Row 0: correct top-1 per class, row 1: correct top-k per class, row 2: samples per class.
    counts = torch.zeros(3, num_classes, dtype=torch.int64, device=device)
    dummy = (torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64))
    iterator = iter(batches)
    index = 0
    while not max_batches or index < max_batches:
        batch = next(iterator, None)
        if _distributed():
            more = torch.tensor([int(batch is not None)], device=device)
            dist.all_reduce(more)
            if not more.item():
                break
        elif batch is None:
            break
        images, labels = batch if batch is not None else dummy
        x, _ = preprocess(images, labels, device, train=False)
        logits = model(x)
        if batch is not None:
            target = labels.to(device)
            hit = logits.float().topk(k, dim=-1).indices == target[:, None]
            counts[0].index_add_(0, target, hit[:, 0].long())
            counts[1].index_add_(0, target, hit.any(dim=-1).long())
            counts[2].index_add_(0, target, torch.ones_like(target))
        index += 1
    if _distributed():
        dist.all_reduce(counts)
    model.train(was_training)
    per_class = counts.cpu().tolist()
    return EvalResult(correct_top1=sum(per_class[0]), correct_top5=sum(per_class[1]), total=sum(per_class[2]),
                      class_correct=per_class[0], class_total=per_class[2])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="export directory, model.safetensors, finetune run or step directory")
    parser.add_argument("--data", help="eval shards (directory with _info.json, brace pattern); "
                                       "default: the run's data.eval_shards")
    parser.add_argument("--split", help="split of a shard directory; default: the run's data.eval_split")
    parser.add_argument("--csv", type=Path, help="per-class accuracy CSV; default: per_class_<split>.csv "
                                                 "beside the checkpoint")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the run's eval batch size")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        finetuned = load_finetuned(args.checkpoint)
    except (FileNotFoundError, ConfigError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    data = dataclasses.replace(
        finetuned.cfg.data,
        eval_shards=args.data or finetuned.cfg.data.eval_shards,
        eval_split=args.split or finetuned.cfg.data.eval_split,
        eval_batch_size=args.batch_size or finetuned.cfg.data.eval_batch_size,
        num_workers=args.workers,
    )
    if not data.eval_shards:
        print("error: the run has no data.eval_shards; pass --data SHARDS", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = finetuned.model.to(device)
    num_classes = model.num_classes
    try:
        stream = build_eval_stream(data, img_size=model.img_size, rank=0, world_size=1)
        result = evaluate_model(model, stream, BatchPreprocessor(data, num_classes), num_classes, model.img_size,
                                device)
    except (FileNotFoundError, KeyError, ValueError) as exn:  # missing shards or split, labels out of range
        print(f"error: {exn}", file=sys.stderr)
        return 2
    csv_path = args.csv or finetuned.location / f"per_class_{data.eval_split}.csv"
    result.write_csv(csv_path, finetuned.class_names)
    print(f"{args.checkpoint} on {data.eval_shards} [{data.eval_split}]: {result.summary()}")
    print(f"per-class accuracy: {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
