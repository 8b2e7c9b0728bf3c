"""Print a run's resolved config for the top of a launcher's log; ``--check`` also validates it.

Usage: ``python launch/describe.py {pretrain,finetune} [--check --world-size N] --config CFG [key=value ...]``

Why a step before ``srun``: a job log must say exactly what ran (the file, the
overrides and the defaults, merged), and a typo in a key must stop the job
once, on the batch host, before any rank starts. Without ``--check`` only the
strict loader runs (no torch import: seconds matter at every restart); the
trainer repeats the full checks itself and exits 2 on failure, which the
launcher never requeues. ``--check`` (used by ``DRY_RUN=1``) runs the stage's
own ``check_config`` and, for pretraining, prints the DeepSpeed config derived
for this world size.

Exit status 2 (the trainers' config-error status) on an invalid config.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Optional

from pretrain.config import ConfigError, dump_config, load_config
from pretrain.signals import EXIT_CONFIG

STAGES = {
    "pretrain": ("pretrain.config:Config", "pretrain.check:check_config"),
    "finetune": ("finetune.config:FinetuneConfig", "finetune.check:check_config"),
}
"""Stage -> (root config class, ``check_config(cfg, world_size)``; pretrain's returns the DeepSpeed dict)."""


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/describe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument("--check", action="store_true",
                        help="run the trainer's config checks (and derive the DeepSpeed config)")
    parser.add_argument("--world-size", type=int, default=1, help="number of training processes (with --check)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as given to the trainer")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    config_target, check_target = STAGES[args.stage]
    try:
        cfg = load_config(args.config, args.overrides, cls=_resolve(config_target))
        derived = _resolve(check_target)(cfg, args.world_size) if args.check else None
    except (ConfigError, ValueError) as exn:
        print(f"config error: {exn}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"# resolved {args.stage} config ({args.config} + overrides)")
    print(dump_config(cfg), end="")
    if derived is not None:
        print(f"# derived DeepSpeed config (world size {args.world_size})")
        print(json.dumps(derived, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
