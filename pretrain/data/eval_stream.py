"""The eval stream: every sample of the eval split exactly once over all ranks and workers.

Shards are split across ranks and then workers; where there are fewer shards than
parts, every part reads the shards and keeps every n-th sample. No padding, so ranks
may yield different batch counts: sum correct/total counts over ranks (``all_reduce``)
for exact top-1. Shards are read sequentially (webdataset), one open per shard; remote shards
(``s3://``, ``gs://``, ``https://``) stream through fsspec (``data_tools.storage``), front to back.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data_tools import storage
from pretrain.config import DataConfig
from pretrain.data.samples import CorruptLog, collate, decode_sample, loader
from pretrain.data.shards import resolve_shards
from pretrain.data.transforms import build_eval_transform

log = logging.getLogger(__name__)

EvalBatch = tuple[torch.Tensor, torch.Tensor, int]
"""Images uint8 (B, 3, H, W), labels int64 (B,), corrupt samples met while building it."""


def _warn_and_continue(exn: Exception) -> bool:
    """webdataset handler: an unreadable shard or member is logged and skipped."""
    log.warning("skipping unreadable shard data: %r", exn)
    return True

def _open_shards(urls: list[str]) -> Iterator[dict]:
    """webdataset's url_opener, with URL schemes it has no reader for opened through fsspec."""
    for url in urls:
        try:
            fsspec_url = storage.is_remote(url) and not url.startswith(("pipe:", "file:"))
            yield {"url": url, "stream": storage.open_stream(url) if fsspec_url else wds.gopen(url)}
        except Exception as exn:  # noqa: BLE001 - webdataset's handler contract: any read error skips the shard
            _warn_and_continue(exn)


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
        files = wds.tariterators.tar_file_expander(_open_shards(part.urls), handler=_warn_and_continue)
        raw = wds.tariterators.group_by_keys(files, handler=_warn_and_continue)
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
