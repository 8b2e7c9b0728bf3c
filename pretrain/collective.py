"""The few collectives vitscale itself issues (agreement flags, loss and eval counts, gradient buckets), NCCL-safe.

Why one helper: an NCCL process group takes CUDA tensors only; a collective on a
CPU tensor raises ``No backend type associated with device type cpu``. The first
checkpoint save all-reduced a CPU flag and so crashed every NCCL run. Every
collective in ``pretrain``, ``finetune`` and ``data_tools`` goes through this module, which
puts the tensor on ``collective_device()`` and brings the answer back: those issued through
``deepspeed.comm`` (the ZeRO gradient norm) and Accelerate (the logged loss) too. A test
scans the sources for any other caller of the three; another runs training with the
collectives' device faked as a GPU (``tests/fake_devices.py``), so a dropped placement fails
on CPU too.

Why not a ``"cpu:gloo,cuda:nccl"`` backend pair, which torch and DeepSpeed accept:

* it opens a second, full-mesh gloo group over TCP next to NCCL: at 512 ranks each
  rank keeps 511 more sockets, the job needs a second working interface
  (``GLOO_SOCKET_IFNAME``) and start-up gets a second rendezvous, all to move a few
  scalars per step;
* it hides mistakes: a large CPU tensor would silently take the slow TCP path;
* finetuning's group is created by Accelerate (plain ``nccl``), so a pair would need
  a second set-up path there, while this helper serves both stages as they are.

The tensors here are a handful of scalars; the host-device copy costs microseconds,
and the callers read the result on the host anyway (one sync they already paid).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def device_for_backend(backend: str) -> torch.device:
    """Where a tensor must be for a group of ``backend``: the current CUDA device for NCCL, else the CPU.

    A backend pair such as ``cuda:nccl,cpu:gloo`` has a CPU backend, so the CPU suffices there.
    """
    parts = [part.split(":")[-1] for part in backend.lower().split(",")]
    if "nccl" in parts and not any(part in ("gloo", "mpi") for part in parts):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_device() -> torch.device:
    """The device the default process group reduces on (CPU when there is no group)."""
    return device_for_backend(str(dist.get_backend())) if active() else torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType,
                group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Reduce ``tensor`` over ``group`` (default: all processes) on ``collective_device()``; the result is on
    ``tensor``'s device (in place when it already was there; a no-op without a group)."""
    if not active():
        return tensor
    device = collective_device()
    placed = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(placed, op=op, group=group)
    return placed if placed is tensor else placed.to(tensor.device)


def sum_(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` (default: all processes); use the returned tensor: it is ``tensor``,
    reduced in place, only when ``tensor`` was already on ``collective_device()`` (no-op without a group)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def reduce_async(tensor: torch.Tensor, dst: Optional[int], group: Optional[dist.ProcessGroup] = None) -> dist.Work:
    """Start summing ``tensor`` over ``group`` in place, into global rank ``dst`` (every rank for None: an
    all-reduce); wait on the returned work.

    For gradient buckets (``pretrain.flat_grads``), which live where the model does and so already
    on ``collective_device()``: a tensor elsewhere is refused, since a copy would take the sum
    away from the buffer the caller reads.
    """
    if tensor.device != collective_device():
        raise ValueError(f"reduce_async: a {tensor.device} tensor for a group that reduces on {collective_device()}")
    if dst is None:
        return dist.all_reduce(tensor, group=group, async_op=True)
    return dist.reduce(tensor, dst, group=group, async_op=True)


def sum_values(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over all processes (float64)."""
    return sum_(torch.tensor(list(values), dtype=torch.float64)).tolist()


def min_int(value: int) -> int:
    """The smallest ``value`` over all processes."""
    return int(_all_reduce(torch.tensor([value], dtype=torch.int64), dist.ReduceOp.MIN).item())


def any_true(flag: bool) -> bool:
    """True if ``flag`` holds on at least one process."""
    return sum_values([float(flag)])[0] > 0


def all_true(flag: bool) -> bool:
    """True if ``flag`` holds on every process."""
    return not any_true(not flag)


def barrier() -> None:
    """Wait for every process; under NCCL on this process' own GPU (no device guessing)."""
    if not active():
        return
    device = collective_device()
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()
