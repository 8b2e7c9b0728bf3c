"""The train order as a pure function: (shard lengths, seed, global batch, streams, step) -> samples.

No I/O, only integer arithmetic on numpy arrays, so it runs identically in every
process, on every machine, and at full scale in milliseconds per step.

The design, and why:

* **Without replacement.** Epoch ``e`` is a permutation of all ``N`` samples of the
  manifest (``_info.json`` shard lengths). An epoch has ``N // global_batch`` steps;
  the ``N mod global_batch`` samples left over differ from epoch to epoch.
* **C canonical streams.** The shards are permuted per (seed, epoch); their samples,
  concatenated in that order, are cut into ``C`` equal contiguous *regions* of
  ``R = N // C`` samples (the last ``N mod C`` samples are the first part left out).
  Stream ``c`` visits its region in a pseudo-random order: position ``j`` of the
  stream is ``feistel(j)``, a keyed bijection of ``[0, R)``, evaluated for just the
  positions asked for (no permutation is ever materialised: computing step 812,345
  costs what step 1 costs).
* **Steps.** Global step ``t`` of an epoch takes positions ``[t b, (t + 1) b)`` of every
  stream, ``b = global_batch / C``; its *slots* ``0 .. global_batch - 1`` are stream-major
  (slot ``c b + i`` is stream ``c``'s ``i``-th sample of the step). Rank ``r`` of ``W``
  takes the contiguous slots ``[r B / W, (r + 1) B / W)``, i.e. whole streams, for every
  ``W`` dividing ``C``: the set of samples of a step, and which slot each sample fills
  (augmentation is seeded per slot), does not depend on the world size or on the
  number of DataLoader workers, which only decide who decodes a slot.
* **I/O.** A region spans ``R / (N / S)`` shards (at ImageNet-21k scale with the default
  ``C = B = 4096``: 3,467 samples, a third of a shard), so a rank reads inside ``C / W``
  small byte ranges (8 at 512 ranks); each sample is one positioned read of its bytes (the per-shard index
  gives offset and length), the size of one ImageFolder file read but without an
  ``open``. Reading contiguous blocks of samples instead (MosaicML's shuffle blocks)
  would save nothing for a reader that fetches exactly the bytes of each sample, and
  would correlate the samples a stream contributes to a step.
* **Shuffle quality.** A step holds ``b`` samples from each of ``C`` disjoint regions of a
  random shard order: stratified sampling, which meets uniform sampling's class
  diversity even on a class-sorted source once ``b`` is small next to the classes of
  a region (measured in ``tests/test_order.py``).

* **Window mode** (``window > 0``, ``data.window_samples``), for shards on object storage.
  Above, a stream is at every position of its region all epoch, so a rank's working set
  is every shard of its regions (``S / W + C / W`` of them), which a node-local cache of
  whole shards would have to hold at once. In window mode stream ``c`` cuts its region
  into windows of ``M = window`` consecutive samples and visits them one after the other,
  each in a keyed pseudo-random order (position ``j`` is in window ``j // M``), so at any
  step it reads within one window (two while a step or the loader's lookahead crosses a
  window's end): ``stream_shard_bound()`` shards at most. Odd streams walk their region
  from its end, so a shard cut by the boundary of regions ``c`` and ``c + 1`` is read by both
  streams in the same few steps (both at the start or both at the end of the epoch) and a
  node fetches it once. Everything exact stays: keys of step ``t`` are a function of
  (manifest, seed, global batch, streams, window, ``t``), ranks take whole streams, every
  sample once per epoch; only shuffle quality changes: a step's ``b`` samples of a stream
  come from ``M`` consecutive samples instead of ``R``. On shards written by ``data_tools
  convert`` (shuffled across shards) that costs nothing measurable; on class-sorted shards a
  window holds few classes (``benchmarks/window_shuffle.py``). At ImageNet-21k scale with
  ``C = 64`` (8 nodes of 8 GPUs, one stream per rank: ``b = 64``), ``M = 10,000`` samples (one
  1 GB shard), a rank's working set is 2 windows x 3 shards = 6 GB, a node's 48 GB.
  ``window = 0`` is the order above, bit for bit.

Cost at full scale (ImageNet-21k: N = 14.2 M, S = 1,400 shards, B = C = 4096, 512
ranks x 8 workers): one step is the shard permutation and prefix sums (S integers),
B Feistel evaluations (6 rounds of a 64-bit mix, < 4 cycle-walking passes on average)
and one ``searchsorted`` over S: O(S + B) work and memory, about a millisecond, whatever
the step. A whole epoch (the coverage check) is the same on N positions in chunks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

ROUNDS = 6
"""Feistel rounds: more than the 4 that make a keyed Feistel network a pseudo-random permutation."""

_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a fast, well-spread 64-bit hash."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def hash_key(*parts: int | str) -> int:
    """A 64-bit key from ints/strings, identical in every process and on every machine (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def feistel_permute(x: np.ndarray, n: int, keys: np.ndarray | int) -> np.ndarray:
    """``pi_key(x)`` for a keyed bijection ``pi_key`` of ``[0, n)``, element-wise (``keys`` broadcasts).

    A balanced Feistel network on the smallest even bit width covering ``n`` is a bijection
    of ``[0, 2^bits)``; cycle walking (apply it again while the result is >= n) restricts it
    to ``[0, n)`` and stays a bijection. ``2^bits < 4 n``, so under 4 passes on average.
    """
    bits = max(2, int(n - 1).bit_length())
    bits += bits & 1
    half, mask = _U64(bits // 2), _U64((1 << (bits // 2)) - 1)
    x = np.asarray(x, dtype=np.uint64)
    shape = x.shape
    x = x.reshape(-1)
    keys = np.broadcast_to(np.asarray(keys, dtype=np.uint64), shape).reshape(-1)
    round_keys = [_mix(keys + _U64(0x9E3779B97F4A7C15 * (r + 1) % 2**64)) for r in range(ROUNDS)]

    def network(values: np.ndarray, where: slice | np.ndarray) -> np.ndarray:
        left, right = values >> half, values & mask
        for round_key in round_keys:
            left, right = right, left ^ (_mix(right ^ round_key[where]) & mask)
        return (left << half) | right

    out = network(x, slice(None))
    todo = np.flatnonzero(out >= _U64(n))
    while todo.size:
        out[todo] = network(out[todo], todo)
        todo = todo[out[todo] >= _U64(n)]
    return out.astype(np.int64).reshape(shape)


def default_streams(global_batch: int) -> int:
    """``data.streams: 0``: one stream per sample of a step (``C = global_batch``).

    Every world size the batch allows (``micro x W`` divides the global batch) then divides
    ``C`` and reproduces the order, and ``C`` depends on the global batch alone. Regions are
    ``N / global_batch`` samples (ImageNet-21k at 4096: 3,467, about a third of a shard).
    """
    return global_batch


def valid_world_sizes(streams: int, global_batch: int, micro_batch: int) -> list[int]:
    """World sizes that reproduce the order (``W | C``) and fit the batch (``micro x W | global``)."""
    return [w for w in range(1, streams + 1)
            if streams % w == 0 and micro_batch > 0 and global_batch % (micro_batch * w) == 0]


def plan_hash(names: Sequence[str], lengths: Sequence[int], global_batch: int, streams: int, window: int = 0) -> str:
    """Identifies everything but the seed that the order depends on (saved in checkpoints).

    ``window`` enters only when set, so plans of the default order keep the hash they had."""
    text = json.dumps([list(names), [int(n) for n in lengths], global_batch, streams] + ([window] if window else []))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, eq=False)
class Order:
    """The order over shards of ``lengths`` samples each; every method is pure and cheap.

    Sample ids are manifest positions: id ``starts[s] + i`` is sample ``i`` of shard ``s``.
    """

    lengths: np.ndarray
    global_batch: int
    streams: int
    seed: int
    window: int = 0
    """``M``: samples per window of a stream's region (window mode); 0: the whole region at once."""
    starts: np.ndarray = field(init=False, repr=False)
    _layouts: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        if lengths.ndim != 1 or not lengths.size or lengths.min() < 0:
            raise ValueError(f"shard lengths must be a non-empty list of sample counts >= 0, got {self.lengths!r}")
        object.__setattr__(self, "lengths", lengths)
        object.__setattr__(self, "starts", np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
        object.__setattr__(self, "_layouts", {})
        if self.streams < 1 or self.global_batch % self.streams:
            raise ValueError(f"data.streams={self.streams} must divide data.global_batch_size={self.global_batch}")
        if self.window < 0:
            raise ValueError(f"data.window_samples={self.window} must be 0 (off) or a sample count")
        if self.steps_per_epoch < 1:
            raise ValueError(f"the {self.num_samples} train samples are fewer than one global batch of "
                             f"{self.global_batch}: lower data.global_batch_size")

    @property
    def num_samples(self) -> int:
        return int(self.lengths.sum())

    @property
    def per_stream(self) -> int:
        """``b``: samples each stream gives each step."""
        return self.global_batch // self.streams

    @property
    def region(self) -> int:
        """``R``: samples in each stream's region."""
        return self.num_samples // self.streams

    @property
    def steps_per_epoch(self) -> int:
        return self.region // self.per_stream

    def where(self, global_step: int) -> tuple[int, int]:
        """(epoch, step in epoch) of 0-based ``global_step``."""
        return divmod(global_step, self.steps_per_epoch)

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard order of ``epoch`` and the end of each of those shards in the concatenation (kept per epoch)."""
        if epoch not in self._layouts:
            shards = len(self.lengths)
            perm = feistel_permute(np.arange(shards), shards, hash_key(self.seed, epoch, "shards"))
            self._layouts.clear()
            self._layouts[epoch] = perm, np.cumsum(self.lengths[perm])
        return self._layouts[epoch]

    def samples(self, epoch: int, step: int, slots: Optional[np.ndarray] = None) -> np.ndarray:
        """Sample ids of ``slots`` (default: all ``global_batch``) of ``step`` in ``epoch``."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} is outside the epoch's {self.steps_per_epoch} steps")
        slots = np.arange(self.global_batch) if slots is None else np.asarray(slots, dtype=np.int64)
        stream, within = np.divmod(slots, self.per_stream)
        return self._ids(epoch, stream, step * self.per_stream + within)

    def epoch_samples(self, epoch: int, first_step: int, num_steps: int) -> np.ndarray:
        """Sample ids of ``num_steps`` whole steps from ``first_step``, shape (steps, global_batch)."""
        steps = np.arange(first_step, first_step + num_steps)[:, None]
        slots = np.arange(self.global_batch)[None, :]
        stream, within = np.divmod(slots, self.per_stream)
        return self._ids(epoch, np.broadcast_to(stream, (num_steps, self.global_batch)),
                         steps * self.per_stream + within)

    def left_out(self, epoch: int) -> np.ndarray:
        """Sample ids ``epoch`` does not use: each stream's positions past the last step, and the
        ``N mod C`` samples after the last region (fewer than ``global_batch`` in all)."""
        unused = np.arange(self.steps_per_epoch * self.per_stream, self.region)
        stream = np.repeat(np.arange(self.streams), unused.size)
        tail = np.arange(self.streams * self.region, self.num_samples)
        return np.concatenate([self._ids(epoch, stream, np.tile(unused, self.streams)),
                               self._from_concatenated(epoch, tail)])

    def _ids(self, epoch: int, stream: np.ndarray, position: np.ndarray) -> np.ndarray:
        keys = _mix(np.asarray(stream, dtype=np.uint64) ^ _U64(hash_key(self.seed, epoch, "streams")))
        if self.window:
            within = self._windowed(np.asarray(stream), np.asarray(position), keys)
        else:
            within = feistel_permute(position, self.region, keys)
        return self._from_concatenated(epoch, stream * self.region + within)

    def _windowed(self, stream: np.ndarray, position: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Region offsets of stream positions in window mode: window ``j // M`` in a keyed order of its own,
        walked from the region's start on even streams and from its end on odd ones."""
        stream, position = np.broadcast_arrays(stream, position)
        keys = np.broadcast_to(keys, position.shape)
        window, offset = np.divmod(position, self.window)
        start = window * self.window
        keys = _mix(keys ^ _mix(window.astype(np.uint64) + _U64(0x632BE59BD9B4E019)))
        within = np.empty(position.shape, dtype=np.int64)
        last = start + self.window > self.region  # the region's last window, shorter than M
        full = ~last
        within[full] = start[full] + feistel_permute(offset[full], self.window, keys[full])
        if last.any():
            tail = self.region - int(start[last].flat[0])
            within[last] = start[last] + feistel_permute(offset[last], tail, keys[last])
        return np.where(stream % 2 == 1, self.region - 1 - within, within)

    def stream_shard_bound(self) -> int:
        """Most shards one stream reads within one window (window mode) or over the epoch (``window = 0``).

        ``M`` consecutive samples span at most ``1 + ceil((M - 1) / L)`` shards holding samples, with
        ``L`` the shortest such shard; a rank's working set is at most twice this per stream it
        holds (``rank_shard_bound``), twice for a window's end inside a step or the loader's lookahead.
        """
        span = min(self.window or self.region, self.region)  # a window never reaches past its stream's region
        shortest = int(self.lengths[self.lengths > 0].min())
        return min(int(np.count_nonzero(self.lengths)), 1 + -(-(span - 1) // shortest))

    def rank_shard_bound(self, world_size: int) -> int:
        """Most shards a rank of ``world_size`` reads at any one time (its whole share when ``window = 0``)."""
        streams = self.streams // world_size
        held = streams * self.stream_shard_bound() * (2 if self.window else 1)
        return min(int(np.count_nonzero(self.lengths)), held)

    def _from_concatenated(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Sample ids of positions in ``epoch``'s concatenation of permuted shards."""
        perm, ends = self._epoch_layout(epoch)
        at = np.searchsorted(ends, positions, side="right")
        shard = perm[at]
        return self.starts[shard] + positions - (ends[at] - self.lengths[shard])

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, index in shard) of sample ids."""
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        return shard, ids - self.starts[shard]

    def rank_slots(self, rank: int, world_size: int) -> range:
        """The slots of every step that ``rank`` of ``world_size`` trains on (whole streams)."""
        if self.streams % world_size:
            raise ValueError(f"world size {world_size} does not divide data.streams={self.streams}")
        per_rank = self.global_batch // world_size
        return range(rank * per_rank, (rank + 1) * per_rank)

    def micro_slots(self, rank: int, world_size: int, micro_batch: int, index: int) -> np.ndarray:
        """Slots of ``rank``'s ``index``-th micro-batch of a step (``index < global / (micro x world)``)."""
        mine = self.rank_slots(rank, world_size)
        if len(mine) % micro_batch or not 0 <= index < len(mine) // micro_batch:
            raise ValueError(f"micro-batch {index} of {micro_batch} does not fit rank {rank}'s {len(mine)} slots")
        return np.arange(mine.start + index * micro_batch, mine.start + (index + 1) * micro_batch)
