"""Preemption: SIGUSR1 mid-run -> the step finishes, a checkpoint is committed, exit 75; a rerun resumes.
A signal before the first step exits 75 at once without a checkpoint; ``checkpoint.every_steps=0`` saves only
at the end.

Runs ``finetune.train.train`` in this process (one process, no data workers), so the
signal reaches the loop's handler directly, as ``srun --signal`` delivers it to each task.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from safetensors.torch import save_file

from finetune.config import FinetuneConfig
from finetune.train import train
from pretrain.checkpoint import CheckpointDir
from pretrain.config import apply_overrides
from pretrain.model import build_vit
from pretrain.signals import EXIT_PREEMPTED, PreemptionFlag

pytestmark = pytest.mark.slow

SIZES = dict(embed_dim=24, depth=1, num_heads=2, mlp_dim=48, patch_size=8)


def tiny_export(out: Path) -> Path:
    model = build_vit("custom", img_size=32, num_classes=10, pre_logits=24, **SIZES)
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.config.to_dict()))
    return out / "model.safetensors"


def signal_after_first_logged_step(metrics: Path) -> threading.Thread:
    """SIGUSR1 to this process once the loop has logged a step (its handler is installed by then)."""
    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def fresh_accelerate():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_overrides(tmp_path: Path, shards: Path) -> list[str]:
    """A 10000-step run of a tiny model, from a fresh tiny export, into ``tmp_path/run``."""
    return [f"init={tiny_export(tmp_path / 'pre')}", f"run.dir={tmp_path / 'run'}", "model.variant=custom",
            "model.img_size=48", "model.num_classes=10", *(f"model.{k}={v}" for k, v in SIZES.items()),
            f"data.train_shards={shards}", "data.eval_shards=", "data.global_batch_size=16",
            "data.micro_batch_size=8", "data.num_workers=0", "data.shuffle_buffer=50",
            "schedule.total_steps=10000", "schedule.warmup_steps=0", "checkpoint.every_steps=1000",
            "logging.every_steps=1", "logging.tensorboard=false"]


def test_sigusr1_saves_exits_75_and_the_rerun_resumes(tmp_path, demo_shards, fresh_accelerate):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, demo_shards)
    cfg = apply_overrides(FinetuneConfig(), overrides)
    watcher = signal_after_first_logged_step(run_dir / "metrics.jsonl")
    assert train(cfg) == EXIT_PREEMPTED
    watcher.join()
    stopped_at = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 1 <= stopped_at < 1000
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step_{stopped_at:08d}"
    saved = json.loads((run_dir / "checkpoints" / tag / "trainer_state.json").read_text())
    assert saved["state"]["step"] == stopped_at and saved["state"]["samples"] == 16 * stopped_at
    AcceleratorState._reset_state(reset_partial_state=True)

    cfg = apply_overrides(FinetuneConfig(), [*overrides, f"schedule.total_steps={stopped_at + 2}"])
    assert train(cfg) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_signal_before_the_first_step_exits_75_without_a_checkpoint(tmp_path, demo_shards, fresh_accelerate):
    """The flag is set before ``train`` starts (as when SIGUSR1 arrives while ``python -m finetune`` imports)."""
    cfg = apply_overrides(FinetuneConfig(), tiny_overrides(tmp_path, demo_shards))
    with PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert train(cfg, flag) == EXIT_PREEMPTED
    assert CheckpointDir(tmp_path / "run" / "checkpoints").find() is None
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()


def test_every_steps_0_checkpoints_only_at_the_end(tmp_path, demo_shards, fresh_accelerate):
    cfg = apply_overrides(FinetuneConfig(), [*tiny_overrides(tmp_path, demo_shards), "schedule.total_steps=3",
                                             "checkpoint.every_steps=0"])
    assert train(cfg) == 0
    ckdir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("step_*")) == ["step_00000003"]
    assert CheckpointDir(ckdir).find().step == 3


@pytest.mark.parametrize("every", [1, 0], ids=["periodic", "final"])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_exit_1(every: int, tmp_path, demo_shards,
                                                                       fresh_accelerate, monkeypatch) -> None:
    """A full disk at a periodic or the final save: no commit, exit 1 (as pretraining), not a run that goes on or
    reports success without the checkpoint it promised."""
    import finetune.train

    def full_disk(path: Path) -> None:
        raise OSError(28, f"could not write {path}/rng.pt: No space left on device")

    monkeypatch.setattr(finetune.train, "save_rng", full_disk)
    cfg = apply_overrides(FinetuneConfig(), [*tiny_overrides(tmp_path, demo_shards), "schedule.total_steps=2",
                                             f"checkpoint.every_steps={every}"])
    assert train(cfg) == 1
    assert CheckpointDir(tmp_path / "run" / "checkpoints").find() is None
