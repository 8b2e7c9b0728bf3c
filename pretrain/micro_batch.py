"""``data.micro_batch_size: auto``: the largest power of two that fits, found before ``deepspeed.initialize``.

Why a probe and not a formula: activation memory depends on the kernels (SDPA backend,
torch.compile, recomputation) and the allocator; one forward + backward at the candidate
size on the device measures it. Candidates are the powers of two that divide this rank's
share of the global batch (``global / world``), largest first, so the global batch stays
exact: gradient accumulation = global / (micro x world). A candidate fits when the probe's
peak plus the memory DeepSpeed adds later (``engine_state_bytes``) stays under
``MEMORY_FRACTION`` of the device; an out-of-memory error halves it. Ranks may differ (other
jobs' memory, another card): they agree on the smallest answer, with one all-reduce.

On CPU nothing is probed (host memory is not the limit, and a probe would take minutes):
the largest candidate up to ``CPU_MAX``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Callable

import torch
from torch import nn

from pretrain import collective
from pretrain.config import Config

log = logging.getLogger(__name__)

AUTO = "auto"
MEMORY_FRACTION = 0.85
"""Share of the device the probe may plan for; the rest is allocator fragmentation and cuDNN/NCCL workspaces."""
CPU_MAX = 64
DEEPSPEED_BUFFERS = 512 * 2**20
"""Gradient buckets in fp32 (DeepSpeed's two of 25M elements with overlap; ``pretrain.flat_grads``' three copies
in flight) and the all-gather bucket (``pretrain.engine``); the flat path's whole-model gradient buffer is the
bf16 gradient the probe's backward holds itself."""


def candidates(per_rank: int) -> list[int]:
    """Powers of two dividing ``per_rank``, largest first (1 always)."""
    out, size = [], 1
    while per_rank % size == 0 and size <= per_rank:
        out.append(size)
        size *= 2
    return out[::-1]


def engine_state_bytes(params: int, zero_stage: int, world_size: int) -> int:
    """Bytes per rank DeepSpeed allocates beyond what a probe of the bf16 model sees.

    fp32 master weights (4 B), Adam moments (8 B) and fp32 gradient partitions (4 B) per
    parameter, partitioned over the ranks from stage 1 on, plus the communication buckets.
    """
    shards = world_size if zero_stage >= 1 else 1
    return 16 * params // shards + DEEPSPEED_BUFFERS


def _fits(model: nn.Module, micro: int, example: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], budget: int, device: torch.device) -> bool:
    """One forward + backward of ``micro`` images: whether its peak memory stays within ``budget`` bytes."""
    torch.cuda.reset_peak_memory_stats(device)
    try:
        x, target = example(micro)
        loss_fn(model(x), target).backward()
        return torch.cuda.max_memory_allocated(device) <= budget
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def probe(model: nn.Module, cfg: Config, world_size: int, device: torch.device, dtype: torch.dtype,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], multihot: bool) -> int:
    """The largest candidate micro-batch whose forward + backward fits on ``device`` (a copy of ``model`` runs)."""
    sizes = candidates(cfg.data.global_batch_size // world_size)
    params = sum(p.numel() for p in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory
    budget = int(MEMORY_FRACTION * total) - engine_state_bytes(params, cfg.deepspeed.zero_stage, world_size)
    twin = copy.deepcopy(model).to(device=device, dtype=dtype)
    img, classes = cfg.model.img_size, cfg.model.num_classes

    def example(micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(micro, 3, img, img, device=device, dtype=dtype)
        target = (torch.zeros(micro, classes, device=device) if multihot
                  else torch.zeros(micro, dtype=torch.long, device=device))
        return x, target

    try:
        with torch.random.fork_rng(devices=[device]):  # the run's RNG stream stays that of an explicit size
            return next((m for m in sizes if _fits(twin, m, example, loss_fn, budget, device)), 1)
    finally:
        del twin
        torch.cuda.empty_cache()


def placeholder(cfg: Config, world_size: int) -> Config:
    """``cfg`` with ``auto`` replaced by the per-rank share (no accumulation), to check and show the DeepSpeed
    config before any device is probed; the run itself resolves ``auto`` in ``resolve``."""
    if cfg.data.micro_batch_size != AUTO:
        return cfg
    return _with_micro_batch(cfg, max(cfg.data.global_batch_size // world_size, 1))


def resolve(cfg: Config, world_size: int, device: torch.device, model: nn.Module, dtype: torch.dtype,
            loss_fn: Any, multihot: bool) -> Config:
    """``cfg`` with ``data.micro_batch_size`` an integer: unchanged if set, else probed and agreed over ranks."""
    if cfg.data.micro_batch_size != AUTO:
        return cfg
    per_rank = cfg.data.global_batch_size // world_size
    if device.type == "cuda":
        mine = probe(model, cfg, world_size, device, dtype, loss_fn, multihot)
    else:
        mine = next(m for m in candidates(per_rank) if m <= CPU_MAX)
    micro = collective.min_int(mine)
    log.info("data.micro_batch_size auto: %d per rank (this rank alone: %d; %d per rank per step, %d accumulation "
             "steps)", micro, mine, per_rank, per_rank // micro)
    return _with_micro_batch(cfg, micro)


def _with_micro_batch(cfg: Config, micro: int) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch_size=micro))
