"""Attention rollout (Abnar & Zuidema) on hand-computed cases, and the PIL overlay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.attention import attention_panel, attention_rollout, colourise, predict_with_rollout
from pretrain.model import build_vit


def cls_attention(*cls_rows: list[float]) -> torch.Tensor:
    """(1, heads, 4, 4) attention: the class token's row per head; patches attend to themselves."""
    heads = []
    for row in cls_rows:
        attn = torch.eye(4)
        attn[0] = torch.tensor(row)
        heads.append(attn)
    return torch.stack(heads)[None]


def test_rollout_averages_heads_adds_identity_and_multiplies_in_depth_order():
    # Layer 1, heads averaged: class row [0, .5, .25, .25]; (A + I) / 2 -> [.5, .25, .125, .125].
    first = cls_attention([0, 1, 0, 0], [0, 0, 0.5, 0.5])
    # Layer 2: class row [0, 0, 0, 1] -> [.5, 0, 0, .5].
    second = cls_attention([0, 0, 0, 1], [0, 0, 0, 1])
    # M2 @ M1, class row = [.25, .125, .0625, .5625]; patches min-max scaled -> [.125, 0, 1].
    maps = attention_rollout([first, second], grid=(1, 3))
    torch.testing.assert_close(maps, torch.tensor([[[0.125, 0.0, 1.0]]]))
    # The other order (M1 @ M2) gives [.25, .125, .375] -> [.5, 0, 1]: order matters.
    torch.testing.assert_close(attention_rollout([second, first], grid=(1, 3)), torch.tensor([[[0.5, 0.0, 1.0]]]))


def test_rollout_rejects_a_wrong_grid():
    with pytest.raises(ValueError, match="covers 3 patches, but the grid"):
        attention_rollout([cls_attention([0, 1, 0, 0])], grid=(2, 2))


def test_colour_map_endpoints_and_overlay_panel():
    ends = colourise(np.array([0.0, 1.0]))
    assert ends.dtype == np.uint8 and ends[0].tolist() == [68, 1, 84] and ends[1].tolist() == [253, 231, 37]
    model = build_vit("custom", img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5).eval()
    logits, maps = predict_with_rollout(model, torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5) and maps.shape == (2, 4, 4)
    assert maps.amin() == 0.0 and maps.amax() == 1.0
    panel = attention_panel(Image.new("RGB", (32, 32), "white"), maps[0], size=64)
    assert panel.size == (128, 64)
    assert panel.getpixel((10, 10)) == (255, 255, 255) and panel.getpixel((74, 10)) != (255, 255, 255)
