"""``python -m finetune --config configs/finetune/<recipe>.yaml init=<pretrained> [section.key=value ...]``.

Runs on one process, or several under ``torchrun``, ``accelerate launch`` or
SLURM ``srun``. Exit statuses (launchers rely on them): 0 finished, 75 preempted
after a clean save (requeue), 2 config/usage error or pretrained weights that do
not fit the model (found before any process group starts), 3 too many
non-finite steps, anything else a real error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from pretrain.config import ConfigError, load_config
from pretrain.distributed import DistEnv
from pretrain.signals import EXIT_CONFIG

from .config import FinetuneConfig
from .load import PretrainedLoadError
from .train import check_config, train


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/finetune/demo.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="init=PATH and section.key=value overrides (CLI > file > defaults)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        env = DistEnv.from_env()
        cfg = load_config(args.config, args.overrides, cls=FinetuneConfig)
        check_config(cfg, env.world_size)
    except (ConfigError, ValueError) as exn:
        print(f"config error: {exn}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        return train(cfg)
    except PretrainedLoadError as exn:
        print(f"error loading init={cfg.init}: {exn}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
