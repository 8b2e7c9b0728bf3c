"""The DeepSpeed engine, from a config dict derived from our typed ``Config``.

Why derive instead of keeping a DeepSpeed JSON next to the YAML: two files that
must agree (batch sizes, precision, clipping) drift. ``deepspeed_config`` is the
single translation; ``deepspeed.extra`` is merged last for settings vitscale does
not model.

Choices made here:

* The optimizer is a ``torch.optim`` one (``pretrain.optim``; AdamW with torch's fused
  kernel, one pass over each of ZeRO's flat partitions); ZeRO partitions its state just
  the same, and DeepSpeed's own CPU Adam would JIT-compile for minutes.
* Stages 1-2 take a leaner step than DeepSpeed's default (``pretrain.lean_zero``) and, where
  that step skips on the device, a gradient path of ours (``pretrain.flat_grads``): the same
  updates and skipped steps with a fraction of DeepSpeed's per-tensor host work.
* Non-finite steps: DeepSpeed's ZeRO optimizers skip an update whose gradient norm
  is inf/NaN. For fp32 that check is always on at stages 1-3; for bf16 we switch it
  on (``check_grad_overflow``); fp16 has it through loss scaling. At stages 1-2 in
  fp32 and bf16 the lean step decides on the device (``pretrain.lean_zero._skip_on_device``):
  the host never learns of the skip, so the LR schedule steps on every optimizer step,
  skipped or not, and ``step_skipped`` gives the flag as a device tensor. At stage 3
  and fp16 DeepSpeed decides on the host and does not step the schedule on a skipped
  step. Stage 0 (a plain torch optimizer) has no such check: there the torch
  optimizer gets an ``overflow`` flag that the loop sets for a non-finite step; its
  ``step()`` then does nothing and DeepSpeed's engine, which reads the same attribute,
  counts the step as skipped, as with ZeRO.

DeepSpeed's shared-memory all-reduce for CPUs (``deepspeed_shm_comm``) is not built
(``without_inference_comm_build``): its comm backend JIT-compiles it when it starts, about a
minute of C++ compiling on the first run in each environment, for ``inference_all_reduce`` only;
training's collectives go through ``torch.distributed`` (``deepspeed/comm/torch.py``).

DeepSpeed's throughput timer is off (``timers.throughput``): from the third step on it synchronised
the device twice per micro-batch to time it, a wait for the GPU's queue in every step, for a
figure nobody reads (``pretrain.metrics.Throughput`` times whole windows at the sync points).

Communication (``_zero_section``), per ZeRO stage:

* ``overlap_comm`` on every stage >= 1 when CUDA is there: gradients are reduced on a
  side stream while backward still runs (stage 1 reduces in the last micro-batch's
  backward, stages 2-3 in every one). On CPU there is no stream to overlap on; DeepSpeed's
  double buffers would only cost memory, so it is off there. ``pretrain.flat_grads``, where it
  runs, overlaps on its own (asynchronous reductions launched from the backward's hooks, on
  the communication library's stream) and ignores the setting.
* ``reduce_bucket_size`` 25M elements (DeepSpeed's default is 500M, more than ViT-B/16's
  86M parameters: one reduction after the whole backward, nothing overlapped). 25M gives
  4 buckets for B/16, 12 for L/16, 25 for H/14, each a 50-100 MB message, where NCCL runs
  at full bus bandwidth; with overlap DeepSpeed double-buffers it (200 MB in fp32).
* ``allgather_bucket_size`` 50M (stages 1-2): the updated parameters are gathered after
  the optimizer step, where nothing overlaps: fewer, larger collectives.
* stage 3: ``stage3_prefetch_bucket_size`` 50M (about the next two blocks of H/14, 20M
  each) is fetched while the current block computes; parameters under 100k elements
  (norms, biases; ``stage3_param_persistence_threshold``) stay whole on every rank,
  since gathering each would cost one collective per tiny tensor and per use.

bf16 gradients (``data_types.grad_accum_dtype`` and ``communication_data_type``): at
stages 2 and 3 gradients are accumulated over micro-batches and reduced over ranks in
fp32: a bf16 sum of 8-512 ranks' gradients and of several micro-batches loses the low
bits of small gradients (8 significant bits). The cost is twice the gradient bytes on
the wire (B/16: 344 MB per step instead of 172 MB, hidden behind backward by the
overlap). Stage 1 keeps bf16 accumulation: DeepSpeed replaces its ZeRO-1 optimizer by
another wrapper (``BF16_Optimizer``) for bf16 with fp32 accumulation, with its own
checkpoint layout that nothing here is tested with; the bf16 recipes use stage 2 or 3.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from pretrain.config import Config, ConfigError, DeepSpeedConfig
from pretrain.lean_zero import make_lean
from pretrain.optim import build_optimizer, build_scheduler

STEPS_PER_PRINT_NEVER = 1 << 62
"""DeepSpeed prints its own per-step lines every ``steps_per_print`` steps; ours replace them."""


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


DEVICE_STEP_SETTINGS: dict[str, Any] = {"timers": {"throughput": {"enabled": False}},
                                        "bf16": {"check_grad_overflow": True}}
"""What DeepSpeed needs for a step without host reads (``pretrain.lean_zero``): its throughput timer
synchronises the device twice per micro-batch, and in bf16 only ``check_grad_overflow`` makes a
non-finite step one to skip (on the device) at all. Pretraining and finetuning's DeepSpeed plugin
both take it (``with_device_step_settings``)."""


def with_device_step_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``DEVICE_STEP_SETTINGS`` (``config`` says whether bf16 is enabled)."""
    return _deep_merge(config, DEVICE_STEP_SETTINGS)


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    per_pass = cfg.data.micro_batch_size * world_size
    if cfg.data.micro_batch_size <= 0 or cfg.data.global_batch_size % per_pass:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not divisible by data.micro_batch_size="
            f"{cfg.data.micro_batch_size} x world size {world_size}: change the global batch or the micro-batch"
        )
    return cfg.data.global_batch_size // per_pass


REDUCE_BUCKET = 25_000_000
ALLGATHER_BUCKET = 50_000_000
STAGE3_PREFETCH_BUCKET = 50_000_000
STAGE3_PERSISTENCE_THRESHOLD = 100_000
"""Elements; the module docstring gives the reasons."""


def _zero_section(ds: DeepSpeedConfig, gpu: bool) -> dict[str, Any]:
    """``zero_optimization`` for ``ds.zero_stage``: buckets and overlap as the module docstring explains."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=gpu, reduce_bucket_size=REDUCE_BUCKET)
    if ds.zero_stage in (1, 2):
        zero.update(allgather_bucket_size=ALLGATHER_BUCKET)
    if ds.zero_stage >= 2:
        zero.update(contiguous_gradients=True)
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_prefetch_bucket_size=STAGE3_PREFETCH_BUCKET,
                    stage3_param_persistence_threshold=STAGE3_PERSISTENCE_THRESHOLD)
    if ds.offload_optimizer:
        if ds.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    return zero


def _gradient_dtypes(ds: DeepSpeedConfig) -> dict[str, Any]:
    """fp32 gradient accumulation and reduction for bf16 at stages 2-3 (module docstring); empty otherwise."""
    if ds.precision == "bf16" and ds.zero_stage >= 2:
        return {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    return {}


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False,
                     gpu: Optional[bool] = None) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` processes (``gpu``: CUDA, default: if present)."""
    ds = cfg.deepspeed
    gpu = torch.cuda.is_available() if gpu is None else gpu
    config: dict[str, Any] = {
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": _zero_section(ds, gpu),
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": STEPS_PER_PRINT_NEVER,
        "wall_clock_breakdown": False,
        "dump_state": False,
        "checkpoint": {"load_universal": load_universal},
        **_gradient_dtypes(ds),
    }
    return _deep_merge(with_device_step_settings(config), ds.extra)


def without_inference_comm_build() -> None:
    """Keep DeepSpeed's comm backend from building its CPU inference all-reduce (module docstring).

    DeepSpeed's ``build_shm_op`` asks its accelerator for the builder (the CPU accelerator has one, the
    CUDA one none) and then its probe of compatible ops, which it computes once per process and keeps
    (``deepspeed.ops.__compatible_ops__``); marked incompatible there, it returns None and inference
    all-reduces fall back to ``torch.distributed``. Only where the accelerator has the builder is the
    probe touched, as DeepSpeed touches it: on a GPU (no builder) it is not run for this. Call before
    DeepSpeed's backend starts.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def build_engine(model: nn.Module, cfg: Config, ds_config: dict[str, Any]) -> Any:
    """Wrap ``model`` with its optimizer and LR schedule in a DeepSpeed engine (process group must exist)."""
    import deepspeed

    without_inference_comm_build()
    optimizer = build_optimizer(model, cfg.optim)
    if cfg.deepspeed.zero_stage == 0:
        _skippable(optimizer)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    make_lean(engine)
    return engine


def current_lr(engine: Any) -> float:
    return float(engine.get_lr()[0])


def global_grad_norm(engine: Any) -> Any:
    """Global gradient norm of the last optimizer step (before clipping) as DeepSpeed keeps it, not read back:
    a device tensor, a float, or None (``pretrain.step_window`` reads it at the next sync point)."""
    return engine.get_global_grad_norm()


def step_skipped(engine: Any) -> Any:
    """Whether the last optimizer step's update was skipped (non-finite gradients): the lean step's device
    flag (1.0 / 0.0, not read back; ``pretrain.step_window`` reads it at the next sync point), else
    DeepSpeed's host bool."""
    flag = getattr(engine.optimizer, "step_skipped", None)
    return flag if flag is not None else not engine.was_step_applied()


class _SkipWhenOverflow:
    """Mixin for a torch optimizer: ``step()`` is a no-op while ``overflow`` is set."""

    overflow = False

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        if self.overflow:
            return None
        return super().step(closure)  # type: ignore[misc]


def _skippable(optimizer: Optimizer) -> Optimizer:
    """Give ``optimizer`` the ``overflow`` switch (its class gains the mixin; its state is untouched)."""
    cls = type(optimizer)
    optimizer.__class__ = type(f"Skippable{cls.__name__}", (_SkipWhenOverflow, cls), {})
    return optimizer


def skip_step_if(engine: Any, nonfinite: bool) -> None:
    """Call before the ``engine.step()`` that ends an optimizer step: skip its update if ``nonfinite``.

    ZeRO stages detect the non-finite gradients themselves; at stage 0 the switch is ours.
    """
    if engine.zero_optimization_stage() == 0:
        inner = engine.optimizer if isinstance(engine.optimizer, Optimizer) else engine.optimizer.optimizer
        inner.overflow = nonfinite


def optimizer_state_elements(engine: Any) -> dict[str, int]:
    """Elements of fp32 master weights and optimizer state held by this rank.

    Where ZeRO keeps them: the wrapped torch optimizer's ``state`` (Adam moments,
    per partition), and the fp32 partitions ``single_partition_of_fp32_groups``
    (stages 1/2) or ``fp32_partitioned_groups_flat`` (stage 3); stage 0 keeps full
    fp32 parameters in the model itself.
    """
    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)
    state = sum(t.numel() for s in inner.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.ndim > 0)
    if hasattr(zero_opt, "single_partition_of_fp32_groups"):
        master = sum(t.numel() for t in zero_opt.single_partition_of_fp32_groups)
    elif hasattr(zero_opt, "fp32_partitioned_groups_flat"):
        master = sum(t.numel() for t in zero_opt.fp32_partitioned_groups_flat)
    else:
        master = sum(p.numel() for g in inner.param_groups for p in g["params"])
    return {"optimizer_state": state, "fp32_master": master}
