"""Finetuning's reported throughput times optimizer steps only: evaluation and checkpoints stay out of it.

Runs ``finetune.train.train`` in this process with every evaluation and checkpoint save
taking an hour by the clock ``finetune.train`` reads (the clock is moved on, nothing
sleeps); every window of steps timed into ``Throughput`` must stay far below that.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import finetune.train
from finetune.config import FinetuneConfig
from pretrain.config import apply_overrides
from pretrain.metrics import Throughput
from test_finetune_preempt import fresh_accelerate, tiny_overrides  # noqa: F401 (fixture)

HOUR_S = 3600.0


def test_eval_and_checkpoint_time_stay_out_of_the_step_time(tmp_path: Path, demo_shards: Path, fresh_accelerate,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    skipped = [0.0]

    def taking_an_hour(real):
        def call(*args, **kwargs):
            skipped[0] += HOUR_S
            return real(*args, **kwargs)
        return call

    step_times: list[float] = []
    add = Throughput.add

    def recorded(self, images: int, step_time: float, data_time: float) -> None:
        step_times.append(step_time)
        add(self, images, step_time, data_time)

    clock = SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0])
    monkeypatch.setattr(finetune.train, "time", clock)
    monkeypatch.setattr(finetune.train, "run_eval", taking_an_hour(finetune.train.run_eval))
    monkeypatch.setattr(finetune.train, "save", taking_an_hour(finetune.train.save))
    monkeypatch.setattr(Throughput, "add", recorded)
    overrides = [*tiny_overrides(tmp_path, demo_shards), f"data.eval_shards={demo_shards}", "eval.every_steps=1",
                 "eval.max_batches=1", "schedule.total_steps=3", "checkpoint.every_steps=1"]
    assert finetune.train.train(apply_overrides(FinetuneConfig(), overrides)) == 0
    # Steps 2 and 3 follow an evaluation and a save of the step before: two hours by this clock.
    assert skipped[0] >= 4 * HOUR_S
    assert len(step_times) == 3 and max(step_times) < HOUR_S, step_times
