"""Gradients of DeepSpeed's ZeRO stage 1-2 optimizer written by autograd into one flat buffer, reduced per bucket.

Why: DeepSpeed's gradient path works one parameter tensor at a time on the host. In each
backward a hook per parameter copies its gradient into a bucket and re-points ``.grad`` (5
dispatcher calls), after each bucket's reduction the partition's gradients are copied out
again (6 calls), the step flattens them once more (1), and the first hook of a backward
builds a view of every parameter to count them (1): about 13 calls per tensor, 2,000 of the
3,200 a step of ViT-Ti/16 dispatched, where a plain fused-AdamW loop dispatches 1,170 in all.
On a GPU those calls are host time the device waits for once a step is host-bound.

What this path does instead, per param group ``i`` (same arithmetic, one call per bucket):

* every parameter's ``.grad`` is, for the engine's life, a view into ``grads[i]``, a buffer of
  the parameters' dtype laid out as DeepSpeed's ``bit16_groups_flat[i]`` (the weights' own
  flat buffer): autograd adds each new gradient into it in place (``AccumulateGrad``), so a
  backward leaves the whole group's gradient flat, with no copy of ours;
* ``grads[i]`` is cut into buckets of whole tensors of at most ``reduce_bucket_size`` elements.
  With several ranks, a post-accumulate hook per parameter counts down its bucket (Python, no
  dispatcher call) and the last one launches the bucket's reduction: divided by the world size
  in the gradient's dtype, cast to ``communication_data_type`` where that differs, then
  reduced asynchronously, so the reduction overlaps the rest of the backward as DeepSpeed's
  does. The collective is DeepSpeed's choice (``use_multi_rank_bucket_allreduce``): by default
  one all-reduce of the whole bucket, whatever the number of partitions it spans (a 25M bucket
  spans 150 of B/16's at 512 ranks, where a ``reduce`` per owner would be 150 latency-bound
  collectives); with the option off, one ``reduce`` per rank whose partition the bucket overlaps.
  Buckets are launched in the order their last gradients arrive, which is the same on every rank
  because every rank runs the same graph (ViT uses every parameter in every step; stochastic depth
  masks rows, it does not skip a block), as DeepSpeed's buckets, filled in arrival order, assume;
  a model whose use of parameters depended on the data would need one fixed order;
* after the backward (``overlapping_partition_gradients_reduce_epilogue`` at stage 2, every
  micro-batch; ``reduce_gradients`` at stage 1, at the accumulation boundary, as DeepSpeed
  reduces) it waits for the reductions, adds each bucket's share of this rank's partition into
  the group's gradient partition (DeepSpeed's own ``GradPartitionBufferGroup``, built once, in
  ``gradient_accumulation_dtype``), and zeroes ``grads[i]``;
* the step (``pretrain.lean_zero._skip_on_device``) takes that partition whole, and zeroes it
  after the update.

Why the results are DeepSpeed's bit for bit: each gradient value goes through the same
operations in the same order. DeepSpeed divides a bucket by the world size in the gradient's
dtype, casts it to the communication dtype, reduces it to the partition's owner and adds the
result into the fp32 (bf16 at stage 1) partition; an add into zeros is a copy; micro-batches
are summed after the reduction at stage 2 and before it at stage 1, as here. Across ranks the
sum of one element over the ranks is the collective's: the same collective on the same bucket
as DeepSpeed's (``allreduce_bucket`` issues one per bucket of at most ``reduce_bucket_size``).
Tested against DeepSpeed's own path at 1 and 2 ranks, stages 1-2, fp32 and bf16, with
accumulation, both collectives.

Memory: ``grads[i]`` holds the whole model's gradient in its dtype on every rank (B/16 in
bf16: 172 MB), as stage 1 and a plain loop do; DeepSpeed's stage 2 keeps 25M-element buckets
instead (two with overlap). The micro-batch probe (``pretrain.micro_batch``) measures a backward
that holds that much already. With several ranks and an fp32 communication dtype for bf16
gradients, each bucket in flight has an fp32 copy: ``IN_FLIGHT`` + 1 at most (300 MB at 25M elements).

Applies where ``pretrain.lean_zero._skip_on_device`` does (it reads the partition), to a plain
optimizer (no offload, no MoE, no ``grad_accum`` attribute), ``reduce_scatter`` on, gradients
averaged, every parameter trainable and a partition that is one contiguous slice of the flat
buffer; otherwise DeepSpeed's own path runs (``applies``).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from pretrain import collective

log = logging.getLogger(__name__)

IN_FLIGHT = 2
"""Buckets whose reductions may be outstanding at once: the compute stream waits for the oldest only when a
third is launched, by which time the backward has computed a whole bucket more (DeepSpeed double-buffers
its buckets alike); it bounds the fp32 copies of bf16 buckets to three (300 MB at 25M elements)."""


FLAT_ATTRIBUTES = (
    "partition_gradients", "communication_data_type", "reduce_bucket_size", "_grad_acc_hooks", "grad_start_offset",
    "grad_partition_insertion_offset", "use_grad_accum_attribute", "reduce_scatter", "gradient_average",
    "is_gradient_accumulation_boundary", "overlapping_partition_gradients_reduce_epilogue", "reduce_gradients",
    "zero_grad", "backward_prologue", "get_param_id", "sequence_parallel_size", "use_multi_rank_bucket_allreduce",
)
"""What this path reads or replaces on DeepSpeed's optimizer, beyond ``pretrain.lean_zero.LEAN_ATTRIBUTES``."""


def applies(optimizer: Any) -> bool:
    """Whether this path gives ``optimizer`` (a lean stage 1-2 optimizer whose step skips on the device) DeepSpeed's
    gradients (module docstring); where it does not, DeepSpeed's own path runs."""
    missing = [name for name in FLAT_ATTRIBUTES if not hasattr(optimizer, name)]
    if missing:
        import deepspeed

        log.warning("DeepSpeed %s's ZeRO optimizer lacks %s: its own, slower gradient path is used "
                    "(pretrain/flat_grads.py was written against 0.19.8)", deepspeed.__version__, ", ".join(missing))
        return False
    plain = (not optimizer.use_grad_accum_attribute and optimizer.reduce_scatter and optimizer.gradient_average
             and optimizer.sequence_parallel_size == 1 and not optimizer.zenflow and not optimizer.has_moe_layers
             and len({id(group) for group in optimizer.real_dp_process_group}) == 1
             and all(p.requires_grad for group in optimizer.bit16_groups for p in group))
    return plain and all(_partition_is_a_slice(optimizer, i) for i in range(len(optimizer.bit16_groups)))


def _partition_is_a_slice(optimizer: Any, i: int) -> bool:
    """Whether DeepSpeed's gradient partition of group ``i`` holds each element where the flat buffer's slice of
    this rank has it (so one add per bucket fills it)."""
    rank = dist.get_rank(group=optimizer.real_dp_process_group[i])
    base = rank * int(optimizer.partition_size[i])
    offsets = {id(p): offset for p, offset in zip(optimizer.round_robin_bit16_groups[i],
                                                  optimizer.round_robin_bit16_offsets[i])}
    for p in optimizer.params_in_partition[i]:
        param_id = optimizer.get_param_id(p)
        start = offsets[id(p)] + int(optimizer.grad_start_offset[i][rank][param_id])
        if start - base != int(optimizer.grad_partition_insertion_offset[i][rank][param_id]):
            return False
    return True


def install(optimizer: Any) -> "FlatGradients":
    """Put this path in place of DeepSpeed's on ``optimizer`` (``applies`` must hold)."""
    flat = FlatGradients(optimizer)
    optimizer.backward_prologue = flat.prologue
    optimizer.overlapping_partition_gradients_reduce_epilogue = flat.epilogue
    optimizer.reduce_gradients = lambda pipeline_parallel=False: flat.epilogue()
    optimizer.zero_grad = lambda set_to_none=True: None      # zeroed after each reduction and each step
    return flat


@dataclass
class Bucket:
    """Whole tensors ``[start, end)`` of group ``group``'s flat gradient, reduced together."""

    group: int
    start: int
    end: int
    params: list[torch.nn.Parameter]
    """The bucket's parameters, whose gradients it holds."""
    grad: torch.Tensor
    owners: list[tuple[Optional[int], int, int]]
    """(global rank, start, end) of each partition the bucket overlaps, in flat elements; or one
    (None, start, end), the whole bucket to all-reduce."""
    own: Optional[tuple[int, int]]
    """This rank's share, ``[start, end)`` in flat elements, if any."""
    into: Optional[torch.Tensor]
    """Where that share goes: its slice of this rank's gradient partition."""
    remaining: int = 0
    launched: bool = False
    sent: Optional[torch.Tensor] = None
    works: list[Any] = field(default_factory=list)


class FlatGradients:
    """The gradient path of the module docstring for one ``DeepSpeedZeroOptimizer`` (stage 1 or 2)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.every_micro_batch = bool(optimizer.partition_gradients)
        group = optimizer.real_dp_process_group[0]
        self.world, self.rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        self.comm_dtype = optimizer.communication_data_type
        self.all_reduce = bool(optimizer.use_multi_rank_bucket_allreduce)
        self.grads: list[torch.Tensor] = []
        self.partitions: list[Any] = []
        self.views: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.buckets: list[Bucket] = []
        self.armed: Optional[bool] = None
        self.in_flight: deque[Bucket] = deque()
        for i, flat in enumerate(optimizer.bit16_groups_flat):
            grads = torch.zeros_like(flat)
            self.grads.append(grads)
            for p, offset in zip(optimizer.round_robin_bit16_groups[i], optimizer.round_robin_bit16_offsets[i]):
                self.views.append((p, grads.narrow(0, offset, p.numel()).view_as(p)))
            partition = optimizer._build_compact_grad_partition_buffer(i)
            optimizer.averaged_gradients[i] = partition
            self.partitions.append(partition)
            self.buckets += self._buckets(i)
        self._attach()
        hooks = [p.register_post_accumulate_grad_hook(self._hook(bucket))
                 for bucket in self.buckets for p in bucket.params] if self.world > 1 else []
        for handle in optimizer._grad_acc_hooks:
            handle.remove()
        optimizer._grad_acc_hooks[:] = hooks

    def _buckets(self, i: int) -> list[Bucket]:
        """Group ``i``'s flat gradient in buckets of whole tensors, ``reduce_bucket_size`` elements at most."""
        opt, size = self.optimizer, int(self.optimizer.reduce_bucket_size)
        part = int(opt.partition_size[i])
        pg = opt.real_dp_process_group[i]
        spans: list[tuple[int, int, list[torch.nn.Parameter]]] = []
        for p, offset in zip(opt.round_robin_bit16_groups[i], opt.round_robin_bit16_offsets[i]):
            if not spans or offset + p.numel() - spans[-1][0] > size:
                spans.append((offset, offset, []))
            start, _, params = spans[-1]
            params.append(p)
            spans[-1] = (start, offset + p.numel(), params)
        if spans:                                          # the padding after the last tensor is reduced too
            spans[-1] = (spans[-1][0], self.grads[i].numel(), spans[-1][2])
        buckets, lo_own, hi_own = [], self.rank * part, (self.rank + 1) * part
        for start, end, params in spans:
            owners: list[tuple[Optional[int], int, int]] = [(None, start, end)] if self.all_reduce else [
                (dist.get_global_rank(pg, r), max(start, r * part), min(end, (r + 1) * part))
                for r in range(self.world) if r * part < end and start < (r + 1) * part]
            own = (max(start, lo_own), min(end, hi_own)) if lo_own < end and start < hi_own else None
            into = None if own is None else self.partitions[i].flat_partition[own[0] - lo_own:own[1] - lo_own]
            buckets.append(Bucket(i, start, end, params, self.grads[i][start:end], owners, own, into))
        return buckets

    def _attach(self) -> None:
        """Every parameter's ``.grad`` is its view again (Python identity checks; DeepSpeed's ``zero_grad`` and
        ``free_grad_in_param_list`` set them to None, a checkpoint load may too)."""
        for p, view in self.views:
            if p.grad is not view:
                p.grad = view

    def _hook(self, bucket: Bucket) -> Any:
        def counted(_: torch.Tensor) -> None:
            if self.armed is None:
                self.armed = self.every_micro_batch or self.optimizer.is_gradient_accumulation_boundary()
            if not self.armed:
                return
            bucket.remaining -= 1
            if bucket.remaining == 0:
                self._launch(bucket)
            elif bucket.remaining < 0:
                raise RuntimeError("a parameter's gradient was accumulated twice in one backward: vitscale's flat "
                                   "gradient path reduces each bucket once (pretrain/flat_grads.py)")
        return counted

    def prologue(self) -> None:
        """Before each backward (``backward_prologue``): views in place, bucket counters full."""
        self._attach()
        self.armed = None
        for bucket in self.buckets:
            bucket.remaining, bucket.launched = len(bucket.params), False

    def _launch(self, bucket: Bucket) -> None:
        """Divide, cast and reduce ``bucket`` (all-reduce, or to the owners of its partitions) as DeepSpeed's
        ``average_tensor`` does, with several ranks; with one there is nothing to send. Then finish the
        buckets launched before it beyond ``IN_FLIGHT``, which bounds the fp32 copies that exist at once."""
        bucket.launched = True
        self.in_flight.append(bucket)
        if self.world > 1:
            grad = bucket.grad.div_(self.world)
            sent = grad if grad.dtype == self.comm_dtype else grad.to(self.comm_dtype)
            bucket.sent = sent
            for dst, lo, hi in bucket.owners:
                bucket.works.append(collective.reduce_async(sent[lo - bucket.start:hi - bucket.start], dst,
                                                            self.optimizer.real_dp_process_group[bucket.group]))
        while len(self.in_flight) > IN_FLIGHT:
            self._finish(self.in_flight.popleft())

    def _finish(self, bucket: Bucket) -> None:
        """Wait for ``bucket``'s reductions (on a GPU: the compute stream waits, the host does not) and add this
        rank's share into its gradient partition."""
        for work in bucket.works:
            work.wait()
        bucket.works.clear()
        if bucket.own is not None:
            lo, hi = bucket.own
            source = bucket.sent if bucket.sent is not None else bucket.grad
            bucket.into.add_(source if hi - lo == source.numel() else source[lo - bucket.start:hi - bucket.start])
        bucket.sent = None

    def epilogue(self) -> None:
        """After a backward that reduces: launch what the hooks did not, finish every bucket, zero the buffers."""
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        while self.in_flight:
            self._finish(self.in_flight.popleft())
        for grads in self.grads:
            grads.zero_()

    def partition(self, i: int) -> torch.Tensor:
        """Group ``i``'s gradient partition for the step (flat, ``gradient_accumulation_dtype``)."""
        return self.partitions[i].flat_partition

    def after_step(self, i: int) -> None:
        self.partitions[i].flat_partition.zero_()
