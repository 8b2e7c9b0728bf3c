"""Classification losses: softmax cross-entropy or big_vision's sigmoid cross-entropy.

Why sigmoid: ImageNet-21k images often carry several valid labels; big_vision
trains its i21k ViTs with per-class sigmoid cross-entropy summed over classes
(``sigmoid_xent``) and a classifier bias of -10. Both losses accept integer class
indices or float (B, C) targets (one-hot, smoothed, MixUp/CutMix-mixed), as
``BatchPreprocessor`` produces, and compute in fp32 whatever the logits' dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from pretrain.config import OptimConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def softmax_xent(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean softmax cross-entropy; ``target`` int64 (B,) or float (B, C) probabilities."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def sigmoid_xent(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-class sigmoid cross-entropy, summed over classes, mean over the batch (big_vision).

    Label smoothing moves each multi-hot target towards ``1 / C``, as ``optax.smooth_labels``.
    """
    num_classes = logits.shape[-1]
    if target.ndim == 1:
        target = F.one_hot(target, num_classes)
    target = target.float()
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").sum(-1).mean()


def build_loss(cfg: OptimConfig) -> LossFn:
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"optim.label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    fn = {"softmax": softmax_xent, "sigmoid": sigmoid_xent}.get(cfg.loss)
    if fn is None:
        raise ValueError(f"optim.loss={cfg.loss!r} is not one of ['softmax', 'sigmoid']")
    smoothing = cfg.label_smoothing
    return lambda logits, target: fn(logits, target, smoothing)


def target_kind(cfg: OptimConfig) -> str:
    """The target layout ``BatchPreprocessor`` should produce for this loss."""
    return "multihot" if cfg.loss == "sigmoid" else "index"
