"""The train order (``pretrain.data.order``): a pure function, checked at ImageNet-21k scale without data.

Full scale is 14.2 M samples in 1,400 shards of uneven length, global batch 4096,
512 ranks x 8 DataLoader workers (micro-batch 1, so 8 micro-batches per rank and step).
"""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from fork_server import run_module, run_python

from pretrain.data.order import Order, default_streams, feistel_permute, valid_world_sizes

REPO = Path(__file__).resolve().parents[1]
N_I21K, SHARDS, BATCH, RANKS, WORKERS = 14_200_000, 1400, 4096, 512, 8


def i21k_lengths() -> np.ndarray:
    """1,400 shards of about 9,000-11,300 samples (uneven, as a size-capped converter writes them), 14.2 M in all."""
    lengths = np.random.default_rng(0).integers(9000, 11287, SHARDS)
    lengths = lengths * N_I21K // lengths.sum()
    lengths[: N_I21K - lengths.sum()] += 1
    assert lengths.sum() == N_I21K and lengths.min() > 8000
    return lengths


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_feistel_is_a_bijection(n: int) -> None:
    for key in (0, 7, 2**63 + 5):
        assert sorted(feistel_permute(np.arange(n), n, key).tolist()) == list(range(n))
    if n >= 64:
        assert not np.array_equal(feistel_permute(np.arange(n), n, 1), feistel_permute(np.arange(n), n, 2))


def test_defaults_and_world_sizes() -> None:
    assert default_streams(4096) == 4096 and default_streams(96) == 96
    assert valid_world_sizes(16, 64, 8) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="must divide data.global_batch_size"):
        Order(np.array([100]), 64, 48, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Order(np.array([10, 20]), 64, 8, 0)


def test_a_late_step_at_full_scale_is_cheap_and_the_same_for_every_world_size() -> None:
    """Every worker of 512 ranks x 8 computes its micro-batch of the last step of an epoch: < 2 s, < 1 GB."""
    order = Order(i21k_lengths(), BATCH, default_streams(BATCH), seed=17)
    epoch, step = 41, order.steps_per_epoch - 1
    micro = BATCH // (RANKS * WORKERS)

    def every_workers_share() -> list[np.ndarray]:
        return [order.samples(epoch, step, order.micro_slots(rank, RANKS, micro, worker))
                for rank in range(RANKS) for worker in range(WORKERS)]

    start = time.process_time()  # CPU time: the machine is shared, wall time is not this code's
    parts = every_workers_share()
    seconds = time.process_time() - start
    tracemalloc.start()  # one worker's share and the whole step (what ``python -m pretrain.data.order`` computes)
    order.samples(epoch, step, order.micro_slots(RANKS - 1, RANKS, micro, WORKERS - 1))
    order.samples(epoch, step)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"step {step} of epoch {epoch}, {RANKS} ranks x {WORKERS} workers: {seconds:.3f} CPU s, "
          f"peak {peak / 2**20:.1f} MiB traced")
    assert seconds < 2 and peak < 2**30
    whole = order.samples(epoch, step)
    assert np.array_equal(np.concatenate(parts), whole) and len(set(whole.tolist())) == BATCH
    for world in (1, 2, 64, 1024):
        per_rank = [order.samples(epoch, step, np.arange(order.rank_slots(r, world).start,
                                                          order.rank_slots(r, world).stop)) for r in range(world)]
        assert np.array_equal(np.concatenate(per_rank), whole), world
    with pytest.raises(ValueError, match="does not divide data.streams=4096"):
        order.rank_slots(0, 48)


def test_every_sample_once_per_epoch_at_full_scale() -> None:
    """All 3,466 steps of an epoch: no sample twice, fewer than a global batch left out, and not the same ones."""
    order = Order(i21k_lengths(), BATCH, default_streams(BATCH), seed=3)
    steps = order.steps_per_epoch
    used = np.empty((steps, BATCH), dtype=np.int64)
    for first in range(0, steps, 512):
        count = min(512, steps - first)
        used[first:first + count] = order.epoch_samples(5, first, count)
    counts = np.bincount(used.ravel(), minlength=N_I21K)
    assert counts.max() == 1 and counts.size == N_I21K
    left = order.left_out(5)
    assert np.array_equal(np.sort(left), np.flatnonzero(counts == 0))
    assert steps == N_I21K // BATCH and 0 < left.size == N_I21K - steps * BATCH < BATCH
    overlap = np.intersect1d(left, order.left_out(6)).size
    print(f"{left.size} samples left out of epoch 5, {overlap} of them also of epoch 6")
    assert overlap < left.size // 10


def test_steps_and_epochs_differ_and_depend_on_the_seed() -> None:
    order = Order(np.array([7, 1, 12, 30, 50]), 8, 4, seed=0)
    assert not np.array_equal(order.samples(0, 0), order.samples(1, 0))
    assert not np.array_equal(order.samples(0, 0), Order(order.lengths, 8, 4, seed=1).samples(0, 0))
    assert np.array_equal(order.epoch_samples(2, 3, 2), np.stack([order.samples(2, 3), order.samples(2, 4)]))
    shard, index = order.locate(np.array([0, 6, 7, 8, 20, 99]))
    assert shard.tolist() == [0, 0, 1, 2, 3, 4] and index.tolist() == [0, 6, 0, 0, 0, 49]
    assert order.where(0) == (0, 0) and order.where(order.steps_per_epoch + 2) == (1, 2)


@pytest.mark.parametrize("streams", [8, 64, 512])
def test_class_diversity_of_a_class_sorted_source_matches_uniform_sampling(streams: int) -> None:
    """2,000 classes of 100 samples in class order, shards of 150 (one or two classes each), batch 512:
    distinct classes per global batch >= 95 % of uniform random sampling's (mean over 30 batches)."""
    labels = np.repeat(np.arange(2000), 100)
    lengths = np.full(labels.size // 150, 150)
    lengths[-1] += labels.size - lengths.sum()
    order = Order(lengths, 512, streams, seed=0)
    ours = np.mean([len(np.unique(labels[ids])) for ids in order.epoch_samples(1, 100, 30)])
    rng = np.random.default_rng(0)
    uniform = np.mean([len(np.unique(labels[rng.choice(labels.size, 512, replace=False)])) for _ in range(30)])
    print(f"C={streams}: {ours:.1f} distinct classes per batch, uniform sampling {uniform:.1f}")
    assert ours >= 0.95 * uniform


def test_order_cli_prints_each_steps_keys(st_make_shards) -> None:
    """``python -m pretrain.data.order`` for steps across an epoch boundary: the order's samples, by key, sorted."""
    shards = st_make_shards([7, 1, 12, 10])
    config = ["--config", "configs/pretrain/demo.yaml", f"data.train_shards={shards}", "data.eval_shards=",
              "data.global_batch_size=8", "data.micro_batch_size=4", "run.seed=4"]
    result = run_module("pretrain.data.order", *config, "--steps", "2:6", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    order = Order(np.array([7, 1, 12, 10]), 8, 8, seed=4)
    assert [(r["step"], r["epoch"]) for r in rows] == [(2, 0), (3, 0), (4, 1), (5, 1)]
    for row in rows:
        epoch, step = order.where(row["step"] - 1)
        assert row["keys"] == sorted(f"s{i:06d}" for i in order.samples(epoch, step))
    bad = run_module("pretrain.data.order", *config, "--steps", "5:2", timeout=120)
    assert bad.returncode == 2 and "expected A:B" in bad.stderr


def test_a_world_size_that_cannot_reproduce_the_order_exits_2_before_launch(demo_shards: Path) -> None:
    """``launch/describe.py --check`` (run by the launch scripts before srun) names the valid world sizes."""
    base = ["launch/describe.py", "pretrain", "--check", "--config", "configs/pretrain/demo.yaml",
            f"data.train_shards={demo_shards}", "data.eval_shards=", "data.streams=16", "data.micro_batch_size=2"]
    bad = run_python(*base, "--world-size", "32", timeout=120)
    assert bad.returncode == 2
    assert "world size 32 cannot reproduce the train order of 16 canonical streams" in bad.stderr
    assert "valid world sizes are 1, 2, 4, 8, 16" in bad.stderr
    good = run_python(*base, "--world-size", "16", timeout=120)
    assert good.returncode == 0, good.stderr
