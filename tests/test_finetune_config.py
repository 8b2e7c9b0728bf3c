"""Finetune config: recipes load strictly, ``init=`` is a top-level override, bad settings exit 2 early."""

from __future__ import annotations

from datetime import timedelta

import pytest

from finetune.__main__ import main
from finetune.config import FinetuneConfig
from finetune.check import check_config
from pretrain.config import Config, ConfigError, load_config


@pytest.mark.parametrize("recipe", ["vit_b16_in1k_384", "vit_l16_in1k_384", "demo"])
def test_recipes_load_and_follow_the_transfer_recipe(repo_root, recipe):
    cfg = load_config(repo_root / f"configs/finetune/{recipe}.yaml", ["init=weights.safetensors"], cls=FinetuneConfig)
    assert cfg.init == "weights.safetensors"
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.grad_clip) == ("sgd", 0.9, 0.0, 1.0)
    assert cfg.model.pre_logits is None and cfg.data.mixup == 0.0 and cfg.schedule.decay == "cosine"
    if recipe != "demo":
        assert (cfg.model.img_size, cfg.data.global_batch_size, cfg.schedule.warmup_steps,
                cfg.schedule.total_steps) == (384, 512, 500, 20_000)
        assert 0.01 <= cfg.optim.lr <= 0.03
    cfg.validate(world_size=2 if recipe == "demo" else 16, check_paths=False)


def test_demo_finetunes_above_the_demo_pretraining_resolution(repo_root):
    pre = load_config(repo_root / "configs/pretrain/demo.yaml")
    ft = load_config(repo_root / "configs/finetune/demo.yaml", cls=FinetuneConfig)
    assert ft.model.img_size > pre.model.img_size
    sizes = ("variant", "embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "pool")
    assert [getattr(ft.model, k) for k in sizes] == [getattr(pre.model, k) for k in sizes]
    assert ft.data.normalize == pre.data.normalize


def test_unknown_key_suggests_the_nearest(repo_root):
    with pytest.raises(ConfigError, match="did you mean 'mixed_precision'"):
        load_config(repo_root / "configs/finetune/demo.yaml", ["accelerate.mixed_precison=bf16"], cls=FinetuneConfig)


def test_finetune_checks(tmp_path, demo_shards):
    cfg = FinetuneConfig()
    cfg.data.train_shards = str(tmp_path)
    with pytest.raises(ConfigError, match="init is empty"):
        cfg.validate()
    cfg.init = str(tmp_path / "missing.safetensors")
    cfg.model.pre_logits = 768
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert "missing.safetensors does not exist" in str(info.value)
    assert "model.pre_logits=768" in str(info.value)
    cfg = load_config(None, [f"init={tmp_path}", f"data.train_shards={demo_shards}", "data.eval_shards=",
                             "schedule.warmup_steps=0", "optim.lr=-1"], cls=FinetuneConfig)
    with pytest.raises(ConfigError, match="optim.lr must be positive"):
        check_config(cfg, world_size=1)


def test_main_exits_2_on_config_errors(repo_root, capsys):
    assert main(["--config", str(repo_root / "configs/finetune/demo.yaml"), "init=", "optim.nme=sgd"]) == 2
    assert "did you mean 'name'" in capsys.readouterr().err


@pytest.mark.parametrize("cls,recipe", [(Config, "pretrain/demo.yaml"), (FinetuneConfig, "finetune/demo.yaml")])
def test_distributed_timeout_loads_strictly_and_must_be_positive(repo_root, cls, recipe):
    path = repo_root / "configs" / recipe
    assert load_config(path, cls=cls).distributed.timeout_min == 30.0
    cfg = load_config(path, ["distributed.timeout_min=90"], cls=cls)
    assert cfg.distributed.timeout_min == 90.0
    with pytest.raises(ConfigError, match="did you mean 'timeout_min'"):
        load_config(path, ["distributed.timeout=90"], cls=cls)
    with pytest.raises(ConfigError, match="distributed.timeout_min"):
        load_config(path, ["distributed.timeout_min=soon"], cls=cls)
    cfg.distributed.timeout_min = 0
    with pytest.raises(ConfigError, match="distributed.timeout_min=0 must be positive"):
        cfg.validate(check_paths=False)


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("zero_stage", [None, 2])
def test_finetune_gives_accelerate_the_timeout_on_every_backend(gpu, zero_stage, monkeypatch):
    """Accelerate's own default is 10 min under NCCL: the group it starts must get ``distributed.timeout_min``."""
    import torch

    import finetune.train

    given = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(finetune.train, "Accelerator", lambda **kwargs: given.update(kwargs))
    cfg = load_config(None, ["init=w.safetensors", "distributed.timeout_min=45",
                             f"accelerate.zero_stage={zero_stage or 'null'}"], cls=FinetuneConfig)
    finetune.train.build_accelerator(cfg, accum=1)
    (handler,) = given["kwargs_handlers"]
    gloo = not gpu and zero_stage is not None  # the plugin on CPU (FACTS.md)
    assert handler.to_kwargs() == {"timeout": timedelta(minutes=45), **({"backend": "gloo"} if gloo else {})}
    assert ("deepspeed_plugin" in given) == (zero_stage is not None)


def test_finetunes_deepspeed_plugin_gets_the_settings_of_a_step_without_host_reads(monkeypatch):
    """The plugin's config carries what pretraining's engine has (``DEVICE_STEP_SETTINGS``): no throughput timer
    (two device syncs a micro-batch) and bf16's overflow check (else a non-finite bf16 step is applied), with
    bf16 enabled as ``accelerate.mixed_precision`` says; and DeepSpeed's CPU inference all-reduce is not built
    when the Accelerator starts DeepSpeed's comm backend (``pretrain.engine.without_inference_comm_build``)."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    import finetune.train

    given = {}
    monkeypatch.setattr(finetune.train, "Accelerator", lambda **kwargs: given.update(kwargs))
    for precision in ("bf16", "no"):
        cfg = load_config(None, ["init=w.safetensors", "accelerate.zero_stage=2",
                                 f"accelerate.mixed_precision={precision}"], cls=FinetuneConfig)
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = True  # the probe's verdict, as in a new process
        finetune.train.build_accelerator(cfg, accum=1)
        assert build_shm_op() is None
        ds = given["deepspeed_plugin"].deepspeed_config
        assert ds["timers"] == {"throughput": {"enabled": False}}
        assert ds["bf16"] == {"enabled": precision == "bf16", "check_grad_overflow": True}
