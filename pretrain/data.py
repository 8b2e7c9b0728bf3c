"""Streaming input pipeline: webdataset shards -> uint8 micro-batches, even across ranks, resumable.

Train stream, and why it is built this way:

* **Equal batch counts.** An epoch is ``samples_per_epoch // global_batch_size``
  optimizer steps; every rank yields ``batches_per_epoch = steps x accumulation``
  micro-batches of ``micro_batch_size``. Shards are drawn *with replacement*
  (webdataset ``ResampledShards``), so no rank or worker can run dry, whatever
  the shard sizes and however few shards there are.
* **Deterministic batches.** Each (epoch, rank) stream is cut into ``lanes``
  independent sample sequences (resampled shards -> tar samples -> shuffle
  buffer), each seeded from (seed, epoch, rank, lane). Micro-batch ``k`` of the
  epoch is the ``k // lanes``-th batch of lane ``k % lanes``. DataLoader workers
  are handed batches round-robin, in order, so batch ``k`` is the same tensor
  whichever worker builds it. ``lanes`` defaults to ``num_workers`` (one lane per
  worker, nothing read twice) and is stored in the position, so a resume with
  another worker count still reproduces the stream (workers then also read,
  without decoding, the batches of their lanes that other workers build).
* **Augmentation** draws from the global torch RNG, reseeded before every sample
  from (seed, epoch, rank, lane, slot), inside ``fork_rng`` so the training
  process' own RNG is untouched when ``num_workers=0``.
* **Exact resume without decoding.** A batch is a fixed run of ``micro_batch_size``
  raw samples of its lane; fast-forwarding to a saved position reads and drops
  raw tar members (no image decode). The read cost is the bytes of the skipped
  part of the current epoch.
* **Corrupt samples** (undecodable image, missing image or ``cls``) are counted,
  logged at counts 1, 2, 4, 8, ... and replaced by another good sample of the
  same batch with the corrupt slot's augmentation seed, so batch sizes, batch
  counts and resume stay exact. Only when a whole micro-batch is corrupt are
  further raw samples drawn (logged; resume past that batch is then not exact).

Eval stream: shards are split across ranks and then workers; where there are
fewer shards than parts, every part reads the shards and keeps every n-th sample.
Each sample is seen exactly once, no padding, so ranks may yield different batch
counts: sum correct/total counts over ranks (``all_reduce``) for exact top-1.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.config import DataConfig
from pretrain.shards import resolve_shards
from pretrain.transforms import IMAGE_KEYS, CorruptImageError, build_eval_transform, build_train_transform

log = logging.getLogger(__name__)

MAX_EMPTY_SHARDS = 1000
"""Consecutive shard reads without a single sample after which the train stream gives up."""

MAX_CORRUPT_DRAWS = 10_000
"""Consecutive corrupt samples after which the train stream gives up."""

Batch = tuple[torch.Tensor, torch.Tensor, int]
"""Images uint8 (B, 3, H, W), labels int64 (B,), corrupt samples met while building it."""


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings, identical in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _CorruptLog:
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


def decode_sample(sample: dict[str, Any], transform: Callable, corrupt: _CorruptLog) -> Optional[tuple[torch.Tensor, int]]:
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


@dataclass
class StreamPosition:
    """Where a train stream stands: micro-batches handed out in ``epoch`` (same on every rank)."""

    epoch: int = 0
    batch: int = 0
    lanes: int = 1
    """Independent sample sequences per rank (see module docstring); part of the stream's identity."""

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StreamPosition":
        names = {f.name for f in fields(cls)}
        if set(data) != names or not all(isinstance(v, int) and v >= 0 for v in data.values()):
            raise ValueError(f"a stream position needs non-negative ints {sorted(names)}, got {data!r}")
        if data["lanes"] < 1:
            raise ValueError(f"stream position lanes must be >= 1, got {data['lanes']}")
        return cls(**data)


def _loader(dataset: IterableDataset, num_workers: int, persistent: bool) -> DataLoader:
    """DataLoader over a dataset that batches itself; in-order round-robin over workers.

    Its own ``generator`` keeps the loader from drawing its worker base seed from the
    global torch RNG, so building or restarting a stream never shifts the training RNG.
    """
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=persistent, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------- train


@dataclass(frozen=True)
class _TrainPlan:
    """Everything a worker needs to rebuild any lane (picklable)."""

    urls: list[str]
    cfg: DataConfig
    img_size: int
    seed: int
    rank: int
    lanes: int
    batches_per_epoch: int


class _Lane:
    """One lane of one epoch: a seeded infinite raw-sample sequence cut into micro-batches."""

    def __init__(self, plan: _TrainPlan, epoch: int, lane: int, transform: Callable, corrupt: _CorruptLog):
        self.plan, self.epoch, self.lane = plan, epoch, lane
        self.transform, self.corrupt = transform, corrupt
        key = (plan.seed, epoch, plan.rank, lane)
        shard_urls = wds.ResampledShards(plan.urls, seed=derive_seed(*key, "shards"),
                                         worker_seed=lambda: 0, deterministic=True)
        self._shards_since_sample = 0
        raw = wds.tarfile_to_samples(handler=_warn_and_continue)(self._count_shards(iter(shard_urls)))
        bufsize = max(1, plan.cfg.shuffle_buffer)
        self.samples = wds.shuffle(bufsize, bufsize, rng=random.Random(derive_seed(*key, "shuffle")))(raw)
        self.next_index = 0

    def _count_shards(self, urls: Iterator[dict]) -> Iterator[dict]:
        for url in urls:
            self._shards_since_sample += 1
            if self._shards_since_sample > MAX_EMPTY_SHARDS:
                raise RuntimeError(f"read {MAX_EMPTY_SHARDS} shards in a row without one sample "
                                   f"(last {url['url']}): the shards are empty or unreadable")
            yield url

    def _next_raw(self) -> dict[str, Any]:
        sample = next(self.samples)
        self._shards_since_sample = 0
        return sample

    def batch(self, index: int) -> Batch:
        """The ``index``-th micro-batch of this lane; earlier unread ones are skipped undecoded."""
        size = self.plan.cfg.micro_batch_size
        if index < self.next_index:
            raise RuntimeError(f"lane {self.lane} already passed batch {index}")
        for _ in range((index - self.next_index) * size):
            self._next_raw()
        self.next_index = index + 1
        raws = [self._next_raw() for _ in range(size)]
        seeds = [derive_seed(self.plan.seed, self.epoch, self.plan.rank, self.lane, index * size + i) for i in range(size)]
        before = self.corrupt.count
        with torch.random.fork_rng(devices=[]):
            out = [self._decode(raw, seed) for raw, seed in zip(raws, seeds)]
            good = [raws[i] for i, o in enumerate(out) if o is not None] or [self._draw_good(index, seeds[0])]
            bad = [i for i, o in enumerate(out) if o is None]
            for j, i in enumerate(bad):
                out[i] = self._decode(good[j % len(good)], seeds[i])
        images, labels = collate(out)
        return images, labels, self.corrupt.count - before

    def _draw_good(self, index: int, seed: int) -> dict[str, Any]:
        """The next decodable raw sample after an all-corrupt batch (this shifts the lane: logged)."""
        log.warning("every sample of lane %d batch %d (epoch %d) is corrupt: drawing more samples; "
                    "a resume past this batch is not exact", self.lane, index, self.epoch)
        for _ in range(MAX_CORRUPT_DRAWS):
            raw = self._next_raw()
            if self._decode(raw, seed) is not None:
                return raw
        raise RuntimeError(f"{MAX_CORRUPT_DRAWS} samples in a row are corrupt (last {raw.get('__key__')} in "
                           f"{raw.get('__url__')}): the train shards hold no decodable image with a cls label")

    def _decode(self, raw: dict[str, Any], seed: int) -> Optional[tuple[torch.Tensor, int]]:
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed costs 100x more
        return decode_sample(raw, self.transform, self.corrupt)


class _TrainDataset(IterableDataset):
    """Yields this rank's micro-batches from global batch index ``start`` on, forever.

    Worker ``w`` of ``W`` builds batches ``start + w, start + w + W, ...``: exactly the
    ones the DataLoader's in-order round-robin asks it for.
    """

    def __init__(self, plan: _TrainPlan, start: int):
        super().__init__()
        self.plan, self.start = plan, start

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        transform = build_train_transform(self.plan.cfg, self.plan.img_size)
        corrupt = _CorruptLog()
        lanes: dict[tuple[int, int], _Lane] = {}
        for g in itertools.count(self.start + worker, num_workers):
            epoch, k = divmod(g, self.plan.batches_per_epoch)
            lane_id = (epoch, k % self.plan.lanes)
            if lane_id not in lanes:
                lanes = {key: lane for key, lane in lanes.items() if key[0] == epoch}
                lanes[lane_id] = _Lane(self.plan, epoch, lane_id[1], transform, corrupt)
            yield lanes[lane_id].batch(k // self.plan.lanes)


def batches_per_epoch(cfg: DataConfig, num_samples: int, world_size: int) -> int:
    """Micro-batches per rank per epoch: whole optimizer steps of ``global_batch_size``."""
    per_pass = cfg.micro_batch_size * world_size
    if cfg.micro_batch_size <= 0 or cfg.global_batch_size % per_pass:
        raise ValueError(f"data.global_batch_size={cfg.global_batch_size} is not a multiple of "
                         f"data.micro_batch_size={cfg.micro_batch_size} x world size {world_size}")
    steps = num_samples // cfg.global_batch_size
    if steps == 0:
        raise ValueError(f"an epoch of {num_samples} samples is less than one global batch of "
                         f"{cfg.global_batch_size}: raise data.samples_per_epoch or lower the batch")
    return steps * (cfg.global_batch_size // per_pass)


class TrainStream:
    """Iterator over ``(images uint8 (B,3,H,W), labels int64 (B,))``, infinite across epochs.

    ``position()`` counts exactly the batches handed out (not those prefetched by workers).
    """

    def __init__(self, plan: _TrainPlan, start: int, num_workers: int):
        self.batches_per_epoch = plan.batches_per_epoch
        self.lanes = plan.lanes
        self.corrupt_samples = 0
        """Corrupt samples replaced in the batches handed out by this stream object."""
        self._next = start
        self._loader = _loader(_TrainDataset(plan, start), num_workers, persistent=False)
        self._iter: Optional[Iterator[Batch]] = None

    def position(self) -> StreamPosition:
        epoch, batch = divmod(self._next, self.batches_per_epoch)
        return StreamPosition(epoch=epoch, batch=batch, lanes=self.lanes)

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self._loader)
        images, labels, corrupt = next(self._iter)
        self._next += 1
        self.corrupt_samples += corrupt
        return images, labels

    def close(self) -> None:
        """Stop the worker processes (they also stop when the stream is garbage collected)."""
        self._iter = None


def build_train_stream(cfg: DataConfig, *, img_size: int, seed: int, rank: int, world_size: int,
                       position: Optional[StreamPosition] = None) -> TrainStream:
    """The train stream of ``rank``, starting at ``position`` (the start of epoch 0 if None)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    shards = resolve_shards(cfg.train_shards, cfg.train_split, "data.train_shards")
    num_samples = cfg.samples_per_epoch or shards.num_samples
    if not num_samples:
        raise ValueError("data.samples_per_epoch is 0 and data.train_shards has no _info.json with num_samples: "
                         "set data.samples_per_epoch")
    build_train_transform(cfg, img_size)  # reject bad augmentation settings here, not in a worker
    position = position or StreamPosition(lanes=max(1, cfg.num_workers))
    plan = _TrainPlan(shards.urls, cfg, img_size, seed, rank, position.lanes,
                      batches_per_epoch(cfg, num_samples, world_size))
    start = position.epoch * plan.batches_per_epoch + position.batch
    return TrainStream(plan, start, cfg.num_workers)


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

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        part = self.part.split(info.id, info.num_workers) if info else self.part
        transform = build_eval_transform(self.cfg, self.img_size)
        corrupt = _CorruptLog()
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
        self._loader = _loader(dataset, num_workers, persistent=num_workers > 0)

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
