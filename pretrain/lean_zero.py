"""A leaner step for DeepSpeed's ZeRO stage 1-2 optimizer: same updates, same skipped steps, less host work.

DeepSpeed's ``DeepSpeedZeroOptimizer`` spends most of its per-step overhead on the host, one
tensor at a time: ViT-B/16 has 152 parameter tensors, and every step ran about 20 small
dispatcher calls for each of them (views, narrows, ``.data`` swaps, copies) on top of the
model's own work. On a GPU that host time is not hidden once the step is host-bound: on one
H200 (B/16 at 224, bf16, batch 128) the engine ran at 0.53x a plain loop before these changes,
0.84x after the first two. Each function below replaces one piece, says why the result is
the same, and is applied only to a plain stage 1-2 optimizer (no optimizer offload, no model
or pipeline parallelism, which vitscale never sets up) of a DeepSpeed that still has every
attribute it touches (``LEAN_ATTRIBUTES``); otherwise DeepSpeed's own step runs, with a warning.

* ``_overflow_from_grad_norm``: a non-finite step found from the global gradient norm alone;
* ``_foreach_grad_norm``: that norm with multi-tensor kernels;
* ``_keep_parameter_views``: no re-pointing of every parameter at its slot after each step;
* ``_reuse_grad_partition_buffer``: one fp32 gradient partition per group, zeroed, not rebuilt;
* ``_keep_bucket_buffers`` (CPU only): gradient buckets kept between backwards;
* ``_skip_on_device``: the step reads nothing back: clipping and the skip of a non-finite step on
  the device (fp32 and bf16 with torch's fused optimizers);
* ``pretrain.flat_grads`` (where the step skips on the device): gradients written by autograd into one
  flat buffer and reduced per bucket, instead of DeepSpeed's hooks, copies and flattening per tensor;
  the bucket and partition buffers above are then DeepSpeed's unused ones.

``tests/test_pretrain_engine.py`` checks the result bit for bit against DeepSpeed's own step and
a plain loop, and counts the calls that are gone.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from pretrain import collective, flat_grads

log = logging.getLogger(__name__)

LEAN_ATTRIBUTES = (
    "check_overflow", "get_grad_norm_direct", "compute_grad_norm", "check_grad_overflow", "dp_process_group",
    "_update_model_bit16_weights", "bit16_groups", "bit16_groups_flat", "round_robin_bit16_groups",
    "round_robin_bit16_meta", "round_robin_bit16_offsets", "round_robin_bit16_indices",
    "_build_compact_grad_partition_buffer", "ipg_buckets", "setup_buckets",
    "_release_ipg_buffers", "ready_for_gradients",
    "scaled_global_norm", "single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups",
    "real_dp_process_group", "params_in_partition", "params_not_in_partition", "averaged_gradients",
    "all_grad_tensors", "partition_size", "_get_preflattened_grad_partition", "_release_preflattened_grad_buffers",
    "flatten_dense_tensors_aligned", "flatten", "free_grad_in_param_list", "_optimizer_step", "loss_scaler",
    "custom_loss_scaler", "torch_autocast_gradscaler", "zenflow", "has_moe_layers", "clip_grad",
    "update_lp_params",
)
"""What the functions here read or replace on DeepSpeed's optimizer (checked before any is applied)."""


def make_lean(engine: Any) -> None:
    """Apply the lean step to ``engine``'s ZeRO stage 1-2 optimizer, where it applies (module docstring)."""
    optimizer = lean_zero_optimizer(engine)
    if optimizer is None:
        return
    _overflow_from_grad_norm(optimizer)
    _foreach_grad_norm(optimizer)
    _keep_parameter_views(optimizer)
    if _skips_on_device(optimizer) and flat_grads.applies(optimizer):
        _skip_on_device(optimizer, _FlatPartitions(flat_grads.install(optimizer)))
        return
    _reuse_grad_partition_buffer(optimizer)
    if torch.device(optimizer.device).type == "cpu":
        _keep_bucket_buffers(optimizer)
    if _skips_on_device(optimizer):
        _skip_on_device(optimizer, _DeepSpeedPartitions(optimizer))


def lean_zero_optimizer(engine: Any) -> Optional[Any]:
    """The engine's stage 1-2 ZeRO optimizer if the lean step applies to it (module docstring); else None."""
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if type(optimizer) is not DeepSpeedZeroOptimizer or optimizer.cpu_offload or optimizer.mpu is not None:
        return None
    missing = [name for name in LEAN_ATTRIBUTES if not hasattr(optimizer, name)]
    if missing:
        log.warning("DeepSpeed %s's ZeRO optimizer lacks %s: its own, slower step is used (pretrain/lean_zero.py "
                    "was written against 0.19.8)", deepspeed.__version__, ", ".join(missing))
        return None
    return optimizer


def _overflow_from_grad_norm(optimizer: Any) -> None:
    """Stages 1-2: let the gradient norm alone find a non-finite step, not DeepSpeed's per-tensor check as well.

    Why: before the norm, ``DeepSpeedZeroOptimizer.step`` runs ``check_overflow``, which tests
    every gradient tensor of the partition separately: about ten kernels per tensor (amax,
    amin, isfinite twice, logical ops, an add), 1,500 launches per step for ViT-B/16's 152
    tensors, then a host sync. Measured on one H200 (``benchmarks/train_step.py``, B/16 at 224,
    bf16, batch 128): the engine ran at 0.58x a plain loop with it, 0.85x without; the device
    busy time per step was the same in both, so the cost was all launches on the host.

    The step then computes the global gradient norm anyway (``compute_grad_norm``, on since
    clipping needs it): a sum over every gradient, all-reduced over the ranks, so any inf or
    NaN anywhere makes it inf or NaN, and the combined global norm inf; for fp32/fp16 and for
    bf16 with ``check_grad_overflow`` DeepSpeed's step (or ``_skip_on_device``) then skips the
    step, exactly as the per-tensor check would. So the per-tensor check is redundant wherever that norm is
    computed; it is kept with optimizer offload (whose norm is computed on the host) and at
    stage 3 (another optimizer class, not measured).
    """
    if optimizer.compute_grad_norm and (optimizer.dtype != torch.bfloat16 or optimizer.check_grad_overflow):
        optimizer.check_overflow = lambda partition_gradients=True: None


def _foreach_grad_norm(optimizer: Any) -> None:
    """Stages 1-2: the global gradient norm with multi-tensor kernels instead of two kernels per tensor.

    DeepSpeed's ``get_grad_norm_direct`` casts each gradient tensor to fp64 and takes its norm
    separately (ViT-B/16: 152 casts + 152 norms + a stack per step, host launch time). This is
    the same sum for the L2 norm with ``torch._foreach_norm``, then the all-reduce over DeepSpeed's
    data-parallel group (in fp32, as DeepSpeed's; through ``pretrain.collective`` like every
    collective vitscale issues). A non-finite result is returned as it is, not masked to -1 as
    DeepSpeed's ``mask_nan_or_inf_with_val_inplace`` does: that builds its -1 with ``torch.tensor(-1.0,
    device=...)``, a blocking host-to-device copy that waits for the GPU's queue every step, and
    the mask changes nothing downstream: ``combine_grad_norm_groups`` (``scaled_global_norm``) turns
    a -1, an inf and a NaN group norm alike into an inf global norm, which ``_overflow_from_grad_norm``
    and ``_skip_on_device`` rely on. Other norm types keep DeepSpeed's function.

    The per-tensor norms accumulate in fp32, as ``torch.nn.utils.clip_grad_norm_`` does, not in
    fp64: torch sums fp32 pairwise (relative error about 1e-7 per tensor), far below what a clip
    threshold needs, while fp64 accumulation took 4x as long on CPU (Ti/16's gradients: 3.4 ms
    against 0.85 ms per step on 2 cores, best of 11). The one difference: a sum of squares
    above fp32's range (a norm above about 1.8e19) reads as non-finite and the step is
    skipped, where fp64 would have clipped it; a gradient that large has diverged either way.
    """

    deepspeed_norm = optimizer.get_grad_norm_direct

    def grad_norm(gradients: list[torch.Tensor], params: list[torch.Tensor], norm_type: float = 2) -> torch.Tensor:
        if float(norm_type) != 2.0:
            return deepspeed_norm(gradients, params, norm_type)
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
            total = torch.stack(norms).pow(2).sum()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        total = collective.sum_(total, group=optimizer.dp_process_group).pow(0.5)
        return total

    optimizer.get_grad_norm_direct = grad_norm


def _keep_parameter_views(optimizer: Any) -> None:
    """Skip DeepSpeed's re-pointing of every parameter at its slot of the flat buffer while none has moved.

    Why: after each step ``_update_model_bit16_weights`` sets ``p.data`` of every parameter to a
    fresh ``narrow(...).view(...)`` of the group's flat buffer, twice (608 dispatcher calls per
    step for Ti/16 and B/16's 152 tensors; DeepSpeed's own comment: "we probably don't need
    this? just to be safe"). The all-gather writes the updated weights into that same buffer in
    place, so the parameters already are those views. Here each parameter's address, shape and
    contiguity are compared with its slot (plain Python reads, no dispatcher call); only if
    one differs (the buffer was replaced, e.g. by a checkpoint load) does DeepSpeed's update run.
    """
    update = optimizer._update_model_bit16_weights

    def update_if_moved(group_index: int) -> None:
        flat = optimizer.bit16_groups_flat[group_index]
        base, itemsize = flat.data_ptr(), flat.element_size()
        slots = zip(optimizer.round_robin_bit16_groups[group_index], optimizer.round_robin_bit16_meta[group_index],
                    optimizer.round_robin_bit16_offsets[group_index])
        if any(p.data_ptr() != base + offset * itemsize or p.shape != meta.shape or p.dtype != flat.dtype
               or not p.is_contiguous() for p, meta, offset in slots) or any(
                p is not q for p, q in zip(optimizer.bit16_groups[group_index],
                                           _round_robin_order(optimizer, group_index))):
            update(group_index)

    optimizer._update_model_bit16_weights = update_if_moved


def _round_robin_order(optimizer: Any, group_index: int) -> list[torch.Tensor]:
    """The group's parameters as ``_update_model_bit16_weights``' second loop pairs them with its slots."""
    slots = optimizer.round_robin_bit16_groups[group_index]
    return [slots[i] for i in optimizer.round_robin_bit16_indices[group_index]]


def _reuse_grad_partition_buffer(optimizer: Any) -> None:
    """Keep each group's fp32 gradient partition (bf16 at stage 2) and zero it, instead of building it anew.

    Why: with bf16 weights and fp32 gradient accumulation (``data_types.grad_accum_dtype``) DeepSpeed
    reduces into a flat fp32 partition per group, built at every optimizer step by
    ``_build_compact_grad_partition_buffer``: a ``torch.zeros`` of the whole partition plus a
    narrow and a view per parameter (306 dispatcher calls per step for 152 tensors). The layout
    depends only on the partitioning, which is fixed for the engine's life, and the previous
    step's partition is dropped by the time the next is built (``step`` frees it after the
    update; the overflow path drops it too), so the same one, zeroed, is the same buffer. It
    stays allocated between steps: 4 bytes per parameter over the ranks (B/16 on 8 GPUs: 43 MB),
    which ``pretrain.micro_batch.engine_state_bytes`` already counts.
    """
    build = optimizer._build_compact_grad_partition_buffer
    built: dict[int, Any] = {}

    def zeroed(group_idx: int) -> Any:
        group = built.get(group_idx)
        if group is None:
            group = built[group_idx] = build(group_idx)
        else:
            group.flat_partition.zero_()
        return group

    optimizer._build_compact_grad_partition_buffer = zeroed


def _keep_bucket_buffers(optimizer: Any) -> None:
    """On CPU, stages 1-2 keep their gradient bucket buffers from one backward to the next.

    Why: DeepSpeed frees its ``reduce_bucket_size`` bucket buffers (25 M elements, 100 MB in
    fp32) after every backward and allocates them again at the next, so the optimizer step has
    that memory. On a GPU the caching allocator hands the same block back; on the CPU a block
    that large is a fresh ``mmap`` each time, and the first write to each of its pages faults:
    Ti/16's 23 MB of gradients cost 5,556 minor page faults per backward, about 10 % of a
    250 ms step on 2 cores, against 90-450 in a plain loop's backward (``getrusage``). Kept,
    the buffers are written in place like any other. Only the buckets are kept: the gradient
    partition (``grads_in_partition``) must be new at each micro-batch, since with gradient
    accumulation the previous micro-batch's views into it are still being summed.
    """
    release, setup = optimizer._release_ipg_buffers, optimizer.setup_buckets
    kept: dict[torch.dtype, list[torch.Tensor]] = {}

    def release_keeping() -> None:
        kept.update({dtype: list(bucket.buffer) for dtype, bucket in optimizer.ipg_buckets.items() if bucket.buffer})
        release()

    def setup_reusing() -> None:
        allocating = not optimizer.ready_for_gradients
        setup()  # DeepSpeed's bookkeeping; its new buffers are untouched pages, unmapped unused when swapped out
        if not allocating:
            return
        for dtype, bucket in optimizer.ipg_buckets.items():
            old = kept.pop(dtype, [])
            if [(t.shape, t.dtype) for t in old] == [(t.shape, t.dtype) for t in bucket.buffer]:
                bucket.buffer[:] = old

    optimizer._release_ipg_buffers = release_keeping
    optimizer.setup_buckets = setup_reusing


FUSED_FOUND_INF = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
"""torch optimizers whose fused kernels take ``found_inf`` (``torch.amp.GradScaler``'s protocol)."""


def _skips_on_device(optimizer: Any) -> bool:
    """Whether ``_skip_on_device`` gives this optimizer DeepSpeed's step: fp32, or bf16 with ``check_grad_overflow``
    (no loss scaling; DeepSpeed skips a non-finite step there too), the norm computed, a fused torch
    optimizer, none of DeepSpeed's other step variants in use."""
    inner = optimizer.optimizer
    checked = optimizer.dtype == torch.float32 or (optimizer.dtype == torch.bfloat16 and optimizer.check_grad_overflow)
    return (optimizer.compute_grad_norm and checked
            and not optimizer.loss_scaler.dynamic and not optimizer.custom_loss_scaler and optimizer.loss_scale == 1
            and optimizer.torch_autocast_gradscaler is None and not optimizer.zenflow and not optimizer.has_moe_layers
            and type(inner) in FUSED_FOUND_INF and all(group.get("fused") for group in inner.param_groups))


class _DeepSpeedPartitions:
    """Each group's gradient partition as DeepSpeed's gradient path leaves it (``averaged_gradients``), flattened
    as ``DeepSpeedZeroOptimizer.step`` flattens it, and DeepSpeed's references to it dropped after."""

    def __init__(self, optimizer: Any) -> None:
        from deepspeed import comm as dist

        self.optimizer = optimizer
        self.last_rank = [dist.get_rank(group=group) == dist.get_world_size(group=group) - 1
                          for group in optimizer.real_dp_process_group]

    def take(self, i: int) -> torch.Tensor:
        optimizer = self.optimizer
        optimizer.free_grad_in_param_list(optimizer.params_not_in_partition[i])
        flat = optimizer._get_preflattened_grad_partition(i)
        if flat is None and self.last_rank[i]:
            flat = optimizer.flatten_dense_tensors_aligned(optimizer.averaged_gradients[i],
                                                           int(optimizer.partition_size[i]))
        elif flat is None:
            flat = optimizer.flatten(optimizer.averaged_gradients[i])
        optimizer.free_grad_in_param_list(optimizer.params_in_partition[i])
        optimizer._release_preflattened_grad_buffers(i)
        optimizer.averaged_gradients[i] = None
        optimizer.all_grad_tensors[i] = None
        return flat

    def release(self, i: int) -> None:
        """Nothing to do: the next backward builds new ones."""


class _FlatPartitions:
    """Each group's gradient partition from ``pretrain.flat_grads``: kept, and zeroed after the update."""

    def __init__(self, flat: flat_grads.FlatGradients) -> None:
        self.flat = flat

    def take(self, i: int) -> torch.Tensor:
        return self.flat.partition(i)

    def release(self, i: int) -> None:
        self.flat.after_step(i)


def _skip_on_device(optimizer: Any, partitions: Any) -> None:
    """Stages 1-2, fp32 and bf16: DeepSpeed's step without its host reads; a non-finite step skipped on the device.

    Why: ``DeepSpeedZeroOptimizer.step`` decides on the host whether a step overflowed
    (``is_invalid_grad_norm`` reads the global norm back, and ``unscale_and_clip_grads`` reads it
    again), so every step made the host wait for the device to finish the backward before it
    could launch the update, the all-gather and the next forward: on one H200 (B/16, bf16, batch
    128) DeepSpeed's reads were the only ones left between sync points. This step reads nothing:

    * the global norm is DeepSpeed's (``scaled_global_norm``: the per-group norms combined,
      inf when any is not finite), a device tensor;
    * ``found_inf`` = the norm is not finite, a device tensor, given to the wrapped optimizer as
      the attribute torch's fused Adam/AdamW/SGD read (``torch.amp.GradScaler``'s protocol): their
      kernels leave the weights, the moments and the step count untouched where it is 1 (SGD's
      momentum starts at zero, ``pretrain.optim.zero_momentum``, or a skipped first step would
      leave it uninitialised);
    * clipping multiplies by ``1 / max(1, (norm + 1e-6) / clip)`` computed on the device, the
      same operations DeepSpeed's ``unscale_and_clip_grads`` runs with a loss scale of 1 (``x / 1``
      and ``x * 1`` are exact), so a finite step's weights equal DeepSpeed's bit for bit;
    * the rest is DeepSpeed's non-offload path unchanged (``partitions.take``: the flat gradient
      partition of each group, DeepSpeed's or ``pretrain.flat_grads``'; step each group, then
      ``update_lp_params``: copy to the bit16 partitions, all-gather). On a skipped step the
      bit16 copy rewrites the unchanged fp32 master, the same values, so the weights stay those
      of the previous step bit for bit (``tests/test_device_step.py``).

    What the host no longer knows: whether a step was skipped. DeepSpeed's engine reads
    ``optimizer.overflow`` (always False here), so it steps the learning-rate schedule on every
    optimizer step, skipped or not, and ``engine.skipped_steps`` stays 0: the schedule follows the
    step count, as in a plain torch loop with ``GradScaler``. The flag of the last step stays on
    the device as ``optimizer.step_skipped`` (``pretrain.engine.step_skipped``); the train loop
    reads the flags of a window of steps at its next sync point, where ``optim.max_nonfinite_steps``
    is enforced.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    from pretrain.optim import zero_momentum

    inner, groups = zero_momentum(optimizer.optimizer), range(len(optimizer.bit16_groups))

    def step(closure: Any = None) -> None:
        optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
        optimizer.overflow = False
        norm = optimizer.scaled_global_norm()
        optimizer._global_grad_norm = norm
        found_inf = torch.isfinite(norm).logical_not_().float()
        inner.found_inf = optimizer.step_skipped = found_inf
        clip = optimizer.clip_grad > 0
        scale = torch.clamp((norm + 1e-6) / optimizer.clip_grad, min=1.0).reciprocal() if clip else None
        for i in groups:
            fp32 = optimizer.single_partition_of_fp32_groups[i]
            partition = partitions.take(i).to(fp32.dtype)
            fp32.grad = partition
            if scale is not None:
                partition.mul_(scale)
            optimizer._optimizer_step(i)
            fp32.grad = None
            partitions.release(i)
        optimizer.update_lp_params()  # DeepSpeed's copy into the bit16 partitions and all-gather
        for i in groups:
            optimizer._update_model_bit16_weights(i)

    optimizer.step = step
