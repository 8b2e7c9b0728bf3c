"""ViT model: weight/logit parity with timm, variant table, pos-embed resampling, FLOPs, helpers."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch.utils.flop_counter import FlopCounterMode

from pretrain.flops import flops_per_image
from pretrain.model import (
    VARIANTS,
    ViTConfig,
    build_vit,
    build_vit_from_config,
    parse_variant,
    reset_classifier,
    resample_pos_embed,
    vit_config,
)
from pretrain.optim import param_groups_weight_decay

TINY = dict(embed_dim=32, depth=2, num_heads=4, patch_size=8)


def tiny(**kwargs):
    kwargs = {**dict(img_size=32, num_classes=5), **TINY, **kwargs}
    return build_vit("custom", **kwargs)


def images(cfg: ViTConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)


def randomise_head(model) -> None:
    """Our init zeroes the classifier; random weights make logit comparisons meaningful."""
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
        model.head.bias.normal_()


def assert_same_outputs(ours, theirs, x: torch.Tensor) -> None:
    """Tokens, pooled pre-logits features and logits agree within 1e-5 (fp32)."""
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        feats, their_feats = ours.forward_features(x), theirs.forward_features(x)
        torch.testing.assert_close(feats, their_feats, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.forward_head(feats, pre_logits=True),
                                   theirs.forward_head(their_feats, pre_logits=True), rtol=0, atol=1e-5)
        logits = ours.forward_head(feats)
        assert logits.abs().max() > 0.1
        torch.testing.assert_close(logits, theirs.forward_head(their_feats), rtol=0, atol=1e-5)


def random_state(model) -> dict[str, torch.Tensor]:
    """Random weights for every key of ``model`` (LayerNorm scales around 1); much cheaper than init on B/16."""
    gen = torch.Generator().manual_seed(0)
    return {key: torch.randn(value.shape, generator=gen) * 0.02 + float("norm" in key and key.endswith("weight"))
            for key, value in model.state_dict().items()}


# ------------------------------------------------------------ timm parity


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_tiny16_matches_timm_both_ways(pool):
    ours = build_vit("Ti/16", pool=pool)
    randomise_head(ours)
    theirs = TimmViT(**ours.config.timm_kwargs())
    x = images(ours.config)

    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_outputs(ours, theirs, x)

    fresh = TimmViT(**ours.config.timm_kwargs())
    ours.load_state_dict(fresh.state_dict(), strict=True)
    assert_same_outputs(ours, fresh, x)


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_base16_matches_timm(pool):
    cfg = vit_config("B/16", img_size=64, pool=pool)
    with torch.device("meta"):
        ours, theirs = build_vit_from_config(cfg), TimmViT(**cfg.timm_kwargs())
    state = random_state(ours)
    ours.load_state_dict(state, strict=True, assign=True)
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    assert_same_outputs(ours, theirs, images(cfg))


def _as_timm_trunk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our pre-logits model's weights as a timm model whose ``head`` is our pre-logits layer."""
    trunk = {k: v for k, v in state.items() if not k.startswith("head.")}
    return {k.replace("pre_logits.fc.", "head."): v for k, v in trunk.items()}


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_pre_logits_head_matches_timm_trunk(pool):
    """timm 1.0 has no pre-logits layer: its ``head`` stands in for ``pre_logits.fc``, tanh and our head follow."""
    ours = build_vit("Ti/16", pool=pool, pre_logits=48, num_classes=7)
    randomise_head(ours)
    trunk_cfg = dataclasses.replace(ours.config, pre_logits=None, num_classes=48)
    theirs = TimmViT(**trunk_cfg.timm_kwargs())
    theirs.load_state_dict(_as_timm_trunk(ours.state_dict()), strict=True)
    x = images(ours.config)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        feats, their_feats = ours.forward_features(x), theirs.forward_features(x)
        torch.testing.assert_close(ours.forward_head(feats, pre_logits=True),
                                   theirs.forward_head(their_feats, pre_logits=True), rtol=0, atol=1e-5)
        expected = F.linear(torch.tanh(theirs.forward_head(their_feats)), ours.head.weight, ours.head.bias)
        torch.testing.assert_close(ours.forward_head(feats), expected, rtol=0, atol=1e-5)


TIMM_NAMES = {
    "Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224", "B/16": "vit_base_patch16_224",
    "B/32": "vit_base_patch32_224", "L/16": "vit_large_patch16_224", "H/14": "vit_huge_patch14_224",
    "g/14": "vit_giant_patch14_224",
}


@pytest.mark.parametrize("variant", list(TIMM_NAMES))
def test_variant_table_matches_timm_registry(variant):
    """Every table entry has exactly the parameter names and shapes of timm's registered model."""
    with torch.device("meta"):
        ours = build_vit(variant)
    theirs = timm.create_model(TIMM_NAMES[variant], pretrained=False, num_classes=1000, device="meta")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# ------------------------------------------------------------ variants and config


def test_variant_decoding_any_patch_and_overrides():
    assert set(VARIANTS) == {"Ti", "S", "B", "L", "H", "g"}
    assert parse_variant("L/14") == (1024, 24, 16, 4096, 14)
    cfg = vit_config("B/8", img_size=64, depth=2)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size) == (768, 2, 12, 3072, 8)
    assert vit_config("S/16", embed_dim=256, num_heads=4).mlp_dim == 1024
    model = build_vit("custom", img_size=48, mlp_dim=40, **TINY)
    assert (model.embed_dim, model.patch_size, model.grid_size, model.img_size) == (32, 8, (6, 6), 48)
    assert model.blocks[0].mlp.fc1.out_features == 40
    assert model.num_prefix_tokens == 1


@pytest.mark.parametrize("variant", ["X/16", "B16", "B/x", "b/16", "B/0"])
def test_unknown_variant_lists_valid_ones(variant):
    valid = r"Ti/PATCH, S/PATCH, B/PATCH, L/PATCH, H/PATCH, g/PATCH"
    with pytest.raises(ValueError, match=rf"unknown ViT variant .*{valid}"):
        build_vit(variant)


def test_custom_without_sizes_names_missing_ones():
    with pytest.raises(ValueError, match="needs depth, num_heads"):
        build_vit("custom", embed_dim=32, patch_size=8)


def test_img_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match=r"img_size=100 is not divisible by patch_size=16.*\(e\.g\. 96 or 112\)"):
        build_vit("B/16", img_size=100)


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="embed_dim=30 is not divisible by num_heads=4"):
        tiny(embed_dim=30)
    with pytest.raises(ValueError, match="pool='avg' is not one of"):
        tiny(pool="avg")


def test_input_of_wrong_size_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match=r"input images are \(40, 40\).*built for \(32, 32\)"):
        model(torch.randn(1, 3, 40, 40))


def test_config_json_round_trip_rebuilds_the_model():
    model = tiny(pre_logits=16, pool="gap", head_bias=-10.0, drop_path=0.1)
    randomise_head(model)
    data = json.loads(json.dumps(model.config.to_dict()))
    rebuilt = build_vit_from_config(data)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = images(model.config)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown key 'embed_dims'; did you mean 'embed_dim'"):
        build_vit_from_config({**data, "embed_dims": 8})


def test_init_follows_jax_scheme():
    model = build_vit("custom", img_size=32, num_classes=11, head_bias=-10.0, pre_logits=24, **TINY)
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.all(model.head.bias == -10.0)
    assert 0 < model.cls_token.abs().max() < 1e-4
    assert 0.015 < model.pos_embed.std() < 0.025
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / sum(qkv.shape))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert 0 < model.blocks[0].mlp.fc1.bias.abs().max() < 1e-4
    assert model.pre_logits.fc.weight.abs().max() > 0
    conv = model.patch_embed.proj.weight
    fan_in = conv[0].numel()
    assert conv.abs().max() <= 2 * math.sqrt(1 / fan_in) / 0.87962566103423978 + 1e-6
    assert abs(conv.std().item() * math.sqrt(fan_in) - 1) < 0.1


# ------------------------------------------------------------ pos-embed resampling


@pytest.mark.parametrize("old, new", [(14, 24), (14, (24, 16)), (24, 14), (7, 7)])
def test_resample_pos_embed_matches_timm(old, new):
    pos = torch.randn(1, 1 + old * old, 16, generator=torch.Generator().manual_seed(1))
    ours = resample_pos_embed(pos, new)
    new_hw = (new, new) if isinstance(new, int) else new
    theirs = resample_abs_pos_embed(pos, new_size=list(new_hw), num_prefix_tokens=1)
    assert ours.shape == (1, 1 + new_hw[0] * new_hw[1], 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:, :1], pos[:, :1], rtol=0, atol=0)
    if new_hw == (old, old):
        assert torch.equal(ours, pos)


def test_resample_pos_embed_with_explicit_old_grid_and_errors():
    pos = torch.randn(1, 1 + 6 * 4, 8)
    theirs = resample_abs_pos_embed(pos, new_size=[9, 6], old_size=[6, 4], num_prefix_tokens=1)
    torch.testing.assert_close(resample_pos_embed(pos, (9, 6), old_grid=(6, 4)), theirs, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not a square grid; pass old_grid"):
        resample_pos_embed(pos, 8)
    with pytest.raises(ValueError, match=r"old_grid=\(5, 5\) holds 25 positions, but pos_embed has 24"):
        resample_pos_embed(pos, 8, old_grid=(5, 5))


# ------------------------------------------------------------ FLOPs


def counted_flops(model) -> int:
    """FlopCounterMode on the explicit-attention path (it counts 0 FLOPs for CPU SDPA)."""
    x = images(model.config, batch=1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        feats, _ = model.forward_features(x, return_attention=True)
        model.forward_head(feats)
    return counter.get_total_flops()


@pytest.mark.parametrize("img_size", [224, 384])
def test_flops_match_flop_counter(img_size):
    model = build_vit("Ti/16", img_size=img_size, pre_logits=192, num_classes=1000)
    expected = counted_flops(model)
    assert abs(flops_per_image(model) - expected) <= 0.02 * expected
    assert flops_per_image(model.config) == flops_per_image(vit_config("Ti/16", pre_logits=192), img_size=img_size)


def test_flops_linear_head_and_bad_size():
    model = tiny(img_size=48)
    assert abs(flops_per_image(model) - counted_flops(model)) <= 0.02 * counted_flops(model)
    with pytest.raises(ValueError, match="img_size=50 is not divisible by patch_size=8"):
        flops_per_image(model, img_size=50)


# ------------------------------------------------------------ attention, checkpointing


def test_attention_weights_and_equal_outputs():
    model = tiny().eval()
    x = images(model.config)
    with torch.no_grad():
        fused = model.forward_features(x)
        explicit, attentions = model.forward_features(x, return_attention=True)
    tokens = 1 + 4 * 4
    assert len(attentions) == 2
    for weights in attentions:
        assert weights.shape == (2, 4, tokens, tokens)
        assert weights.min() >= 0
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, tokens))
    torch.testing.assert_close(explicit, fused, rtol=0, atol=1e-5)


def test_bf16_forward_both_attention_paths():
    model = tiny().to(torch.bfloat16).eval()
    x = images(model.config).to(torch.bfloat16)
    with torch.no_grad():
        fused = model.forward_features(x)
        explicit, attentions = model.forward_features(x, return_attention=True)
    assert fused.dtype == explicit.dtype == attentions[0].dtype == torch.bfloat16
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(explicit.float(), fused.float(), rtol=0, atol=0.1)


def test_grad_checkpointing_gives_same_gradients():
    """Stochastic depth is on, so equal gradients also show checkpointing replays the same random masks."""
    model = tiny(drop_path=0.5, num_classes=3)
    randomise_head(model)
    model.train()
    x = images(model.config, batch=8)

    def grads(enable: bool) -> tuple[dict[str, torch.Tensor], int]:
        """Gradients, and how many tensors autograd saved for backward in the forward."""
        saved = []
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
            loss = model(x).square().sum()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, len(saved)

    plain, saved_plain = grads(False)
    recomputed, saved_checkpointed = grads(True)
    assert saved_checkpointed < saved_plain / 2
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=1e-6, msg=name)


def test_drop_path_rates_rise_linearly_and_only_in_training():
    model = tiny(drop_path=0.3, depth=4)
    assert [b.drop_path1.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    randomise_head(model)
    x = images(model.config)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        first = model(x)
        assert any(not torch.equal(first, model(x)) for _ in range(5))


# ------------------------------------------------------------ head swap, weight decay


def test_reset_classifier_gives_zero_linear_head_with_timm_keys():
    model = tiny(pre_logits=16, num_classes=21, head_bias=-10.0)
    reset_classifier(model, 10)
    assert model.config.pre_logits is None and model.config.num_classes == model.num_classes == 10
    assert model.head.weight.shape == (10, 32)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert not any(k.startswith("pre_logits") for k in model.state_dict())
    with torch.device("meta"):
        twin = TimmViT(**model.config.timm_kwargs())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    with torch.no_grad():
        assert torch.count_nonzero(model(images(model.config))) == 0
    reset_classifier(model, 0)
    assert model.forward(images(model.config)).shape == (2, 32)


def test_param_groups_weight_decay():
    model = tiny(pre_logits=16)
    model.patch_embed.proj.weight.requires_grad_(False)
    decay, no_decay = param_groups_weight_decay(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "blocks.0.norm1.bias"} <= skipped
    assert all(model.get_parameter(n).ndim == 2 for n in decayed)
    assert decayed == {n for n, p in model.named_parameters()
                       if p.ndim >= 2 and n not in {"pos_embed", "cls_token", "patch_embed.proj.weight"}}
    assert decayed | skipped == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not decayed & skipped
