"""SIGKILL while finetune writes a checkpoint (``python -m finetune``, 1 process, a 1-block ViT); the next run resumes.

``KILLS`` seeded moments among the operations that write the step-4 checkpoint
(``fault_child.py``: Accelerate's ``torch.save`` and safetensors files, the trainer state
and generator files, flushes, renames, folder creations, up to moving ``latest``); after
each kill the next run resumes from the last complete checkpoint, never a partial one,
with the losses of an uninterrupted run.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from fault_child import finished, losses, moments, of_step, operations, run_child
from pretrain.checkpoint import CheckpointDir, step_tag
from test_finetune_preempt import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.faults]
STEPS = 6
LIMIT = 16 * 1024
"""Bytes a file may grow to once the limit is set: below the tiny model's weights (44 KB, the first file written) and optimizer state, above the logs."""


def finetune(root: Path, overrides: list[str], moment_k: int = 0, limit=None):
    """``python -m finetune`` for ``STEPS`` steps into ``root/run``, checkpoints every 2, killed at ``moment_k``
    (or, with ``limit``, its files capped at ``limit`` bytes from then on)."""
    return run_child(moment_k, root / "run.log", "finetune", "--config", "configs/finetune/demo.yaml", *overrides,
                     f"schedule.total_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
                     within=str(root / "run" / "checkpoints"), limit=limit)


@pytest.fixture(scope="module")
def uninterrupted(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    """(the uninterrupted run's folder, the overrides of every run, its checkpoint operations in order)."""
    reference = tmp_path_factory.mktemp("reference")
    overrides = tiny_overrides(reference, demo_shards)  # one pretrained export for every run
    finished(finetune(reference, overrides))
    return reference, overrides, operations(reference / "run.log")


def test_a_write_refused_mid_checkpoint_keeps_the_previous_one_and_exits_1_naming_the_file(uninterrupted,
                                                                                          tmp_path: Path) -> None:
    """``RLIMIT_FSIZE`` from the step-4 checkpoint's first operation on (``EFBIG``, as ``ENOSPC`` on a full disk):
    Accelerate's writers (torch's and safetensors') name no file; the run still exits 1 with one line naming the
    file being written and why, the partial folder removed, step 2 kept as the latest."""
    reference, overrides, ops = uninterrupted
    root = tmp_path / "refused"
    root.mkdir()
    done = finetune(root, [*overrides, f"run.dir={root / 'run'}"], of_step(ops, step_tag(4))[0], limit=LIMIT)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output[-3000:]
    ckdir = CheckpointDir(root / "run" / "checkpoints")
    assert ckdir.find().step == 2 and not ckdir.path(4).exists()
    errors = [line for line in output.splitlines() if "NOT saved" in line]
    assert len(errors) == 1, output[-3000:]
    assert f"checkpoint {step_tag(4)} was NOT saved: [Errno 27] could not write {ckdir.path(4)}/" in errors[0]
    assert f"File too large; {ckdir.path(2)} is intact and stays latest" in errors[0]


def test_a_checkpoint_damaged_after_it_completed_exits_2_with_one_line_and_the_way_back(uninterrupted,
                                                                                       tmp_path: Path) -> None:
    reference, overrides, _ = uninterrupted
    root = tmp_path / "damaged"
    shutil.copytree(reference / "run", root / "run")
    ckdir = CheckpointDir(root / "run" / "checkpoints")
    damaged = max((f for f in ckdir.path(6).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:size // 2])
    done = finetune(root, [*overrides, f"run.dir={root / 'run'}", f"schedule.total_steps={STEPS + 2}"])
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert [line for line in output.splitlines() if "damaged" in line] == [
        f"error: checkpoint {ckdir.path(6)} is damaged: {damaged.relative_to(ckdir.path(6))} has {size // 2} bytes, "
        f"{size} bytes were written; to resume from {ckdir.path(4)} (step 4), move the damaged one aside: "
        f"mv {ckdir.path(6)} {ckdir.path(6)}.damaged"], output[-3000:]


def test_sigkill_while_writing_a_checkpoint_then_the_next_run_resumes_from_the_last_complete_one(
        uninterrupted, tmp_path: Path) -> None:
    reference, overrides, ops = uninterrupted
    for moment_k in moments(of_step(ops, step_tag(4)), "finetune checkpoint"):
        root = tmp_path / f"killed-{moment_k}"
        root.mkdir()
        assert finetune(root, [*overrides, f"run.dir={root / 'run'}"], moment_k).returncode == -signal.SIGKILL
        resumed_from = CheckpointDir(root / "run" / "checkpoints").find().step
        assert resumed_from in (2, 4)
        output = finished(finetune(root, [*overrides, f"run.dir={root / 'run'}"]))
        assert f"resumed from {root / 'run' / 'checkpoints' / step_tag(resumed_from)}" in output
        assert losses(root / "run") == losses(reference / "run"), ops[moment_k - 1]
