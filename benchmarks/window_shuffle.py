"""Window mode of the train order at ImageNet-21k scale: what a node fetches, and what the shuffle gives up.

The real order (``pretrain.data.order``) for one node's ranks over a whole epoch; the node's
shard cache is simulated as an LRU of whole shards holding the node's working set
(``ranks x Order.rank_shard_bound``, what ``pretrain.preflight`` asks of
``data.cache_limit_bytes``). Counted: shard fetches of node 0 against the samples it trains on,
as bytes (every sample the shard's average size), and the most shards it held at once.

Shuffle quality: distinct classes per global batch of the first 20 steps against uniform random
sampling of the same batch size, on labels that ``data_tools convert`` shuffles across shards
(converter-shuffled) and on class-sorted shards (21,841 classes of ~650 samples in order).

Scale: N = 14,197,122 samples in S = 1,400 shards (~10,141 each, ~1 GB), B = 4,096, nodes of 8
ranks, C = 8 x nodes (one stream per rank), windows of M samples.

    python benchmarks/window_shuffle.py [--nodes 1,8,64] [--window 10000] [--epochs-steps 0]

Prints one JSON line per configuration and a final JSON object with all of them. ``tests/test_remote.py`` measures the same ratio on a
real S3-compatible server with the real cache.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict

import numpy as np

from pretrain.data.order import Order

SAMPLES = 14_197_122
CLASSES = 21_841
SHARDS = 1_400
GLOBAL_BATCH = 4096
RANKS_PER_NODE = 8


def i21k_lengths() -> np.ndarray:
    lengths = np.random.default_rng(0).integers(9000, 11287, SHARDS)
    lengths = lengths * SAMPLES // lengths.sum()
    lengths[: SAMPLES - lengths.sum()] += 1
    return lengths


def node_fetches(order: Order, nodes: int, steps: int) -> dict:
    """Fetches of node 0's cache over ``steps`` steps (LRU of the node's working set, in shards)."""
    world = nodes * RANKS_PER_NODE
    capacity = RANKS_PER_NODE * order.rank_shard_bound(world)
    slots = np.arange(RANKS_PER_NODE * GLOBAL_BATCH // world)  # ranks 0..7: the node's first slots
    cache: OrderedDict[int, None] = OrderedDict()
    fetched = trained = 0
    for step in range(steps):
        shards, _ = order.locate(order.samples(0, step, slots))
        trained += shards.size
        for shard in np.unique(shards).tolist():
            if shard in cache:
                cache.move_to_end(shard)
                continue
            fetched += int(order.lengths[shard])
            cache[shard] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return {"cache_shards": capacity, "fetched_over_trained": round(fetched / trained, 4)}


def distinct_classes(order: Order, labels: np.ndarray, steps: int = 20) -> float:
    return float(np.mean([np.unique(labels[order.samples(0, s)]).size for s in range(steps)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,8,64", help="nodes of 8 ranks (C = 8 x nodes streams)")
    parser.add_argument("--window", type=int, default=10_000, help="data.window_samples (default: ~one shard)")
    parser.add_argument("--steps", type=int, default=0, help="steps simulated (default: a whole epoch)")
    args = parser.parse_args()

    lengths = i21k_lengths()
    rng = np.random.default_rng(0)
    sorted_labels = np.repeat(np.arange(CLASSES), -(-SAMPLES // CLASSES))[:SAMPLES]
    shuffled = sorted_labels[rng.permutation(SAMPLES)]
    uniform = float(np.mean([np.unique(shuffled[rng.choice(SAMPLES, GLOBAL_BATCH, replace=False)]).size
                             for _ in range(20)]))
    rows = []
    for nodes in map(int, args.nodes.split(",")):
        for window in (0, args.window):
            start = time.perf_counter()
            order = Order(lengths, GLOBAL_BATCH, RANKS_PER_NODE * nodes, seed=0, window=window)
            steps = args.steps or order.steps_per_epoch
            row = {"nodes": nodes, "streams": order.streams, "window": window, "steps": steps,
                   "rank_shard_bound": order.rank_shard_bound(RANKS_PER_NODE * nodes),
                   **node_fetches(order, nodes, steps),
                   "distinct_shuffled_vs_uniform": round(distinct_classes(order, shuffled) / uniform, 4),
                   "distinct_sorted_vs_uniform": round(distinct_classes(order, sorted_labels) / uniform, 4),
                   "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(json.dumps({"uniform_distinct_classes": uniform, "rows": rows}))


if __name__ == "__main__":
    main()
