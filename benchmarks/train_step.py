"""Training-step throughput: our ViT vs timm's in the same plain AdamW loop, and our DeepSpeed engine vs that loop.

    python benchmarks/train_step.py                      # CPU defaults: Ti/16 at 112 px, batch 16, fp32
    python benchmarks/train_step.py --variant B/16 --img-size 224 --batch 128   # on a GPU: bf16, prints MFU
    python benchmarks/train_step.py --variant B/16 --img-size 224 --batch 128 --compile   # all three compiled
    torchrun --nproc_per_node 8 benchmarks/train_step.py ... # weak scaling: the engine on 8 ranks, batch per rank
    python benchmarks/train_step.py ... --shards DIR --decode gpu   # + the engine fed from JPEG shards

Figures (images/s, best of ``--repeats`` alternating rounds, so load changes hit every
contender alike):

* ``ours_plain``: ``pretrain.model`` ViT, ``torch.optim.AdamW``, softmax cross-entropy;
* ``timm_plain``: timm's ``VisionTransformer`` built from ``ViTConfig.timm_kwargs()`` (same
  architecture and parameter count), same loop; ``ours_vs_timm`` = ours / timm;
* ``ours_engine``: the same model in our DeepSpeed engine (``pretrain.engine``, ZeRO-2, every
  process of the launch, ``--batch`` per process); ``engine_vs_plain`` = engine / plain per
  device (target >= 0.95), ``engine_overhead`` its inverse;
* ``ours_engine_ds_grads``: the same engine on DeepSpeed's own gradient path (``pretrain.flat_grads``
  off; the rest of ``pretrain.lean_zero`` on): the baseline of the flat path, ``flat_grads_speedup`` =
  ``ours_engine`` / it;
* ``ours_engine_data`` (with ``--shards DIR``): the same engine fed by the training input path
  instead of one fixed tensor: the train stream over ``DIR`` (``--decode`` as ``data.decode``,
  ``--workers`` loader workers) and ``BatchPreprocessor``; ``data_vs_synthetic`` = its img/s /
  ``ours_engine``'s, 1.0 when the input path keeps up (issue 14: "data path on/off").

``<name>_aten_calls_per_step`` (eager only): ATen calls one step dispatches (``pretrain.metrics.dispatched_calls``),
the host work behind a step; exact and machine-independent, so an engine's overhead on a GPU's host
can be compared with the plain loop's on any CPU.

``<name>_python_ms_per_step`` (``--python``, eager only): host time a step spends running Python code
itself (the engine's per-step and per-parameter bookkeeping, the hooks, the model's ``forward``), not
in the ATen calls and other C functions it makes: ``cProfile``'s self time summed over Python functions,
3 steps, best of 3. cProfile slows Python code down about 2x alike for every contender, so compare the
contenders, not the absolute figure; on CPU the backward's hooks run in this thread and are counted.

``--compile``: the plain loops run ``torch.compile``d modules and the engine is compiled the
way ``model.compile`` does it (``engine.compile()``), so on a GPU the engine is compared with a
plain compiled bf16 loop. Under ``torchrun`` with N processes the plain loops still run on each
device alone and the engine spans all N: ``ours_engine_images_per_s`` (per device) at N against the
same figure of a 1-process run is the weak-scaling efficiency (``launch/gpu_check.py`` does that).

On a GPU the plain loops run under bf16 autocast and the engine in bf16, and MFU and HFU
are reported from ``flops_per_image`` and the device's peak (``pretrain.metrics``; with
``--grad-checkpointing`` all three recompute activations and HFU counts the extra forward);
``"unknown"`` where the peak of the device is not known (``--peak-tflops`` sets it).
The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from pretrain.config import Config, apply_overrides
from pretrain.data.train_stream import build_train_stream
from pretrain.data.transforms import BatchPreprocessor
from pretrain.distributed import DistEnv, init_distributed
from pretrain.engine import build_engine, deepspeed_config
from pretrain.flops import flops_per_image
from pretrain.metrics import UNKNOWN, Throughput, device_peak_tflops, dispatched_calls, finish_device_work
from pretrain.model import build_vit


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="Ti/16")
    parser.add_argument("--img-size", type=int, default=None, help="default 112 on CPU, 224 on GPU")
    parser.add_argument("--batch", type=int, default=None, help="default 16 on CPU, 128 on GPU")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--compile", action="store_true", help="torch.compile every contender")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU/HFU (default: table)")
    parser.add_argument("--only", default=None, help="comma-separated contenders to run (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for the engine, e.g. deepspeed.zero_stage=1 or "
                             "'deepspeed.extra={zero_optimization: {overlap_comm: false}}' (repeatable)")
    parser.add_argument("--shards", type=Path, default=None, metavar="DIR",
                        help="also run the engine on micro-batches from these webdataset shards through the train "
                             "stream (contender ours_engine_data; data_vs_synthetic = its img/s / ours_engine's)")
    parser.add_argument("--decode", default="cpu", choices=["cpu", "cpu_full", "gpu"], help="data.decode with --shards")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="loader workers with --shards (default: CPU cores - 2)")
    parser.add_argument("--python", action="store_true",
                        help="also report each contender's Python self time per step (<name>_python_ms_per_step)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="after timing, profile 3 steps of each contender: DIR/<name>.txt holds its top ops")
    return parser.parse_args()


def timed_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    finish_device_work(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    finish_device_work(device)
    return time.perf_counter() - start


def plain_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> Callable[[], None]:
    """A plain loop with torch's fused AdamW: the engine's own optimizer kernel, so the two differ by the engine's
    work alone (the default update, single-tensor on CPU, dispatches about 7 more ATen calls per tensor)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def build_bench_engine(model: torch.nn.Module, cfg: Config, world_size: int, compile_model: bool) -> Any:
    engine = build_engine(model, cfg, deepspeed_config(cfg, world_size=world_size))
    if compile_model:
        engine.compile()
    return engine


def engine_step(engine: Any, batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """One optimizer step of ``engine`` on the micro-batch ``batch()`` returns (input in the engine's dtype)."""
    def step() -> None:
        x, y = batch()
        loss = F.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
    return step


def stream_batches(args: argparse.Namespace, cfg: Config, env: DistEnv, device: torch.device,
                   dtype: torch.dtype) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches from ``args.shards`` through the training input path: the train stream (``data.decode``
    as ``--decode``, ``--workers`` loader workers) and ``BatchPreprocessor`` onto the device."""
    data = dataclasses.replace(cfg.data, train_shards=str(args.shards), decode=args.decode,
                               num_workers=args.workers, mixup=0.0, cutmix=0.0)
    stream = build_train_stream(data, img_size=cfg.model.img_size, seed=0, rank=env.rank,
                                world_size=env.world_size, device=device)
    preprocess = BatchPreprocessor(data, cfg.model.num_classes)
    return lambda: preprocess(*next(stream), device, dtype)


def python_ms_per_step(step: Callable[[], None], steps: int = 3, rounds: int = 3) -> float:
    """Milliseconds per step spent in Python functions' own code (module docstring), best of ``rounds``."""
    import cProfile
    import pstats

    best = float("inf")
    for _ in range(rounds):
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [step() for _ in range(steps)])
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        own = sum(tottime for (filename, _, _), (_, _, tottime, _, _) in stats.items() if filename != "~")
        best = min(best, own)
    return round(best * 1e3 / steps, 3)


def profile(step: Callable[[], None], out: Path, device: torch.device, steps: int = 3) -> Optional[float]:
    """Profile ``steps`` calls of ``step``; write the top ops by device and by host time to ``out``.

    Returns the device's busy fraction (None on CPU): summed kernel time over wall time. Near 1 the step is
    bound by the device's work; well below 1 the device waits for the host (launch overhead,
    synchronisations), which is where an engine's per-step overhead shows.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    finish_device_work(device)
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        finish_device_work(device)
    wall_us = (time.perf_counter() - start) * 1e6
    averages = prof.key_averages()
    busy_us = sum(e.self_device_time_total for e in averages if e.device_type.name == "CUDA")
    out.parent.mkdir(parents=True, exist_ok=True)
    sort_device = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out.write_text(f"{steps} steps, wall {wall_us / 1e3:.1f} ms, device busy {busy_us / 1e3:.1f} ms\n\n"
                   + averages.table(sort_by=sort_device, row_limit=40) + "\n\n"
                   + averages.table(sort_by="self_cpu_time_total", row_limit=40))
    return round(busy_us / wall_us, 3) if device.type == "cuda" else None


def main() -> None:
    args = parse_args()
    import timm.models.vision_transformer as timm_vit

    env = DistEnv.from_env()
    device = init_distributed(env)
    gpu = device.type == "cuda"
    img = args.img_size or (224 if gpu else 112)
    batch = args.batch or (128 if gpu else 16)
    cfg = Config()
    cfg.model.variant, cfg.model.img_size, cfg.model.num_classes = args.variant, img, args.num_classes
    cfg.data.global_batch_size, cfg.data.micro_batch_size = batch * env.world_size, batch
    cfg.deepspeed.zero_stage, cfg.deepspeed.precision = 2, "bf16" if gpu else "fp32"
    cfg.schedule.total_steps, cfg.schedule.warmup_steps = 10_000, 10
    apply_overrides(cfg, args.overrides)

    torch.manual_seed(0)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, args.num_classes, (batch,), device=device)
    ours = build_vit(args.variant, img_size=img, num_classes=args.num_classes).to(device)
    timm_model = timm_vit.VisionTransformer(**ours.config.timm_kwargs()).to(device)
    engine_model = build_vit(args.variant, img_size=img, num_classes=args.num_classes)
    for model in (ours, timm_model, engine_model):
        model.set_grad_checkpointing(args.grad_checkpointing)
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in timm_model.parameters()), "timm twin has another size"

    plain_models = [torch.compile(m) if args.compile else m for m in (ours, timm_model)]
    engines: list[Any] = []

    def engine() -> Any:
        """The one engine both engine contenders train (built on first use)."""
        if not engines:
            engines.append(build_bench_engine(engine_model, cfg, env.world_size, args.compile))
        return engines[0]

    def ds_grads_engine() -> Any:
        """The same engine on DeepSpeed's own gradient path (``pretrain.flat_grads`` off while it is built)."""
        from pretrain import flat_grads

        applies, flat_grads.applies = flat_grads.applies, lambda optimizer: False
        try:
            twin = build_vit(args.variant, img_size=img, num_classes=args.num_classes)
            twin.set_grad_checkpointing(args.grad_checkpointing)
            return build_bench_engine(twin, cfg, env.world_size, args.compile)
        finally:
            flat_grads.applies = applies

    def on_synthetic(built: Any) -> Callable[[], None]:
        """A step of ``built`` on the fixed batch, in the engine's input dtype."""
        fixed = (x.to(built.module.cls_token.dtype), y)
        return engine_step(built, lambda: fixed)

    makers = {"ours_plain": lambda: plain_step(plain_models[0], x, y, gpu),
              "timm_plain": lambda: plain_step(plain_models[1], x, y, gpu),
              "ours_engine": lambda: on_synthetic(engine()),
              "ours_engine_ds_grads": lambda: on_synthetic(ds_grads_engine())}
    if args.shards is not None:
        makers["ours_engine_data"] = lambda: engine_step(engine(), stream_batches(
            args, cfg, env, device, engine().module.cls_token.dtype))
    only = args.only.split(",") if args.only else list(makers)
    unknown = sorted(set(only) - set(makers))
    if unknown:
        raise SystemExit(f"--only {args.only}: unknown contender(s) {unknown}; choose from {sorted(makers)}")
    steps = {name: makers[name]() for name in makers if name in only}
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, step in steps.items():
            seconds = timed_steps(step, args.steps, args.warmup, device)
            best[name] = max(best.get(name, 0.0), batch * args.steps / seconds)
            print(f"{name:12s} {best[name]:9.1f} images/s (best so far)", flush=True)

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu x{torch.get_num_threads()} threads",
        "variant": args.variant, "img_size": img, "batch": batch, "params": params,
        "precision": cfg.deepspeed.precision, "zero_stage": cfg.deepspeed.zero_stage,
        "grad_checkpointing": args.grad_checkpointing, "compile": args.compile, "world_size": env.world_size,
        "overrides": args.overrides,
        **{f"{k}_images_per_s": round(v, 2) for k, v in best.items()},
    }
    if {"ours_plain", "timm_plain"} <= set(best):
        result["ours_vs_timm"] = round(best["ours_plain"] / best["timm_plain"], 3)
    if {"ours_plain", "ours_engine"} <= set(best):
        result["engine_vs_plain"] = round(best["ours_engine"] / best["ours_plain"], 3)
        result["engine_overhead"] = round(best["ours_plain"] / best["ours_engine"], 3)
    if {"ours_engine", "ours_engine_ds_grads"} <= set(best):
        result["flat_grads_speedup"] = round(best["ours_engine"] / best["ours_engine_ds_grads"], 3)
    if {"ours_engine", "ours_engine_data"} <= set(best):
        result.update(decode=args.decode, workers=args.workers,
                      data_vs_synthetic=round(best["ours_engine_data"] / best["ours_engine"], 3))
    if not args.compile:
        result.update({f"{name}_aten_calls_per_step": dispatched_calls(step) for name, step in steps.items()})
        if args.python:
            result.update({f"{name}_python_ms_per_step": python_ms_per_step(step) for name, step in steps.items()})
    throughput = Throughput(flops_per_image(ours), 1, device_peak_tflops(device, args.peak_tflops),
                            recompute=args.grad_checkpointing)
    for key in best:
        figures = throughput.utilisation(best[key])
        result[f"{key}_mfu"] = round(figures["perf/mfu"], 4) if figures else UNKNOWN
        result[f"{key}_hfu"] = round(figures["perf/hfu"], 4) if figures else UNKNOWN
    if args.profile is not None and env.rank == 0:
        result["profile_device_busy"] = {name: profile(step, args.profile / f"{name}.txt", device)
                                         for name, step in steps.items()}
    if env.rank == 0:
        print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
