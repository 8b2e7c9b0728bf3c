"""Optimizer and learning-rate schedule from ``OptimConfig`` / ``ScheduleConfig``.

Why torch optimizers even under DeepSpeed: DeepSpeed's own ``AdamW`` JIT-compiles
a C++ op (minutes on CPU), while ZeRO wraps any ``torch.optim`` optimizer just as
well. The schedule is built from ``torch.optim.lr_scheduler`` pieces so its state
saves and loads with the optimizer's, and it is stepped once per optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from pretrain.config import ConfigError, OptimConfig, ScheduleConfig
from pretrain.loss import build_loss


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: decayed matrices, and the rest at weight decay 0.

    No decay for ndim <= 1 parameters (norm scales, biases) and for the names in
    ``model.no_weight_decay()`` (class token, position embedding), as in the
    ViT / big_vision recipes. Frozen parameters are left out.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """AdamW (pretraining) or SGD with momentum (finetuning) over decay / no-decay groups.

    No weight decay on norms, biases, the class token and the position embedding.

    Both are torch's fused kernels (``fused=True``, CPU and CUDA), which also take ``found_inf``:
    a non-finite step is skipped on the device, with no host read (``pretrain.lean_zero._skip_on_device``,
    ``finetune.train.train_step``). AdamW's fused kernel: one pass over each tensor
    where the default single-tensor (CPU) or foreach (CUDA) update makes about ten, each
    streaming the tensor through memory. ZeRO hands the optimizer one flat fp32 partition per
    group (Ti/16: 5.7 M elements, B/16: 86 M), so those passes are the whole update: a
    Ti/16-sized step takes 3.1 ms fused against 11.2 ms single-tensor on 2 CPU cores
    (best of 9). Its state (``step``, ``exp_avg``, ``exp_avg_sq``) is AdamW's. A checkpoint
    saved by an unfused AdamW keeps its ``fused`` setting when loaded, so it resumes with
    the arithmetic it was written with.
    """
    if cfg.lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {cfg.lr}")
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, fused=True)
    if cfg.name == "sgd":
        return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
    raise ValueError(f"optim.name={cfg.name!r} is not one of ['adamw', 'sgd']")


def zero_momentum(optimizer: Optimizer) -> Optimizer:
    """Give each SGD parameter with momentum (and no dampening) a zero momentum buffer before its first step.

    Why: torch's fused SGD makes a missing buffer with ``torch.empty_like`` and lets its first step
    write it; a first step skipped through ``found_inf`` writes nothing, and the next step starts
    from uninitialised memory (seen on CPU: -6.2e6 in a fresh buffer). From zero the first step
    computes ``momentum * 0 + grad``, which is ``grad`` exactly, the value torch's first step
    stores, so the updates are unchanged. Call it on the optimizer that steps, once its
    parameters are final: ZeRO gives it its own flat partitions (``pretrain.lean_zero`` calls it
    there), and buffers made for the model's parameters before would be kept, unused, in its state.
    """
    for group in optimizer.param_groups:
        if "dampening" not in group or not group["momentum"] or group["dampening"]:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return optimizer


def place_step_counts(optimizer: Optimizer) -> None:
    """Put each fused (or capturable) group's ``step`` counts where torch's kernels read them: fp32 on the
    parameter's device.

    Why: torch's ``load_state_dict`` does this itself (``_process_value_according_to_param_policy``),
    but DeepSpeed's universal-checkpoint loader (a resume on another world size) assigns the
    state directly, with the ``step`` it saved from a CPU copy (``torch.load(map_location="cpu")``).
    The fused CUDA kernel takes the counts as device tensors (the reason torch moves them on
    load). Values are kept; counts already in place are left alone.
    """
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor) and (step.device != param.device or step.dtype != torch.float32):
                optimizer.state[param]["step"] = step.to(device=param.device, dtype=torch.float32)


def build_scheduler(optimizer: Optimizer, cfg: ScheduleConfig) -> LRScheduler:
    """Linear warmup to the peak lr, then cosine or linear decay to ``min_lr`` at ``total_steps``.

    Warmup starts at ``peak / warmup_steps`` (``LinearLR`` cannot start at 0) and reaches
    the peak after ``warmup_steps`` optimizer steps.
    """
    peak = optimizer.param_groups[0]["lr"]
    if not 0 <= cfg.min_lr <= peak:
        raise ValueError(f"schedule.min_lr={cfg.min_lr} must lie in [0, optim.lr={peak}]")
    if not 0 <= cfg.warmup_steps <= cfg.total_steps or cfg.total_steps < 1:
        raise ValueError(f"schedule: need 0 <= warmup_steps ({cfg.warmup_steps}) <= total_steps ({cfg.total_steps})"
                         " and total_steps >= 1")
    decay_steps = max(1, cfg.total_steps - cfg.warmup_steps)
    if cfg.decay == "cosine":
        decay: LRScheduler = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=cfg.min_lr)
    elif cfg.decay == "linear":
        decay = LinearLR(optimizer, start_factor=1.0, end_factor=cfg.min_lr / peak, total_iters=decay_steps)
    else:
        raise ValueError(f"schedule.decay={cfg.decay!r} is not one of ['cosine', 'linear']")
    if cfg.warmup_steps == 0:
        return decay
    warmup = LinearLR(optimizer, start_factor=1.0 / cfg.warmup_steps, end_factor=1.0, total_iters=cfg.warmup_steps)
    return SequentialLR(optimizer, [warmup, decay], milestones=[cfg.warmup_steps])


def check_training(cfg: Any) -> None:
    """The training-loop checks both stages share (``ConfigError``, exit status 2 before any process group).

    ``cfg`` is a root config with ``optim``, ``schedule``, ``checkpoint``, ``eval`` and
    ``logging`` sections. The loss and the schedule are built once on a 1-parameter probe,
    so every value they reject is reported before a model exists. Both loops read
    ``checkpoint.every_steps`` and ``eval.every_steps`` of 0 as "only at the end" (a
    checkpoint is still written on preemption and on a non-finite stop).
    """
    try:
        build_loss(cfg.optim)
        build_scheduler(build_optimizer(torch.nn.Linear(1, 1), cfg.optim), cfg.schedule)
    except ValueError as exn:
        raise ConfigError(str(exn)) from None
    if cfg.checkpoint.every_steps < 0 or cfg.eval.every_steps < 0 or cfg.logging.every_steps < 1:
        raise ConfigError(f"checkpoint.every_steps ({cfg.checkpoint.every_steps}) and eval.every_steps "
                          f"({cfg.eval.every_steps}) must be >= 0 (0: only at the end), logging.every_steps "
                          f"({cfg.logging.every_steps}) >= 1")
    if cfg.optim.max_nonfinite_steps < 1:
        raise ConfigError(f"optim.max_nonfinite_steps must be >= 1, got {cfg.optim.max_nonfinite_steps}")
