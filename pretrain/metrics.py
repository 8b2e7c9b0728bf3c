"""Training metrics: throughput, MFU and HFU, data wait, memory; TensorBoard, a JSONL log and a console line.

Why here and engine-agnostic: pretraining (DeepSpeed) and finetuning (Accelerate)
report the same figures the same way. Only rank 0 writes; every rank measures.

Utilisation, per device (PaLM appendix B):

* ``perf/mfu`` (model FLOPs utilisation) counts the FLOPs the model needs: 3 x the
  forward FLOPs per image (backward = 2 x forward), whatever the implementation does;
* ``perf/hfu`` (hardware FLOPs utilisation) counts what the hardware runs: with
  activation recomputation (``model.grad_checkpointing``) the forward runs twice,
  4 x forward; without it HFU equals MFU.

Both divide by the device's peak: ``logging.peak_tflops``, else ``PEAK_TFLOPS`` looked up
by the exact device name ``torch.cuda.get_device_name`` reports. Names differ by a word
between parts with very different peaks (H100 SXM vs PCIe vs NVL, L40 vs L40S vs L4),
so a substring match gives wrong numbers: an unknown name (and a CPU) reports no MFU
or HFU, and the run logs that the peak is unknown and how to set it.

The step time a figure uses must end when the device has finished the step
(``finish_device_work``): CUDA kernels run asynchronously, so a host clock read
right after ``optimizer.step()`` stops before the update has run.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

PEAK_TFLOPS: dict[str, float] = {
    "NVIDIA B200": 2250.0,
    "NVIDIA H200": 989.4,
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H800": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.05,
    "NVIDIA L40": 181.05,
    "NVIDIA L4": 121.0,
    "AMD Instinct MI300X": 1307.4,
}
"""Dense (no sparsity) bf16 tensor-core peak TFLOP/s from the vendors' datasheets, by exact device name."""

UNKNOWN = "unknown"


def device_peak_tflops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """Peak TFLOP/s of ``device`` from the config override or the table (None: unknown, logged once)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = PEAK_TFLOPS.get(name.strip())
    if peak is None:
        log.warning("peak FLOP/s of device %r unknown: MFU and HFU are not reported; set logging.peak_tflops to its "
                    "dense bf16 TFLOP/s to get them", name)
    return peak


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def finish_device_work(device: torch.device) -> None:
    """Wait until ``device`` has run everything queued (a no-op on the CPU): call before reading a step's clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dispatched_calls(run: Any) -> int:
    """How many ATen calls the dispatcher sees while ``run()`` runs (views, copies and kernels alike).

    Why count them: a training step on a GPU is host-bound once the host takes longer to issue
    its calls than the device takes to run them, and a wrapper such as DeepSpeed adds many
    small calls per parameter tensor. The count is exact and the same on any machine, so an
    engine's host work can be compared with a plain loop's on a CPU, where no GPU is at hand.
    Not for compiled modules: the dispatch mode makes them re-trace.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = 0

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        run()
    return calls


class Throughput:
    """Accumulates step and data-wait time between two ``report()`` calls."""

    def __init__(self, flops_per_image: float, world_size: int, peak_tflops: Optional[float],
                 recompute: bool = False) -> None:
        self.model_flops_per_image = 3 * flops_per_image
        self.hardware_flops_per_image = (4 if recompute else 3) * flops_per_image
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.reset()

    def reset(self) -> None:
        self.images = 0
        self.step_time = 0.0
        self.data_time = 0.0

    def add(self, images: int, step_time: float, data_time: float) -> None:
        """``images`` over all ranks in one step of ``step_time`` s, of which ``data_time`` s waiting for data."""
        self.images += images
        self.step_time += step_time
        self.data_time += data_time

    def utilisation(self, images_per_s_per_device: float) -> dict[str, float]:
        """``perf/mfu`` and ``perf/hfu`` at this rate; empty when the peak is unknown."""
        if not self.peak_tflops:
            return {}
        peak = self.peak_tflops * 1e12
        return {"perf/mfu": images_per_s_per_device * self.model_flops_per_image / peak,
                "perf/hfu": images_per_s_per_device * self.hardware_flops_per_image / peak}

    def report(self) -> dict[str, float]:
        """Figures since the last report, then start a new window."""
        if self.step_time <= 0:
            return {}
        per_s = self.images / self.step_time
        per_device = per_s / self.world_size
        out = {
            "perf/images_per_s": per_s,
            "perf/images_per_s_per_device": per_device,
            "perf/data_wait_frac": self.data_time / self.step_time,
            **self.utilisation(per_device),
        }
        self.reset()
        return out


class MetricsWriter:
    """TensorBoard scalars + ``metrics.jsonl`` (one JSON object per logged step) on rank 0; no-op elsewhere.

    The JSONL file is what scripts and tests read (no TensorBoard parsing needed);
    a resumed run appends, so the last line for a step wins.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def write_image(self, step: int, tag: str, image: Any) -> None:
        """An (H, W, 3) uint8 image to TensorBoard (e.g. attention maps); not in the JSONL log."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def console_line(step: int, total: int, scalars: dict[str, float]) -> str:
    """Compact rank-0 progress line, e.g. ``step 120/500 loss 1.234 lr 3.0e-04 gnorm 0.91 img/s 830 ...``."""
    parts = [f"step {step}/{total}"]
    fields = [("train/loss", "loss", "{:.4f}"), ("train/lr", "lr", "{:.2e}"), ("train/grad_norm", "gnorm", "{:.3f}"),
              ("perf/images_per_s", "img/s", "{:.0f}"), ("perf/mfu", "mfu", "{:.1%}"), ("perf/hfu", "hfu", "{:.1%}"),
              ("perf/data_wait_frac", "data", "{:.0%}"), ("perf/mem_gb", "mem", "{:.1f}G"),
              ("train/nonfinite_steps", "nonfinite", "{:.0f}"), ("eval/top1", "top1", "{:.2%}"),
              ("eval/top5", "top5", "{:.2%}")]
    for key, name, fmt in fields:
        if key in scalars:
            parts.append(f"{name} {fmt.format(scalars[key])}")
    return " ".join(parts)


def quiet_library_warnings(rank: int) -> None:
    """Show each repeated library warning once, and DeepSpeed's info chatter nowhere.

    DeepSpeed logs per step at INFO and torch warns on every ZeRO all-gather call;
    webdataset warns about unclosed files on every shard.
    """
    warnings.filterwarnings("once", category=FutureWarning)
    warnings.filterwarnings("once", category=UserWarning)
    warnings.filterwarnings("ignore", category=ResourceWarning)
    level = logging.WARNING if rank == 0 else logging.ERROR
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(level)

