"""``python -m pretrain.data.order --config CFG [key=value ...] --steps A:B``: which samples did step s see?

Prints one JSON line per global step ``s`` (1-based, as in ``data_keys/rank-*.jsonl``) in
``[A, B)``: ``{"step": s, "epoch": e, "keys": [sorted __key__ of the whole global batch]}``.
No training and no image bytes: the order is arithmetic on the manifest, and keys come
from the per-shard indexes (checked against their shards; built from tar headers into
``data.cache_dir`` where one is missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from pretrain.config import ConfigError, load_config
from pretrain.data.sample_table import StaleIndexError, cache_root, check_index
from pretrain.data.shards import train_data
from pretrain.signals import EXIT_CONFIG


def _steps(text: str) -> range:
    first, sep, end = text.partition(":")
    try:
        steps = range(int(first), int(end))
    except ValueError:
        steps = range(0)
    if not sep or not steps or steps.start < 1:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: expected A:B with 1 <= A < B (1-based global steps)")
    return steps


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data.order", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's YAML recipe")
    parser.add_argument("--steps", required=True, type=_steps, help="A:B, global steps A .. B-1 (1-based)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as given to the trainer")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        data = train_data(cfg.data, cfg.run.seed)
    except (ConfigError, ValueError, OSError, KeyError) as exn:
        print(f"config error: {exn}", file=sys.stderr)
        return EXIT_CONFIG
    order, keys, cache = data.order, {}, cache_root(cfg.data.cache_dir)
    try:
        for step in args.steps:
            epoch, in_epoch = order.where(step - 1)
            shards, indices = order.locate(order.samples(epoch, in_epoch))
            for shard in set(shards.tolist()) - set(keys):
                keys[shard] = check_index(data.urls[shard], int(order.lengths[shard]), cache).keys
            batch = sorted(keys[s][i] for s, i in zip(shards.tolist(), indices.tolist()))
            print(json.dumps({"step": step, "epoch": epoch, "keys": batch}), flush=True)
    except StaleIndexError as exn:
        print(f"data error: {exn}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
