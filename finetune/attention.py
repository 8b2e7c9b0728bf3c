"""Attention rollout (Abnar & Zuidema, 2020) and its overlay on the input image.

Why rollout and not the last layer's attention: information mixes across
tokens in every block, so one layer's map says little about which pixels
reach the class token. Rollout treats each block as a mixing matrix (heads
averaged, plus the identity for the residual path, rows renormalised) and
multiplies them through the depth; the class token's row over the patches is
the map. The overlay needs only PIL and a hand-written colour map, so
prediction works without plotting libraries.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

# Anchors of a perceptually ordered dark-blue -> teal -> yellow map (close to viridis).
_COLOUR_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def attention_rollout(attentions: Sequence[torch.Tensor], grid: tuple[int, int],
                      num_prefix_tokens: int = 1) -> torch.Tensor:
    """Class-token rollout over the patches, ``(B, grid_h, grid_w)``, each map min-max scaled to [0, 1].

    ``attentions`` holds one ``(B, heads, N, N)`` softmax attention per block, in depth order.
    """
    if not attentions:
        raise ValueError("attention_rollout needs the attention of at least one block")
    rollout = None
    for attn in attentions:
        mixing = attn.float().mean(dim=1)
        mixing = mixing + torch.eye(mixing.shape[-1], dtype=mixing.dtype, device=mixing.device)
        mixing = mixing / mixing.sum(dim=-1, keepdim=True)
        rollout = mixing if rollout is None else mixing @ rollout
    patches = rollout[:, 0, num_prefix_tokens:]
    if patches.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"attention covers {patches.shape[-1]} patches, but the grid {grid} has {grid[0] * grid[1]}")
    maps = patches.reshape(-1, *grid)
    low = maps.flatten(1).amin(dim=1)[:, None, None]
    high = maps.flatten(1).amax(dim=1)[:, None, None]
    return (maps - low) / (high - low).clamp_min(1e-12)


def colourise(heat: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with the colour map above (piecewise linear)."""
    positions = np.linspace(0.0, 1.0, len(_COLOUR_ANCHORS))
    flat = np.clip(heat, 0.0, 1.0).reshape(-1)
    rgb = np.stack([np.interp(flat, positions, _COLOUR_ANCHORS[:, c]) for c in range(3)], axis=-1)
    return rgb.reshape(*heat.shape, 3).round().astype(np.uint8)


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """Blend the colourised ``(grid_h, grid_w)`` map, upsampled bicubically, over ``image``."""
    image = image.convert("RGB")
    small = Image.fromarray((heat.detach().cpu().float().numpy() * 255.0).round().astype(np.uint8))
    upsampled = np.asarray(small.resize(image.size, Image.BICUBIC), dtype=np.float64) / 255.0
    return Image.blend(image, Image.fromarray(colourise(upsampled)), alpha)


@torch.no_grad()
def predict_with_rollout(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and rollout maps ``(B, grid_h, grid_w)`` of a ``VisionTransformer`` in one forward."""
    feats, attentions = model.forward_features(x, return_attention=True)
    logits = model.forward_head(feats)
    return logits, attention_rollout(attentions, tuple(model.grid_size), model.num_prefix_tokens)


def attention_panel(image: Image.Image, heat: torch.Tensor, size: int = 256) -> Image.Image:
    """The model's input and its rollout overlay side by side, each scaled to ``size`` pixels high."""
    width = round(image.width * size / image.height)
    shown = image.convert("RGB").resize((width, size), Image.BICUBIC)
    panel = Image.new("RGB", (2 * width, size))
    panel.paste(shown, (0, 0))
    panel.paste(overlay(shown, heat), (width, 0))
    return panel
