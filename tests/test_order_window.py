"""Window mode of the train order (``data.window_samples``): what it keeps and what it bounds.

Kept: every sample once per epoch, a step's slots the same on every world size (ranks take
whole streams), ``window_samples=0`` the default order bit for bit. Bounded: the shards a
stream reads at any step (``Order.stream_shard_bound``), and reads within a shard run in one
direction (a window after another). Shuffle quality against uniform sampling on shuffled
and class-sorted sources.
"""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.data.order import Order, plan_hash

LENGTHS = np.array([97, 103, 0, 100, 88, 120, 101, 99, 95, 110, 104, 93, 100, 91, 100, 109])


def _epoch(order: Order, epoch: int = 0) -> np.ndarray:
    return order.epoch_samples(epoch, 0, order.steps_per_epoch)


@pytest.mark.parametrize("window", [1, 7, 64, 150, 10_000])
def test_every_sample_once_per_epoch_and_the_left_out_rest(window: int) -> None:
    order = Order(LENGTHS, 32, 8, seed=3, window=window)
    for epoch in (0, 1):
        ids = np.concatenate([_epoch(order, epoch).ravel(), order.left_out(epoch)])
        assert np.array_equal(np.sort(ids), np.arange(order.num_samples))


def test_window_zero_is_the_default_order_and_keeps_its_plan_hash() -> None:
    plain, zero = Order(LENGTHS, 32, 8, seed=5), Order(LENGTHS, 32, 8, seed=5, window=0)
    assert np.array_equal(_epoch(plain), _epoch(zero))
    assert plan_hash(["a"], [3], 32, 8, 0) == plan_hash(["a"], [3], 32, 8) != plan_hash(["a"], [3], 32, 8, 64)
    assert not np.array_equal(_epoch(plain), _epoch(Order(LENGTHS, 32, 8, seed=5, window=64)))


def test_ranks_take_whole_streams_so_every_world_size_sees_the_same_step() -> None:
    order = Order(LENGTHS, 32, 8, seed=1, window=40)
    full = order.samples(0, 17)
    for world in (1, 2, 4, 8):
        got = np.concatenate([order.samples(0, 17, np.asarray(order.rank_slots(r, world))) for r in range(world)])
        assert np.array_equal(got, full)


@pytest.mark.parametrize("window", [30, 100, 250])
def test_a_stream_reads_its_windows_in_turn_within_the_bound(window: int) -> None:
    """Per stream: the shards of any run of steps inside one window fit ``stream_shard_bound``; a stream's
    window index never goes back (sequential through its region); odd streams walk their region from the end."""
    order = Order(LENGTHS, 32, 8, seed=7, window=window)
    b = order.per_stream
    bound = order.stream_shard_bound()
    assert bound == 1 + -(-(window - 1) // 88)
    shards, _ = order.locate(_epoch(order))
    for stream in range(order.streams):
        mine = shards[:, stream * b:(stream + 1) * b]
        windows = np.arange(order.steps_per_epoch) * b // window
        assert np.all(np.diff(windows) >= 0)
        for w in np.unique(windows):
            assert len(set(mine[windows == w].ravel().tolist())) <= bound
    shared = 0
    for stream in range(order.streams - 1):
        # A shard two neighbouring streams read is in use without a gap: each reads it in a run of windows
        # that ends (even left stream) or starts (odd) at the epoch's edge, so a node holding both fetches it once.
        left, right = shards[:, stream * b:(stream + 1) * b], shards[:, (stream + 1) * b:(stream + 2) * b]
        edge = windows[0] if stream % 2 else windows[-1]
        for shard in set(left.ravel().tolist()) & set(right.ravel().tolist()):
            for reads in (left, right):
                when = np.unique(windows[np.any(reads == shard, axis=1)])
                assert edge in when and np.all(np.diff(when) == 1), (stream, shard, when)
            shared += 1
    assert shared
    assert order.rank_shard_bound(8) == min(15, 2 * bound) and order.rank_shard_bound(1) == min(15, 16 * bound)


def test_window_zero_bounds_a_rank_by_its_regions() -> None:
    order = Order(LENGTHS, 32, 8, seed=0)
    region = order.region
    assert order.stream_shard_bound() == min(15, 1 + -(-(region - 1) // 88))
    shards, _ = order.locate(_epoch(order))
    for rank in range(4):
        mine = set(shards[:, np.asarray(order.rank_slots(rank, 4))].ravel().tolist())
        assert len(mine) <= order.rank_shard_bound(4)


def _distinct(labels: np.ndarray, order: Order, steps: int = 30) -> float:
    ids = order.epoch_samples(0, 0, steps)
    return float(np.mean([np.unique(labels[row]).size for row in ids]))


@pytest.mark.parametrize("source", ["shuffled", "class-sorted"])
def test_window_mode_class_diversity_against_uniform(source: str) -> None:
    """2,000 classes x 100 samples in shards of 1,000, batch 512, 64 streams, windows of 1,000 samples:
    on converter-shuffled shards distinct classes per batch are >= 95 % of uniform sampling's; class-sorted
    sources are printed (a window then holds ~10 classes: the figure the README reports)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2000), 100)
    if source == "shuffled":
        labels = labels[rng.permutation(labels.size)]
    order = Order(np.full(200, 1000), 512, 64, seed=0, window=1000)
    ours = _distinct(labels, order)
    uniform = np.mean([np.unique(labels[rng.choice(labels.size, 512, replace=False)]).size for _ in range(30)])
    print(f"{source}: window mode {ours:.1f} distinct classes per batch, uniform {uniform:.1f} "
          f"({ours / uniform:.1%})")
    if source == "shuffled":
        assert ours >= 0.95 * uniform
    else:
        assert ours < 0.95 * uniform  # what window mode gives up on class-sorted shards


def test_a_negative_window_is_a_config_error() -> None:
    from pathlib import Path

    from pretrain.config import ConfigError, load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "demo.yaml",
                      ["data.window_samples=-1"])
    with pytest.raises(ConfigError, match=r"data.window_samples=-1 must be 0 \(the default order\) or a sample count"):
        cfg.validate(1, check_paths=False)


def test_a_window_longer_than_a_region_is_bounded_by_the_region() -> None:
    """A stream reads only its own region, so a window past it adds no shards to the bound (nor to the cache the
    preflight asks for)."""
    region = Order(LENGTHS, 32, 8, seed=0, window=1).region
    whole = Order(LENGTHS, 32, 8, seed=0, window=region).stream_shard_bound()
    assert Order(LENGTHS, 32, 8, seed=0, window=100 * region).stream_shard_bound() == whole
    assert whole <= Order(LENGTHS, 32, 8, seed=0).stream_shard_bound()
