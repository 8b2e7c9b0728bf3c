"""Resume across GPU layouts: a checkpoint written by tasks that saw 8 GPUs resumes in tasks bound to one, and back.

The GPUs are faked (``fake_devices``): real generator-state tensors per device, a device
index beyond the visible ones raising as torch does. Pretraining's per-rank RNG files and
finetuning's (next to Accelerate's own state) are both checked.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils.constants import RNG_STATE_NAME

from fake_devices import fake_cuda
from finetune.config import FinetuneConfig
from finetune.train import TrainerState, restore, save, setup
from pretrain.checkpoint import CheckpointDir, load_rng, rng_file, rng_state, save_rng
from pretrain.config import apply_overrides
from pretrain.distributed import DistEnv
from test_finetune_preempt import tiny_overrides


def host_draws() -> list[float]:
    return [random.random(), float(torch.rand(()))]


@pytest.mark.parametrize("saved_with,resumed_with", [((8, 3), (1, 0)), ((1, 0), (8, 5))])
def test_pretrain_rng_resumes_on_another_layout(saved_with, resumed_with, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The state of the device this process drew from moves to the device it draws from now."""
    writer = fake_cuda(monkeypatch, *saved_with, seed=1)
    save_rng(tmp_path)
    own = writer.states[saved_with[1]].clone()
    expected = host_draws()
    reader = fake_cuda(monkeypatch, *resumed_with, seed=2)
    untouched = reader.get_rng_state_all()
    assert load_rng(tmp_path)
    assert host_draws() == expected
    assert torch.equal(reader.states[resumed_with[1]], own)
    others = [i for i in range(reader.count) if i != resumed_with[1]]
    assert all(torch.equal(reader.states[i], untouched[i]) for i in others)


def test_the_fake_fails_like_the_old_restore(monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous restore (``set_rng_state_all`` of every state saved) on fewer GPUs raises here, as on a node."""
    saved = fake_cuda(monkeypatch, 8, 3).get_rng_state_all()
    fake_cuda(monkeypatch, 1, 0)
    with pytest.raises(IndexError):
        torch.cuda.set_rng_state_all(saved)


@pytest.mark.parametrize("saved_count,visible,current,entry", [(8, 8, 3, 3), (1, 8, 5, 0), (8, 1, 0, None)])
def test_older_per_gpu_lists_restore_the_writers_own_device(saved_count, visible, current, entry, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Checkpoints written before held ``get_rng_state_all``: the writer's own entry is taken when certain
    (same layout, or a writer that saw one GPU), else the CUDA generator is left alone with a warning."""
    writer = fake_cuda(monkeypatch, saved_count, 0, seed=3)
    state = {**rng_state(), "cuda": writer.get_rng_state_all()}
    torch.save(state, rng_file(tmp_path))
    reader = fake_cuda(monkeypatch, visible, current, seed=4)
    before = reader.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert load_rng(tmp_path)
    restored = reader.get_rng_state()
    if entry is None:
        assert torch.equal(restored, before) and "not restored" in caplog.text
    else:
        assert torch.equal(restored, writer.states[entry]) and not caplog.text


@pytest.fixture(scope="module")
def finetune_parts(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path):
    """A tiny finetuning setup on the CPU (one process), as ``finetune.train.start`` builds it."""
    cfg = apply_overrides(FinetuneConfig(), tiny_overrides(tmp_path_factory.mktemp("ft"), demo_shards))
    yield cfg, setup(cfg, DistEnv(), None)
    AcceleratorState._reset_state(reset_partial_state=True)


def accelerate_on_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accelerate's state saving as on a GPU node: it finds CUDA and saves ``get_rng_state_all``."""
    import accelerate.checkpointing

    monkeypatch.setattr(accelerate.checkpointing, "get_torch_accelerator_backend", lambda: ("cuda", torch.cuda))


@pytest.mark.parametrize("saved_with,resumed_with", [((8, 3), (1, 0)), ((1, 0), (8, 5))])
def test_finetune_checkpoint_resumes_on_another_layout(saved_with, resumed_with, finetune_parts, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, parts = finetune_parts
    ckdir = CheckpointDir(tmp_path / "checkpoints")
    accelerate_on_fake_gpus(monkeypatch)
    writer = fake_cuda(monkeypatch, *saved_with, seed=5)
    assert save(parts, cfg, TrainerState(step=7), ckdir)
    own = writer.states[saved_with[1]].clone()
    accelerate_saved = torch.load(ckdir.find().path / f"{RNG_STATE_NAME}_0.pkl", weights_only=False)
    assert len(accelerate_saved["torch_cuda_manual_seed"]) == saved_with[0]  # what Accelerate itself keeps
    expected = host_draws()
    reader = fake_cuda(monkeypatch, *resumed_with, seed=6)
    latest = ckdir.find()
    assert restore(parts, latest.path, latest.meta).step == 7
    assert host_draws() == expected
    assert torch.equal(reader.states[resumed_with[1]], own)


@pytest.mark.parametrize("visible,current,restored", [(8, 3, True), (1, 0, False)])
def test_finetune_checkpoints_without_own_rng_file_read_accelerates(visible, current, restored, finetune_parts,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog) -> None:
    """A checkpoint from before the per-rank file: Accelerate's list gives the writer's entry where certain;
    on one GPU out of the writer's 8 it is unknown (Accelerate's own restore leaves entry 0 on device 0)."""
    cfg, parts = finetune_parts
    ckdir = CheckpointDir(tmp_path / "checkpoints")
    accelerate_on_fake_gpus(monkeypatch)
    writer = fake_cuda(monkeypatch, 8, 3, seed=7)
    assert save(parts, cfg, TrainerState(step=2), ckdir)
    latest = ckdir.find()
    rng_file(latest.path).unlink()
    expected = host_draws()
    reader = fake_cuda(monkeypatch, visible, current, seed=8)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        restore(parts, latest.path, latest.meta)
    assert host_draws() == expected
    assert torch.equal(reader.get_rng_state(), writer.states[3]) == restored
    assert ("not restored" in caplog.text) != restored
