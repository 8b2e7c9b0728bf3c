"""``pretrain.flat_grads`` across ranks: the flat gradient path against DeepSpeed's own, bit for bit, at 2 ranks.

The 1-rank comparisons (and the ATen calls the path saves) are in ``test_pretrain_engine.py``'s
``test_lean_zero_step_equals_deepspeeds_own_and_a_plain_loop_with_less_host_work``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fork_server import run_ranks

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage,precision,accumulation,bucket,allreduce", [
    (2, "bf16", 2, 1000, "true"), (2, "bf16", 2, 1000, "false"), (2, "fp32", 2, 1000, "true"),
    (1, "fp32", 2, 1000, "false"), (1, "bf16", 1, 25_000_000, "true")])
def test_two_ranks_train_as_deepspeeds_own_path_bit_for_bit(stage: int, precision: str, accumulation: int,
                                                            bucket: int, allreduce: str, tmp_path: Path) -> None:
    """2 ranks on their own data, 3 optimizer steps of ``accumulation`` micro-batches (``tests/flat_grads_ranks.py``):
    the weights of every rank equal those of the same engine on DeepSpeed's own gradient path and step, bit for
    bit (a clip threshold that never clips: DeepSpeed's fp64 norm differs in the last bits). Buckets of 1,000
    elements cut the tiny model's 23,850 (32 tensors, whole ones: several exceed 1,000) into 12 per micro-batch,
    some straddling the two ranks' partitions;
    25M gives one per group, the padding included. Both of DeepSpeed's collectives
    (``use_multi_rank_bucket_allreduce``: an all-reduce per bucket, its default, or a reduce per owner).
    Each bucket's reduction was launched inside the backward
    by its last gradient's hook (none left to the epilogue): the overlap DeepSpeed's buckets give; and no more
    than ``IN_FLIGHT`` buckets' reductions were outstanding after a launch (the bound on fp32 copies)."""
    from pretrain.flat_grads import IN_FLIGHT

    done = run_ranks(2, "tests/flat_grads_ranks.py", str(stage), precision, str(accumulation), str(bucket),
                     allreduce, str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    buckets = 12 if bucket == 1000 else 2
    reducing = 3 * (accumulation if stage == 2 else 1)                # stage 1 reduces at the boundary only
    for rank in ranks:
        differ = [k for k in rank["flat"] if not torch.equal(rank["flat"][k], rank["deepspeed"][k])]
        assert not differ, differ
        assert rank["launches"] == ["backward"] * buckets * reducing
        assert max(rank["in_flight"]) == min(IN_FLIGHT, buckets)
    assert all(torch.equal(ranks[0]["flat"][k], ranks[1]["flat"][k]) for k in ranks[0]["flat"])
