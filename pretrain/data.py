"""Input pipeline pieces shared by the train and eval streams, and the eval stream.

The train stream (order, reader, per-slot seeds) is ``pretrain.train_stream``; this
module holds the pieces both streams share (decode, collate, corrupt-sample log,
loader) and the eval stream.

Eval stream: shards are split across ranks and then workers; where there are
fewer shards than parts, every part reads the shards and keeps every n-th sample.
Each sample is seen exactly once, no padding, so ranks may yield different batch
counts: sum correct/total counts over ranks (``all_reduce``) for exact top-1.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.config import DataConfig
from pretrain.shards import resolve_shards
from pretrain.transforms import IMAGE_KEYS, CorruptImageError, build_eval_transform

log = logging.getLogger(__name__)

EvalBatch = tuple[torch.Tensor, torch.Tensor, int]
"""Images uint8 (B, 3, H, W), labels int64 (B,), corrupt samples met while building it."""


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


def _warn_and_continue(exn: Exception) -> bool:
    """webdataset handler: an unreadable shard or member is logged and skipped."""
    log.warning("skipping unreadable shard data: %r", exn)
    return True


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


# ---------------------------------------------------------------------- eval


@dataclass(frozen=True)
class _Part:
    """Shards to read and which samples of their concatenation to keep (index % mod == res)."""

    urls: list[str]
    mod: int = 1
    res: int = 0

    def split(self, index: int, count: int) -> "_Part":
        """Part ``index`` of ``count``: whole shards where there are enough, else every ``count``-th sample."""
        if self.mod == 1 and len(self.urls) >= count:
            return _Part(self.urls[index::count])
        return _Part(self.urls, self.mod * count, self.res + self.mod * index)


class _EvalDataset(IterableDataset):
    def __init__(self, part: _Part, cfg: DataConfig, img_size: int, batch_size: int):
        super().__init__()
        self.part, self.cfg, self.img_size, self.batch_size = part, cfg, img_size, batch_size

    def __iter__(self) -> Iterator[EvalBatch]:
        info = get_worker_info()
        part = self.part.split(info.id, info.num_workers) if info else self.part
        transform = build_eval_transform(self.cfg, self.img_size)
        corrupt = CorruptLog()
        raw = wds.tarfile_to_samples(handler=_warn_and_continue)(iter([{"url": u} for u in part.urls]))
        mine = itertools.islice(raw, part.res, None, part.mod)
        while True:
            before = corrupt.count
            chunk = list(itertools.islice(mine, self.batch_size))
            out = [o for o in (decode_sample(s, transform, corrupt) for s in chunk) if o is not None]
            if out:
                images, labels = collate(out)
                yield images, labels, corrupt.count - before
            if len(chunk) < self.batch_size:
                return


class EvalStream:
    """Re-iterable over this rank's eval batches ``(uint8 images, int64 labels)``; last batches may be short.

    Ranks may yield different numbers of batches and samples: sum the counts over ranks.
    """

    def __init__(self, dataset: _EvalDataset, num_samples: Optional[int], num_workers: int):
        self.num_samples = num_samples
        """Eval samples over all ranks (from ``_info.json``; None when the spec has none)."""
        self.corrupt_samples = 0
        self._loader = loader(dataset, num_workers, persistent=num_workers > 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, corrupt in self._loader:
            self.corrupt_samples += corrupt
            yield images, labels


def build_eval_stream(cfg: DataConfig, *, img_size: int, rank: int, world_size: int) -> EvalStream:
    """This rank's share of the eval set: every sample exactly once over all ranks and workers."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    shards = resolve_shards(cfg.eval_shards, cfg.eval_split, "data.eval_shards")
    build_eval_transform(cfg, img_size)
    part = _Part(shards.urls).split(rank, world_size)
    dataset = _EvalDataset(part, cfg, img_size, cfg.eval_batch_size or cfg.micro_batch_size)
    return EvalStream(dataset, shards.num_samples, cfg.num_workers)
