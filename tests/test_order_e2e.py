"""Must show 1 end to end: the keys of each global step, logged by ``data.log_keys`` during real
(tiny, CPU, gloo) pretraining runs, are the same on 1, 2 and 4 processes, across SIGKILL and resumes
on other world sizes (2 -> 1 -> 4), and equal to what ``python -m pretrain.data.order`` prints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fork_server import run_module, run_ranks, torchrun
from pretrain.data.keylog import read_step_keys

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
TINY = ["--config", "configs/pretrain/demo.yaml", "data.eval_shards=", "model.depth=1", "model.embed_dim=48",
        "model.num_heads=2", "model.mlp_dim=96", "model.pre_logits=48", "data.global_batch_size=16",
        "data.micro_batch_size=4", "schedule.warmup_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
        "logging.every_steps=1", "data.mixup=0.0"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """What follows ``-m pretrain``."""
    return [*TINY, f"run.dir={run_dir}", f"data.train_shards={shards}", "data.log_keys=true",
            f"schedule.total_steps={STEPS}", *extra]


def _train(nproc: int, run_dir: Path, shards: Path, *extra: str) -> None:
    result = run_ranks(nproc, "-m", "pretrain", *_args(run_dir, shards, *extra), env=_env(), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _kill_after(run_dir: Path, shards: Path, step: int) -> None:
    """A 2-process run, SIGKILLed (one worker; torchrun ends the other) as soon as its checkpoint of step
    ``step`` is complete. Waiting for the checkpoint, not for a logged step, keeps the kill before the next
    checkpoint however fast steps run (polled every 20 ms; a step and a save take longer here)."""
    latest = run_dir / "checkpoints" / "latest"
    proc = subprocess.Popen(torchrun(2, "-m", "pretrain", *_args(run_dir, shards)), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (latest.is_file() and latest.read_text() == f"step_{step:08d}"):
            assert proc.poll() is None and time.time() < deadline, "the run ended or hung before the kill"
            time.sleep(0.02)
        workers = [p for p in Path("/proc").glob("[0-9]*/stat")
                   if p.read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)]
        os.kill(int(workers[0].parent.name), signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0


def test_step_keys_are_one_function_of_the_step(demo_shards: Path, tmp_path: Path) -> None:
    order = run_module("pretrain.data.order", *TINY, f"data.train_shards={demo_shards}", "--steps", f"1:{STEPS + 1}",
                       timeout=120)
    assert order.returncode == 0, order.stderr
    expected = {row["step"]: row["keys"] for row in map(json.loads, order.stdout.splitlines())}
    assert sorted(expected) == list(range(1, STEPS + 1)) and all(len(k) == 16 for k in expected.values())

    _train(1, tmp_path / "w1", demo_shards, "data.num_workers=0")
    _train(4, tmp_path / "w4", demo_shards, "data.num_workers=2")
    assert read_step_keys(tmp_path / "w1") == expected
    assert read_step_keys(tmp_path / "w4") == expected

    chain = tmp_path / "chain"
    _kill_after(chain, demo_shards, 2)
    assert (chain / "checkpoints" / "latest").read_text() in ("step_00000002", "step_00000004")
    _train(1, chain, demo_shards, "schedule.total_steps=5", "data.num_workers=1")
    _train(4, chain, demo_shards, "data.num_workers=0")
    assert read_step_keys(chain) == expected
    assert sorted(p.name for p in (chain / "data_keys").glob("*")) == [f"rank-{r}.jsonl" for r in range(4)]
