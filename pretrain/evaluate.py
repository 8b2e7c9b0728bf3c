"""Exact top-1/top-5 and per-class counts over an eval stream, shared by pretraining and finetuning.

Why counts and not averaged accuracies: every eval sample is seen exactly once
over all processes, but processes may see different numbers of batches, so the
only exact reduction is a sum of integer counts (correct top-1, correct top-5,
seen, per class), all-reduced once at the end.

The model is anything called as ``model(x)`` with ``train()``/``eval()``: a plain
module, a DDP/Accelerate-wrapped one or a DeepSpeed engine; only torch and
``pretrain.collective`` are used here, so exported models evaluate without DeepSpeed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from pretrain import collective
from pretrain.data.transforms import BatchPreprocessor

TOP_K = 5


@dataclass
class EvalResult:
    """Exact counts over the whole eval set."""

    correct_top1: int
    correct_top5: int
    total: int
    class_correct: list[int]
    class_total: list[int]

    @property
    def top1(self) -> float:
        return self.correct_top1 / max(self.total, 1)

    @property
    def top5(self) -> float:
        return self.correct_top5 / max(self.total, 1)

    def scalars(self) -> dict[str, float]:
        """The metrics both stages write (TensorBoard tags)."""
        return {"eval/top1": self.top1, "eval/top5": self.top5, "eval/samples": float(self.total)}

    def summary(self) -> str:
        return (f"top-1 {self.top1:.4f} ({self.correct_top1}/{self.total})  "
                f"top-5 {self.top5:.4f} ({self.correct_top5}/{self.total})")

    def write_csv(self, path: Path, class_names: Optional[Sequence[str]] = None) -> None:
        """One row per class: index, name, correct, total, accuracy (empty when the class is absent)."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "name", "correct", "total", "accuracy"])
            for index, (correct, total) in enumerate(zip(self.class_correct, self.class_total)):
                name = class_names[index] if class_names else str(index)
                writer.writerow([index, name, correct, total, f"{correct / total:.6f}" if total else ""])


def lockstep(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], dummy: tuple[torch.Tensor, torch.Tensor],
             max_batches: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """``(images, payload, real)`` until no process has a batch left; ``dummy`` (``real=False``) where this one ran out.

    With several processes, all of them agree before every batch whether anyone still
    has one, and those that ran out forward a dummy image: under ZeRO-3 a forward is a
    collective that every rank must join (plain DDP would not need it).
    """
    iterator = iter(batches)
    index = 0
    while not max_batches or index < max_batches:
        batch = next(iterator, None)
        if collective.active():
            if not collective.any_true(batch is not None):
                return
        elif batch is None:
            return
        yield (*(batch if batch is not None else dummy), batch is not None)
        index += 1


def dummy_batch(img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One black image with label 0: what a process forwards when it has no batch left (``lockstep``)."""
    return torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64)


@torch.no_grad()
def evaluate_model(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   preprocess: BatchPreprocessor, num_classes: int, img_size: int, device: torch.device,
                   max_batches: int = 0, dtype: torch.dtype = torch.float32) -> EvalResult:
    """Count correct predictions over this process' ``batches``, then sum over all processes.

    Processes forward in ``lockstep``. ``dtype`` is the input dtype the model computes in
    (a DeepSpeed bf16 engine takes bf16 inputs; Accelerate's autocast takes fp32).
    """
    was_training = model.training
    model.eval()
    k = min(TOP_K, num_classes)
    # Row 0: correct top-1 per class, row 1: correct top-k per class, row 2: samples per class.
    counts = torch.zeros(3, num_classes, dtype=torch.int64, device=device)
    for images, labels, real in lockstep(batches, dummy_batch(img_size), max_batches):
        x, _ = preprocess(images, labels, device, dtype, train=False)
        logits = model(x)
        if real:
            target = labels.to(device)
            hit = logits.float().topk(k, dim=-1).indices == target[:, None]
            counts[0].index_add_(0, target, hit[:, 0].long())
            counts[1].index_add_(0, target, hit.any(dim=-1).long())
            counts[2].index_add_(0, target, torch.ones_like(target))
    counts = collective.sum_(counts)
    model.train(was_training)
    per_class = counts.cpu().tolist()
    return EvalResult(correct_top1=sum(per_class[0]), correct_top5=sum(per_class[1]), total=sum(per_class[2]),
                      class_correct=per_class[0], class_total=per_class[2])
