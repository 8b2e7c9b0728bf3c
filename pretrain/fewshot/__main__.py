"""``python -m pretrain.fewshot SOURCE --data [NAME=]DIR [--shots 1,5,10,25]``: few-shot probe and kNN of any model.

SOURCE is a pretraining run, checkpoint, export, or timm-named ``model.safetensors``
(``pretrain.fewshot.source``). Each ``--data`` is a shard directory with a train and a val
split (``python -m data_tools convert``). Prints the table, then one JSON line (the record
the training loop writes to ``fewshot.jsonl``). Exit 2 with one line on stderr for a bad
SOURCE, a missing dataset or split, or a shot count above a class' train images.

Runs in one process; under ``torchrun`` every rank shares the images as in the loop.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from pretrain.signals import EXIT_CONFIG


def _numbers(kind):
    return lambda text: [kind(value) for value in text.split(",") if value.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.fewshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="run directory, checkpoint step_N/, export directory or .safetensors file")
    parser.add_argument("--data", action="append", required=True, metavar="[NAME=]DIR",
                        help="labelled shard directory (repeat for several); NAME defaults to the folder's name")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--shots", type=_numbers(int), default=[1, 5, 10, 25], help="default 1,5,10,25")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--l2", type=float, default=1024.0, help="ridge penalty (default 2^10)")
    parser.add_argument("--l2-grid", type=_numbers(float), default=[],
                        help="e.g. 64,128,256,512,1024: choose L2 on held-out shots")
    parser.add_argument("--knn-k", type=int, default=20, help="0 skips the kNN monitor")
    parser.add_argument("--knn-temperature", type=float, default=0.07)
    parser.add_argument("--knn-bank", type=int, default=100, help="train images a class in the bank (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes")
    parser.add_argument("--normalize", choices=["imagenet", "inception"],
                        help="pixel normalisation (default: the run's data.normalize, else imagenet)")
    parser.add_argument("--crop-pct", type=float, help="eval center-crop fraction (default: the run's, else 0.875)")
    parser.add_argument("--num-heads", type=int, help="attention heads of timm weights whose width is no variant")
    parser.add_argument("--device", default=None, help="one process: default cuda if available, else cpu")
    return parser


def eval_section(args: argparse.Namespace):
    """The ``eval.fewshot`` / ``eval.knn`` sections the flags describe, validated as a run's would be."""
    from pathlib import Path

    from pretrain.config import ConfigError, FewShotConfig, KnnConfig, PretrainEvalConfig

    datasets = {}
    for item in args.data:
        name, sep, directory = item.rpartition("=")
        name = name if sep else Path(directory).resolve().name
        if name in datasets:
            raise ConfigError(f"--data: the name {name!r} is given twice: write NAME=DIR")
        datasets[name] = {"shards": directory, "train_split": args.train_split, "val_split": args.val_split}
    section = PretrainEvalConfig(
        fewshot=FewShotConfig(datasets=datasets, shots=args.shots, seeds=args.seeds, l2=args.l2,
                              l2_grid=args.l2_grid, batch_size=args.batch_size),
        knn=KnnConfig(datasets=datasets if args.knn_k else {}, k=max(args.knn_k, 1),
                      temperature=args.knn_temperature, bank_per_class=args.knn_bank))
    errors = section.errors()
    if errors:
        raise ConfigError(errors[0])
    return section


def data_section(args: argparse.Namespace, source: str):
    """Normalisation and crop of the run the source came from, unless the flags say otherwise."""
    import dataclasses
    from pathlib import Path

    from pretrain.config import DataConfig, load_config
    from pretrain.fewshot.source import run_config_file

    config_file = run_config_file(Path(source))
    data = load_config(config_file).data if config_file else DataConfig()
    return dataclasses.replace(data, normalize=args.normalize or data.normalize, num_workers=args.workers,
                               eval_crop_pct=args.crop_pct or data.eval_crop_pct)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from pretrain.config import ConfigError
    from pretrain.distributed import DistEnv, init_distributed, shutdown_distributed, single_process_device
    from pretrain.fewshot.monitor import Monitor
    from pretrain.fewshot.source import SourceError, load_source
    from pretrain.preflight import check_monitor_data

    try:
        section = eval_section(args)
        check_monitor_data(section)
        model = load_source(args.source, args.num_heads)
        data = data_section(args, args.source)
    except (ConfigError, SourceError) as exn:
        print(f"fewshot: {exn}", file=sys.stderr)
        return EXIT_CONFIG
    env = DistEnv.from_env()
    device = init_distributed(env) if env.world_size > 1 else torch.device(args.device or single_process_device())
    try:
        monitor = Monitor(section.fewshot, section.knn, data, model.config.img_size, env.rank, env.world_size, device)
        record = monitor.evaluate(model.to(device), step=0)
    finally:
        shutdown_distributed()
    if env.is_main:
        print(record.table())
        print(record.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
