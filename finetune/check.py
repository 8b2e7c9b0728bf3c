"""``check_config`` of finetuning: every check that needs no process group and no weights (``ConfigError``, exit 2).

A module of its own for the reason ``pretrain.check`` gives: ``launch/describe.py --check`` and
``python -m finetune`` run it before torchvision, Accelerate or the training loop are imported.
"""

from __future__ import annotations

from pretrain.config import ConfigError
from pretrain.optim import check_training
from pretrain.preflight import preflight

from .config import FinetuneConfig


def check_config(cfg: FinetuneConfig, world_size: int) -> None:
    """Config, training-loop settings and the data's manifests (``preflight``)."""
    cfg.validate(world_size)
    if cfg.data.micro_batch_size == "auto":
        raise ConfigError("data.micro_batch_size: 'auto' is resolved by pretraining only; set an integer for "
                          "finetuning (e.g. 32)")
    preflight(cfg, world_size)
    check_training(cfg)
