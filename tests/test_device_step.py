"""Steps that read nothing back from the device, DeepSpeed's included (issue 21), in this process (1 rank, gloo).

Every entry point through which a value reaches the host is counted, from any module: torch's,
DeepSpeed's and ours. On a GPU each is a wait for the device's queue to drain; on this CPU the
same calls happen, so counting them here finds the GPU's per-step syncs without a GPU.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import pretrain.train as train_module
from pretrain.train import train
from test_finetune_preempt import fresh_accelerate, tiny_overrides  # noqa: F401  (fresh_accelerate is a fixture)
from test_pretrain_engine import nan_losses_from, process_group, tiny_config  # noqa: F401  (process_group is a fixture)

REPO = Path(__file__).resolve().parents[1]
INPUT_PATH = str(REPO / "pretrain" / "data")
"""The input pipeline works on host tensors by design (labels, decoded images before the copy to the device)."""

TENSOR_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
"""Tensor methods that bring a value to the host (on a GPU: wait for the device to drain its queue)."""


def _from_input_path() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(INPUT_PATH):
            return True
        frame = frame.f_back
    return False


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every host read, from any module outside the input pipeline, as ``file:line what``.

    Counted: the ``TENSOR_READS`` methods, ``torch.cuda.synchronize``, DeepSpeed's accelerator's
    ``synchronize``, and ``torch.tensor(..., device=...)``: on a GPU a blocking copy from host
    memory, which waits for the device's queue like a read (DeepSpeed's
    ``mask_nan_or_inf_with_val_inplace`` made one per step).
    """
    from deepspeed.accelerator import get_accelerator

    # An engine an earlier test in this process left in a reference cycle is destroyed when the collector
    # finds it, and its optimizer's ``destroy`` synchronizes: collect now, not inside a counted step (that
    # read, from a dead engine, once landed in step 2 of a run here).
    gc.collect()
    reads: list[str] = []

    def note(what: str) -> None:
        if not _from_input_path():
            caller = sys._getframe(2)
            reads.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {what}")

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def read(*args: Any, **kwargs: Any) -> Any:
            note(name)
            return real(*args, **kwargs)
        return read

    for name in TENSOR_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counted("torch.cuda.synchronize", torch.cuda.synchronize))
    accelerator = type(get_accelerator())
    monkeypatch.setattr(accelerator, "synchronize", counted("accelerator.synchronize", accelerator.synchronize))
    real_tensor = torch.tensor

    def tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("device") is not None:
            note("torch.tensor(device=...)")
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    return reads


def reads_per_step(monkeypatch: pytest.MonkeyPatch, reads: list[str],
                   loop: Any = train_module) -> tuple[dict[int, list[str]], list[int]]:
    """Wrap ``loop``'s (``pretrain.train`` or ``finetune.train``) steps: the reads of each step (``train_step``
    and ``advance``) by step, and each sync point's (``settle``)."""
    per_step: dict[int, list[str]] = {}
    settled: list[int] = []
    real_step, real_advance, real_settle = loop.train_step, loop.advance, loop.settle

    def counted_step(*args):
        reads.clear()
        return real_step(*args)

    def step_then_advance(run, *values):
        real_advance(run, *values)
        per_step[run.state.step] = list(reads)
        reads.clear()

    def counted_settle(run):
        out = real_settle(run)
        settled.append(len(reads))
        reads.clear()
        return out

    monkeypatch.setattr(loop, "train_step", counted_step)
    monkeypatch.setattr(loop, "advance", step_then_advance)
    monkeypatch.setattr(loop, "settle", counted_settle)
    return per_step, settled


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16")])
def test_steps_between_sync_points_read_nothing_back_in_any_module(stage: int, precision: str, process_group,
                                                                   host_reads: list[str], demo_shards: Path,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps 2-4 of 5 (logging every 5, no checkpoint or eval in between, 2 micro-batches a step) make 0 host
    reads from any module, DeepSpeed's ZeRO step included; the sync points (step 1, the process' first,
    and step 5) do read, through the window."""
    per_step, settled = reads_per_step(monkeypatch, host_reads)
    cfg = tiny_config(tmp_path / "run", demo_shards, f"deepspeed.zero_stage={stage}",
                      f"deepspeed.precision={precision}", "schedule.total_steps=5", "logging.every_steps=5",
                      "checkpoint.every_steps=0", "data.micro_batch_size=8")
    env, device = process_group
    assert train(cfg, env, device) == 0
    assert {step: per_step[step] for step in (2, 3, 4)} == {2: [], 3: [], 4: []}, per_step
    assert len(settled) == 2 and all(n >= 1 for n in settled), settled


def test_the_count_sees_deepspeeds_own_step(process_group, host_reads: list[str], demo_shards: Path,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard itself: with DeepSpeed's own stage-2 step (``make_lean`` left out) the same steps read the
    overflow flag and the norm back, and the count names DeepSpeed's files."""
    import pretrain.engine

    monkeypatch.setattr(pretrain.engine, "make_lean", lambda engine: None)
    per_step, _ = reads_per_step(monkeypatch, host_reads)
    cfg = tiny_config(tmp_path / "run", demo_shards, "deepspeed.zero_stage=2", "schedule.total_steps=3",
                      "logging.every_steps=3", "checkpoint.every_steps=0")
    env, device = process_group
    assert train(cfg, env, device) == 0
    assert any(read.startswith(("stage_1_and_2.py", "utils.py")) for read in per_step[2]), per_step


def build_tiny_engine(cfg, seed: int = 0) -> Any:
    from pretrain.engine import build_engine, deepspeed_config
    from pretrain.model import build_vit

    torch.manual_seed(seed)
    model = build_vit("custom", img_size=16, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                      patch_size=8)
    torch.nn.init.normal_(model.head.weight, std=0.1)                 # nonzero: every tensor gets a gradient
    return build_engine(model, cfg, deepspeed_config(cfg, world_size=1, gpu=False))


def snapshot(engine: Any) -> dict[str, torch.Tensor]:
    """Weights, fp32 master partitions and AdamW state (moments and step counts), copied."""
    zero = engine.optimizer
    out = {f"w.{k}": v.detach().clone() for k, v in engine.module.state_dict().items()}
    out.update({f"master.{i}": t.detach().clone() for i, t in enumerate(zero.single_partition_of_fp32_groups)})
    for i, state in enumerate(zero.optimizer.state.values()):
        out.update({f"adam.{i}.{k}": v.detach().clone() for k, v in state.items()})
    return out


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "bf16")])
def test_a_nan_at_step_k_leaves_the_weights_of_step_k_minus_1(stage: int, precision: str, process_group,
                                                              demo_shards: Path, tmp_path: Path) -> None:
    """Step 3 of 5 has a NaN loss: after it the weights, fp32 master, AdamW moments and step counts are those
    of step 2 bit for bit, its skip flag is 1 on the device (0 for the others), the schedule moved on, and
    steps 4-5 update again from there."""
    from pretrain.engine import current_lr, step_skipped

    cfg = tiny_config(tmp_path / "run", demo_shards, f"deepspeed.zero_stage={stage}",
                      f"deepspeed.precision={precision}", "optim.grad_clip=1.0")
    engine = build_tiny_engine(cfg)
    dtype = engine.module.cls_token.dtype
    torch.manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16, dtype=dtype), torch.randint(0, 10, (16,))) for _ in range(5)]
    states, flags, lrs = [], [], []
    for k, (x, y) in enumerate(batches, start=1):
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss * float("nan") if k == 3 else loss)
        engine.step()
        states.append(snapshot(engine))
        flags.append(step_skipped(engine))
        lrs.append(current_lr(engine))
    assert all(isinstance(flag, torch.Tensor) for flag in flags)
    assert [float(flag) for flag in flags] == [0.0, 0.0, 1.0, 0.0, 0.0]
    step2, step3, step4 = states[1], states[2], states[3]
    assert all(torch.equal(step2[k], step3[k]) for k in step2), [k for k in step2 if not torch.equal(step2[k],
                                                                                                    step3[k])]
    assert any(not torch.equal(states[0][k], step2[k]) for k in step2 if k.startswith("w."))
    assert any(not torch.equal(step3[k], step4[k]) for k in step3 if k.startswith("w."))
    assert all(torch.isfinite(v).all() for v in step4.values())
    assert lrs[1] != lrs[2] != lrs[3]                                  # the schedule steps on a skipped step too
    engine.destroy()


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16")])
def test_clipped_finite_steps_equal_deepspeeds_own_bit_for_bit(stage: int, precision: str, process_group,
                                                               demo_shards: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """3 finite steps with a clip threshold every step exceeds (0.05): weights, fp32 master and AdamW state equal
    those of DeepSpeed's own ``step()`` bit for bit, so the clip coefficient computed on the device is
    DeepSpeed's to the last bit. Only ``_skip_on_device`` is left out for the reference: the other lean
    patches stay, since DeepSpeed's fp64 norm kernel gives another norm in the last bits (and so another
    clip factor). ``tests/test_pretrain_engine.py`` compares unclipped steps without any lean patch."""
    import pretrain.lean_zero

    cfg = tiny_config(tmp_path / "run", demo_shards, f"deepspeed.zero_stage={stage}",
                      f"deepspeed.precision={precision}", "optim.grad_clip=0.05")
    torch.manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))) for _ in range(3)]

    def trained() -> tuple[dict[str, torch.Tensor], list[float]]:
        engine = build_tiny_engine(cfg)
        dtype, norms = engine.module.cls_token.dtype, []
        for x, y in batches:
            engine.backward(torch.nn.functional.cross_entropy(engine(x.to(dtype)).float(), y))
            engine.step()
            norms.append(float(engine.get_global_grad_norm()))
        state = snapshot(engine)
        engine.destroy()
        return state, norms

    ours, our_norms = trained()
    monkeypatch.setattr(pretrain.lean_zero, "_skips_on_device", lambda optimizer: False)
    deepspeeds, their_norms = trained()
    assert min(our_norms) > 0.05 * 2                                   # every step clipped
    assert our_norms == their_norms
    assert all(torch.equal(ours[k], deepspeeds[k]) for k in ours), [k for k in ours
                                                                    if not torch.equal(ours[k], deepspeeds[k])]


# ------------------------------------------------------------------ finetune


def finetune_config(tmp_path: Path, shards: Path, *overrides: str):
    from finetune.config import FinetuneConfig
    from pretrain.config import apply_overrides

    return apply_overrides(FinetuneConfig(), [*tiny_overrides(tmp_path, shards), *overrides])


def test_finetune_steps_between_sync_points_read_nothing_back(host_reads: list[str], demo_shards: Path,
                                                              tmp_path: Path, fresh_accelerate,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Finetuning (Accelerate, one process, fused SGD): steps 2-4 of 5 with logging every 5 make 0 host reads from
    any module; the sync points (steps 1 and 5) read the window."""
    import finetune.train as finetune_module

    per_step, settled = reads_per_step(monkeypatch, host_reads, finetune_module)
    cfg = finetune_config(tmp_path, demo_shards, "schedule.total_steps=5", "logging.every_steps=5",
                          "checkpoint.every_steps=0")
    assert finetune_module.train(cfg) == 0
    assert {step: per_step[step] for step in (2, 3, 4)} == {2: [], 3: [], 4: []}, per_step
    assert len(settled) == 2 and all(n >= 1 for n in settled), settled


def test_finetune_nonfinite_steps_are_skipped_on_the_device_and_stop_at_the_sync_point(
        demo_shards: Path, tmp_path: Path, fresh_accelerate, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN losses from step 3 on, logging every 4, checkpoints every 2, ``optim.max_nonfinite_steps=2``: the run
    stops at the sync point of step 4 with exit 3, and the weights it saved there are those of step 2 bit for
    bit (steps 3 and 4 skipped on the device; SGD's momentum untouched too, or step 4 would move them)."""
    from safetensors.torch import load_file

    import finetune.train as finetune_module
    from pretrain.train import EXIT_NONFINITE

    monkeypatch.setattr(finetune_module, "build_loss", nan_losses_from(5))  # 2 micro-batches a step: step 3 on
    cfg = finetune_config(tmp_path, demo_shards, "schedule.total_steps=10", "logging.every_steps=4",
                          "checkpoint.every_steps=2", "optim.max_nonfinite_steps=2", "checkpoint.keep_last=5")
    assert finetune_module.train(cfg) == EXIT_NONFINITE
    ckdir = tmp_path / "run" / "checkpoints"
    step2, step4 = (load_file(str(ckdir / f"step_{s:08d}" / "model.safetensors")) for s in (2, 4))
    assert sorted(p.name for p in ckdir.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert all(torch.equal(step2[k], step4[k]) for k in step2)
    assert all(torch.isfinite(v).all() for v in step4.values())
