"""The pretraining loop: setup, one optimizer step, evaluation and bookkeeping, each its own function.

Resume order (big_vision's, minus init weights): the latest *complete*
checkpoint in ``run.dir/checkpoints`` if ``checkpoint.resume``, else scratch.
A checkpoint written on another number of processes is converted to a
DeepSpeed universal checkpoint first (once, cached next to it).

Per optimizer step every rank runs ``grad_accum`` micro-batches through
``engine.backward`` / ``engine.step`` (DeepSpeed applies the update on the last).
A step reads nothing back from the device: its loss and gradient norm wait in a
``StepWindow`` until the next sync point (logging, checkpoint or evaluation step,
the last step, the first step of the process), where one all-reduce gives every
step's mean loss and whether any rank got a stop signal, so all ranks take the
same decisions at the same step (``pretrain.step_window`` says what the deferral
changes).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pretrain import collective, micro_batch
from pretrain.checkpoint import (MARKER, Checkpoint, CheckpointDir, convert_to_universal, load_deepspeed,
                                 param_shapes, save_deepspeed, universal_path)
from pretrain.config import Config, config_to_dict, dump_config
from pretrain.data.eval_stream import build_eval_stream
from pretrain.data.keylog import KeyLog
from pretrain.data.train_stream import StreamPosition, build_train_stream
from pretrain.data.transforms import BatchPreprocessor
from pretrain.distributed import DistEnv
from pretrain.engine import (build_engine, current_lr, deepspeed_config, global_grad_norm, grad_accum_steps,
                             optimizer_state_elements, skip_step_if, step_skipped)
from pretrain.evaluate import evaluate_model
from pretrain.fewshot.monitor import Monitor
from pretrain.flops import flops_per_image
from pretrain.loss import build_loss, target_kind
from pretrain.metrics import MetricsWriter, Throughput, console_line, device_peak_tflops, finish_device_work, memory_gb
from pretrain.model import build_vit
from pretrain.signals import EXIT_PREEMPTED, PreemptionFlag
from pretrain.step_window import StepRecord, StepWindow, first_step_report

log = logging.getLogger("pretrain")

EXIT_NONFINITE = 3
"""Too many non-finite losses in a row (a real failure: not requeued)."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done (applied or skipped)."""
    samples: int = 0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0


@dataclass
class StepResult:
    loss_sum: torch.Tensor
    """This rank's sum of its micro-batch losses, on the device (read at the next sync point)."""
    data_time: float
    keys: list[str] = field(default_factory=list)
    """``__key__`` of every sample this rank used in the step (all micro-batches)."""


@dataclass
class Run:
    """Everything ``setup`` builds and the loop uses."""

    cfg: Config
    env: DistEnv
    device: torch.device
    engine: Any
    stream: Any
    eval_stream: Any
    preprocess: BatchPreprocessor
    loss_fn: Any
    ckdir: CheckpointDir
    writer: MetricsWriter
    throughput: Throughput
    flag: PreemptionFlag
    shapes: dict[str, list[int]]
    grad_accum: int
    dtype: torch.dtype
    window: StepWindow
    keylog: Optional[KeyLog] = None
    monitor: Optional[Monitor] = None
    """Few-shot probe and kNN monitor (``eval.fewshot``, ``eval.knn``); None when neither has datasets."""
    state: TrainState = field(default_factory=TrainState)
    last_saved: int = -1
    window_start: float = 0.0
    """``perf_counter`` when the current window's first step began."""
    window_data_time: float = 0.0
    first_step_s: Optional[float] = None
    """Duration of this process' first step (torch.compile, warm-up; kept out of the throughput), once known."""
    warmup_logged: bool = False


# --------------------------------------------------------------------- setup


def resume_point(cfg: Config, env: DistEnv) -> tuple[Optional[Checkpoint], bool]:
    """The checkpoint to resume from (None: scratch) and whether it was written on another world size.

    After a world-size change its universal form is made here (rank 0 converts, the others
    wait for it on the file system; no process group needed): ``python -m pretrain`` calls
    this before the group starts, ``setup`` again (then it finds the conversion done).
    """
    ckdir = CheckpointDir(cfg.run.path / "checkpoints")
    latest = ckdir.find() if cfg.checkpoint.resume else None
    if latest is not None:
        ckdir.check(latest)
    resized = latest is not None and latest.world_size not in (None, env.world_size)
    if resized:
        if not (universal_path(latest) / MARKER).is_file():
            log.info("checkpoint %s was written by %d processes, this run has %d: converting to a universal "
                     "checkpoint", latest.path, latest.world_size, env.world_size)
        convert_to_universal(latest, env.rank, cfg.deepspeed.universal_timeout_min * 60)
    return latest, resized


def setup(cfg: Config, env: DistEnv, device: torch.device, flag: PreemptionFlag) -> Run:
    run_dir = cfg.run.path
    ckdir = CheckpointDir(run_dir / "checkpoints")
    latest, resized = resume_point(cfg, env)
    dtype = DTYPES[cfg.deepspeed.precision]

    torch.manual_seed(cfg.run.seed)
    model = build_vit(cfg.model.variant, **cfg.model.build_kwargs())
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    cfg = micro_batch.resolve(cfg, env.world_size, device, model, dtype, build_loss(cfg.optim),
                              multihot=target_kind(cfg.optim) == "multihot")
    grad_accum = grad_accum_steps(cfg, env.world_size)
    shapes = param_shapes(model)
    flops = flops_per_image(model)
    engine = build_engine(model, cfg, deepspeed_config(cfg, env.world_size, load_universal=resized))
    if cfg.model.compile:
        engine.compile()

    state, client = TrainState(), {}
    if latest is not None:
        client = load_deepspeed(engine, latest, shapes, universal=resized)
        state = TrainState(step=client["step"], samples=client["samples"],
                           nonfinite_total=client.get("nonfinite_total", 0))
        log.info("resumed from %s (step %d, %d samples seen)", latest.path, state.step, state.samples)
    # The order is the same on every world size: the saved position holds after a resize too.
    position = StreamPosition.from_dict(client["stream_position"]) if client else None
    stream = build_train_stream(cfg.data, img_size=cfg.model.img_size, seed=cfg.run.seed, rank=env.rank,
                                world_size=env.world_size, position=position, device=device)
    eval_stream = (build_eval_stream(cfg.data, img_size=cfg.model.img_size, rank=env.rank, world_size=env.world_size)
                   if cfg.data.eval_shards else None)

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    peak = device_peak_tflops(device, cfg.logging.peak_tflops)
    monitor = Monitor(cfg.eval.fewshot, cfg.eval.knn, cfg.data, cfg.model.img_size, env.rank, env.world_size, device,
                      dtype, run_dir)
    return Run(
        cfg=cfg, env=env, device=device, engine=engine, stream=stream, eval_stream=eval_stream,
        preprocess=BatchPreprocessor(cfg.data, cfg.model.num_classes, target_kind(cfg.optim)),
        loss_fn=build_loss(cfg.optim), ckdir=ckdir,
        writer=MetricsWriter(run_dir, env.is_main, cfg.logging.tensorboard),
        throughput=Throughput(flops, env.world_size, peak, recompute=cfg.model.grad_checkpointing),
        flag=flag, shapes=shapes, grad_accum=grad_accum, dtype=dtype,
        window=StepWindow(device, grad_accum * env.world_size),
        keylog=KeyLog(run_dir, env.rank) if cfg.data.log_keys else None,
        monitor=monitor if monitor.enabled else None,
        state=state, last_saved=state.step if latest is not None else -1,
    )


# ---------------------------------------------------------------------- step


def _nonfinite_anywhere(loss_sum: torch.Tensor) -> bool:
    """Whether any rank's loss sum is NaN/inf: one all-reduce and one host read (ZeRO stage 0 only)."""
    return not bool(torch.isfinite(collective.sum_(loss_sum.detach().clone())))


def train_step(run: Run) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches on every rank; reads nothing back from the device.

    Except at ZeRO stage 0: there the update of a non-finite step is skipped by our switch
    (``skip_step_if``), which needs the ranks' agreement on the host before ``engine.step()``.
    """
    engine = run.engine
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    data_time, keys = 0.0, []
    for micro in range(run.grad_accum):
        tick = time.perf_counter()
        images, labels = next(run.stream)
        data_time += time.perf_counter() - tick
        keys += run.stream.last_keys
        x, target = run.preprocess(images, labels, run.device, run.dtype)
        loss = run.loss_fn(engine(x), target)
        engine.backward(loss)
        loss_sum += loss.detach().double()
        if micro == run.grad_accum - 1 and engine.zero_optimization_stage() == 0:
            skip_step_if(engine, _nonfinite_anywhere(loss_sum))
        engine.step()
    return StepResult(loss_sum, data_time, keys)


# ---------------------------------------------------------------------- eval


def evaluate(run: Run) -> dict[str, float]:
    """Exact top-1 / top-5 over the eval set (counts summed over ranks); empty when it has no samples."""
    cfg = run.cfg
    result = evaluate_model(run.engine, run.eval_stream, run.preprocess, cfg.model.num_classes, cfg.model.img_size,
                            run.device, max_batches=cfg.eval.max_batches, dtype=run.dtype)
    return result.scalars() if result.total else {}


# -------------------------------------------------------------- bookkeeping


def save(run: Run) -> bool:
    """Checkpoint the current step (all ranks); False if the save failed (previous one kept)."""
    state, cfg = run.state, run.cfg
    client = {
        "step": state.step, "samples": state.samples, "nonfinite_total": state.nonfinite_total,
        "stream_position": run.stream.position().to_dict(), "config": config_to_dict(cfg),
        "world_size": run.env.world_size,
    }
    meta = {"zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
            "model": run.engine.module.config.to_dict(), "param_shapes": run.shapes}
    saved = save_deepspeed(run.engine, run.ckdir, state.step, client, meta, cfg.checkpoint.keep_last)
    if saved is not None:
        run.last_saved = state.step
        log.info("saved checkpoint %s", saved.path)
    return saved is not None


def advance(run: Run, result: StepResult) -> None:
    """Host-side bookkeeping of a step: counters, key log, and its device values into the window."""
    state, cfg = run.state, run.cfg
    state.step += 1
    state.samples += cfg.data.global_batch_size
    run.window_data_time += result.data_time
    if run.keylog is not None:
        run.keylog.write(state.step, run.stream.epoch, result.keys)
    run.window.add(state.step, result.loss_sum, global_grad_norm(run.engine), current_lr(run.engine),
                   step_skipped(run.engine))


def sync_due(run: Run, first_step: int) -> bool:
    """Whether this step ends a window: logging, checkpoint, evaluation, last step, or the process' first step."""
    cfg, step = run.cfg, run.state.step
    return (step in (first_step, cfg.schedule.total_steps) or step % cfg.logging.every_steps == 0
            or any(every and step % every == 0 for every in (cfg.checkpoint.every_steps, cfg.eval.every_steps,
                                                             cfg.eval.fewshot.every_steps, cfg.eval.knn.every_steps)))


def settle(run: Run) -> tuple[int, bool]:
    """At a sync point: read the window, write its metrics; (longest non-finite streak in it, stop requested)."""
    finish_device_work(run.device)
    elapsed = time.perf_counter() - run.window_start
    steps = len(run.window)
    records, stop = run.window.resolve(run.flag.requested)
    if run.first_step_s is None:
        run.first_step_s = elapsed
    else:
        if not run.warmup_logged:
            log.info(first_step_report(run.first_step_s, elapsed / steps))
            run.warmup_logged = True
        run.throughput.add(steps * run.cfg.data.global_batch_size, elapsed, run.window_data_time)
    run.window_data_time = 0.0
    return write_records(run, records), stop


def write_records(run: Run, records: list[StepRecord]) -> int:
    """Counters and metrics of the window's steps (console line at ``logging.every_steps``); longest non-finite streak."""
    state, cfg = run.state, run.cfg
    longest = 0
    for record in records:
        state.nonfinite_total += record.nonfinite
        state.nonfinite_in_row = state.nonfinite_in_row + 1 if record.nonfinite else 0
        longest = max(longest, state.nonfinite_in_row)
        if record.nonfinite:
            log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row, %d in total)", record.step,
                        state.nonfinite_in_row, state.nonfinite_total)
        scalars = {"train/loss": record.loss, "train/lr": record.lr, "train/grad_norm": record.grad_norm}
        if record.step % cfg.logging.every_steps == 0 or record.step == cfg.schedule.total_steps:
            scalars.update(run.throughput.report())
            scalars["perf/mem_gb"] = memory_gb(run.device)
            scalars["train/nonfinite_steps"] = float(state.nonfinite_total)
            scalars["train/samples"] = float(state.samples)
            log.info(console_line(record.step, cfg.schedule.total_steps, scalars))
        run.writer.write(record.step, scalars)
    return longest


def maybe_evaluate(run: Run, final: bool = False) -> None:
    every = run.cfg.eval.every_steps
    if run.eval_stream is None or not (final or (every and run.state.step % every == 0)):
        return
    scalars = evaluate(run)
    if scalars:
        log.info("eval at step %d: top1 %.4f top5 %.4f (%d samples)", run.state.step, scalars["eval/top1"],
                 scalars["eval/top5"], scalars["eval/samples"])
        run.writer.write(run.state.step, scalars)
        run.writer.flush()


def maybe_monitor(run: Run, final: bool = False) -> None:
    """The few-shot probe and kNN monitor where due (``Monitor.due``): TensorBoard, metrics.jsonl and fewshot.jsonl."""
    if run.monitor is None:
        return
    fewshot, knn = run.monitor.due(run.state.step, final)
    if not (fewshot or knn):
        return
    record = run.monitor.evaluate(run.engine, run.state.step, fewshot, knn)
    log.info("representation monitors at step %d (%d images, %.1f s):\n%s", record.step, record.images,
             record.seconds, record.table())
    run.writer.write(run.state.step, {**record.scalars(), "perf/monitor_seconds": record.seconds})
    run.writer.flush()
    run.monitor.write(record)


# ---------------------------------------------------------------------- loop


def train(cfg: Config, env: DistEnv, device: torch.device, flag: Optional[PreemptionFlag] = None) -> int:
    """Train to ``schedule.total_steps`` (or until a stop signal); returns the process exit status.

    ``flag`` is best installed by the caller as early as it can (``python -m pretrain`` does
    so before importing torch), so that a signal during start-up is not fatal; without one,
    a flag is installed for the duration of this call.
    """
    with nullcontext(flag) if flag is not None else PreemptionFlag() as active:
        run = setup(cfg, env, device, active)
        try:
            return _loop(run)
        finally:
            run.writer.close()
            run.stream.close()
            if run.keylog is not None:
                run.keylog.close()
            run.engine.destroy()  # drops its gradient hooks, which hold the engine and its groups from C++


def stop_requested(flag: PreemptionFlag) -> bool:
    """Whether any rank got a stop signal: one all-reduce, so every rank must call it at the same point."""
    return collective.any_true(flag.requested)


def stopped_during_start_up(flag: PreemptionFlag, step: int) -> bool:
    """Whether any rank got a stop signal before this process' first step (logged if so).

    The caller then exits ``EXIT_PREEMPTED`` without a checkpoint: nothing new happened
    since the one it resumed from (or it started from scratch), and the requeued run
    starts from there again.
    """
    if not stop_requested(flag):
        return False
    log.warning("received %s during start-up: exiting with %d before step %d, without a checkpoint (the requeued "
                "run resumes from the previous one)", flag.describe(), EXIT_PREEMPTED, step + 1)
    return True


def _loop(run: Run) -> int:
    cfg, state = run.cfg, run.state
    if stopped_during_start_up(run.flag, state.step):
        return EXIT_PREEMPTED
    first_step = state.step + 1
    run.window_start = time.perf_counter()
    while state.step < cfg.schedule.total_steps:
        advance(run, train_step(run))
        if not sync_due(run, first_step):
            continue
        longest_nonfinite, stop = settle(run)
        if longest_nonfinite >= cfg.optim.max_nonfinite_steps:
            save(run)
            log.error("stopping: %d optimizer steps in a row had a non-finite loss (NaN/inf), seen at step %d; their "
                      "updates were skipped and the weights were saved at step %d. Lower optim.lr, check the data, "
                      "or raise optim.max_nonfinite_steps", longest_nonfinite, state.step, state.step)
            return EXIT_NONFINITE
        if stop:
            ok = save(run)
            log.warning("received %s: %s at step %d, exiting with %d for requeue", run.flag.describe(),
                        "saved" if ok else "could NOT save", state.step, EXIT_PREEMPTED)
            return EXIT_PREEMPTED if ok else 1
        maybe_evaluate(run)
        maybe_monitor(run)
        every = cfg.checkpoint.every_steps
        if every and state.step % every == 0 and state.step < cfg.schedule.total_steps and not save(run):
            return 1  # training on would only add steps that no checkpoint can keep (the error line says why)
        run.window_start = time.perf_counter()
    if run.last_saved != state.step and not save(run):
        return 1
    if not cfg.eval.every_steps or state.step % cfg.eval.every_steps:
        maybe_evaluate(run, final=True)
    maybe_monitor(run, final=True)
    held = optimizer_state_elements(run.engine)
    log.info("finished %d steps; rank 0 holds %d optimizer-state and %d fp32-master elements (ZeRO-%d)",
             state.step, held["optimizer_state"], held["fp32_master"], cfg.deepspeed.zero_stage)
    return 0
