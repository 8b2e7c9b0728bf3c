"""One rank of ``test_flat_grads.py``'s multi-rank comparison: the same tiny engine trained with vitscale's flat
gradient path and with DeepSpeed's own path (``make_lean`` left out), each rank on its own data.

    python tests/flat_grads_ranks.py STAGE PRECISION ACCUMULATION BUCKET ALLREDUCE OUT_DIR   (under a launcher)

ALLREDUCE is DeepSpeed's ``use_multi_rank_bucket_allreduce`` (true: one all-reduce per bucket, its
default; false: a reduce per partition owner).

Writes ``OUT_DIR/rank{R}.pt``: both runs' weights, and for the flat run where each bucket's reduction
was launched (inside the backward, from the hooks, or after it, from the epilogue) and how many buckets'
reductions were outstanding after each launch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import pretrain.engine
from pretrain import flat_grads
from pretrain.config import Config, apply_overrides
from pretrain.distributed import DistEnv, init_distributed, shutdown_distributed
from pretrain.engine import build_engine, deepspeed_config
from pretrain.model import build_vit

STEPS = 3


def trained(cfg: Config, env: DistEnv, accumulation: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_vit("custom", img_size=16, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                      patch_size=8)
    torch.nn.init.normal_(model.head.weight, std=0.1)                 # nonzero: every tensor gets a gradient
    engine = build_engine(model, cfg, deepspeed_config(cfg, world_size=env.world_size, gpu=False))
    dtype, data = engine.module.cls_token.dtype, torch.Generator().manual_seed(100 + env.rank)
    for _ in range(STEPS * accumulation):
        x, y = torch.randn(8, 3, 16, 16, generator=data), torch.randint(0, 10, (8,), generator=data)
        engine.backward(torch.nn.functional.cross_entropy(engine(x.to(dtype)).float(), y))
        engine.step()
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    engine.destroy()
    return state


def main() -> None:
    stage, precision, accumulation, bucket, allreduce, out = sys.argv[1:7]
    env = DistEnv.from_env()
    init_distributed(env)
    cfg = apply_overrides(Config(), [
        f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}", "optim.grad_clip=1e6",
        f"data.global_batch_size={8 * int(accumulation) * env.world_size}", "data.micro_batch_size=8",
        "schedule.warmup_steps=1", "schedule.total_steps=100",
        f"deepspeed.extra={{zero_optimization: {{reduce_bucket_size: {bucket}, "
        f"use_multi_rank_bucket_allreduce: {allreduce}}}}}"])
    launches: list[str] = []
    in_flight: list[int] = []
    launch = flat_grads.FlatGradients._launch

    def recorded(self: flat_grads.FlatGradients, bucket: flat_grads.Bucket) -> None:
        launches.append("backward" if torch._C._current_graph_task_id() != -1 else "epilogue")
        launch(self, bucket)
        in_flight.append(sum(b.sent is not None for b in self.buckets))

    flat_grads.FlatGradients._launch = recorded
    flat = trained(cfg, env, int(accumulation))
    flat_grads.FlatGradients._launch = launch
    pretrain.engine.make_lean = lambda engine: None
    deepspeeds = trained(cfg, env, int(accumulation))
    torch.save({"flat": flat, "deepspeed": deepspeeds, "launches": launches, "in_flight": in_flight},
               Path(out) / f"rank{env.rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
