"""Finetune run configuration: the pretrain sections, recomposed, plus ``init`` and ``accelerate``.

Why a second root and not a flag on ``pretrain.config.Config``: finetuning has
different defaults (SGD, no weight decay, 384 px, 1k classes), a required
pretrained ``init`` and an Accelerate section instead of the DeepSpeed engine
one. It composes the same section dataclasses and goes through the same strict
loader (``load_config(path, overrides, cls=FinetuneConfig)``), so a typo fails
the same way in both stages and ``init=...`` works as a top-level override.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from pretrain.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    validate_common,
)


@dataclass
class AccelerateConfig:
    """How Accelerate runs the loop; devices and processes come from the launcher."""

    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast dtype for forward passes; weights and optimizer state stay fp32. fp16 needs a GPU."""
    zero_stage: Optional[Literal[1, 2, 3]] = None
    """Wrap the model with Accelerate's DeepSpeed plugin at this ZeRO stage (models that do not
    fit one device with plain DDP); None uses DDP. The plugin needs the ``transformers`` package."""


def _finetune_model() -> ModelConfig:
    return ModelConfig(img_size=384, num_classes=1000)


def _finetune_data() -> DataConfig:
    return DataConfig(global_batch_size=512, micro_batch_size=32)


def _finetune_optim() -> OptimConfig:
    return OptimConfig(name="sgd", lr=0.03, momentum=0.9, weight_decay=0.0, grad_clip=1.0)


def _finetune_schedule() -> ScheduleConfig:
    return ScheduleConfig(total_steps=20_000, warmup_steps=500, decay="cosine")


@dataclass
class FinetuneConfig:
    """Root finetuning config (defaults: the ViT paper's ImageNet-1k transfer at 384 px)."""

    init: str = ""
    """Pretrained weights: an exported ``model.safetensors`` (``config.json`` beside it), a
    pretraining run directory (its latest checkpoint) or a DeepSpeed checkpoint directory."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=_finetune_model)
    """The finetune model; its size must equal the pretrained one (checked when loading),
    ``img_size`` and ``num_classes`` are the downstream ones, ``pre_logits`` must stay None."""
    data: DataConfig = field(default_factory=_finetune_data)
    optim: OptimConfig = field(default_factory=_finetune_optim)
    schedule: ScheduleConfig = field(default_factory=_finetune_schedule)
    accelerate: AccelerateConfig = field(default_factory=AccelerateConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int = 1, check_paths: bool = True) -> None:
        """Reject impossible settings before any process group starts."""
        validate_common(self, world_size, check_paths)
        errors = []
        if not self.init:
            errors.append("init is empty: pass the pretrained weights, "
                          "e.g. init=runs/<pretrain>/export/model.safetensors")
        elif check_paths and not Path(self.init).exists():
            errors.append(f"init: {self.init} does not exist (an exported model.safetensors, "
                          "a pretraining run directory or a DeepSpeed checkpoint directory)")
        if self.model.pre_logits is not None:
            errors.append(f"model.pre_logits={self.model.pre_logits}: finetuning replaces the pretraining head "
                          "with a linear classifier; remove model.pre_logits (or set it to null)")
        if self.accelerate.mixed_precision == "fp16" and not torch.cuda.is_available():
            errors.append("accelerate.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
        if self.accelerate.zero_stage is not None and importlib.util.find_spec("transformers") is None:
            errors.append(f"accelerate.zero_stage={self.accelerate.zero_stage}: Accelerate's DeepSpeed plugin "
                          "needs the transformers package; install it or set accelerate.zero_stage=null (DDP)")
        if errors:
            raise ConfigError.of(errors)
