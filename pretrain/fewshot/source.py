"""The model behind ``python -m pretrain.fewshot SOURCE``: a pretraining run or checkpoint, an export, or timm weights.

Accepted, in the order tried:

* a ``.safetensors`` file or a directory holding ``model.safetensors``: with ``config.json``
  beside it (``pretrain.export`` and ``finetune.export`` write one) the model is built from
  that; without one the weights are taken for timm's ``VisionTransformer`` (the names
  ``pretrain.model`` shares) and the architecture is read off the tensor shapes
  (``config_from_state_dict``);
* a pretraining run directory, its ``checkpoints/`` folder or one ``step_N/`` checkpoint: the
  latest complete checkpoint's fp32 weights, merged over the ranks that wrote it as
  ``pretrain.export`` does, into the model its marker describes.

Every load is ``strict``: a key that does not fit is an error naming it, never a random layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from pretrain.checkpoint import CheckpointDir
from pretrain.export import MODEL_CONFIG, WEIGHTS, consolidated_state_dict, load_exported
from pretrain.model import VARIANTS, VisionTransformer, build_vit_from_config

HEADS_BY_WIDTH = {width: heads for width, _, heads, _ in VARIANTS.values()}
"""Attention heads cannot be read off the weights (qkv is one matrix); the variant table's width decides."""


class SourceError(ValueError):
    """SOURCE is not a model this command can load (the message says why and what is accepted)."""


def config_from_state_dict(state: dict[str, torch.Tensor], num_heads: Optional[int] = None) -> dict[str, Any]:
    """``ViTConfig`` fields of timm-named ViT weights: widths from shapes, depth from block count, pooling from
    which norm is present, ``img_size`` from the square position grid."""
    if "cls_token" not in state or "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise SourceError("weights without cls_token, pos_embed and patch_embed.proj.weight are not a timm "
                          "VisionTransformer with a class token")
    width = state["cls_token"].shape[-1]
    proj = state["patch_embed.proj.weight"]
    tokens = state["pos_embed"].shape[1] - 1
    grid = round(tokens ** 0.5)
    if grid * grid != tokens:
        raise SourceError(f"pos_embed has {tokens} patch positions, not a square grid")
    heads = num_heads or HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise SourceError(f"width {width} is no variant of the table ({sorted(HEADS_BY_WIDTH)}): pass --num-heads")
    head = state.get("head.weight")
    pre_logits = state.get("pre_logits.fc.weight")
    return dict(embed_dim=width, depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
                num_heads=heads, mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0], patch_size=proj.shape[-1],
                img_size=grid * proj.shape[-1], in_chans=proj.shape[1],
                num_classes=0 if head is None else head.shape[0],
                pre_logits=None if pre_logits is None else pre_logits.shape[0],
                pool="gap" if "fc_norm.weight" in state else "token")


def _weights_file(path: Path) -> Optional[Path]:
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    return path / WEIGHTS if (path / WEIGHTS).is_file() else None


def _load_weights(weights: Path, num_heads: Optional[int]) -> VisionTransformer:
    if (weights.parent / MODEL_CONFIG).is_file():
        return load_exported(weights.parent)
    state = load_file(str(weights))
    model = build_vit_from_config(config_from_state_dict(state, num_heads))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exn:
        raise SourceError(f"{weights}: the weights do not fit the ViT read off their shapes: "
                          f"{' '.join(str(exn).split())}") from None
    return model.eval()


def run_config_file(path: Path) -> Optional[Path]:
    """The ``config.yaml`` of the run a checkpoint SOURCE belongs to (its data section gives the normalisation)."""
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
            return folder / "config.yaml"
    return None


def load_source(source: str, num_heads: Optional[int] = None) -> VisionTransformer:
    """The fp32 model of ``source`` in eval mode (module docstring); ``SourceError`` when it is none of those."""
    path = Path(source)
    if not path.exists():
        raise SourceError(f"{source} does not exist")
    weights = _weights_file(path)
    if weights is not None:
        return _load_weights(weights, num_heads)
    if path.is_dir():
        checkpoint = next(filter(None, (CheckpointDir(root).find() for root in (path / "checkpoints", path))), None)
        checkpoint = checkpoint or CheckpointDir(path.parent).read(path)
        if checkpoint is not None and "model" in checkpoint.meta:
            model = build_vit_from_config(checkpoint.meta["model"])
            model.load_state_dict(consolidated_state_dict(checkpoint.path, checkpoint.meta.get("zero_stage", 1)),
                                  strict=True)
            return model.eval()
    raise SourceError(f"{source} is not a .safetensors file, a directory with {WEIGHTS}, or a pretraining run / "
                      "checkpoint directory with a complete step_N/")

