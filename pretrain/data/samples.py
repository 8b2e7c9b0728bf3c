"""Pieces the train and eval streams share: per-sample seeds, decode, collate, the
corrupt-sample log and the DataLoader settings."""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from pretrain.data.image_header import CorruptImageError
from pretrain.data.transforms import IMAGE_KEYS

log = logging.getLogger(__name__)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings, identical in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class CorruptLog:
    """Counts corrupt samples in this process and logs the 1st, 2nd, 4th, 8th, ... one."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, reason: str, sample: dict[str, Any]) -> None:
        self.count += 1
        if self.count & (self.count - 1) == 0:
            log.warning("skipped corrupt sample %s from %s (%s); %d so far in this worker",
                        sample.get("__key__"), sample.get("__url__"), reason, self.count)


def decode_sample(sample: dict[str, Any], transform: Callable, corrupt: CorruptLog) -> Optional[tuple[torch.Tensor, int]]:
    """Raw webdataset sample -> (uint8 image, label), or None (counted and logged) if it is corrupt."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        corrupt(f"no image field among {IMAGE_KEYS}", sample)
        return None
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError) as exn:
        corrupt(f"missing or invalid cls: {exn!r}", sample)
        return None
    try:
        return transform(sample[key]), label
    except CorruptImageError as exn:
        corrupt(f"{key}: {exn}", sample)
        return None


def collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label) pairs into uint8 (B, 3, H, W) in channels-last memory, and int64 labels.

    Decoded pixels are interleaved (HWC), so a channels-last batch is a plain copy per image,
    where a standard NCHW stack would transpose every image; convolutions and the device-side
    preprocessing accept either layout.
    """
    first = samples[0][0]
    images = torch.empty((len(samples), *first.shape), dtype=torch.uint8, memory_format=torch.channels_last)
    for out, (image, _) in zip(images, samples):
        out.copy_(image)
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64)


def loader(dataset: IterableDataset, num_workers: int, persistent: bool, prefetch: Optional[int] = None
           ) -> DataLoader:
    """DataLoader over a dataset that batches itself; in-order round-robin over workers.

    Its own ``generator`` keeps the loader from drawing its worker base seed from the
    global torch RNG, so building or restarting a stream never shifts the training RNG.
    """
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=persistent, generator=torch.Generator().manual_seed(0),
                      prefetch_factor=prefetch if num_workers else None)
