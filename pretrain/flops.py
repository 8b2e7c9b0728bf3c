"""Analytic forward FLOPs of a ViT, for throughput and MFU reporting.

Why a formula and not a profiler: it costs nothing per step, holds for any
device and attention kernel (``FlopCounterMode`` counts no FLOPs for CPU SDPA),
and is checked against ``torch.utils.flop_counter`` on the explicit-attention
path in ``tests/test_model.py``. FLOPs are 2 x multiply-accumulates of the
matrix products (patch conv, qkv, q @ k^T, attention @ v, output projection,
MLP, head); norms, softmax, GELU and residual adds are left out, as in the
usual MFU accounting (PaLM appendix B). A training step costs about 3x the
forward (backward = 2x), plus one more forward with gradient checkpointing.
"""

from __future__ import annotations

from typing import Optional, Union

from .model import ViTConfig, VisionTransformer


def flops_per_image(model_or_cfg: Union[VisionTransformer, ViTConfig], img_size: Optional[int] = None) -> int:
    """Forward FLOPs for one image; ``img_size`` overrides the model's resolution (e.g. finetuning at 384)."""
    cfg = model_or_cfg.config if isinstance(model_or_cfg, VisionTransformer) else model_or_cfg
    size = cfg.img_size if img_size is None else img_size
    if size % cfg.patch_size:
        raise ValueError(f"flops_per_image: img_size={size} is not divisible by patch_size={cfg.patch_size}")
    patches = (size // cfg.patch_size) ** 2
    tokens = patches + VisionTransformer.num_prefix_tokens
    dim, mlp = cfg.embed_dim, cfg.mlp_dim

    embed = patches * cfg.in_chans * cfg.patch_size ** 2 * dim
    projections = tokens * (3 * dim * dim + dim * dim + 2 * dim * mlp)
    attention = 2 * tokens * tokens * dim
    head = dim * cfg.pre_logits + cfg.pre_logits * cfg.num_classes if cfg.pre_logits else dim * cfg.num_classes
    return 2 * (embed + cfg.depth * (projections + attention) + head)
