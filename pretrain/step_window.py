"""Per-step training values kept on the device between sync points, then read with one collective.

Why: every host read of a device value (``.item()``, ``.tolist()``, ``bool(tensor)``) waits
for the GPU to drain its queue, and the host then has to refill it while the GPU idles. A
step used to read its loss, its finiteness, its gradient norm and the ranks' agreement on a
stop signal; at ~0.1 s per step on an H100 those stalls cost several per cent. Now a step
only appends device tensors here; at a *sync point* (a logging, checkpoint or evaluation
step, the last step, and the first step of a process) ``resolve`` all-reduces the window's
per-step loss sums together with the stop flag and reads them, with the gradient norms, in
one device-to-host copy.

What the deferral changes, and why it stays correct:

* a non-finite loss still never updates the weights: ZeRO stages 1-3 skip such an update
  inside ``engine.step()`` (``pretrain.engine``; at stages 1-2 decided on the device, at stage 3
  by DeepSpeed on the host); stage 0 decides on the host every step (``train_step``), the one
  remaining per-step sync of ours, and no recipe uses stage 0;
* a step is non-finite when the sum of its losses over ranks and micro-batches is (a NaN or
  inf in any term makes the sum NaN or inf) or when its update was skipped (a non-finite
  gradient with a finite loss): the window keeps each step's skip flag, a device tensor at
  stages 1-2 (``pretrain.engine.step_skipped``), and reads it with the rest;
* "``optim.max_nonfinite_steps`` in a row stop the run" is detected at the sync point that
  ends the streak's window, up to ``logging.every_steps - 1`` steps late; those later steps
  are skipped too if still non-finite, so the saved weights are the last good ones unless
  the streak ended before the sync point;
* a stop signal is seen at the next sync point, at most ``logging.every_steps`` steps after it
  arrived (the recipes log every 20-50 steps; SLURM signals 300 s before the limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from pretrain import collective


@dataclass
class StepRecord:
    """One optimizer step as read back at a sync point."""

    step: int
    loss: float
    """Mean over ranks and micro-batches; NaN if any of them was non-finite."""
    grad_norm: float
    lr: float
    skipped: bool = False
    """The update was skipped: its gradients were not finite (whatever the loss)."""

    @property
    def nonfinite(self) -> bool:
        return self.skipped or not math.isfinite(self.loss)


@dataclass
class StepWindow:
    """The steps since the last sync point: device values, read together by ``resolve``."""

    device: torch.device
    losses_per_step: int
    """Loss terms summed per step over all ranks (micro-batches x world size): the divisor of the mean."""
    steps: list[int] = field(default_factory=list)
    loss_sums: list[torch.Tensor] = field(default_factory=list)
    grad_norms: list[torch.Tensor] = field(default_factory=list)
    skipped: list[torch.Tensor] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    def add(self, step: int, loss_sum: torch.Tensor, grad_norm: Any, lr: float, skipped: Any = False) -> None:
        """Keep step ``step``'s loss sum (this rank's, on the device), gradient norm and skip flag (a device tensor
        or a bool), without reading them."""
        self.steps.append(step)
        self.loss_sums.append(loss_sum)
        self.grad_norms.append(self._on_device(grad_norm))
        self.skipped.append(self._on_device(skipped))
        self.lrs.append(lr)

    def _on_device(self, value: Any) -> torch.Tensor:
        """A float64 device scalar from a tensor (copied: DeepSpeed may reuse it), a number, or None (NaN)."""
        if isinstance(value, torch.Tensor):
            return value.detach().reshape(()).to(dtype=torch.float64, copy=True)
        return torch.full((), math.nan if value is None else float(value), dtype=torch.float64, device=self.device)

    def _stacked(self, values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values).double() if values else torch.zeros(0, dtype=torch.float64, device=self.device)

    def __len__(self) -> int:
        return len(self.steps)

    def resolve(self, stop: bool) -> tuple[list[StepRecord], bool]:
        """The window's records and whether any rank asked to stop; empties the window.

        One all-reduce (loss sums and the stop flag) and one host read; every rank must call it
        at the same step.
        """
        n = len(self.steps)
        flag = torch.full((1,), float(stop), dtype=torch.float64, device=self.device)
        summed = collective.sum_(torch.cat([self._stacked(self.loss_sums), flag]))
        values = torch.cat([summed, self._stacked(self.grad_norms), self._stacked(self.skipped)]).tolist()
        records = []
        for i, (step, lr) in enumerate(zip(self.steps, self.lrs)):
            loss = values[i] / self.losses_per_step
            records.append(StepRecord(step, loss if math.isfinite(loss) else math.nan, values[n + 1 + i], lr,
                                      skipped=values[2 * n + 1 + i] > 0))
        self.steps, self.loss_sums, self.grad_norms, self.skipped, self.lrs = [], [], [], [], []
        return records, values[n] > 0


def first_step_report(first_s: float, later_s: float) -> str:
    """How long the first step of a process took against later ones: the cost of torch.compile and warm-up."""
    return (f"first step {first_s:.2f} s vs {later_s:.3f} s per later step: about {first_s - later_s:.1f} s of "
            "torch.compile and warm-up")
