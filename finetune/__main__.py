"""``python -m finetune --config configs/finetune/<recipe>.yaml init=<pretrained> [section.key=value ...]``.

Runs on one process, or several under ``torchrun``, ``accelerate launch`` or
SLURM ``srun``. Exit statuses (launchers rely on them): 0 finished, 75 preempted
after a clean save, or stopped by a signal during start-up before the first step
(requeue), 2 config/usage error, pretrained weights that do not fit the model
(found before any process group starts) or a damaged checkpoint (one line names the
file and how to resume from the previous one), 3 too many non-finite steps, anything
else a real error.
"""

from __future__ import annotations

import sys
from typing import Optional

from pretrain.cli import exit_process, load_checked, parse_stage_args
from pretrain.signals import EXIT_CONFIG, PreemptionFlag


def main(argv: Optional[list[str]] = None) -> int:
    # The flag first: torch and Accelerate take seconds to import, and a signal then must not kill us.
    with PreemptionFlag() as flag:
        args = parse_stage_args("python -m finetune", __doc__, "configs/finetune/demo.yaml", argv,
                                overrides_help="init=PATH and section.key=value overrides (CLI > file > defaults)")
        from .check import check_config  # torch only: a config error exits before the rest is imported
        from .config import FinetuneConfig

        loaded = load_checked(args, FinetuneConfig, check_config)
        if loaded is None:
            return EXIT_CONFIG
        _, cfg = loaded
        from pretrain.checkpoint import DamagedCheckpointError

        from .load import PretrainedLoadError
        from .train import train

        try:
            return train(cfg, flag)
        except PretrainedLoadError as exn:
            print(f"error loading init={cfg.init}: {exn}", file=sys.stderr)
            return EXIT_CONFIG
        except DamagedCheckpointError as exn:
            print(f"error: {exn}", file=sys.stderr)
            return EXIT_CONFIG


if __name__ == "__main__":
    exit_process(main())
