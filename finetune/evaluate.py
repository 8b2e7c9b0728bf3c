"""``python -m finetune.evaluate``: exact top-1/top-5 and a per-class accuracy CSV of a finetuned model.

The counting itself (shared with pretraining) is ``pretrain.evaluate.evaluate_model``.

Usage::

    python -m finetune.evaluate CHECKPOINT --data SHARDS [--split val] [--csv per_class.csv]

CHECKPOINT is anything ``finetune.export.load_finetuned`` accepts: a finetune run
directory, one of its ``checkpoints/step_N`` directories, or an exported
finetuned model (``model.safetensors`` with ``config.json`` and ``finetune.yaml``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

from pretrain.config import ConfigError
from pretrain.data.eval_stream import build_eval_stream
from pretrain.data.transforms import BatchPreprocessor
from pretrain.distributed import single_process_device
from pretrain.evaluate import evaluate_model

from .export import load_finetuned


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
    device = single_process_device()
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
