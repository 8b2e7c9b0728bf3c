"""Steps between sync points make no host-device synchronisation, DeepSpeed's included, checked on a GPU.

    torchrun --standalone --nproc_per_node 1 launch/step_sync_check.py SHARDS RUN_DIR

The demo recipe in bf16 with ZeRO-2 on the GPU: step 1 (a sync point, and the one that places
constants and compiles) runs normally, steps 2 and 3 under ``torch.cuda.set_sync_debug_mode("warn")``,
which warns at every synchronising CUDA call. Any warning fails the check (exit 1), whoever raised
it: ours (``pretrain``) and others (DeepSpeed's, torch's) are counted apart. DeepSpeed's ZeRO-2 step
read its overflow flag and norm every step until ``pretrain.lean_zero._skip_on_device`` moved the
decision onto the device; ``tests/test_device_step.py`` counts the same reads on CPU. The last line
is one JSON object.
Started by ``launch/gpu_check.py``.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OURS = str(REPO / "pretrain")


def main(shards: str, run_dir: str) -> int:
    from pretrain.config import load_config
    from pretrain.distributed import DistEnv, init_distributed, shutdown_distributed
    from pretrain.signals import PreemptionFlag
    from pretrain.train import advance, settle, setup, train_step

    cfg = load_config(REPO / "configs/pretrain/demo.yaml", [
        f"run.dir={run_dir}", f"data.train_shards={shards}", "data.eval_shards=", "deepspeed.precision=bf16",
        "deepspeed.zero_stage=2", "schedule.total_steps=4", "schedule.warmup_steps=1", "logging.every_steps=4", "checkpoint.every_steps=0",
        "data.num_workers=2"])
    env = DistEnv.from_env()
    device = init_distributed(env)
    run = setup(cfg, env, device, PreemptionFlag())
    try:
        advance(run, train_step(run))
        settle(run)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(2):
                    advance(run, train_step(run))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        settle(run)
    finally:
        run.stream.close()
        run.writer.close()
        shutdown_distributed()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    ours = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs if w.filename.startswith(OURS))
    theirs = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs if not w.filename.startswith(OURS))
    print(json.dumps({"ok": not syncs, "ours": dict(ours), "others": dict(theirs)}))
    return 0 if not syncs else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
