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

Everything here is NumPy on the host and deterministic: the same features give the same
weights on every machine that runs the same LAPACK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pretrain.data.samples import derive_seed

BIAS_CONSTANT = 100.0
"""Value of the appended constant feature (big_vision's): the bias weight is penalised 1/100² as much."""
STD_EPS = 1e-5
HOLDOUT_FRACTION = 5
"""``select_l2`` holds out ``max(1, shots // HOLDOUT_FRACTION)`` images of each class."""


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: what is needed to score new features (and what rank 0 broadcasts)."""

    mean: np.ndarray
    """(D,) per-dimension mean of the few-shot features."""
    std: np.ndarray
    """(D,) their standard deviation plus ``STD_EPS``."""
    weights: np.ndarray
    """(D + 1, C): the last row multiplies the bias feature."""

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class index per row of ``features`` (N, D)."""
        return (design_matrix(features, self.mean, self.std) @ self.weights).argmax(axis=1)

    def pack(self) -> np.ndarray:
        """Flat float64 vector (mean, std, weights): one collective carries a probe."""
        return np.concatenate([self.mean, self.std, self.weights.ravel()])

    @classmethod
    def unpack(cls, flat: np.ndarray, dim: int, num_classes: int) -> "LinearProbe":
        return cls(flat[:dim], flat[dim:2 * dim], flat[2 * dim:].reshape(dim + 1, num_classes))


def design_matrix(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Standardised float64 features with the bias column appended."""
    x = (np.asarray(features, dtype=np.float64) - mean) / std
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot rows mapped to {-1, +1}."""
    return 2.0 * np.eye(num_classes)[labels] - 1.0


@dataclass(frozen=True)
class RidgeCache:
    """The eigendecomposition behind every λ's weights (big_vision's ``_precompute_cache``)."""

    mean: np.ndarray
    std: np.ndarray
    eigs: np.ndarray
    lhs: np.ndarray
    rhs: np.ndarray

    def probe(self, l2: float) -> LinearProbe:
        """Ridge weights for penalty ``l2``: ``lhs @ diag(1 / (eigs + l2)) @ rhs``."""
        return LinearProbe(self.mean, self.std, self.lhs @ (self.rhs / (self.eigs + l2)[:, None]))


def ridge_cache(features: np.ndarray, labels: np.ndarray, num_classes: int) -> RidgeCache:
    """Standardise, append the bias, and diagonalise the smaller of ``XᵀX`` and ``XXᵀ``.

    ``N >= D``: weights ``Q diag(1/(e+λ)) Qᵀ XᵀY``. ``N < D``: the kernel form
    ``Xᵀ(XXᵀ + λI)⁻¹Y = XᵀQ diag(1/(e+λ)) QᵀY``; both equal ``(XᵀX + λI)⁻¹XᵀY``.
    """
    features = np.asarray(features, dtype=np.float64)
    mean = features.mean(axis=0)
    std = features.std(axis=0) + STD_EPS
    x = design_matrix(features, mean, std)
    y = targets(labels, num_classes)
    if x.shape[0] >= x.shape[1]:
        eigs, q = np.linalg.eigh(x.T @ x)
        return RidgeCache(mean, std, eigs, q, q.T @ (x.T @ y))
    eigs, q = np.linalg.eigh(x @ x.T)
    return RidgeCache(mean, std, eigs, x.T @ q, q.T @ y)


def fit_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float) -> LinearProbe:
    return ridge_cache(features, labels, num_classes).probe(l2)


def holdout_mask(labels: np.ndarray, shots: int) -> np.ndarray:
    """True for the last ``max(1, shots // HOLDOUT_FRACTION)`` images of each class (picks are in random order)."""
    held = np.zeros(len(labels), dtype=bool)
    count = max(1, shots // HOLDOUT_FRACTION)
    for label in np.unique(labels):
        held[np.flatnonzero(labels == label)[-count:]] = True
    return held


def select_l2(features: np.ndarray, labels: np.ndarray, num_classes: int, shots: int, grid: Sequence[float],
              default: float) -> float:
    """The grid's λ with the best accuracy on the held-out part of the few-shot images.

    Ties go to the larger λ (the more regularised probe). With one shot nothing can be held
    out and ``default`` is returned, as with an empty grid.
    """
    if not grid or shots < 2:
        return default
    held = holdout_mask(labels, shots)
    cache = ridge_cache(features[~held], labels[~held], num_classes)
    scores = [(float((cache.probe(l2).predict(features[held]) == labels[held]).mean()), l2) for l2 in grid]
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
