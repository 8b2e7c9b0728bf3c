"""Pretrained weights -> finetune model: read, filter (head swap, pos-embed resample), strict load.

Why a filter function plus an exact key check (timm's ``checkpoint_filter_fn``,
MAE's asserted missing keys): ``load_state_dict(strict=False)`` alone would
silently start from random weights for any key that was renamed, so after
dropping the pretraining head the only keys allowed to be missing are the new
classifier's, and none may be unexpected. A checkpoint of another model size
fails before loading, naming every parameter with both shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file
from torch import nn

from pretrain.checkpoint import CheckpointDir
from pretrain.export import MODEL_CONFIG, WEIGHTS, consolidated_state_dict
from pretrain.model import ViTConfig, build_vit, reset_classifier, resample_pos_embed

from .config import FinetuneConfig

NEW_HEAD_KEYS = frozenset({"head.weight", "head.bias"})
"""The only keys a finetune model may miss after loading: its fresh zero-initialised classifier."""
PRETRAIN_HEAD_PREFIXES = ("pre_logits.", "head.")
"""The pretraining head (tanh pre-logits layer and classifier), dropped before loading."""


class PretrainedLoadError(ValueError):
    """The pretrained weights do not fit the finetune model (names, shapes or source)."""


def build_finetune_model(cfg: FinetuneConfig) -> nn.Module:
    """The downstream model: the configured ViT at the finetune resolution, zero-initialised linear head."""
    model = build_vit(cfg.model.variant, **cfg.model.build_kwargs())
    reset_classifier(model, cfg.model.num_classes)
    return model


def _grid_of(config: dict[str, Any]) -> Optional[tuple[int, int]]:
    """Patch grid of the model a ``ViTConfig`` dict describes (None for an empty dict)."""
    return ViTConfig.from_dict(config).grid_size if config else None


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module,
                         old_grid: Optional[tuple[int, int]] = None) -> dict[str, torch.Tensor]:
    """Drop the pretraining head and resample ``pos_embed`` to ``model``'s grid (class token kept).

    ``old_grid`` is the pretraining patch grid; None infers a square one from the token count.
    """
    target = model.pos_embed
    filtered = {}
    for key, value in state_dict.items():
        if key.startswith(PRETRAIN_HEAD_PREFIXES):
            continue
        if key == "pos_embed" and value.shape != target.shape:
            grid = tuple(model.patch_embed.grid_size)
            try:
                value = resample_pos_embed(value, new_grid=grid, num_prefix_tokens=model.num_prefix_tokens,
                                           old_grid=old_grid)
            except ValueError as exn:
                raise PretrainedLoadError(f"pos_embed {tuple(value.shape)} cannot be resampled to the finetune "
                                          f"grid {grid}: {exn}") from None
        filtered[key] = value
    return filtered


def load_filtered(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a filtered state dict; anything but exactly the new head missing is an error."""
    own = model.state_dict()
    mismatched = [f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                  for key, value in state_dict.items() if key in own and value.shape != own[key].shape]
    if mismatched:
        raise PretrainedLoadError(
            "pretrained weights have other shapes than the finetune model (another model size? "
            "set model.variant / model sizes to the pretrained ones):\n  " + "\n  ".join(mismatched))
    result = model.load_state_dict(state_dict, strict=False)
    missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
    if missing != NEW_HEAD_KEYS or unexpected:
        problems = []
        if missing - NEW_HEAD_KEYS:
            problems.append(f"missing from the checkpoint: {sorted(missing - NEW_HEAD_KEYS)}")
        if NEW_HEAD_KEYS - missing:
            problems.append("expected the new head to be missing, but the checkpoint has "
                            f"{sorted(NEW_HEAD_KEYS - missing)}")
        if unexpected:
            problems.append(f"unexpected in the checkpoint: {sorted(unexpected)}")
        raise PretrainedLoadError("pretrained weights do not match the finetune model:\n  " + "\n  ".join(problems))


def _deepspeed_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of one DeepSpeed checkpoint tag directory (``pretrain.export``'s merge).

    ZeRO 1-3 checkpoints have per-rank optimizer partitions (``*_optim_states.pt``) that
    DeepSpeed's ZeRO->fp32 tool reassembles; a stage-0 checkpoint holds the whole module.
    """
    if not any(tag_dir.glob("*model_states.pt")):
        raise PretrainedLoadError(f"init: {tag_dir} holds no DeepSpeed model states (*model_states.pt)")
    return consolidated_state_dict(tag_dir, zero_stage=1 if any(tag_dir.glob("*_optim_states.pt")) else 0)


def _checkpoint_tag_dir(path: Path) -> tuple[Path, Optional[tuple[int, int]]]:
    """The DeepSpeed tag directory ``init`` names, and its model's grid when the marker records it.

    ``path`` may be a pretraining run directory (its latest complete checkpoint), its
    ``checkpoints/`` directory, one ``step_N/`` directory, or any DeepSpeed save
    directory with a ``latest`` file.
    """
    for root in (path / "checkpoints", path):
        latest = CheckpointDir(root).find()
        if latest is not None:
            return latest.path, _grid_of(latest.meta.get("model") or {})
    single = CheckpointDir(path.parent).read(path)
    if single is not None:
        return path, _grid_of(single.meta.get("model") or {})
    if (path / "latest").is_file():
        return path / (path / "latest").read_text().strip(), None
    if any(path.glob("*model_states.pt")):
        return path, None
    raise PretrainedLoadError(
        f"init: {path} is not an exported model.safetensors, a pretraining run directory, or a DeepSpeed "
        "checkpoint directory (with a complete step_N/, a 'latest' file or *model_states.pt files)")


def read_pretrained(init: Union[str, Path]) -> tuple[dict[str, torch.Tensor], Optional[tuple[int, int]]]:
    """Weights and pretraining patch grid from an exported model, a pretraining run or a DeepSpeed checkpoint."""
    path = Path(init)
    weights = path / WEIGHTS if path.is_dir() else path
    if weights.is_file():
        if weights.suffix != ".safetensors":
            raise PretrainedLoadError(f"init: {path} is a file but not a .safetensors export")
        config_path = weights.parent / MODEL_CONFIG
        grid = _grid_of(json.loads(config_path.read_text())) if config_path.is_file() else None
        return load_file(str(weights)), grid
    if not path.is_dir():
        raise PretrainedLoadError(f"init: {path} does not exist")
    tag_dir, grid = _checkpoint_tag_dir(path)
    return _deepspeed_weights(tag_dir), grid


def load_pretrained(model: nn.Module, init: Union[str, Path]) -> None:
    """Read ``init``, filter it for ``model`` and load it strictly (see module docstring)."""
    state_dict, grid = read_pretrained(init)
    load_filtered(model, checkpoint_filter_fn(state_dict, model, old_grid=grid))
