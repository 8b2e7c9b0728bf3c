"""``check_config`` of pretraining: every check of a run that needs no process group, no model and no device.

Why a module of its own: the launchers run it before ``srun``/torchrun (``launch/describe.py
--check``: ``DRY_RUN=1``, ``launch/local.sh``) and ``python -m pretrain`` runs it before anything
else, so a config error costs what its imports cost: torch, not torchvision, DeepSpeed or the
training loop. The data's checks run before the loss and the schedule are built on a probe
(``check_training``: torch's own checks of their values), since building a torch optimizer
imports ``torch._dynamo``. On 2 cores (2026-12-07): a config error 2.3-2.9 s (4.0-5.2 s when
the whole loop was imported first), ``describe.py --check`` of a good config 6.3 s (7.1 s).
"""

from __future__ import annotations

from typing import Any

from pretrain import micro_batch
from pretrain.config import Config
from pretrain.engine import deepspeed_config
from pretrain.optim import check_training
from pretrain.preflight import preflight


def check_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """Config, training-loop settings, the data's manifests (``preflight``); returns the DeepSpeed config dict."""
    cfg.validate(world_size)
    preflight(cfg, world_size)
    check_training(cfg)
    return deepspeed_config(micro_batch.placeholder(cfg, world_size), world_size)
