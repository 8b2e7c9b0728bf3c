"""The train stream: the order's samples for this rank, read by offset, decoded in DataLoader workers.

* **Which samples.** ``pretrain.data.order`` maps (epoch, step, slot) to a sample; rank ``r``
  takes its slots, cut into ``grad_accum`` micro-batches. Worker ``w`` of ``n`` builds
  micro-batches ``w, w + n, ...`` (the DataLoader's in-order round-robin), so a batch is
  the same tensor whichever worker builds it and however many there are.
* **Augmentation** is seeded per (seed, epoch, step, slot), not per rank or worker:
  a sample gets the same crop on any world size or worker count. Seeds are set on the
  global torch RNG inside ``fork_rng``, so the caller's RNG is untouched.
* **Reading.** ``pretrain.data.reader`` fetches each sample's bytes at its offset, from the
  node's sample table (``pretrain.data.sample_table``, built and checked before the workers
  start); resuming at step ``s`` computes step ``s``'s samples directly (no replay, O(1) in
  ``s``). Each worker opens each shard at most once per epoch (``shard_opens`` counts them).
* **Corrupt samples** (unreadable bytes, undecodable image, missing image or ``cls``)
  are counted, logged at counts 1, 2, 4, ..., and replaced: slot ``i`` tries the samples
  ``derive_seed(seed, epoch, step, i, "replace", a) mod N`` for a = 0, 1, ... until one
  decodes (with the slot's augmentation seed). Batch sizes stay exact and the
  replacement is a function of the slot alone, so determinism and resume are kept.
* **Memory** is bounded by ``data.loader_memory_mb``: the prefetch depth is derived
  from it (see ``loader_memory``), and the bound is logged at start.
* **Decode path** (``data.decode``): workers decode and crop (``cpu``, ``cpu_full``), or
  draw the crops and hand over the encoded bytes, which ``__next__`` decodes on the
  training device (``gpu``, ``pretrain.data.decode``). Either way the stream yields uint8
  (B, 3, H, W) batches; with ``gpu`` they are already on the device.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.config import DataConfig
from pretrain.data.decode import EncodedBatch, build_encoded_crop, collate_encoded, finish_batch
from pretrain.data.order import Order
from pretrain.data.reader import CachedShardReader, CorruptSampleError, ShardReader
from pretrain.data.sample_table import SampleTable, cache_root, sample_table
from pretrain.data.shard_cache import ShardCache
from pretrain.data.samples import CorruptLog, collate, decode_sample, derive_seed, loader
from pretrain.data.shards import train_data
from pretrain.data.transforms import build_train_transform

log = logging.getLogger(__name__)

MAX_CORRUPT_DRAWS = 10_000
"""Replacement candidates tried for one corrupt slot before the stream gives up."""

MAX_PREFETCH = 4
"""Most micro-batches each worker prepares ahead; more hides nothing once decoding keeps up."""

WORKER_RESERVE_MB = 64
"""Per worker, besides its decoded batches: one encoded sample (an i21k sample is ~110 KB) and
decode buffers."""

TrainBatch = tuple[torch.Tensor | EncodedBatch, torch.Tensor, int, list[str], int, int, list[int], int]
"""Images uint8 (B, 3, H, W) (encoded with ``data.decode=gpu``), labels int64 (B,), corrupt samples
replaced, keys used, bytes read, the worker that built it, the shards it opened for it, bytes it
fetched from remote storage for it."""


@dataclass(frozen=True)
class StreamPosition:
    """Where a train stream stands, saved in checkpoints: steps done in ``epoch``, and the order's identity."""

    epoch: int = 0
    step: int = 0
    seed: int = 0
    streams: int = 1
    plan: str = ""
    """``pretrain.data.order.plan_hash`` of shard names and lengths, global batch and streams."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StreamPosition":
        names = [f for f in cls.__dataclass_fields__]
        ints = ("epoch", "step", "seed", "streams")
        if set(data) != set(names):
            raise ValueError(f"the checkpoint's data position {data!r} is not this version's {names}: it was "
                             "written by a vitscale from before the train order of `pretrain.data.order` and cannot be "
                             "mapped onto it; resume with the version that wrote it, or start a new run.dir")
        if not all(isinstance(data[k], int) and data[k] >= 0 for k in ints) or not isinstance(data["plan"], str):
            raise ValueError(f"a stream position needs non-negative ints {list(ints)} and a plan string, got "
                             f"{data!r}")
        return cls(**data)


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to build any micro-batch of this rank (picklable)."""

    urls: list[str]
    lengths: list[int]
    cfg: DataConfig
    img_size: int
    seed: int
    streams: int
    rank: int
    world_size: int
    table: SampleTable

    @property
    def grad_accum(self) -> int:
        return self.cfg.global_batch_size // (self.cfg.micro_batch_size * self.world_size)

    def order(self) -> Order:
        return Order(np.asarray(self.lengths), self.cfg.global_batch_size, self.streams, self.seed,
                     self.cfg.window_samples)


class _Builder:
    """Builds micro-batches in one process: order arithmetic, reads by offset, seeded decode."""

    def __init__(self, plan: _Plan, worker: int = 0):
        self.plan, self.order, self.worker = plan, plan.order(), worker
        self.reader = _reader(plan, self.order)
        self.transform, self.collate = _worker_steps(plan.cfg, plan.img_size)
        self.corrupt = CorruptLog()
        self.epoch = -1

    def batch(self, micro_index: int) -> TrainBatch:
        """Micro-batch ``micro_index`` of this rank, counted from the first step of epoch 0."""
        global_step, k = divmod(micro_index, self.plan.grad_accum)
        epoch, step = self.order.where(global_step)
        if epoch != self.epoch:
            self.epoch = epoch
            self.reader.close()  # another epoch, other regions: other shards
        slots = self.order.micro_slots(self.plan.rank, self.plan.world_size, self.plan.cfg.micro_batch_size, k)
        shards, indices = self.order.locate(self.order.samples(epoch, step, slots))
        before, read_before, fetched_before = self.corrupt.count, self.reader.bytes_read, self.reader.bytes_fetched
        out, keys = [], []
        with torch.random.fork_rng(devices=[]):
            for slot, shard, index in zip(slots.tolist(), shards.tolist(), indices.tolist()):
                seed = derive_seed(self.plan.seed, epoch, step, slot)
                decoded, key = self._decode(shard, index, seed)
                attempt = 0
                while decoded is None:
                    shard, index = self._replacement(epoch, step, slot, attempt)
                    (decoded, key), attempt = self._decode(shard, index, seed), attempt + 1
                out.append(decoded)
                keys.append(key)
        images, labels = self.collate(out)
        opened, self.reader.opened = self.reader.opened, []
        return (images, labels, self.corrupt.count - before, keys, self.reader.bytes_read - read_before,
                self.worker, opened, self.reader.bytes_fetched - fetched_before)

    def _replacement(self, epoch: int, step: int, slot: int, attempt: int) -> tuple[int, int]:
        if attempt >= MAX_CORRUPT_DRAWS:
            raise RuntimeError(f"{MAX_CORRUPT_DRAWS} replacement samples in a row are corrupt (epoch {epoch}, step "
                               f"{step}, slot {slot}): the train shards hold no decodable image with a cls label")
        sample = derive_seed(self.plan.seed, epoch, step, slot, "replace", attempt) % self.order.num_samples
        shard, index = self.order.locate(np.array([sample]))
        return int(shard[0]), int(index[0])

    def _decode(self, shard: int, index: int, seed: int) -> tuple[Optional[tuple[torch.Tensor, int]], str]:
        """(decoded sample or None when corrupt, its key: from its tar header, or shard#index when unreadable)."""
        try:
            raw = self.reader.read(shard, index)
        except (CorruptSampleError, OSError) as exn:
            key = f"{self.plan.urls[shard]}#{index}"
            self.corrupt(f"unreadable: {exn}", {"__key__": key, "__url__": self.plan.urls[shard]})
            return None, key
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed costs 100x more
        return decode_sample(raw, self.transform, self.corrupt), raw["__key__"]


def _reader(plan: _Plan, order: Order) -> ShardReader:
    """Local shards are read in place; remote ones through the node's shard cache, keeping descriptors (and so
    cached copies in use) for at most the rank's working set of shards."""
    if plan.table.versions is None:
        return ShardReader(plan.urls, plan.table)
    cache = ShardCache(cache_root(plan.cfg.cache_dir), plan.cfg.cache_limit_bytes)
    return CachedShardReader(plan.urls, plan.table, cache, order.rank_shard_bound(plan.world_size))


def _worker_steps(cfg: DataConfig, img_size: int) -> tuple[Callable, Callable]:
    """(per-sample transform, collate) of the workers for ``data.decode``; bad settings raise ``ValueError``."""
    if cfg.decode == "gpu":
        return build_encoded_crop(cfg, img_size), collate_encoded
    return build_train_transform(cfg, img_size), collate


class _TrainDataset(IterableDataset):
    """Yields this rank's micro-batches from ``start`` on, forever; worker ``w`` of ``n`` builds every n-th."""

    def __init__(self, plan: _Plan, start: int):
        super().__init__()
        self.plan, self.start = plan, start

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        builder = _Builder(self.plan, worker)
        index = self.start + worker
        try:
            while True:
                yield builder.batch(index)
                index += workers
        finally:
            builder.reader.close()


def loader_memory(cfg: DataConfig, img_size: int) -> tuple[int, float]:
    """(prefetch depth, MiB bound) for the train loader of one rank under ``data.loader_memory_mb``.

    Decoded micro-batches in flight: ``workers x prefetch`` (in-process: 1), each
    ``micro x 3 x img^2`` bytes (uint8), plus ``WORKER_RESERVE_MB`` per worker.
    """
    batch_mb = cfg.micro_batch_size * 3 * img_size * img_size / 2**20
    workers = max(1, cfg.num_workers)
    room = cfg.loader_memory_mb - workers * WORKER_RESERVE_MB
    prefetch = min(MAX_PREFETCH, math.floor(room / (workers * batch_mb))) if room > 0 else 0
    if prefetch < 1:
        raise ValueError(f"data.loader_memory_mb={cfg.loader_memory_mb} holds less than one decoded micro-batch "
                         f"({batch_mb:.1f} MiB) plus {WORKER_RESERVE_MB} MiB for each of {workers} workers: raise "
                         "it, or lower data.num_workers or data.micro_batch_size")
    return prefetch, workers * (prefetch * batch_mb + WORKER_RESERVE_MB)


class TrainStream:
    """Iterator over ``(images uint8 (B,3,H,W), labels int64 (B,))``, infinite across epochs.

    ``position()`` counts exactly the micro-batches handed out (not those prefetched).
    ``last_keys`` are the keys of the last batch; ``corrupt_samples``, ``bytes_read`` and
    ``bytes_fetched`` (from remote storage into the node's shard cache, by this rank's workers)
    add up what the handed-out batches met, read and fetched; ``shard_opens`` counts the opens of
    each shard by each worker, ``(worker, shard) -> opens`` (at most workers x shards entries).
    """

    def __init__(self, plan: _Plan, order: Order, plan_id: str, start: int, prefetch: int,
                 device: Optional[torch.device]):
        self.order, self.plan_id, self.seed, self.grad_accum = order, plan_id, plan.seed, plan.grad_accum
        self.img_size, self.device = plan.img_size, device
        self.corrupt_samples = 0
        self.bytes_read = 0
        self.bytes_fetched = 0
        self.shard_opens: Counter[tuple[int, int]] = Counter()
        self.last_keys: list[str] = []
        self._next = start
        self._loader = loader(_TrainDataset(plan, start), plan.cfg.num_workers, persistent=False, prefetch=prefetch)
        self._iter: Optional[Iterator[TrainBatch]] = None

    @property
    def epoch(self) -> int:
        """Epoch of the last batch handed out."""
        return self.order.where(max(0, self._next - 1) // self.grad_accum)[0]

    def position(self) -> StreamPosition:
        steps, partial = divmod(self._next, self.grad_accum)
        if partial:
            raise RuntimeError(f"the stream stands inside a step ({partial} of {self.grad_accum} micro-batches)")
        epoch, step = self.order.where(steps)
        return StreamPosition(epoch, step, self.seed, self.order.streams, self.plan_id)

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self._loader)
        images, labels, corrupt, keys, read, worker, opened, fetched = next(self._iter)
        self._next += 1
        self.corrupt_samples += corrupt
        self.bytes_read += read
        self.bytes_fetched += fetched
        self.shard_opens.update((worker, shard) for shard in opened)
        self.last_keys = keys
        if isinstance(images, EncodedBatch) and self.device is not None:
            try:
                images = finish_batch(images, self.img_size, self.device)
            except RuntimeError as err:
                raise RuntimeError(f"decoding the micro-batch of {keys} on {self.device} failed; data.decode=cpu "
                                   "finds and replaces corrupt images in the workers") from err
        return images, labels

    def close(self) -> None:
        """Stop the worker processes (they also stop when the stream is garbage collected)."""
        self._iter = None


def _start_step(order: Order, plan_id: str, seed: int, position: Optional[StreamPosition]) -> int:
    """The 0-based global step to start at; a position from another order continues at its (epoch, step)."""
    if position is None:
        return 0
    if (position.plan, position.seed, position.streams) != (plan_id, seed, order.streams):
        log.warning("the train order changed since the checkpoint (plan %s seed %d streams %d, now %s %d %d: "
                    "shards, global batch, data.streams or seed): continuing at epoch %d step %d of the new "
                    "order; the samples of the coming steps are not those of the old order", position.plan,
                    position.seed, position.streams, plan_id, seed, order.streams, position.epoch, position.step)
    if position.step >= order.steps_per_epoch:
        return (position.epoch + 1) * order.steps_per_epoch
    return position.epoch * order.steps_per_epoch + position.step


def build_train_stream(cfg: DataConfig, *, img_size: int, seed: int, rank: int, world_size: int,
                       position: Optional[StreamPosition] = None, device: Optional[torch.device | str] = "cpu"
                       ) -> TrainStream:
    """The train stream of ``rank``, starting at ``position`` (the start of epoch 0 if None).

    ``device`` is where ``data.decode=gpu`` decodes (the training device); None hands out the
    workers' ``EncodedBatch`` as it is (what ``benchmarks/data_throughput.py`` measures as the
    GPU path's CPU side). The CPU paths ignore it.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    data = train_data(cfg, seed)
    order = data.order
    order.rank_slots(rank, world_size)  # world size must divide the streams
    if cfg.micro_batch_size <= 0 or cfg.global_batch_size % (cfg.micro_batch_size * world_size):
        raise ValueError(f"data.global_batch_size={cfg.global_batch_size} is not a multiple of "
                         f"data.micro_batch_size={cfg.micro_batch_size} x world size {world_size}")
    _worker_steps(cfg, img_size)  # reject bad augmentation settings here, not in a worker
    prefetch, bound_mb = loader_memory(cfg, img_size)
    table = sample_table(data.urls, order.lengths.tolist(), cfg.cache_dir)
    plan = _Plan(data.urls, order.lengths.tolist(), cfg, img_size, seed, order.streams, rank, world_size, table)
    if rank == 0:
        log.info("train order: %d samples, %d steps per epoch, %d canonical streams (exact resume on world sizes "
                 "dividing %d); loader memory per rank <= %.0f MiB (%d workers x prefetch %d micro-batches of %d "
                 "images at %d px + %d MiB each; data.loader_memory_mb=%d)", order.num_samples,
                 order.steps_per_epoch, order.streams, order.streams, bound_mb, cfg.num_workers, prefetch,
                 cfg.micro_batch_size, img_size, WORKER_RESERVE_MB, cfg.loader_memory_mb)
    start = _start_step(order, data.plan, seed, position) * plan.grad_accum
    return TrainStream(plan, order, data.plan, start, prefetch, None if device is None else torch.device(device))
