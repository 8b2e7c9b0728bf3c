"""``pretrain.evaluate.evaluate_model`` (shared by both stages) against scikit-learn's top-k accuracy."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import top_k_accuracy_score
from torch import nn

from pretrain.config import DataConfig
from pretrain.data.transforms import BatchPreprocessor
from pretrain.evaluate import evaluate_model

NUM_CLASSES, IMG = 7, 8


class Recorder(nn.Module):
    """A linear classifier that records the input dtypes it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * IMG * IMG, NUM_CLASSES)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dtypes.append(x.dtype)
        return self.fc(x.float().flatten(1))


def batches(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (n, 3, IMG, IMG), dtype=torch.uint8, generator=gen),
             torch.randint(0, NUM_CLASSES, (n,), generator=gen)) for n in sizes]


@pytest.mark.parametrize("max_batches", [0, 2])
def test_counts_match_sklearn(max_batches: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, data = Recorder(), batches([5, 8, 3])
    preprocess = BatchPreprocessor(DataConfig(), NUM_CLASSES)
    model.train()
    result = evaluate_model(model, data, preprocess, NUM_CLASSES, IMG, torch.device("cpu"), max_batches=max_batches,
                            dtype=torch.float64)
    assert model.training and set(model.dtypes) == {torch.float64}

    used = data[:max_batches] if max_batches else data
    with torch.no_grad():
        scores = torch.cat([model.fc(preprocess(x, y, "cpu", train=False)[0].flatten(1)) for x, y in used]).numpy()
    labels = torch.cat([y for _, y in used]).numpy()
    classes = list(range(NUM_CLASSES))
    assert result.total == len(labels)
    assert result.correct_top1 == top_k_accuracy_score(labels, scores, k=1, labels=classes, normalize=False)
    assert result.correct_top5 == top_k_accuracy_score(labels, scores, k=5, labels=classes, normalize=False)
    hits = scores.argmax(1) == labels
    assert result.class_total == np.bincount(labels, minlength=NUM_CLASSES).tolist()
    assert result.class_correct == np.bincount(labels, weights=hits, minlength=NUM_CLASSES).astype(int).tolist()
    assert result.scalars() == {"eval/top1": hits.mean(), "eval/top5": result.correct_top5 / len(labels),
                                "eval/samples": float(len(labels))}

    result.write_csv(tmp_path / "per_class.csv")
    rows = list(csv.DictReader((tmp_path / "per_class.csv").read_text().splitlines()))
    assert [int(r["total"]) for r in rows] == result.class_total


def test_empty_stream_counts_nothing() -> None:
    result = evaluate_model(Recorder(), [], BatchPreprocessor(DataConfig(), NUM_CLASSES), NUM_CLASSES, IMG,
                            torch.device("cpu"))
    assert result.total == 0 and result.top1 == 0.0 and result.class_total == [0] * NUM_CLASSES


def test_the_counts_are_the_reduced_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sum over processes comes back as a new tensor wherever the counts were not on the collective's device
    (a GPU reduce of host counts): the result must be read from it. Two processes with equal counts, faked."""
    import pretrain.collective as collective

    data = batches([5, 8, 3])
    alone = evaluate_model(Recorder(), data, BatchPreprocessor(DataConfig(), NUM_CLASSES), NUM_CLASSES, IMG,
                           torch.device("cpu"))
    monkeypatch.setattr(collective, "sum_", lambda tensor: tensor * 2)
    both = evaluate_model(Recorder(), data, BatchPreprocessor(DataConfig(), NUM_CLASSES), NUM_CLASSES, IMG,
                          torch.device("cpu"))
    assert both.total == 2 * alone.total == 32
    assert both.class_total == [2 * n for n in alone.class_total]
