"""Faults during pretraining checkpoints (``python -m pretrain``, 1 process on gloo, a 1-block ViT).

Each case against one uninterrupted run of 6 steps with checkpoints at steps 2, 4 and 6,
whose operations in its checkpoint folder (``fault_child.py``: file writes, flushes,
renames, folder creations and removals) number the moments of a fault:

* a file-size limit hit while writing a checkpoint (``--limit``: the kernel refuses the
  write with ``EFBIG``, as it refuses one on a full disk with ``ENOSPC``): the previous
  checkpoint stays the latest and the run exits 1 with one line naming the file and the
  reason, not a traceback, and not training on past a step no checkpoint can keep;
* a file of the last checkpoint truncated after it completed: the next run stops before
  loading anything with one line naming the file and how to resume from the one before,
  and following it resumes there with the uninterrupted run's losses;
* SIGKILL at ``KILLS`` seeded moments of the step-4 checkpoint's write: the next run
  resumes from the last complete checkpoint, never a partial one, with the losses of the
  uninterrupted run (DeepSpeed resumes fp32 bit-exactly).
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from fault_child import finished, losses, moments, of_step, operations, run_child
from pretrain.checkpoint import CheckpointDir, step_tag

pytestmark = [pytest.mark.slow, pytest.mark.faults]
LIMIT = 64 * 1024
"""Bytes a file may grow to once the limit is set: below every checkpoint file of the model, above the logs."""
STEPS = 6


def pretrain(run_dir: Path, shards: Path, moment_k: int = 0, *overrides: str, limit=None):
    """``python -m pretrain`` for ``STEPS`` steps, checkpoints every 2, the fault at checkpoint operation ``moment_k``."""
    return run_child(moment_k, run_dir.with_suffix(".log"), "pretrain", "--config", "configs/pretrain/demo.yaml",
                     f"run.dir={run_dir}", f"data.train_shards={shards}", "data.eval_shards=", "data.num_workers=0",
                     "model.depth=1", "data.global_batch_size=16", "data.micro_batch_size=16",
                     "schedule.warmup_steps=1", "logging.every_steps=1", f"schedule.total_steps={STEPS}",
                     "checkpoint.every_steps=2", "checkpoint.keep_last=5", *overrides, limit=limit,
                     within=str(run_dir / "checkpoints"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> tuple[Path, list[str]]:
    """(the uninterrupted run's folder, its checkpoint operations in order)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finished(pretrain(run_dir, demo_shards))
    return run_dir, operations(run_dir.with_suffix(".log"))


def test_a_write_refused_mid_checkpoint_keeps_the_previous_one_and_exits_1_naming_the_file(
        reference, demo_shards: Path, tmp_path: Path) -> None:
    expected, ops = reference
    moment_k = next(n for n in of_step(ops, step_tag(4)) if ops[n - 1].startswith("torch.save"))
    run_dir = tmp_path / "run"
    done = pretrain(run_dir, demo_shards, moment_k, limit=LIMIT)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    ckdir = CheckpointDir(run_dir / "checkpoints")
    assert ckdir.find().step == 2 and not ckdir.path(4).exists()
    errors = [line for line in output.splitlines() if "NOT saved" in line]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    assert f"checkpoint {step_tag(4)} was NOT saved: [Errno 27] could not write {ckdir.path(4)}/" in errors[0]
    assert f"File too large; {ckdir.path(2)} is intact and stays latest" in errors[0]
    assert max(losses(run_dir)) == 4  # stopped at the failed save, no step trained past it


def test_a_checkpoint_truncated_after_it_completed_is_named_with_the_way_back(reference, demo_shards: Path,
                                                                              tmp_path: Path) -> None:
    expected, _ = reference
    run_dir = shutil.copytree(expected, tmp_path / "run")
    ckdir = CheckpointDir(run_dir / "checkpoints")
    damaged = ckdir.path(6) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:size // 2])
    done = pretrain(run_dir, demo_shards, 0, f"schedule.total_steps={STEPS + 2}")
    output = done.stdout + done.stderr
    move = f"mv {ckdir.path(6)} {ckdir.path(6)}.damaged"
    assert done.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert [line for line in output.splitlines() if "damaged" in line] == [
        f"error: checkpoint {ckdir.path(6)} is damaged: {damaged.name} has {size // 2} bytes, {size} bytes were "
        f"written; to resume from {ckdir.path(4)} (step 4), move the damaged one aside: {move}"], output[-3000:]
    ckdir.path(6).rename(f"{ckdir.path(6)}.damaged")
    finished(pretrain(run_dir, demo_shards))
    assert losses(run_dir) == losses(expected)


def test_sigkill_while_writing_a_checkpoint_then_the_next_run_resumes_from_the_last_complete_one(
        reference, demo_shards: Path, tmp_path: Path) -> None:
    expected, ops = reference
    for moment_k in moments(of_step(ops, step_tag(4)), "pretrain checkpoint"):
        run_dir = tmp_path / f"run-{moment_k}"
        assert pretrain(run_dir, demo_shards, moment_k).returncode == -signal.SIGKILL
        resumed_from = CheckpointDir(run_dir / "checkpoints").find().step
        assert resumed_from in (2, 4)
        output = finished(pretrain(run_dir, demo_shards))
        assert f"resumed from {run_dir / 'checkpoints' / step_tag(resumed_from)}" in output
        assert losses(run_dir) == losses(expected), ops[moment_k - 1]
