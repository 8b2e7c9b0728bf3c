"""bf16 finetuning under Accelerate's DeepSpeed plugin: the engine casts the model to bf16, so the
images must reach it in bf16 (fp32 images failed in the first convolution with a dtype mismatch).

One ``torchrun`` process (the plugin needs ``LOCAL_RANK``), gloo on CPU, a tiny model, bf16
(slow on CPUs without bf16 units, hence few steps). Checkpoint, final eval and export run too.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from fork_server import torchrun
from test_finetune_preempt import SIZES, tiny_export

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("zero_stage", [2])
def test_deepspeed_plugin_finetunes_in_bf16(zero_stage: int, tmp_path: Path, demo_shards: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [f"init={tiny_export(tmp_path / 'pre')}", f"run.dir={run_dir}", "model.img_size=48",
                 *(f"model.{k}={v}" for k, v in SIZES.items()), f"data.train_shards={demo_shards}",
                 f"data.eval_shards={demo_shards}", "data.global_batch_size=8", "data.micro_batch_size=8",
                 "data.num_workers=0", "data.eval_batch_size=50", "eval.max_batches=2", "schedule.total_steps=3",
                 "schedule.warmup_steps=1", "checkpoint.every_steps=2", "logging.every_steps=1",
                 "logging.tensorboard=false", f"accelerate.zero_stage={zero_stage}",
                 "accelerate.mixed_precision=bf16"]
    proc = subprocess.run(torchrun(1, "-m", "finetune", "--config", str(REPO / "configs/finetune/demo.yaml"),
                                   *overrides), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train/loss"] for line in lines if "train/loss" in line]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert any("eval/top1" in line for line in lines)
    assert (run_dir / "checkpoints" / "step_00000003").is_dir() and (run_dir / "export" / "model.safetensors").is_file()
    # DeepSpeed names the optimizer state of a bf16 engine so: the model really ran in bf16.
    assert (run_dir / "checkpoints" / "step_00000003" / "pytorch_model" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
