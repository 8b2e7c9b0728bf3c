"""The bundled demo dataset: scikit-learn's handwritten digits as an ImageFolder and as shards.

1,797 real 8x8 greyscale digits (10 classes) ship inside scikit-learn, so the demo
and the tests need no download. They are upscaled to 32 px RGB PNGs, split
stratified into 1,497 train / 300 val with a fixed seed, written to
``OUT/images/{train,val}/<digit>/<index>.png`` and converted into
``OUT/shards`` (splits ``train`` and ``val``, 200 samples per shard, so train has
several shards, the last one shorter). Rerunning it reuses finished shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .convert import convert
from .manifest import CLASSES_FILE

IMAGE_SIZE = 32
VAL_SAMPLES = 300
SAMPLES_PER_SHARD = 200
SEED = 0
NAME = "digits"


def write_split_images(images_dir: Path, grey: np.ndarray, targets: np.ndarray, val_samples: int) -> dict[str, int]:
    """Greyscale uint8 images (N, h, w) as ``images_dir/{train,val}/<label>/<index>.png`` at ``IMAGE_SIZE`` px RGB,
    split stratified with the fixed seed; return images per split."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(targets))
    train, val = train_test_split(indices, test_size=val_samples, stratify=targets, random_state=SEED)
    for split, chosen in (("train", train), ("val", val)):
        for index in chosen:
            folder = images_dir / split / str(targets[index])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(grey[index], "L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
            image.convert("RGB").save(folder / f"{index:04d}.png")
    return {"train": len(train), "val": len(val)}


def write_images(images_dir: Path) -> dict[str, int]:
    """Write the digits as ``images_dir/{train,val}/<digit>/<index>.png``; return images per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    return write_split_images(images_dir, grey, digits.target, VAL_SAMPLES)


def convert_splits(images_dir: Path, shards: Path, name: str, progress: bool = False) -> Path:
    """``images_dir/{train,val}`` into splits ``train`` and ``val`` of ``shards`` (one class list); return ``shards``."""
    convert(images_dir / "train", shards, split="train", fmt="imagefolder",
            samples_per_shard=SAMPLES_PER_SHARD, seed=SEED, name=name, progress=progress)
    convert(images_dir / "val", shards, split="val", fmt="imagefolder", class_map=shards / CLASSES_FILE,
            samples_per_shard=SAMPLES_PER_SHARD, seed=SEED, progress=progress)
    return shards


def write_demo(out: Union[str, Path] = "data/demo", progress: bool = False) -> Path:
    """Write the demo ImageFolder and its shards under ``out``; return the shards directory."""
    out = Path(out)
    write_images(out / "images")
    return convert_splits(out / "images", out / "shards", NAME, progress)
