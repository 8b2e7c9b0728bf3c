"""big_vision's few-shot linear probe (``evaluators/fewshot_lsr.py``): closed-form ridge regression in float64.

What it fits, as big_vision does: features standardised per dimension with the few-shot
images' own mean and standard deviation (+1e-5), a constant feature of ``BIAS_CONSTANT``
appended (a bias that the penalty barely touches), targets one-hot mapped to {-1, +1},
weights ``(XᵀX + λI)⁻¹ XᵀY``; the prediction is the arg-max over classes.

Why an eigendecomposition and not one solve: ``XᵀX = Q diag(e) Qᵀ`` (or ``XXᵀ`` when
there are fewer images than dimensions, big_vision's kernel form) is computed once and
gives the weights of every λ for the price of a matrix product, so choosing λ from a grid
(Kauldron's variant of the evaluator, ``select_l2``) costs next to nothing. Why float64:
with 25 shots x 1,000 classes and 768 dimensions the Gram matrix's condition number
reaches 1e7 at small λ; float32 loses the last digits of the weights there.

Why torch and not NumPy: the fit runs where its features are, on rank 0's accelerator in
training. ImageNet-1k's 12 probes (1-25 shots, 3 seeds) are ~100 GFLOP of float64 Gram
matrices: minutes on two CPU cores (``benchmarks/monitor_cost.py``), milliseconds on a GPU.
``XᵀY`` is formed from per-class sums of X (``index_add_``), O(N·D) instead of O(N·D·C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.data.samples import derive_seed

BIAS_CONSTANT = 100.0
"""Value of the appended constant feature (big_vision's): the bias weight is penalised 1/100² as much."""
STD_EPS = 1e-5
HOLDOUT_FRACTION = 5
"""``select_l2`` holds out ``max(1, shots // HOLDOUT_FRACTION)`` images of each class."""


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: what is needed to score new features (and what rank 0 shares), float64 tensors."""

    mean: torch.Tensor
    """(D,) per-dimension mean of the few-shot features."""
    std: torch.Tensor
    """(D,) their standard deviation plus ``STD_EPS``."""
    weights: torch.Tensor
    """(D + 1, C): the last row multiplies the bias feature."""

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Class index (row of the targets) per row of ``features`` (N, D), on the probe's device."""
        return (design_matrix(features.to(self.weights.device), self.mean, self.std) @ self.weights).argmax(dim=1)

    def pack(self) -> torch.Tensor:
        """Flat float64 vector (mean, std, weights): one collective carries a probe."""
        return torch.cat([self.mean, self.std, self.weights.flatten()])

    @classmethod
    def unpack(cls, flat: torch.Tensor, dim: int, num_classes: int) -> "LinearProbe":
        return cls(flat[:dim], flat[dim:2 * dim], flat[2 * dim:].reshape(dim + 1, num_classes))


def design_matrix(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Standardised float64 features with the bias column appended."""
    return F.pad((features.double() - mean) / std, (0, 1), value=BIAS_CONSTANT)


@dataclass(frozen=True)
class RidgeCache:
    """The eigendecomposition behind every λ's weights (big_vision's ``_precompute_cache``)."""

    mean: torch.Tensor
    std: torch.Tensor
    eigs: torch.Tensor
    lhs: torch.Tensor
    rhs: torch.Tensor

    def probe(self, l2: float) -> LinearProbe:
        """Ridge weights for penalty ``l2``: ``lhs @ diag(1 / (eigs + l2)) @ rhs``."""
        return LinearProbe(self.mean, self.std, self.lhs @ (self.rhs / (self.eigs + l2)[:, None]))


def ridge_cache(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> RidgeCache:
    """Standardise, append the bias, and diagonalise the smaller of ``XᵀX`` and ``XXᵀ`` (on ``features``' device).

    ``N >= D``: weights ``Q diag(1/(e+λ)) Qᵀ XᵀY``. ``N < D``: the kernel form
    ``Xᵀ(XXᵀ + λI)⁻¹Y = XᵀQ diag(1/(e+λ)) QᵀY``; both equal ``(XᵀX + λI)⁻¹XᵀY``.
    ``labels`` are target rows in ``[0, num_classes)``.
    """
    features = features.double()
    labels = labels.to(features.device)
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False) + STD_EPS
    x = design_matrix(features, mean, std)
    if x.shape[0] >= x.shape[1]:
        # Xᵀ(2·onehot − 1) = 2·(per-class sums of X)ᵀ − (column sums of X)
        sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
        eigs, q = torch.linalg.eigh(x.T @ x)
        return RidgeCache(mean, std, eigs, q, q.T @ (2.0 * sums.T - x.sum(dim=0)[:, None]))
    y = 2.0 * F.one_hot(labels, num_classes).double() - 1.0
    eigs, q = torch.linalg.eigh(x @ x.T)
    return RidgeCache(mean, std, eigs, x.T @ q, q.T @ y)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float) -> LinearProbe:
    return ridge_cache(features, labels, num_classes).probe(l2)


def holdout_mask(labels: torch.Tensor, shots: int) -> torch.Tensor:
    """True for the last ``max(1, shots // HOLDOUT_FRACTION)`` images of each class (picks are in random order)."""
    held = torch.zeros(len(labels), dtype=torch.bool)
    count = max(1, shots // HOLDOUT_FRACTION)
    for label in labels.unique():
        held[torch.nonzero(labels.cpu() == label.cpu()).flatten()[-count:]] = True
    return held


def select_l2(features: torch.Tensor, labels: torch.Tensor, num_classes: int, shots: int, grid: Sequence[float],
              default: float) -> float:
    """The grid's λ with the best accuracy on the held-out part of the few-shot images.

    Ties go to the larger λ (the more regularised probe). With one shot nothing can be held
    out and ``default`` is returned, as with an empty grid.
    """
    if not grid or shots < 2:
        return default
    held = holdout_mask(labels, shots).to(features.device)
    labels = labels.to(features.device)
    cache = ridge_cache(features[~held], labels[~held], num_classes)
    scores = [(float((cache.probe(l2).predict(features[held]) == labels[held]).double().mean()), l2) for l2 in grid]
    return max(scores)[1]


def pick_shots(labels: np.ndarray, per_class: int, seed: int, salt: str, exact: bool = True) -> np.ndarray:
    """(classes, per_class) indices into ``labels``: a seeded random draw per class, nested over shot counts.

    Shot count ``s`` uses the first ``s`` columns, so 1-shot images are among the 5-shot ones
    (a curve over shots compares like with like). The draw depends on ``seed``, ``salt``
    (the dataset's name) and the split's labels only: every rank and every rerun picks the
    same images. Rows follow the sorted class labels present; samples labelled -1 (unreadable)
    are never picked. ``exact``: a class with fewer images is an error; otherwise it gives all
    it has and its row is padded with -1 (the kNN bank). ``per_class = 0`` takes every image.
    """
    classes = np.unique(labels[labels >= 0])
    rng = np.random.default_rng(derive_seed("fewshot", salt, seed))
    members = [rng.permutation(np.flatnonzero(labels == label)) for label in classes]
    short = [(int(label), len(m)) for label, m in zip(classes, members) if len(m) < per_class]
    if exact and short:
        raise ValueError(f"{len(short)} classes have fewer than {per_class} images (class {short[0][0]}: "
                         f"{short[0][1]})")
    width = per_class or max(len(m) for m in members)
    picks = np.full((len(classes), width), -1, dtype=np.int64)
    for row, chosen in zip(picks, members):
        row[:min(width, len(chosen))] = chosen[:width]
    return picks
