"""The finetuning loop on Accelerate: DDP or ZeRO (plugin), mixed precision, checkpoints, preemption.

Everything but the loop comes from ``pretrain/``: model, data streams, batch
preprocessing, optimizer and schedule, loss, metrics, the checkpoint layout and
the preemption flag. What is finetune-specific lives in ``finetune.load``
(head swap, pos-embed resampling) and here.

Resume order (big_vision's): a complete checkpoint in the run directory wins;
otherwise the model starts from ``init`` with a fresh head. A checkpoint is
``accelerator.save_state`` (weights, optimizer, schedule) in ``checkpoints/step_N/``
plus each process' RNG (its own GPU's only, ``pretrain.checkpoint.save_rng``, so a
resume on another GPU layout works) and ``trainer_state.json`` (step, samples,
stream position, resolved config), committed with the shared complete-marker protocol.

Why ``accumulate()`` and Accelerate's optimizer wrapper rather than a hand-rolled
``no_sync``: the same loop then runs under the DeepSpeed plugin, where the
engine owns accumulation, clipping and the step.

A step reads nothing back from the device, as in pretraining (``pretrain.step_window``):
its loss, gradient norm and skip flag wait in a ``StepWindow`` until the next sync point
(logging, checkpoint or evaluation step, the last step, the process' first), where one
all-reduce gives the window's mean losses and whether any rank got a stop signal. A step
whose gradient norm is not finite is skipped on the device: the fused optimizer gets
``found_inf`` (``train_step``); under the DeepSpeed plugin the lean ZeRO step does the same
at stages 1-2 (``pretrain.lean_zero``). The schedule steps on every optimizer step, skipped
or not, since the host does not know; ``optim.max_nonfinite_steps`` is enforced at the
sync point that ends the streak's window.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import accelerate.checkpointing
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs, set_seed
from accelerate.utils.constants import RNG_STATE_NAME
from PIL import Image

from data_tools.manifest import write_text_atomic
from pretrain.checkpoint import (CheckpointDir, check_shapes, load_rng, newest_file, param_shapes, save_collective,
                                 save_rng, set_rng_state, write_error, writes_named)
from pretrain.config import config_to_dict, dump_config
from pretrain.data.eval_stream import build_eval_stream
from pretrain.data.train_stream import StreamPosition, TrainStream, build_train_stream
from pretrain.data.transforms import BatchPreprocessor
from pretrain.distributed import DistEnv, join, log_nccl
from pretrain.engine import grad_accum_steps, step_skipped, with_device_step_settings, without_inference_comm_build
from pretrain.evaluate import EvalResult, evaluate_model
from pretrain.flops import flops_per_image
from pretrain.loss import LossFn, build_loss, target_kind
from pretrain.metrics import MetricsWriter, Throughput, console_line, device_peak_tflops, finish_device_work, memory_gb
from pretrain.lean_zero import make_lean
from pretrain.optim import build_optimizer, build_scheduler, zero_momentum
from pretrain.signals import EXIT_PREEMPTED, PreemptionFlag
from pretrain.step_window import StepRecord, StepWindow
from pretrain.train import EXIT_NONFINITE, stopped_during_start_up

from .attention import attention_panel, predict_with_rollout
from .config import FinetuneConfig
from .export import EXPORT_DIR, TRAINER_STATE, write_export
from .load import build_finetune_model, load_pretrained

log = logging.getLogger("finetune")

ATTENTION_IMAGES = 4
"""Eval images whose attention rollout is logged to TensorBoard at each evaluation."""


@dataclass
class TrainerState:
    """What the loop needs, beyond Accelerate's state, to continue exactly where it stopped."""

    step: int = 0
    samples: int = 0
    position: Optional[dict[str, Any]] = None
    nonfinite_in_a_row: int = 0


@dataclass
class Parts:
    """The prepared objects one run works with."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    preprocess: BatchPreprocessor
    loss_fn: LossFn
    accum: int
    clip: float
    """Gradient-norm clip; ``inf`` when disabled (the norm is still measured)."""
    dtype: torch.dtype
    """Input dtype the prepared model takes (see ``input_dtype``)."""


# ------------------------------------------------------------------- setup


def join_job() -> DistEnv:
    """Read rank/world from torchrun, ``accelerate launch`` or SLURM, and export the ``env://`` set.

    Under ``srun`` without torchrun only ``SLURM_*`` exists; Accelerate reads ``RANK``/``WORLD_SIZE`` and
    ``LOCAL_RANK`` (as the GPU index, see ``DistEnv.export``).
    """
    env = DistEnv.from_env()
    if env.world_size > 1:
        join(env)
    return env


def build_accelerator(cfg: FinetuneConfig, accum: int) -> Accelerator:
    """DDP (CPU or GPU) or the DeepSpeed plugin; the schedule is stepped by us, once per optimizer step.

    The process group Accelerate starts gets ``distributed.timeout_min`` on every backend
    (Accelerate's own default is 10 min under NCCL). With the DeepSpeed plugin on CPU its
    backend is named too: the plugin is ignored with ``cpu=True`` and needs gloo (FACTS.md);
    elsewhere Accelerate picks it (a named backend would make one process start a group).
    """
    on_cpu = not torch.cuda.is_available()
    backend = {"backend": "gloo"} if on_cpu and cfg.accelerate.zero_stage is not None else {}
    group = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.distributed.timeout_min), **backend)
    kwargs: dict[str, Any] = dict(
        mixed_precision=cfg.accelerate.mixed_precision,
        gradient_accumulation_steps=accum,
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if cfg.model.compile else "no",
        kwargs_handlers=[group],
    )
    if cfg.accelerate.zero_stage is None:
        return Accelerator(cpu=on_cpu, **kwargs)
    plugin = DeepSpeedPlugin(zero_stage=cfg.accelerate.zero_stage, gradient_accumulation_steps=accum,
                             gradient_clipping=cfg.optim.grad_clip or None)
    # No dataloader goes through prepare(), so the batch sizes cannot be "auto".
    # bf16's "enabled" is set here: a "bf16" section present keeps Accelerate from enabling it.
    plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=cfg.data.micro_batch_size,
                                   train_batch_size=cfg.data.global_batch_size,
                                   bf16={"enabled": cfg.accelerate.mixed_precision == "bf16"})
    plugin.deepspeed_config = with_device_step_settings(plugin.deepspeed_config)  # as pretraining's engine
    without_inference_comm_build()
    return Accelerator(deepspeed_plugin=plugin, **kwargs)


def setup(cfg: FinetuneConfig, env: DistEnv, resume_from: Optional[Path]) -> Parts:
    """Model (pretrained unless resuming), Accelerator, optimizer, schedule, preprocessing, loss."""
    accum = grad_accum_steps(cfg, env.world_size)
    set_seed(cfg.run.seed + env.rank)  # per-process MixUp/drop-path draws; the weights are broadcast
    model = build_finetune_model(cfg)
    if resume_from is None:
        load_pretrained(model, cfg.init)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing()
    accelerator = build_accelerator(cfg, accum)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        make_lean(model)
    else:
        zero_momentum(optimizer.optimizer)
    preprocess = BatchPreprocessor(cfg.data, cfg.model.num_classes, target=target_kind(cfg.optim))
    return Parts(accelerator, model, optimizer, scheduler, preprocess, build_loss(cfg.optim), accum,
                 cfg.optim.grad_clip or math.inf, input_dtype(accelerator, model))


def input_dtype(accelerator: Accelerator, model: Any) -> torch.dtype:
    """The dtype images must have for ``model`` as ``accelerator.prepare`` returned it.

    Under the DeepSpeed plugin with ``mixed_precision`` bf16 (fp16), the model is a
    ``DeepSpeedEngine`` that has cast its weights to bf16 (fp16) and runs no autocast,
    so fp32 images fail in the first convolution: they are cast here. DDP and a single
    process keep fp32 weights and run the forward under autocast, which takes fp32.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if model.bfloat16_enabled():
            return torch.bfloat16
        if model.fp16_enabled():
            return torch.float16
    return torch.float32


def restore(parts: Parts, checkpoint_path: Path, meta: dict[str, Any]) -> TrainerState:
    """Load Accelerate's state (weights, optimizer, schedule), this process' RNG and our trainer state."""
    check_shapes(meta.get("param_shapes", {}), param_shapes(parts.accelerator.unwrap_model(parts.model)),
                 checkpoint_path)
    parts.accelerator.load_state(str(checkpoint_path))
    restore_rng(parts.accelerator, checkpoint_path)
    saved = json.loads((checkpoint_path / TRAINER_STATE).read_text())
    return TrainerState(**saved["state"])


def restore_rng(acc: Accelerator, checkpoint_path: Path) -> None:
    """Set this process' generators from the checkpoint, over what ``load_state`` set.

    Why not Accelerate's: its state file holds one CUDA state per visible GPU
    (``get_rng_state_all``) and ``load_state`` restores them with ``set_rng_state_all``
    inside a ``try`` that only logs "Could not load random states" at info level: on
    fewer visible GPUs than the writer had, the CUDA generators stay unrestored, and with
    all GPUs visible after one-GPU tasks, device 0 gets the state and this process' device
    keeps its own. ``save`` writes this process' own device state next to it
    (``pretrain.checkpoint.save_rng``); checkpoints written before that are read from
    Accelerate's file with the same choice of entry (``pretrain.checkpoint.own_cuda_state``).
    """
    if load_rng(checkpoint_path):
        return
    accelerate_file = checkpoint_path / f"{RNG_STATE_NAME}_{acc.process_index}.pkl"
    if accelerate_file.is_file():
        states = torch.load(accelerate_file, weights_only=False)
        set_rng_state({"python": states["random_state"], "numpy": states["numpy_random_seed"],
                       "torch": states["torch_manual_seed"], "cuda": states.get("torch_cuda_manual_seed")})


# -------------------------------------------------------------------- step


def train_step(parts: Parts, stream: TrainStream) -> tuple[torch.Tensor, Any, Any, float]:
    """One optimizer step over ``accum`` micro-batches: (this rank's mean loss, gradient norm, skip flag, data
    wait s); the loss, norm and flag stay on the device.

    A non-finite gradient norm skips the update on the device: the fused optimizer (``pretrain.optim``) gets
    it as ``found_inf`` and leaves weights and state untouched. Under the DeepSpeed plugin the engine has
    stepped inside ``accelerator.backward`` and decides itself (``pretrain.engine.step_skipped``); its norm
    is read from the engine, since Accelerate's ``clip_grad_norm_`` there reads it back with ``.item()``.
    With fp16's ``GradScaler`` the scaler skips (and syncs) as Accelerate sets it up.
    """
    acc, model = parts.accelerator, parts.model
    losses, data_time = [], 0.0
    for _ in range(parts.accum):
        tick = time.perf_counter()
        images, labels = next(stream)
        data_time += time.perf_counter() - tick
        x, target = parts.preprocess(images, labels, acc.device, parts.dtype)
        with acc.accumulate(model):
            loss = parts.loss_fn(model(x), target)
            acc.backward(loss)
        losses.append(loss.detach())
    if acc.distributed_type == DistributedType.DEEPSPEED:
        grad_norm, skipped = model.get_global_grad_norm(), step_skipped(model)
    else:
        grad_norm = acc.clip_grad_norm_(model.parameters(), parts.clip)
        skipped = torch.isfinite(grad_norm).logical_not_().float()
        if acc.scaler is None:
            parts.optimizer.optimizer.found_inf = skipped
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).mean(), grad_norm, skipped, data_time


# -------------------------------------------------------------- bookkeeping


def save(parts: Parts, cfg: FinetuneConfig, state: TrainerState, ckdir: CheckpointDir) -> bool:
    """Checkpoint ``state.step`` on every rank; True if every rank wrote it and it was committed."""
    acc = parts.accelerator

    def write(path: Path) -> None:
        try:
            with writes_named(accelerate.checkpointing):  # its weights, optimizer and scheduler files
                acc.save_state(str(path))
        except RuntimeError as exn:  # one of its other torch.save calls (they name no file on a full disk)
            raise write_error(newest_file(path), exn) from exn
        save_rng(path)
        if acc.is_main_process:
            payload = {"state": asdict(state), "config": config_to_dict(cfg)}
            write_text_atomic(path / TRAINER_STATE, json.dumps(payload, indent=1))

    model = acc.unwrap_model(parts.model)
    meta = {"world_size": acc.num_processes, "model": model.config.to_dict(), "param_shapes": param_shapes(model)}
    return save_collective(ckdir, state.step, write, meta, cfg.checkpoint.keep_last) is not None


def run_eval(parts: Parts, cfg: FinetuneConfig, env: DistEnv, step: int, writer: MetricsWriter) -> EvalResult:
    """Exact top-1/top-5 over the eval set on all ranks; rollout maps of a few images to TensorBoard."""
    acc = parts.accelerator
    stream = build_eval_stream(cfg.data, img_size=cfg.model.img_size, rank=env.rank, world_size=env.world_size)
    result = evaluate_model(parts.model, stream, parts.preprocess, cfg.model.num_classes, cfg.model.img_size,
                            acc.device, max_batches=cfg.eval.max_batches, dtype=parts.dtype)
    writer.write(step, result.scalars())
    # ZeRO-3 partitions the weights: the plain module cannot run a forward on one rank.
    if acc.is_main_process and cfg.accelerate.zero_stage != 3:
        images, labels = next(iter(stream))
        images, labels = images[:ATTENTION_IMAGES], labels[:ATTENTION_IMAGES]
        x, _ = parts.preprocess(images, labels, acc.device, parts.dtype, train=False)
        model = acc.unwrap_model(parts.model)
        model.eval()
        _, maps = predict_with_rollout(model, x)
        model.train()
        for i, (image, heat) in enumerate(zip(images, maps)):
            panel = attention_panel(Image.fromarray(image.permute(1, 2, 0).numpy()), heat.cpu())
            writer.write_image(step, f"attention/{i}", np.asarray(panel))
    writer.flush()
    return result


def export(parts: Parts, cfg: FinetuneConfig) -> Optional[Path]:
    """Write ``<run>/export/`` (consolidating ZeRO shards on every rank first); the path on rank 0."""
    acc = parts.accelerator
    state_dict = acc.get_state_dict(parts.model)
    if not acc.is_main_process:
        return None
    return write_export(state_dict, acc.unwrap_model(parts.model), cfg, cfg.run.path / EXPORT_DIR)


# -------------------------------------------------------------------- loop


@dataclass
class Run:
    """One finetuning run: prepared objects, streams, bookkeeping."""

    cfg: FinetuneConfig
    env: DistEnv
    parts: Parts
    state: TrainerState
    stream: TrainStream
    ckdir: CheckpointDir
    writer: MetricsWriter
    throughput: Throughput
    flag: PreemptionFlag
    window: StepWindow
    window_start: float = 0.0
    """``perf_counter`` when the current window's first step began."""
    window_data_time: float = 0.0


def advance(run: Run, loss: torch.Tensor, norm: Any, skipped: Any, data_time: float) -> None:
    """Host-side bookkeeping of a step: counters, stream position, and its device values into the window."""
    cfg, state = run.cfg, run.state
    state.step += 1
    state.samples += cfg.data.global_batch_size
    state.position = run.stream.position().to_dict()
    run.window_data_time += data_time
    run.window.add(state.step, loss, norm, run.parts.scheduler.get_last_lr()[0], skipped)


def sync_due(run: Run, first_step: int) -> bool:
    """Whether this step ends a window: logging, checkpoint, evaluation, last step, or the process' first step."""
    cfg, step = run.cfg, run.state.step
    return (step in (first_step, cfg.schedule.total_steps) or step % cfg.logging.every_steps == 0
            or any(every and step % every == 0 for every in (cfg.checkpoint.every_steps, cfg.eval.every_steps)))


def settle(run: Run) -> tuple[int, bool]:
    """At a sync point: read the window, write its metrics; (longest non-finite streak in it, stop requested)."""
    finish_device_work(run.parts.accelerator.device)
    elapsed = time.perf_counter() - run.window_start
    steps = len(run.window)
    records, stop = run.window.resolve(run.flag.requested)
    run.throughput.add(steps * run.cfg.data.global_batch_size, elapsed, run.window_data_time)
    run.window_data_time = 0.0
    return write_records(run, records), stop


def write_records(run: Run, records: list[StepRecord]) -> int:
    """Metrics of the window's steps (console line and throughput at ``logging.every_steps``); the longest
    non-finite streak, counted on from the previous window."""
    cfg, state, acc = run.cfg, run.state, run.parts.accelerator
    longest = 0
    for record in records:
        state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if record.nonfinite else 0
        longest = max(longest, state.nonfinite_in_a_row)
        scalars = {"train/loss": record.loss, "train/lr": record.lr, "train/grad_norm": record.grad_norm}
        if record.step % cfg.logging.every_steps and record.step != cfg.schedule.total_steps:
            continue
        scalars.update({"perf/mem_gb": memory_gb(acc.device), **run.throughput.report()})
        run.writer.write(record.step, scalars)
        if acc.is_main_process:
            log.info(console_line(record.step, cfg.schedule.total_steps, scalars))
    return longest


def start(cfg: FinetuneConfig, flag: PreemptionFlag) -> Run:
    """Join the job, resume or initialise, and open the streams and metrics."""
    env = join_job()
    ckdir = CheckpointDir(cfg.run.path / "checkpoints")
    latest = ckdir.find() if cfg.checkpoint.resume else None
    if latest is not None:
        ckdir.check(latest)
    parts = setup(cfg, env, latest.path if latest else None)
    log_nccl(env)
    acc = parts.accelerator
    state = restore(parts, latest.path, latest.meta) if latest else TrainerState()
    if acc.is_main_process:
        cfg.run.path.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, cfg.run.path / "config.yaml")
        log.info("%s at step %d (%d steps of %d images, %d micro-batches per process)",
                 f"resumed from {latest.path}" if latest else f"finetuning from {cfg.init}",
                 state.step, cfg.schedule.total_steps, cfg.data.global_batch_size, parts.accum)
    position = StreamPosition.from_dict(state.position) if state.position else None
    stream = build_train_stream(cfg.data, img_size=cfg.model.img_size, seed=cfg.run.seed, rank=env.rank,
                                world_size=env.world_size, position=position, device=acc.device)
    throughput = Throughput(flops_per_image(acc.unwrap_model(parts.model)), env.world_size,
                            device_peak_tflops(acc.device, cfg.logging.peak_tflops), cfg.model.grad_checkpointing)
    writer = MetricsWriter(cfg.run.path, enabled=acc.is_main_process, tensorboard=cfg.logging.tensorboard)
    return Run(cfg, env, parts, state, stream, ckdir, writer, throughput, flag, StepWindow(acc.device, env.world_size))


def loop(run: Run) -> int:
    cfg, state, acc = run.cfg, run.state, run.parts.accelerator
    if stopped_during_start_up(run.flag, state.step):
        return EXIT_PREEMPTED
    first_step = state.step + 1
    run.window_start = time.perf_counter()
    while state.step < cfg.schedule.total_steps:
        # --- one optimizer step; nothing read back until the window's sync point
        advance(run, *train_step(run.parts, run.stream))
        if not sync_due(run, first_step):
            continue
        longest_nonfinite, stop = settle(run)
        if longest_nonfinite >= cfg.optim.max_nonfinite_steps:
            save(run.parts, cfg, state, run.ckdir)
            log.error("stopping: %d optimizer steps in a row had a non-finite loss or gradient norm (updates "
                      "skipped), seen at step %d; saved at step %d. Lower optim.lr, check the data, or raise "
                      "optim.max_nonfinite_steps", longest_nonfinite, state.step, state.step)
            return EXIT_NONFINITE
        # --- periodic evaluation
        every = cfg.eval.every_steps
        if cfg.data.eval_shards and every and state.step % every == 0 and state.step < cfg.schedule.total_steps:
            run_eval(run.parts, cfg, run.env, state.step, run.writer)
        # --- checkpoint; preemption (all ranks agree on the flag at the sync point, so all stop after one step)
        if stop or (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0):
            saved = save(run.parts, cfg, state, run.ckdir)
            if stop:
                log.warning("received %s: checkpoint at step %d %s", run.flag.describe(), state.step,
                            f"saved, exiting with {EXIT_PREEMPTED} for requeue" if saved else "could NOT be saved")
                return EXIT_PREEMPTED if saved else 1
            if not saved:
                return 1  # as pretraining: steps on would only add work no checkpoint keeps (the error line says why)
        run.window_start = time.perf_counter()
    # --- final checkpoint, evaluation and export
    if (not cfg.checkpoint.every_steps or state.step % cfg.checkpoint.every_steps) and not save(
            run.parts, cfg, state, run.ckdir):
        return 1
    if cfg.data.eval_shards:
        result = run_eval(run.parts, cfg, run.env, state.step, run.writer)
        if acc.is_main_process:
            log.info("final eval at step %d: %s", state.step, result.summary())
    out = export(run.parts, cfg)
    if out is not None:
        log.info("exported the finetuned model to %s", out)
    return 0


def train(cfg: FinetuneConfig, flag: Optional[PreemptionFlag] = None) -> int:
    """Finetune ``cfg`` to ``schedule.total_steps``; returns the process exit status.

    0 when done, ``EXIT_PREEMPTED`` after SIGUSR1/SIGTERM and a clean save (or, for a signal
    before the first step, without one), ``EXIT_NONFINITE`` after too many non-finite steps
    in a row. ``flag`` is best installed by the caller before the heavy imports (``python -m
    finetune`` does); without one, a flag is installed for the duration of this call.
    """
    with nullcontext(flag) if flag is not None else PreemptionFlag() as active:
        run = start(cfg, active)
        try:
            return loop(run)
        finally:
            run.writer.close()
            run.stream.close()
            run.parts.accelerator.free_memory()  # destroys a DeepSpeed engine's hooks (see shutdown_distributed)
            run.parts.accelerator.end_training()
