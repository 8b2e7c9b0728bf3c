"""Unit tests of the pretraining pieces: optimizer/schedule, losses, DeepSpeed config, checkpoint layout,
signals, metrics, recipes, and the CLI's config errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fork_server import run_module

from pretrain.checkpoint import CheckpointDir, check_shapes, rng_state, save_collective, set_rng_state, step_tag
from pretrain.config import Config, ConfigError, OptimConfig, ScheduleConfig, load_config
from pretrain.engine import deepspeed_config, grad_accum_steps
from pretrain.loss import build_loss, sigmoid_xent, softmax_xent
from pretrain.metrics import MetricsWriter, Throughput, console_line
from pretrain.model import build_vit
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.signals import PreemptionFlag

REPO = Path(__file__).resolve().parents[1]


def tiny_vit():
    return build_vit("custom", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=5,
                     pre_logits=8)


# ------------------------------------------------------------ optimizer


def test_no_weight_decay_on_norms_biases_cls_and_pos_embed() -> None:
    model = tiny_vit()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "head.bias", "blocks.0.attn.qkv.bias"} <= plain
    assert decayed == {n for n, p in model.named_parameters() if p.ndim > 1 and n not in ("cls_token", "pos_embed")}
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)


def test_step_counts_assigned_past_load_state_dict_are_put_where_the_fused_kernel_reads_them() -> None:
    """DeepSpeed's universal loader assigns ``state["step"]`` directly (a CPU tensor from ``torch.load``), past
    torch's own placement on load; ``place_step_counts`` applies torch's rule: fp32 on the parameter's
    device, value kept. On this CPU machine the device is the same, so the dtype is what can be wrong."""
    from pretrain.optim import place_step_counts

    model = tiny_vit()
    opt = build_optimizer(model, OptimConfig())
    assert all(group["fused"] for group in opt.param_groups)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    param = opt.param_groups[0]["params"][0]
    opt.state[param]["step"] = torch.tensor(7.0, dtype=torch.float64)   # as assigned from another checkpoint
    place_step_counts(opt)
    step = opt.state[param]["step"]
    assert step.dtype == torch.float32 and step.device == param.device and float(step) == 7.0
    kept = opt.state[opt.param_groups[1]["params"][0]]["step"]
    place_step_counts(opt)
    assert opt.state[opt.param_groups[1]["params"][0]]["step"] is kept     # already in place: untouched
    opt.step()
    assert float(opt.state[param]["step"]) == 8.0


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_matches_closed_form(decay: str) -> None:
    peak, min_lr, warmup, total = 1e-3, 1e-5, 10, 50
    opt = build_optimizer(tiny_vit(), OptimConfig(lr=peak))
    sched = build_scheduler(opt, ScheduleConfig(total_steps=total, warmup_steps=warmup, decay=decay, min_lr=min_lr))
    for step in range(total + 1):
        if step < warmup:
            want = peak * (1 + step * (warmup - 1) / warmup) / warmup
        else:
            t = (step - warmup) / (total - warmup)
            shape = (1 + math.cos(math.pi * t)) / 2 if decay == "cosine" else 1 - t
            want = min_lr + (peak - min_lr) * shape
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-6, abs=1e-12), step
        opt.step()
        sched.step()


# ----------------------------------------------------------------- losses


def test_softmax_xent_with_smoothing_matches_manual() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 7), torch.randint(0, 7, (6,))
    smooth = 0.1
    target = F.one_hot(labels, 7).float() * (1 - smooth) + smooth / 7
    want = -(target * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(softmax_xent(logits, labels, smooth), want, atol=1e-6)
    assert torch.allclose(build_loss(OptimConfig(loss="softmax", label_smoothing=smooth))(logits, labels), want,
                          atol=1e-6)


def test_sigmoid_xent_is_big_vision_sum_over_classes() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 7).bfloat16(), torch.randint(0, 7, (6,))
    y = F.one_hot(labels, 7).float()
    x = logits.float()
    want = -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).sum(-1).mean()
    assert torch.allclose(sigmoid_xent(logits, labels), want, atol=1e-5)
    assert torch.allclose(sigmoid_xent(logits, y), want, atol=1e-5)
    assert sigmoid_xent(logits, labels).dtype == torch.float32


def test_bad_loss_settings() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss(OptimConfig(label_smoothing=1.5))


# --------------------------------------------------------- DeepSpeed config


def test_deepspeed_config_is_derived() -> None:
    cfg = Config()
    cfg.data.global_batch_size, cfg.data.micro_batch_size = 4096, 64
    cfg.deepspeed.zero_stage, cfg.deepspeed.precision = 3, "bf16"
    cfg.deepspeed.extra = {"zero_optimization": {"reduce_bucket_size": 123}, "flops_profiler": {"enabled": True}}
    ds = deepspeed_config(cfg, world_size=16)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (4096, 64, 4)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 123
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 1.0
    assert ds["flops_profiler"] == {"enabled": True} and ds["checkpoint"] == {"load_universal": False}
    with pytest.raises(ConfigError, match="not divisible"):
        grad_accum_steps(cfg, world_size=48)


@pytest.mark.parametrize("gpu", [False, True])
def test_deepspeed_communication_per_stage(gpu: bool) -> None:
    """Overlap on GPUs for every ZeRO stage, buckets below a ViT-B's size, fp32 gradient accumulation and
    reduction for bf16 at stages 2-3 only (stage 1 would switch DeepSpeed to another optimizer wrapper)."""
    cfg = Config()
    zero, dtypes = {}, {}
    for stage, precision in [(0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (2, "fp32")]:
        cfg.deepspeed.zero_stage, cfg.deepspeed.precision = stage, precision
        ds = deepspeed_config(cfg, world_size=8, gpu=gpu)
        zero[stage, precision] = ds["zero_optimization"]
        dtypes[stage, precision] = (ds.get("data_types"), ds.get("communication_data_type"))
    assert zero[0, "bf16"] == {"stage": 0}
    for stage in (1, 2, 3):
        assert zero[stage, "bf16"]["overlap_comm"] is gpu
        assert zero[stage, "bf16"]["reduce_bucket_size"] < 86_000_000  # ViT-B/16: several overlapped buckets
    assert "allgather_bucket_size" in zero[2, "bf16"] and "allgather_bucket_size" not in zero[3, "bf16"]
    assert zero[3, "bf16"]["stage3_prefetch_bucket_size"] > 0 and zero[3, "bf16"]["stage3_param_persistence_threshold"] > 0
    fp32_grads = ({"grad_accum_dtype": "fp32"}, "fp32")
    assert dtypes[2, "bf16"] == dtypes[3, "bf16"] == fp32_grads
    assert dtypes[0, "bf16"] == dtypes[1, "bf16"] == dtypes[2, "fp32"] == (None, None)


def test_recipes_load_and_derive_for_their_cluster_sizes() -> None:
    from pretrain.micro_batch import placeholder

    recipes = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"demo", "vit_b16_i21k", "vit_l16_i21k", "vit_h14_i21k_zero3"}
    for path, world in [(p, 2 if p.stem == "demo" else 32) for p in recipes]:
        cfg = load_config(path)
        cfg.validate(world, check_paths=False)
        ds = deepspeed_config(placeholder(cfg, world), world)
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * world * \
            ds["gradient_accumulation_steps"]
    h14 = load_config(REPO / "configs/pretrain/vit_h14_i21k_zero3.yaml")
    assert h14.deepspeed.zero_stage == 3 and h14.model.grad_checkpointing
    gpu_recipes = [load_config(p) for p in recipes if p.stem != "demo"]
    assert all(c.model.compile and c.data.micro_batch_size == "auto" for c in gpu_recipes)
    assert not load_config(REPO / "configs/pretrain/demo.yaml").model.compile
    b16 = load_config(REPO / "configs/pretrain/vit_b16_i21k.yaml")
    assert (b16.data.global_batch_size, b16.optim.lr, b16.optim.weight_decay, b16.schedule.warmup_steps,
            b16.model.head_bias, b16.deepspeed.precision) == (4096, 1e-3, 0.1, 10000, -10.0, "bf16")


# ------------------------------------------------------------- checkpoints


def _fake_checkpoint(ckdir: CheckpointDir, step: int, complete: bool = True) -> Path:
    path = ckdir.begin(step)
    (path / "weights.pt").write_text("w")
    if complete:
        ckdir.commit(step, {"world_size": 1})
    return path


def test_find_latest_never_picks_an_incomplete_checkpoint(tmp_path: Path) -> None:
    ckdir = CheckpointDir(tmp_path / "checkpoints")
    assert ckdir.find() is None
    _fake_checkpoint(ckdir, 10)
    _fake_checkpoint(ckdir, 20)
    _fake_checkpoint(ckdir, 30, complete=False)  # killed mid-write
    assert ckdir.find().step == 20 and (ckdir.root / "latest").read_text() == step_tag(20)
    (ckdir.root / "latest").write_text(step_tag(30))  # even a pointer to it is not trusted
    assert ckdir.find().step == 20
    (ckdir.root / "latest").unlink()
    assert ckdir.find().step == 20 and ckdir.find(10).step == 10 and ckdir.find(30) is None
    # Saving step 30 again starts from an empty directory.
    stale = ckdir.path(30) / "weights.pt"
    ckdir.begin(30)
    assert not stale.exists()


def test_keep_last_purges_old_checkpoints(tmp_path: Path) -> None:
    ckdir = CheckpointDir(tmp_path)
    for step in (1, 2, 3, 4):
        _fake_checkpoint(ckdir, step)
    removed = ckdir.purge(keep_last=2)
    assert [p.name for p in removed] == [step_tag(1), step_tag(2)]
    assert [c.step for c in ckdir.complete()] == [3, 4]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk (simulated ``OSError`` from the writer) leaves ``latest`` and the previous checkpoint."""
    ckdir = CheckpointDir(tmp_path)
    assert save_collective(ckdir, 1, lambda p: (p / "w").write_text("1"), {}, keep_last=3) is not None

    def full_disk(path: Path) -> None:
        (path / "w").write_text("partial")
        raise OSError(28, "No space left on device")

    assert save_collective(ckdir, 2, full_disk, {}, keep_last=3) is None
    assert ckdir.find().step == 1 and (ckdir.path(1) / "w").read_text() == "1"
    assert not ckdir.path(2).exists()
    assert "NOT saved" in caplog.text and "step_00000001 is intact" in caplog.text


def test_shape_mismatch_names_parameters(tmp_path: Path) -> None:
    saved = {"pos_embed": [1, 65, 96], "head.weight": [10, 96], "blocks.4.norm1.weight": [96]}
    current = {"pos_embed": [1, 145, 96], "head.weight": [10, 96]}
    with pytest.raises(ValueError) as err:
        check_shapes(saved, current, tmp_path)
    assert "pos_embed: checkpoint [1, 65, 96] vs model [1, 145, 96]" in str(err.value)
    assert "blocks.4.norm1.weight: only in the checkpoint" in str(err.value)
    assert "head.weight" not in str(err.value)


def test_rng_state_round_trip() -> None:
    """Python, NumPy and torch generators continue where the saved state left them (MixUp, drop-path)."""
    import random

    import numpy as np

    state = rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


# ------------------------------------------------------ signals and metrics


def test_preemption_flag_records_sigusr1_and_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.describe() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_throughput_and_mfu() -> None:
    meter = Throughput(flops_per_image=1e9, world_size=4, peak_tflops=100.0)
    meter.add(images=400, step_time=1.0, data_time=0.25)
    meter.add(images=400, step_time=1.0, data_time=0.0)
    out = meter.report()
    assert out["perf/images_per_s"] == 400 and out["perf/images_per_s_per_device"] == 100
    assert out["perf/data_wait_frac"] == 0.125
    assert out["perf/mfu"] == out["perf/hfu"] == pytest.approx(100 * 3e9 / 100e12)
    assert meter.report() == {}
    unknown = Throughput(1e9, 1, None)
    unknown.add(images=10, step_time=1.0, data_time=0.0)
    assert {"perf/mfu", "perf/hfu"}.isdisjoint(unknown.report())


def test_recomputation_raises_hfu_not_mfu() -> None:
    """Activation recomputation runs the forward twice: the hardware does 4x forward FLOPs, the model needs 3x."""
    meter = Throughput(flops_per_image=1e9, world_size=1, peak_tflops=100.0, recompute=True)
    meter.add(images=100, step_time=1.0, data_time=0.0)
    out = meter.report()
    assert out["perf/mfu"] == pytest.approx(100 * 3e9 / 100e12)
    assert out["perf/hfu"] == pytest.approx(100 * 4e9 / 100e12)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA L40", 181.05), ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0),
    ("NVIDIA H800 PCIe", None), ("NVIDIA H20", None), ("NVIDIA L40G", None), ("Some Future GPU", None),
])
def test_peak_is_looked_up_by_exact_device_name(name: str, peak, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A substring match gave the H100 SXM's peak to an H100 NVL and the L4's to an L40; an unknown name
    reports no MFU (and says how to set the peak) rather than a wrong one; the config override wins."""
    from pretrain.metrics import device_peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    gpu = torch.device("cuda", 0)
    assert device_peak_tflops(gpu) == peak
    assert ("set logging.peak_tflops" in caplog.text) == (peak is None)
    assert device_peak_tflops(gpu, override=123.0) == 123.0
    assert device_peak_tflops(torch.device("cpu")) is None


def test_metrics_writer_tensorboard_and_jsonl(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write(1, {"train/loss": 2.5, "train/lr": 1e-3})
    writer.write(2, {"train/loss": 2.0, "eval/top1": 0.5})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [2.5, 2.0]
    assert {"train/lr", "eval/top1"} <= set(events.Tags()["scalars"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1] == {"step": 2, "train/loss": 2.0, "eval/top1": 0.5}
    MetricsWriter(tmp_path / "other", enabled=False).write(1, {"x": 1.0})
    assert not (tmp_path / "other").exists()
    line = console_line(5, 10, {"train/loss": 1.23456, "perf/images_per_s": 812.4, "perf/mfu": 0.41})
    assert line == "step 5/10 loss 1.2346 img/s 812 mfu 41.0%"


# ------------------------------------------------------------------- CLI


@pytest.mark.parametrize("override,message", [
    ("data.train_shards=/nonexistent/shards", "/nonexistent/shards does not exist"),
    ("schedule.min_lr=1.0", "schedule.min_lr=1.0 must lie in"),
])
def test_config_errors_exit_2_before_any_process_group(override: str, message: str, demo_shards: Path) -> None:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    result = run_module("pretrain", "--config", "configs/pretrain/demo.yaml", f"data.train_shards={demo_shards}",
                        "data.eval_shards=", override, env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [result.stderr.splitlines()[0]] and message in result.stderr, result.stderr


def test_several_config_errors_are_named_together_one_line_each(demo_shards: Path) -> None:
    cfg = load_config("configs/pretrain/demo.yaml", ["data.train_shards=/nonexistent/shards", "data.randaugment=[2]",
                                                     f"data.eval_shards={demo_shards}"])
    with pytest.raises(ConfigError) as info:
        cfg.validate(1)
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config (2 problems):" and len(lines) == 3, lines
    assert "/nonexistent/shards does not exist" in lines[2] and "data.randaugment must be" in lines[1], lines


@pytest.mark.parametrize("every,ok", [(0, True), (-1, False)])
def test_checkpoint_every_steps_bound_is_the_same_in_both_stages(every: int, ok: bool, demo_shards: Path) -> None:
    """0 means "only at the end" in both loops; a negative value is rejected by both ``check_config``s."""
    from finetune.config import FinetuneConfig
    from finetune.check import check_config as check_finetune
    from pretrain.check import check_config as check_pretrain

    common = [f"data.train_shards={demo_shards}", "data.eval_shards=", f"checkpoint.every_steps={every}"]
    pretrain_cfg = load_config(REPO / "configs/pretrain/demo.yaml", common)
    finetune_cfg = load_config(REPO / "configs/finetune/demo.yaml", [f"init={demo_shards}", *common],
                               cls=FinetuneConfig)
    for check, cfg in ((check_pretrain, pretrain_cfg), (check_finetune, finetune_cfg)):
        if ok:
            check(cfg, 1)
        else:
            with pytest.raises(ConfigError, match=r"checkpoint.every_steps \(-1\)"):
                check(cfg, 1)


def test_entry_points_import_nothing_heavy_before_the_flag() -> None:
    """Both ``main()``s install the preemption flag before torch/DeepSpeed/Accelerate load (seconds)."""
    code = ("import sys, pretrain.__main__, finetune.__main__; "
            "print(sorted({'torch', 'deepspeed', 'accelerate'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_a_config_error_exits_before_torchvision_deepspeed_or_accelerate_load(demo_shards: Path) -> None:
    """Both stages check their config with torch alone (``pretrain.check``, ``finetune.check``): a data error is
    reported before ``torch._dynamo`` too (the optimizer probe imports it), the whole loop after the check."""
    code = ("import sys\n"
            "from pretrain.__main__ import main as pretrain\nfrom finetune.__main__ import main as finetune\n"
            f"assert pretrain(['--config', 'configs/pretrain/demo.yaml', 'data.train_shards={demo_shards}', "
            "'data.train_split=nosuch']) == 2\n"
            f"assert finetune(['--config', 'configs/finetune/demo.yaml', 'init={demo_shards}', "
            f"'data.train_shards={demo_shards}', 'data.global_batch_size=4096']) == 2\n"
            "print(sorted({'torchvision', 'deepspeed', 'accelerate', 'torch._dynamo', 'pretrain.train', "
            "'finetune.train'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
    assert result.stderr.count("config error: ") == 2, result.stderr


SIGNAL_AT_START_UP = """
import os, signal, sys
import pretrain.distributed

real_init = pretrain.distributed.init_distributed

def init_after_a_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGUSR1)
    return real_init(*args, **kwargs)

pretrain.distributed.init_distributed = init_after_a_signal
from pretrain.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_signal_during_start_up_exits_75_without_a_checkpoint(demo_shards: Path, tmp_path: Path) -> None:
    """SIGUSR1 arrives before the process group exists: no death by signal (status 138), but exit 75
    before any step and no checkpoint, so the requeued run resumes from the previous one."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_", "LOCAL_RANK"))}
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_START_UP, "--config", "configs/pretrain/demo.yaml", f"run.dir={run_dir}",
         f"data.train_shards={demo_shards}", "data.eval_shards=", "data.num_workers=0", "model.depth=1",
         "data.global_batch_size=16", "data.micro_batch_size=16", "schedule.warmup_steps=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 75, result.stdout[-3000:] + result.stderr[-3000:]
    assert "received SIGUSR1 during start-up" in result.stdout
    assert CheckpointDir(run_dir / "checkpoints").find() is None
    metrics = run_dir / "metrics.jsonl"
    assert not metrics.exists() or "train/loss" not in metrics.read_text()


def test_ranks_wait_for_the_universal_conversion_on_the_file_system(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 converts while the others poll for its marker (no collective, so no collective timeout);
    a conversion that never finishes ends the wait with the setting to raise."""
    import threading

    import pretrain.checkpoint as checkpoint_module
    from pretrain.checkpoint import MARKER, convert_to_universal, universal_path

    monkeypatch.setattr(checkpoint_module, "POLL_S", 0.01)
    checkpoint = CheckpointDir(tmp_path).read(_fake_checkpoint(CheckpointDir(tmp_path), 4))
    with pytest.raises(TimeoutError, match="deepspeed.universal_timeout_min"):
        convert_to_universal(checkpoint, rank=1, timeout_s=0.05)
    out = universal_path(checkpoint)

    def rank0_finishes() -> None:
        out.mkdir()
        (out / MARKER).write_text("{}")

    timer = threading.Timer(0.1, rank0_finishes)
    timer.start()
    assert convert_to_universal(checkpoint, rank=3, timeout_s=30) == out
    timer.join()


# ------------------------------------------------------- auto micro-batch


def test_auto_micro_batch_candidates_keep_the_global_batch_exact() -> None:
    from pretrain.micro_batch import candidates, engine_state_bytes

    assert candidates(512) == [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert candidates(24) == [8, 4, 2, 1] and candidates(1) == [1]
    assert engine_state_bytes(86_000_000, 2, 8) < engine_state_bytes(86_000_000, 2, 1) == \
        engine_state_bytes(86_000_000, 0, 8)


@pytest.mark.parametrize("global_batch, world, expected", [(4096, 8, 64), (48, 1, 16), (96, 2, 16), (6, 2, 1)])
def test_auto_micro_batch_on_cpu_is_capped_and_divides_the_share(global_batch: int, world: int, expected: int) -> None:
    """No probe on CPU: the largest power of two dividing global / world, at most ``CPU_MAX`` (64)."""
    from pretrain.micro_batch import placeholder, resolve

    cfg = load_config(overrides=["data.micro_batch_size=auto", f"data.global_batch_size={global_batch}"])
    resolved = resolve(cfg, world, torch.device("cpu"), model=None, dtype=torch.float32, loss_fn=None, multihot=False)
    assert resolved.data.micro_batch_size == expected and cfg.data.micro_batch_size == "auto"
    assert grad_accum_steps(resolved, world) * expected * world == global_batch
    assert placeholder(cfg, world).data.micro_batch_size == global_batch // world


def test_auto_micro_batch_config() -> None:
    cfg = load_config(REPO / "configs/pretrain/demo.yaml", ["data.micro_batch_size=auto", "data.train_shards=x"])
    cfg.validate(2, check_paths=False)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(overrides=["data.micro_batch_size=big"])
