"""SIGKILL while finetune writes a checkpoint (``python -m finetune``, 1 process, a 1-block ViT); the next run resumes.

``KILLS`` seeded moments among the operations that write the step-4 checkpoint
(``fault_child.py``: Accelerate's ``torch.save`` and safetensors files, the trainer state
and generator files, flushes, renames, folder creations, up to moving ``latest``); after
each kill the next run resumes from the last complete checkpoint, never a partial one,
with the losses of an uninterrupted run.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from fault_child import finished, losses, moments, of_step, operations, run_child
from pretrain.checkpoint import CheckpointDir, step_tag
from test_finetune_preempt import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.faults]
STEPS = 6


def finetune(root: Path, overrides: list[str], moment_k: int = 0):
    """``python -m finetune`` for ``STEPS`` steps into ``root/run``, checkpoints every 2, killed at ``moment_k``."""
    return run_child(moment_k, root / "run.log", "finetune", "--config", "configs/finetune/demo.yaml", *overrides,
                     f"schedule.total_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
                     within=str(root / "run" / "checkpoints"))


def test_sigkill_while_writing_a_checkpoint_then_the_next_run_resumes_from_the_last_complete_one(
        demo_shards: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    overrides = tiny_overrides(reference, demo_shards)  # one pretrained export for every run
    finished(finetune(reference, overrides))
    ops = operations(reference / "run.log")
    for moment_k in moments(of_step(ops, step_tag(4)), "finetune checkpoint"):
        root = tmp_path / f"killed-{moment_k}"
        root.mkdir()
        assert finetune(root, [*overrides, f"run.dir={root / 'run'}"], moment_k).returncode == -signal.SIGKILL
        resumed_from = CheckpointDir(root / "run" / "checkpoints").find().step
        assert resumed_from in (2, 4)
        output = finished(finetune(root, [*overrides, f"run.dir={root / 'run'}"]))
        assert f"resumed from {root / 'run' / 'checkpoints' / step_tag(resumed_from)}" in output
        assert losses(root / "run") == losses(reference / "run"), ops[moment_k - 1]
