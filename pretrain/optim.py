"""Optimizer and learning-rate schedule from ``OptimConfig`` / ``ScheduleConfig``.

Why torch optimizers even under DeepSpeed: DeepSpeed's own ``AdamW`` JIT-compiles
a C++ op (minutes on CPU), while ZeRO wraps any ``torch.optim`` optimizer just as
well. The schedule is built from ``torch.optim.lr_scheduler`` pieces so its state
saves and loads with the optimizer's, and it is stepped once per optimizer step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.adamw import adamw
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from pretrain.config import ConfigError, OptimConfig, ScheduleConfig
from pretrain.loss import build_loss
from pretrain.model import param_groups_weight_decay


class ChunkedAdamW(AdamW):
    """``torch.optim.AdamW`` whose update of a CPU tensor runs over chunks of ``CHUNK`` elements.

    Why: ZeRO hands the optimizer one flat fp32 partition per parameter group (Ti/16: 5.7 M
    elements; B/16: 86 M), and torch's single-tensor AdamW makes about ten elementwise passes
    over the whole buffer, each streaming it through memory. The same passes over 1 M-element
    chunks stay in cache: one Ti/16-sized step took 19.2 ms flat and 5.2 ms in chunks on 2 CPU
    cores (best of 7; 2^18 elements: 5.9 ms, 2^16: 10.5 ms, the per-call overhead
    takes over). The math is torch's own functional ``adamw`` on views, element by element the
    same, so results are bit-identical and the state (``step``, ``exp_avg``, ``exp_avg_sq``) is
    AdamW's, saved and loaded as AdamW's. State is created by AdamW's own first step; GPU
    tensors (foreach/fused kernels, no such cache effect) and the options not used here
    (amsgrad, capturable, differentiable, foreach, fused) always take AdamW's step.
    """

    CHUNK = 1 << 20

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params or any(p.device.type != "cpu" or not self.state[p] for p in params) or any(
                group["amsgrad"] or group["capturable"] or group["differentiable"] or group["foreach"]
                or group["fused"] or group["maximize"] or torch.is_complex(p)
                for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                pieces = [t.reshape(-1).split(self.CHUNK) for t in
                          (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
                for p, g, m, v in zip(*pieces):
                    # Each call advances the step count it is given: every chunk gets a copy of this step's.
                    adamw([p], [g], [m], [v], [], [state["step"].clone()], foreach=False, amsgrad=False,
                          beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
                state["step"] += 1
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """AdamW (pretraining; ``ChunkedAdamW``) or SGD with momentum (finetuning) over decay / no-decay groups.

    No weight decay on norms, biases, the class token and the position embedding.
    """
    if cfg.lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {cfg.lr}")
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return ChunkedAdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)
    if cfg.name == "sgd":
        return SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"optim.name={cfg.name!r} is not one of ['adamw', 'sgd']")


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
