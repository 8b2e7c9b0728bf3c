"""``python -m pretrain --config configs/pretrain/<recipe>.yaml [section.key=value ...]``.

Exit statuses (launchers rely on them): 0 finished, 75 preempted after a clean
save (requeue), or stopped by a signal during start-up before the first step
(requeue; nothing new to save), 1 a checkpoint could not be written (one line names
the file and why; the previous checkpoint stays the latest), 2 config/usage error
(raised before any process group starts) or a damaged checkpoint (one line names the
file and how to resume from the previous one), 3 too many non-finite losses, anything
else a real error.
"""

from __future__ import annotations

import sys
from typing import Optional

from pretrain.cli import exit_process, load_checked, parse_stage_args
from pretrain.signals import EXIT_CONFIG, PreemptionFlag


def main(argv: Optional[list[str]] = None) -> int:
    # The flag first: torch and DeepSpeed take seconds to import, and a signal then must not kill us.
    with PreemptionFlag() as flag:
        args = parse_stage_args("python -m pretrain", __doc__, "configs/pretrain/demo.yaml", argv)
        from pretrain.check import check_config  # torch only: a config error exits before the rest is imported
        from pretrain.config import Config

        loaded = load_checked(args, Config, check_config)
        if loaded is None:
            return EXIT_CONFIG
        env, cfg = loaded
        from pretrain.checkpoint import DamagedCheckpointError
        from pretrain.distributed import init_distributed, shutdown_distributed
        from pretrain.train import resume_point, train

        try:
            resume_point(cfg, env)  # a world-size change converts the checkpoint before any collective can time out
        except DamagedCheckpointError as exn:
            print(f"error: {exn}", file=sys.stderr)
            return EXIT_CONFIG
        device = init_distributed(env, cfg.distributed.timeout_min)
        try:
            return train(cfg, env, device, flag)
        finally:
            shutdown_distributed()


if __name__ == "__main__":
    exit_process(main())
