"""``python -m pretrain --config configs/pretrain/<recipe>.yaml [section.key=value ...]``.

Exit statuses (launchers rely on them): 0 finished, 75 preempted after a clean
save (requeue), 2 config/usage error (raised before any process group starts),
3 too many non-finite losses, anything else a real error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from pretrain.config import ConfigError, load_config
from pretrain.distributed import DistEnv, init_distributed, shutdown_distributed
from pretrain.metrics import quiet_library_warnings
from pretrain.signals import EXIT_CONFIG


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/pretrain/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (CLI > file > defaults)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        env = DistEnv.from_env()
        cfg = load_config(args.config, args.overrides)
        from pretrain.train import check_config

        check_config(cfg, env.world_size)
    except (ConfigError, ValueError) as exn:
        print(f"config error: {exn}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    quiet_library_warnings(env.rank)
    device = init_distributed(env)
    try:
        from pretrain.train import train

        return train(cfg, env, device)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
