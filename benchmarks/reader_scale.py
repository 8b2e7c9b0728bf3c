"""The train reader's cost at ImageNet-21k scale, from 1 to 512 ranks, by simulation: opens, index loads, CPU.

The real order (``pretrain.data.order``) and the real reader (``pretrain.data.reader.ShardReader``
over a real memory-mapped sample table of N records) run for one loader worker's share of a
whole epoch; only the storage is simulated: ``_open``/``_close`` count instead of opening, and
no sample bytes are read or parsed. So the opens, index loads and lookup CPU are those of
training; the decode is not part of it.

Scale: N = 14,197,122 samples (ImageNet-21k fall 2011) in S = 1,400 or 14,000 shards, global
batch B = 4096 = C streams, W = 1, 8, 64, 512 ranks of 8 loader workers, micro-batch
min(256, B / W). Worker 0 of rank 0 reads N / (8 W) samples (1.77 M at W = 1).

Baseline, in the same run on the same sample sequence: the reader before the sample table
(an LRU of 16 descriptors and an LRU of parsed per-shard indexes within 32 MiB at an estimated
128 bytes a sample), replayed as the two cache policies it had.

Index parsing is measured on one real 10,142-line ``.tar.idx`` (an ImageNet-21k shard of the
1,400): CPU-ms per sample parsed. The sample table parses every index once per node and
dataset state, so per sample read it is that figure divided by the epochs run; the baseline
paid it at every index reload.

    python benchmarks/reader_scale.py [--shards 1400,14000] [--world 1,8,64,512] [--workers 8] [--samples N]

Prints one JSON line per (S, W) and a final JSON object with all of them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from array import array
from collections import OrderedDict
from pathlib import Path

import numpy as np

from data_tools.index import ShardIndex, read_index
from pretrain.data.order import Order
from pretrain.data.reader import ShardReader
from pretrain.data.sample_table import ENTRY, SampleTable

SAMPLES = 14_197_122
GLOBAL_BATCH = 4096
OLD_FILES = 16
OLD_INDEX_BYTES = 32 * 2**20
OLD_BYTES_PER_SAMPLE = 128


class CountingReader(ShardReader):
    """The real reader over simulated storage: opens and closes are counted, not done."""

    def __init__(self, urls, table, max_open=None):
        super().__init__(urls, table, max_open)
        self.opens = 0

    def _open(self, path: str) -> int:
        self.opens += 1
        return self.opens

    def _close(self, fd: int) -> None:
        pass


def lengths_for(samples: int, shards: int) -> np.ndarray:
    """``samples`` split over ``shards`` as evenly as counts allow."""
    lengths = np.full(shards, samples // shards, dtype=np.int64)
    lengths[:samples % shards] += 1
    return lengths


def fake_table(lengths: np.ndarray, folder: Path) -> SampleTable:
    """A real memory-mapped table of ``lengths`` samples of 110 KB each (the ImageNet-21k mean)."""
    path = folder / f"table-{lengths.sum()}-{lengths.size}.npy"
    if not path.is_file():
        entries = np.empty(int(lengths.sum()), dtype=ENTRY)
        within = np.arange(entries.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        entries["offset"], entries["length"] = within * 112_640, 112_640
        np.save(path, entries)
    return SampleTable(path, np.cumsum(lengths) - lengths, lengths)


def worker_samples(order: Order, world: int, workers: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard, index in shard) of every sample worker 0 of rank 0 reads in epoch 0, in reading order."""
    accum = GLOBAL_BATCH // (world * micro)
    mine = range(0, order.steps_per_epoch * accum, workers)  # the worker's micro-batches
    ids = np.concatenate([order.samples(0, m // accum, order.micro_slots(0, world, micro, m % accum))
                          for m in mine])
    return order.locate(ids)


def old_policy(shards: np.ndarray, lengths: np.ndarray) -> tuple[int, int]:
    """(opens, index loads) of the pre-table reader on this sequence: LRU 16 files, LRU 32 MiB indexes."""
    files, indexes = OrderedDict(), OrderedDict()
    opens = loads = index_bytes = 0
    for shard in shards.tolist():
        if shard in indexes:
            indexes.move_to_end(shard)
        else:
            loads += 1
            indexes[shard] = size = int(lengths[shard]) * OLD_BYTES_PER_SAMPLE
            index_bytes += size
            while index_bytes > OLD_INDEX_BYTES and len(indexes) > 1:
                index_bytes -= indexes.popitem(last=False)[1]
        if shard in files:
            files.move_to_end(shard)
        else:
            opens += 1
            files[shard] = True
            if len(files) > OLD_FILES:
                files.popitem(last=False)
    return opens, loads


def parse_ms_per_sample(folder: Path, samples: int = 10_142) -> float:
    """CPU-ms per sample to read and parse a real index file of an ImageNet-21k-sized shard (best of 5)."""
    offsets = array("q", range(0, samples * 112_640, 112_640))
    index = ShardIndex([f"n{i // 700:08d}_{i}" for i in range(samples)], offsets, array("q", [112_640] * samples),
                       samples * 112_640 + 1024)
    shard = folder / "shard.tar"
    Path(f"{shard}.idx").write_text(index.to_text())
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        read_index(shard)
        best = min(best, time.process_time() - start)
    return best * 1e3 / samples


def measure(shards: int, world: int, workers: int, folder: Path, parse_ms: float, samples: int = SAMPLES) -> dict:
    lengths = lengths_for(samples, shards)
    order = Order(lengths, GLOBAL_BATCH, GLOBAL_BATCH, seed=0)
    micro = min(256, GLOBAL_BATCH // world)
    shard_ids, indices = worker_samples(order, world, workers, micro)
    reader = CountingReader([f"shard-{s:06d}.tar" for s in range(shards)], fake_table(lengths, folder))
    opened = np.zeros(shards, dtype=np.int64)
    start = time.process_time()
    for shard, index in zip(shard_ids.tolist(), indices.tolist()):
        reader.locate(shard, index)
        reader.handle(shard)
    lookup_ms = (time.process_time() - start) * 1e3 / shard_ids.size
    for shard in reader.opened:
        opened[shard] += 1
    old_opens, old_loads = old_policy(shard_ids, lengths)
    reads = int(shard_ids.size)
    return {
        "shards": shards, "world_size": world, "workers": workers, "micro_batch": micro,
        "samples_read": reads, "shards_touched": int(np.count_nonzero(np.bincount(shard_ids, minlength=shards))),
        "descriptor_budget": reader.max_open,
        "opens": reader.opens, "max_opens_per_shard": int(opened.max()), "opens_per_read": reader.opens / reads,
        "index_loads": 0, "index_bytes_per_sample": ENTRY.itemsize,
        "lookup_cpu_ms_per_read": lookup_ms,
        "index_parse_cpu_ms_per_sample_parsed": parse_ms,
        "baseline_opens": old_opens, "baseline_opens_per_read": old_opens / reads,
        "baseline_index_loads": old_loads, "baseline_index_loads_per_read": old_loads / reads,
        "baseline_index_parse_cpu_ms_per_read": old_loads * float(lengths.mean()) * parse_ms / reads,
        "opens_baseline_vs_table": old_opens / max(1, reader.opens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="1400,14000")
    parser.add_argument("--world", default="1,8,64,512")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--samples", type=int, default=SAMPLES)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        parse_ms = parse_ms_per_sample(Path(tmp))
        for shards in map(int, args.shards.split(",")):
            for world in map(int, args.world.split(",")):
                rows.append(measure(shards, world, args.workers, Path(tmp), parse_ms, args.samples))
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
