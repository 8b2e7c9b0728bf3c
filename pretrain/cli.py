"""What ``python -m pretrain`` and ``python -m finetune`` share: arguments, checked config, logging.

Why nothing heavy is imported here at module level: both ``main()``s install the
preemption flag first and only then import torch, DeepSpeed or Accelerate, so a
SIGUSR1/SIGTERM during those seconds of start-up ends in a clean exit 75, not in
death by signal. ``DistEnv`` (which imports torch) is therefore imported where used.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional, TypeVar

from pretrain.config import ConfigError, load_config

if TYPE_CHECKING:
    from pretrain.distributed import DistEnv

C = TypeVar("C")


def parse_stage_args(prog: str, doc: Optional[str], example: str, argv: Optional[list[str]],
                     overrides_help: str = "section.key=value overrides (CLI > file > defaults)"
                     ) -> argparse.Namespace:
    """``--config RECIPE`` plus positional overrides; ``doc`` (the module docstring) is the help text."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"YAML recipe, e.g. {example}")
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    return parser.parse_args(argv)


def load_checked(args: argparse.Namespace, cls: type[C], check_config: Callable[[C, int], Any]
                 ) -> Optional[tuple[DistEnv, C]]:
    """Read the distributed env, load the config and run ``check_config(cfg, world_size)``; then set up
    logging and check the CPU budget of the config's loader workers (``check_cpu_budget``).

    Returns None after printing ``config error: ...`` to stderr when any of them rejects
    its input; the caller then exits with ``EXIT_CONFIG`` before any process group starts.
    """
    from pretrain.distributed import DistEnv, check_cpu_budget

    try:
        env = DistEnv.from_env()
        cfg = load_config(args.config, args.overrides, cls=cls)
        check_config(cfg, env.world_size)
    except (ConfigError, ValueError) as exn:
        print(f"config error: {exn}", file=sys.stderr)
        return None
    setup_logging(env)
    check_cpu_budget(env, cfg.data.num_workers)
    return env, cfg


def setup_logging(env: DistEnv) -> None:
    """INFO on rank 0 and WARNING elsewhere, each line tagged with its rank; libraries quietened."""
    from pretrain.metrics import quiet_library_warnings

    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    quiet_library_warnings(env.rank)


def exit_process(status: int) -> NoReturn:
    """End a training process with ``status``, skipping the C++ static destructors.

    Why: after a complete run, torch's gloo/NCCL process groups stay referenced from C++
    even after ``shutdown_distributed`` (importing DeepSpeed adds two references to the
    default group that no Python code holds), so their worker threads are torn down among
    the interpreter's static destructors and race them: 2 of 15 finished 2-process bf16
    runs here aborted with ``terminate called without an active exception`` (SIGABRT) after
    their last checkpoint, which torchrun, the launchers and ``srun --kill-on-bad-exit``
    count as a failed job. Everything a run writes is closed before ``main`` returns
    (checkpoints, metrics, TensorBoard, loader workers); Python's own buffers are flushed here.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
