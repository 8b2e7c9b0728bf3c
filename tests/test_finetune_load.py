"""Pretrained -> finetune loading: head swap, pos-embed resampling, strict keys (issue 6, must-show 1 and 2).

The oracle for the resampled model is timm's ``VisionTransformer`` built at the
finetune resolution (dev-only dependency) and timm's own ``resample_abs_pos_embed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune.__main__ import main as finetune_main
from finetune.config import FinetuneConfig
from finetune.load import PretrainedLoadError, build_finetune_model, load_pretrained, read_pretrained
from pretrain.config import apply_overrides
from pretrain.model import build_vit

timm_vit = pytest.importorskip("timm.models.vision_transformer")
timm_layers = pytest.importorskip("timm.layers")

SIZES = dict(embed_dim=48, depth=2, num_heads=3, mlp_dim=96, patch_size=4)


def pretrained_model(**changes) -> torch.nn.Module:
    """A pretraining-style model (tanh pre-logits head) with every weight random, incl. the head."""
    torch.manual_seed(0)
    kwargs = {**SIZES, "img_size": 32, "num_classes": 10, "pre_logits": 48, **changes}
    model = build_vit("custom", **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


def export(model: torch.nn.Module, out: Path, extra: dict | None = None) -> Path:
    """What ``pretrain.export`` writes: model.safetensors + config.json beside it."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({**state, **(extra or {})}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.config.to_dict()))
    return out / "model.safetensors"


def finetune_cfg(img_size: int, num_classes: int = 7, **sizes) -> FinetuneConfig:
    sizes = {**SIZES, **sizes}
    overrides = ["model.variant=custom", f"model.img_size={img_size}", f"model.num_classes={num_classes}"]
    overrides += [f"model.{k}={v}" for k, v in sizes.items()]
    return apply_overrides(FinetuneConfig(), overrides)


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class-token output before any head layer."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


@torch.no_grad()
def test_same_resolution_features_equal_and_head_is_fresh(tmp_path):
    pre = pretrained_model()
    model = build_finetune_model(finetune_cfg(img_size=32))
    load_pretrained(model, export(pre, tmp_path / "export"))
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(features(model, x), features(pre, x))
    assert isinstance(model.pre_logits, torch.nn.Identity)
    assert model.head.weight.shape == (7, 48)
    assert not model.head.weight.any() and not model.head.bias.any()
    assert torch.equal(model(x), torch.zeros(4, 7))


@torch.no_grad()
def test_resampled_model_matches_timm_at_the_new_resolution(tmp_path):
    pre = pretrained_model()
    model = build_finetune_model(finetune_cfg(img_size=48))
    load_pretrained(model, export(pre, tmp_path / "export"))
    model.eval()
    expected_pos = timm_layers.resample_abs_pos_embed(pre.pos_embed, new_size=(12, 12), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed, expected_pos, rtol=0, atol=1e-6)
    assert torch.equal(model.pos_embed[:, :1], pre.pos_embed[:, :1])

    with torch.no_grad():
        model.head.weight.normal_()  # a non-zero head, so the logits comparison means something
    reference = timm_vit.VisionTransformer(**model.config.timm_kwargs()).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 3, 48, 48)
    torch.testing.assert_close(features(model, x), reference.forward_head(reference.forward_features(x),
                                                                        pre_logits=True), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


def test_other_model_size_fails_naming_parameters_and_shapes(tmp_path):
    init = export(pretrained_model(embed_dim=60, num_heads=3, mlp_dim=120, pre_logits=60), tmp_path / "wide")
    with pytest.raises(PretrainedLoadError) as info:
        load_pretrained(build_finetune_model(finetune_cfg(img_size=32)), init)
    message = str(info.value)
    assert "cls_token: checkpoint (1, 1, 60) vs model (1, 1, 48)" in message
    assert "blocks.1.mlp.fc1.weight: checkpoint (120, 60) vs model (96, 48)" in message


def test_other_depth_fails_naming_missing_keys(tmp_path):
    init = export(pretrained_model(depth=1), tmp_path / "shallow")
    with pytest.raises(PretrainedLoadError, match=r"missing from the checkpoint: \['blocks\.1\.attn\.proj\.bias'"):
        load_pretrained(build_finetune_model(finetune_cfg(img_size=32)), init)


def test_unexpected_keys_fail_naming_them(tmp_path):
    init = export(pretrained_model(), tmp_path / "extra", extra={"dist_token": torch.zeros(1, 1, 48)})
    with pytest.raises(PretrainedLoadError, match=r"unexpected in the checkpoint: \['dist_token'\]"):
        load_pretrained(build_finetune_model(finetune_cfg(img_size=32)), init)


def test_read_pretrained_sources_and_bad_paths(tmp_path):
    pre = pretrained_model()
    weights = export(pre, tmp_path / "export")
    for source in (weights, weights.parent):
        state, grid = read_pretrained(source)
        assert grid == (8, 8)
        assert torch.equal(state["pos_embed"], pre.pos_embed)
    with pytest.raises(PretrainedLoadError, match="does not exist"):
        read_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedLoadError, match="is not an exported model.safetensors"):
        read_pretrained(tmp_path / "empty")


def test_main_exits_2_on_mismatched_weights_before_any_process_group(repo_root, demo_shards, tmp_path, capsys):
    init = export(pretrained_model(), tmp_path / "export")  # 48 wide; the demo recipe is 96 wide
    args = ["--config", str(repo_root / "configs/finetune/demo.yaml"), f"init={init}",
            f"data.train_shards={demo_shards}", "data.eval_shards=", f"run.dir={tmp_path / 'run'}"]
    assert finetune_main(args) == 2
    assert "cls_token: checkpoint (1, 1, 48) vs model (1, 1, 96)" in capsys.readouterr().err
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()
