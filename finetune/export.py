"""Finetuned model artefacts: write the export, and read back any finetune CHECKPOINT.

A finetune CHECKPOINT (what ``finetune.evaluate`` and ``finetune.predict`` take) is one of:

* an exported finetuned model: a directory with ``model.safetensors`` (fp32,
  timm key names), ``config.json`` (``ViTConfig``), ``finetune.yaml`` (the
  resolved run config: eval transforms, shards) and, when the shards had one,
  ``classes.json``; or the ``model.safetensors`` file inside it. Training writes
  it to ``<run dir>/export/`` when it finishes;
* a finetune run directory: its ``export/`` if training finished, else its
  latest complete checkpoint;
* one checkpoint directory ``<run dir>/checkpoints/step_NNNNNNNN/`` (written by
  ``accelerator.save_state``; with the DeepSpeed plugin the weights are
  consolidated with DeepSpeed's ZeRO->fp32 tool).

Why an export next to the checkpoints: a checkpoint carries optimizer state and
the engine's layout; an export is what is shipped, needs neither Accelerate nor
DeepSpeed, and loads into timm's ``VisionTransformer`` as it is.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data_tools.manifest import CLASSES_FILE, read_classes
from pretrain.checkpoint import CheckpointDir
from pretrain.config import config_from_dict, dump_config, load_config
from pretrain.export import MODEL_CONFIG, WEIGHTS, consolidated_state_dict, load_exported

from .config import FinetuneConfig
from .load import build_finetune_model

EXPORT_DIR = "export"
RUN_CONFIG = "finetune.yaml"
TRAINER_STATE = "trainer_state.json"
"""Client state written beside ``accelerator.save_state``'s files in every checkpoint."""
DEEPSPEED_TAG = "pytorch_model"
"""Sub-directory (DeepSpeed tag) where Accelerate's DeepSpeed plugin saves the model."""


@dataclass
class Finetuned:
    """A finetuned model ready for inference, with what is needed to feed it and name its outputs."""

    model: nn.Module
    cfg: FinetuneConfig
    class_names: Optional[list[str]]
    location: Path
    """The export or checkpoint directory the weights came from."""


def shards_dir(cfg: FinetuneConfig) -> Optional[Path]:
    """The train shard directory (where ``classes.json`` lives), when the spec is one."""
    spec = cfg.data.train_shards
    return Path(spec) if isinstance(spec, str) and spec and Path(spec).is_dir() else None


def write_export(state_dict: dict[str, torch.Tensor], model: nn.Module, cfg: FinetuneConfig, out: Path) -> Path:
    """Write weights, model config, run config and class names to ``out`` (see module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}, str(out / WEIGHTS))
    (out / MODEL_CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2))
    dump_config(cfg, out / RUN_CONFIG)
    shards = shards_dir(cfg)
    if shards is not None and (shards / CLASSES_FILE).is_file():
        shutil.copyfile(shards / CLASSES_FILE, out / CLASSES_FILE)
    return out


def _checkpoint_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    if (step_dir / WEIGHTS).is_file():
        return load_file(str(step_dir / WEIGHTS))
    if (step_dir / DEEPSPEED_TAG).is_dir():
        return consolidated_state_dict(step_dir / DEEPSPEED_TAG, zero_stage=1)
    raise FileNotFoundError(f"{step_dir} has neither {WEIGHTS} nor a DeepSpeed {DEEPSPEED_TAG}/ directory")


def _load_step(step_dir: Path) -> Finetuned:
    state = json.loads((step_dir / TRAINER_STATE).read_text())
    cfg = config_from_dict(state["config"], FinetuneConfig, source=str(step_dir / TRAINER_STATE))
    model = build_finetune_model(cfg)
    model.load_state_dict(_checkpoint_weights(step_dir), strict=True)
    shards = shards_dir(cfg)
    return Finetuned(model.eval(), cfg, read_classes(shards) if shards else None, step_dir)


def _load_export(directory: Path) -> Finetuned:
    cfg = load_config(directory / RUN_CONFIG, cls=FinetuneConfig)
    return Finetuned(load_exported(directory), cfg, read_classes(directory), directory)


def load_finetuned(path: Union[str, Path]) -> Finetuned:
    """Resolve a finetune CHECKPOINT (module docstring) and load it for inference on the CPU."""
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if (path / WEIGHTS).is_file() and (path / RUN_CONFIG).is_file():
        return _load_export(path)
    if (path / TRAINER_STATE).is_file():
        return _load_step(path)
    if (path / EXPORT_DIR / RUN_CONFIG).is_file():
        return _load_export(path / EXPORT_DIR)
    latest = CheckpointDir(path / "checkpoints").find()
    if latest is not None:
        return _load_step(latest.path)
    raise FileNotFoundError(
        f"{path} is not a finetune checkpoint: expected an export directory ({WEIGHTS} + {RUN_CONFIG}), "
        f"a finetune run directory or one of its checkpoints/step_N directories")
