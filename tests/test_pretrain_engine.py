"""The train loop in this process (1 rank, gloo): non-finite losses, a full disk during a save, collective devices."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

import pretrain.train as train_module
from fake_devices import CollectivesOnAGpu
from pretrain import collective
from pretrain.checkpoint import CheckpointDir
from pretrain.config import load_config
from pretrain.distributed import DistEnv, init_distributed, shutdown_distributed
from pretrain.export import consolidated_state_dict
from pretrain.loss import build_loss
from pretrain.train import EXIT_NONFINITE, train

REPO = Path(__file__).resolve().parents[1]
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def process_group() -> Iterator[tuple[DistEnv, torch.device]]:
    """One gloo group for the module: DeepSpeed caches its groups, so it must outlive every engine here."""
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    env = DistEnv.from_env({})
    device = init_distributed(env)
    try:
        yield env, device
    finally:
        shutdown_distributed()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tiny_config(run_dir: Path, shards: Path, *overrides: str):
    return load_config(REPO / "configs/pretrain/demo.yaml", [
        f"run.dir={run_dir}", f"data.train_shards={shards}", "data.eval_shards=", "data.num_workers=0",
        "data.global_batch_size=16", "data.micro_batch_size=16", "model.depth=1", "schedule.warmup_steps=1",
        "logging.every_steps=1", *overrides])


def weights(ckdir: CheckpointDir, step: int, stage: int) -> dict[str, torch.Tensor]:
    return consolidated_state_dict(ckdir.path(step), stage)


def nan_losses_from(call: int):
    """A stand-in for ``build_loss`` whose losses are NaN from its ``call``-th call on (a micro-batch a call)."""
    calls = {"n": 0}

    def build(cfg):
        loss = build_loss(cfg)

        def fn(logits, target):
            calls["n"] += 1
            value = loss(logits, target)
            return value * float("nan") if calls["n"] >= call else value
        return fn
    return build


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_losses_skip_updates_then_stop(stage: int, process_group, demo_shards: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps 5 and 6 have a NaN loss: both updates are skipped, and 2 in a row stop the run with the
    last good weights (those of step 4) saved."""
    monkeypatch.setattr(train_module, "build_loss", nan_losses_from(5))
    cfg = tiny_config(tmp_path / "run", demo_shards, f"deepspeed.zero_stage={stage}", "schedule.total_steps=10",
                      "checkpoint.every_steps=2", "checkpoint.keep_last=5", "optim.max_nonfinite_steps=2")
    env, device = process_group
    assert train(cfg, env, device) == EXIT_NONFINITE
    ckdir = CheckpointDir(tmp_path / "run" / "checkpoints")
    assert ckdir.find().step == 6
    last_good, saved, earlier = weights(ckdir, 4, stage), weights(ckdir, 6, stage), weights(ckdir, 2, stage)
    assert all(torch.equal(last_good[k], saved[k]) for k in saved)
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert any(not torch.equal(earlier[k], last_good[k]) for k in saved)  # steps 3-4 did update


def test_full_disk_at_the_final_save_keeps_the_previous_checkpoint(process_group, demo_shards: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """``torch.save`` (DeepSpeed's writer) raises ENOSPC for step 4: exit 1, step 2 stays latest and intact."""
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step_00000004" in str(f):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = tiny_config(tmp_path / "run", demo_shards, "schedule.total_steps=4", "checkpoint.every_steps=2")
    env, device = process_group
    assert train(cfg, env, device) == 1
    ckdir = CheckpointDir(tmp_path / "run" / "checkpoints")
    assert ckdir.find().step == 2 and not ckdir.path(4).exists()
    assert all(torch.isfinite(v).all() for v in weights(ckdir, 2, 2).values())
    assert "step_00000002 is intact" in caplog.text


def test_checkpoint_of_another_model_shape_names_the_parameters(process_group, demo_shards: Path,
                                                                tmp_path: Path) -> None:
    env, device = process_group
    assert train(tiny_config(tmp_path / "run", demo_shards, "schedule.total_steps=1"), env, device) == 0
    wider = tiny_config(tmp_path / "run", demo_shards, "schedule.total_steps=2", "model.depth=2",
                        "model.mlp_dim=192")
    with pytest.raises(ValueError, match="different model") as err:
        train(wider, env, device)
    assert "blocks.0.mlp.fc1.weight: checkpoint [384, 96] vs model [192, 96]" in str(err.value)
    assert "blocks.1.attn.qkv.weight: only in the model" in str(err.value)


@pytest.fixture
def collectives_on_a_gpu(process_group, monkeypatch: pytest.MonkeyPatch) -> CollectivesOnAGpu:
    """torch.distributed held to NCCL's rules with ``pretrain.collective`` on a fake GPU (``fake_devices``).

    Why a fake GPU: on the CPU the engine's device is the CPU, so an unplaced collective
    (the bug that crashed every checkpoint under NCCL) would pass a check against it.
    """
    _, device = process_group
    return CollectivesOnAGpu(monkeypatch, engine_device=device)


def test_every_collective_of_a_run_is_placed_on_the_collective_device(process_group, collectives_on_a_gpu,
                                                                      demo_shards: Path, tmp_path: Path) -> None:
    """Steps (loss/flag agreement), evaluation counts, the stop flag and checkpoint saves (ZeRO-3, whose
    engine issues collectives too) all pass their tensors on the collectives' device."""
    env, device = process_group
    placed = collectives_on_a_gpu.placed
    cfg = tiny_config(tmp_path / "run", demo_shards, "deepspeed.zero_stage=3", "schedule.total_steps=2",
                      "checkpoint.every_steps=1", f"data.eval_shards={demo_shards}", "eval.every_steps=1",
                      "eval.max_batches=2")
    assert train(cfg, env, device) == 0
    # 2 steps x 1 agreement + 1 start-up stop flag + 2 saves x 1 agreement + eval batches and counts, at least.
    assert placed.get("all_reduce", 0) >= 2 + 1 + 2 + 2 and placed.get("barrier", 0) >= 2 * 2, placed


def test_the_lean_zero_gradient_norm_is_placed_on_the_collective_device(process_group, collectives_on_a_gpu,
                                                                        demo_shards: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """ZeRO-2's gradient norm (``pretrain.lean_zero``, over DeepSpeed's data-parallel group) is reduced
    through ``pretrain.collective`` too: a call through ``deepspeed.comm`` would fail the fake GPU."""
    env, device = process_group
    groups = []
    sum_ = collective.sum_

    def spy(tensor: torch.Tensor, group=None) -> torch.Tensor:
        groups.append(group)
        return sum_(tensor, group=group)

    monkeypatch.setattr(collective, "sum_", spy)
    cfg = tiny_config(tmp_path / "run", demo_shards, "deepspeed.zero_stage=2", "deepspeed.precision=fp32",
                      "schedule.total_steps=2", "checkpoint.every_steps=0")
    assert train(cfg, env, device) == 0
    assert sum(group is not None for group in groups) >= 2, groups  # a gradient norm in each step, at least


UNPLACED = """
def _all_reduce(tensor, op, group=None):
    if active():
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def barrier():
    if active():
        dist.barrier()
"""
"""``pretrain.collective``'s collectives before the NCCL fix: the host tensor as it is, a barrier on no device."""


def put_back_unplaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace ``pretrain.collective``'s placed collectives by ``UNPLACED``, compiled as that module's own code."""
    namespace = dict(vars(collective))
    exec(compile(UNPLACED, collective.__file__, "exec"), namespace)
    for name in ("_all_reduce", "barrier"):
        monkeypatch.setattr(collective, name, namespace[name])


@pytest.mark.parametrize("call,message", [
    (lambda: collective.any_true(True), "all_reduce got a tensor on cpu; pretrain.collective runs on cuda:3"),
    (lambda: collective.barrier(), "barrier without device_ids=\\[3\\]"),
])
def test_the_fake_gpu_fails_the_unplaced_collectives(process_group, collectives_on_a_gpu, call, message,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard itself: with the placement dropped, each collective fails on the CPU as it did under NCCL."""
    call()
    put_back_unplaced(monkeypatch)
    with pytest.raises(AssertionError, match=message):
        call()


def test_a_run_with_unplaced_collectives_fails(process_group, collectives_on_a_gpu, demo_shards: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env, device = process_group
    put_back_unplaced(monkeypatch)
    with pytest.raises(AssertionError, match="got a tensor on cpu; pretrain.collective runs on cuda:3"):
        train(tiny_config(tmp_path / "run", demo_shards, "schedule.total_steps=1"), env, device)


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")
"""Tensor methods that copy a value to the host (on a GPU: wait for the device to drain its queue)."""
HOST_SIDE = ("train_stream.py", "reader.py", "transforms.py", "data.py")
"""The input pipeline's files: they read host tensors (labels, before the copy to the device)."""


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every host read of a tensor (``SYNCS``) made directly by ``pretrain`` code outside the input pipeline,
    as ``file:line method``; DeepSpeed's and torch's own reads are not ours to remove and are not counted."""
    reads: list[str] = []
    package = str(REPO / "pretrain")

    def counted(name, real):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package) and not caller.endswith(HOST_SIDE):
                reads.append(f"{Path(caller).name}:{sys._getframe(1).f_lineno} {name}")
            return real(self, *args, **kwargs)
        return read

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    return reads


@pytest.mark.parametrize("stage", [2, 3])
def test_a_step_between_sync_points_reads_nothing_back(stage: int, process_group, host_reads: list[str],
                                                       demo_shards: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps 2 and 3 of 4 (logging every 4, no checkpoint or eval in between) read no tensor value on the host;
    the sync points (step 1, the process' first, and step 4) do, through the one window read."""
    per_step: dict[int, list[str]] = {}
    real_step, real_advance = train_module.train_step, train_module.advance

    def step_then_advance(run, result):
        real_advance(run, result)
        per_step[run.state.step] = list(host_reads)
        host_reads.clear()

    def counted_step(run):
        host_reads.clear()
        return real_step(run)

    monkeypatch.setattr(train_module, "train_step", counted_step)
    monkeypatch.setattr(train_module, "advance", step_then_advance)
    settled: list[int] = []
    real_settle = train_module.settle

    def counted_settle(run):
        out = real_settle(run)
        settled.append(len(host_reads))
        return out

    monkeypatch.setattr(train_module, "settle", counted_settle)
    cfg = tiny_config(tmp_path / "run", demo_shards, f"deepspeed.zero_stage={stage}", "schedule.total_steps=4",
                      "logging.every_steps=4", "checkpoint.every_steps=0", "data.micro_batch_size=8")
    env, device = process_group
    assert train(cfg, env, device) == 0
    assert per_step[2] == [] and per_step[3] == [], per_step
    assert len(settled) == 2 and all(n >= 1 for n in settled), settled


def test_a_stop_signal_between_sync_points_stops_at_the_next(process_group, demo_shards: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGUSR1 during step 2 with logging every 4 steps: the run saves step 4 and exits 75; all 4 losses logged."""
    from pretrain.signals import EXIT_PREEMPTED, PreemptionFlag

    flag = PreemptionFlag()
    real_step = train_module.train_step

    def signalled_in_step_2(run):
        if run.state.step == 1:
            flag.signal = signal.SIGUSR1
        return real_step(run)

    monkeypatch.setattr(train_module, "train_step", signalled_in_step_2)
    cfg = tiny_config(tmp_path / "run", demo_shards, "schedule.total_steps=10", "logging.every_steps=4",
                      "checkpoint.every_steps=0")
    env, device = process_group
    assert train(cfg, env, device, flag) == EXIT_PREEMPTED
    assert CheckpointDir(tmp_path / "run" / "checkpoints").find().step == 4
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "train/loss" in row] == [1, 2, 3, 4]


def test_auto_micro_batch_run_records_the_resolved_size(process_group, demo_shards: Path, tmp_path: Path) -> None:
    """``auto`` on CPU resolves without probing (global 16 on 1 rank: 16) and the run directory's config says so."""
    env, device = process_group
    cfg = tiny_config(tmp_path / "run", demo_shards, "data.micro_batch_size=auto", "schedule.total_steps=1")
    assert train(cfg, env, device) == 0
    assert load_config(tmp_path / "run" / "config.yaml").data.micro_batch_size == 16


def test_deepspeeds_cpu_inference_all_reduce_is_never_built(process_group, demo_shards: Path, tmp_path: Path) -> None:
    """DeepSpeed's comm backend JIT-compiles ``deepspeed_shm_comm`` when it starts (about a minute on the first
    run of an environment) for ``inference_all_reduce`` alone: once the run has built its engine, DeepSpeed's
    own ``build_shm_op`` declines to build it. The probe's verdict is put back first, as in a fresh process."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    env, device = process_group
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = True
    assert train(tiny_config(tmp_path / "run", demo_shards, "schedule.total_steps=1"), env, device) == 0
    assert build_shm_op() is None


def losses_of(run_dir: Path) -> list[float]:
    return [row["train/loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in row]


@pytest.mark.slow
def test_compiled_model_trains_like_eager(process_group, demo_shards: Path, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """``model.compile=true`` (inductor on CPU; about 70 s on 2 busy cores for this 1-block model) gives the eager
    losses within float tolerance, and the first step's cost is logged against the later ones. The compiled
    kernels land in the session's own inductor cache (``tests/conftest.py``), never in one shared across runs."""
    env, device = process_group
    common = ("schedule.total_steps=3", "checkpoint.every_steps=0", "data.micro_batch_size=8")
    caplog.set_level("INFO", logger="pretrain")
    assert train(tiny_config(tmp_path / "eager", demo_shards, *common), env, device) == 0
    assert train(tiny_config(tmp_path / "compiled", demo_shards, "model.compile=true", *common), env, device) == 0
    eager, compiled = losses_of(tmp_path / "eager"), losses_of(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    assert all(abs(a - b) < 1e-4 for a, b in zip(eager, compiled)), (eager, compiled)
    assert "per later step: about" in caplog.text
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert cache.name.startswith("vitscale-inductor-") and any(cache.rglob("*.so")), sorted(cache.rglob("*"))[:20]


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "fp32"), (2, "bf16")])
def test_one_nonfinite_gradient_tensor_skips_the_update_without_the_per_tensor_check(
        stage: int, precision: str, process_group, demo_shards: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``pretrain.lean_zero`` drops DeepSpeed's per-tensor overflow check at stages 1-2 and relies on the global
    gradient norm: an inf in a single element of a single gradient tensor (finite loss) must still make the
    step a skipped one with unchanged weights, and a finite step must update them. The per-tensor check
    (``has_overflow_partitioned_grads_serial``) must not run at all."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from pretrain.engine import build_engine, deepspeed_config, step_skipped
    from pretrain.model import build_vit

    def per_tensor_check(self):
        raise AssertionError("the per-tensor overflow check ran")

    monkeypatch.setattr(DeepSpeedZeroOptimizer, "has_overflow_partitioned_grads_serial", per_tensor_check)
    cfg = tiny_config(tmp_path / "run", demo_shards, f"deepspeed.zero_stage={stage}",
                      f"deepspeed.precision={precision}")
    torch.manual_seed(0)
    model = build_vit("custom", img_size=16, num_classes=10, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                      patch_size=8)
    engine = build_engine(model, cfg, deepspeed_config(cfg, world_size=1, gpu=False))
    dtype = engine.module.cls_token.dtype
    x, y = torch.randn(16, 3, 16, 16, dtype=dtype), torch.randint(0, 10, (16,))
    poisoned = engine.module.blocks[0].mlp.fc1.weight
    poison = {"on": False}
    poisoned.register_hook(lambda g: g.index_fill(1, torch.tensor([3]), float("inf")) if poison["on"] else g)

    def step() -> dict[str, torch.Tensor]:
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        assert torch.isfinite(loss)
        engine.backward(loss)
        engine.step()
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}

    before = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    poison["on"] = True
    after_poisoned = step()
    assert float(step_skipped(engine)) == 1.0
    assert all(torch.equal(before[k], after_poisoned[k]) for k in before)
    poison["on"] = False
    after_clean = step()
    assert float(step_skipped(engine)) == 0.0
    assert all(torch.isfinite(v).all() for v in after_clean.values())
    # The head starts at zero, so the first update moves the head (the blocks' gradients are still 0).
    assert not torch.equal(after_clean["head.weight"], before["head.weight"])
    engine.destroy()


@pytest.mark.parametrize("stage", [1, 2])
def test_global_grad_norm_equals_torchs_on_the_same_gradients(stage: int, process_group, demo_shards: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's multi-tensor gradient norm (``pretrain.lean_zero._foreach_grad_norm``) against
    ``torch.nn.utils.get_total_norm`` of a plain fp32 copy of the model on the same batch (relative 1e-5:
    both sum in at least fp32, measured difference ~1e-7)."""
    import copy

    from pretrain.engine import build_engine, deepspeed_config
    from pretrain.model import build_vit

    calls = {"foreach_norm": 0}
    foreach_norm = torch._foreach_norm

    def counting(*args, **kwargs):
        calls["foreach_norm"] += 1
        return foreach_norm(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    cfg = tiny_config(tmp_path / "run", demo_shards, f"deepspeed.zero_stage={stage}", "deepspeed.precision=fp32")
    torch.manual_seed(0)
    model = build_vit("custom", img_size=16, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                      patch_size=8)
    torch.nn.init.normal_(model.head.weight, std=0.1)                 # nonzero: every tensor gets a gradient
    reference = copy.deepcopy(model)
    engine = build_engine(model, cfg, deepspeed_config(cfg, world_size=1, gpu=False))
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
    engine.step()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    want = float(torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]))
    got = float(engine.get_global_grad_norm())
    assert calls["foreach_norm"] >= 1
    assert got == pytest.approx(want, rel=1e-5)
    engine.destroy()


@pytest.mark.parametrize("stage,precision,accumulation,flat", [(1, "fp32", 1, True), (2, "fp32", 1, True),
                                                               (2, "fp32", 2, True), (2, "bf16", 2, True),
                                                               (1, "bf16", 2, True), (2, "fp32", 2, False),
                                                               (2, "bf16", 2, False)])
def test_lean_zero_step_equals_deepspeeds_own_and_a_plain_loop_with_less_host_work(
        stage: int, precision: str, accumulation: int, flat: bool, process_group, demo_shards: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``pretrain.lean_zero`` (with fused AdamW) over 4 optimizer steps of ``accumulation`` micro-batches,
    tolerance 0, with the flat gradient path (``pretrain.flat_grads``) and, ``flat`` False, with
    DeepSpeed's gradient path under the lean patches (what runs where the flat path does not apply):

    * against the same engine with DeepSpeed's own step (``make_lean`` left out): equal weights, bit for
      bit, fp32 and bf16;
    * fp32: against a plain loop on a copy of the model (the same AdamW from ``build_optimizer``, the
      same groups and schedule, ``clip_grad_norm_``): equal weights, bit for bit;
    * the work it removes is gone: DeepSpeed's re-pointing of the parameters never runs after the
      start; with the flat path DeepSpeed's per-tensor gradient hook never runs, the gradient
      partition is built once per group at the start, and a step dispatches at most 2 more ATen
      calls per parameter tensor than the plain loop (fp32; the loop's own count: one ``add_`` per
      tensor where autograd adds into the flat buffer, the rest per group and per step); without
      it the bf16 partition is built once per group and every bucket is reduced from one storage;
      either way a step dispatches at least 4 fewer ATen calls per parameter tensor than DeepSpeed's.

    Why tolerance 0 and a clip threshold that never clips (1e6): the attention's key bias gets a
    gradient of pure rounding noise (softmax ignores it), which Adam normalises to updates of the
    order of the learning rate, so one ulp of difference anywhere (a clip factor from another norm
    kernel, another AdamW kernel) shows up as ~1e-3 in those weights. Identical arithmetic gives
    identical weights; the norm itself is compared in ``test_global_grad_norm_equals_torchs_on_the_same_gradients``.
    """
    import copy

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    import pretrain.engine
    from pretrain import flat_grads
    from pretrain.engine import build_engine, deepspeed_config
    from pretrain.metrics import dispatched_calls
    from pretrain.model import build_vit
    from pretrain.optim import build_optimizer, build_scheduler

    if not flat:
        monkeypatch.setattr(flat_grads, "applies", lambda optimizer: False)
    calls: dict[str, int] = {}
    for name in ("_update_model_bit16_weights", "_build_compact_grad_partition_buffer",
                 "reduce_independent_p_g_buckets_and_remove_grads"):
        original = getattr(DeepSpeedZeroOptimizer, name)
        monkeypatch.setattr(DeepSpeedZeroOptimizer, name, lambda self, *a, _f=original, _n=name: (
            calls.__setitem__(_n, calls.get(_n, 0) + 1), _f(self, *a))[1])
    cfg = tiny_config(tmp_path / "run", demo_shards, f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                      "data.global_batch_size=16", f"data.micro_batch_size={16 // accumulation}", "optim.grad_clip=1e6")
    torch.manual_seed(0)
    model = build_vit("custom", img_size=16, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                      patch_size=8)
    torch.nn.init.normal_(model.head.weight, std=0.1)                 # nonzero: every tensor gets a gradient
    plain, unpatched = copy.deepcopy(model), copy.deepcopy(model)
    tensors = len(list(model.parameters()))
    batches = [(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))) for _ in range(4)]
    loss_fn = torch.nn.functional.cross_entropy

    def train_engine(engine) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        calls.clear()                                                 # DeepSpeed's own set-up calls
        buckets: list[torch.Tensor] = []                              # held, so no address is reused
        average = engine.optimizer.average_tensor
        engine.optimizer.average_tensor = lambda t, *a: (buckets.append(t), average(t, *a))[1]
        dtype = engine.module.cls_token.dtype

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            for xs, ys in zip(x.chunk(accumulation), y.chunk(accumulation)):
                engine.backward(loss_fn(engine(xs.to(dtype)).float(), ys))
                engine.step()

        for x, y in batches[:-1]:
            step(x, y)
        dispatched = dispatched_calls(lambda: step(*batches[-1]))
        seen = {**calls, "storages": len({t.untyped_storage().data_ptr() for t in buckets}),
                "dispatched_last_step": dispatched}
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        engine.destroy()
        return state, seen

    ours, lean = train_engine(build_engine(model, cfg, deepspeed_config(cfg, world_size=1, gpu=False)))
    monkeypatch.setattr(pretrain.engine, "make_lean", lambda engine: None)
    deepspeeds, own = train_engine(build_engine(unpatched, cfg, deepspeed_config(cfg, world_size=1, gpu=False)))
    assert all(torch.equal(ours[k], deepspeeds[k]) for k in ours)

    steps, groups = len(batches), 2
    reductions = tensors * steps * (accumulation if stage == 2 else 1)
    assert own["_update_model_bit16_weights"] == groups * steps and "_update_model_bit16_weights" not in lean
    assert own["reduce_independent_p_g_buckets_and_remove_grads"] == reductions
    assert own["storages"] == steps * (accumulation if stage == 2 else 1)
    if flat:
        assert "reduce_independent_p_g_buckets_and_remove_grads" not in lean and lean["storages"] == 0
        assert "_build_compact_grad_partition_buffer" not in lean
    else:
        assert lean["reduce_independent_p_g_buckets_and_remove_grads"] == reductions and lean["storages"] == 1
    if precision == "bf16" and stage == 2:                            # fp32 accumulation: the compact partition
        assert own["_build_compact_grad_partition_buffer"] == groups * steps
        assert flat or lean["_build_compact_grad_partition_buffer"] == groups
    assert lean["dispatched_last_step"] <= own["dispatched_last_step"] - 4 * tensors, (lean, own)

    if precision == "fp32":
        optimizer = build_optimizer(plain, cfg.optim)
        assert all(group["fused"] for group in optimizer.param_groups)
        schedule = build_scheduler(optimizer, cfg.schedule)

        def plain_step(x: torch.Tensor, y: torch.Tensor) -> None:
            for xs, ys in zip(x.chunk(accumulation), y.chunk(accumulation)):
                (loss_fn(plain(xs), ys) / accumulation).backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()

        for x, y in batches[:-1]:
            plain_step(x, y)
        plain_dispatched = dispatched_calls(lambda: plain_step(*batches[-1]))
        want = plain.state_dict()
        assert all(torch.equal(ours[k], want[k]) for k in want), max((ours[k] - want[k]).abs().max() for k in want)
        if flat:
            assert lean["dispatched_last_step"] <= plain_dispatched + 2 * tensors, (lean, plain_dispatched)


def test_every_collective_of_a_finetuning_run_is_placed_on_the_collective_device(
        process_group, collectives_on_a_gpu, demo_shards: Path, tmp_path: Path) -> None:
    """Finetuning under Accelerate in this group: the logged loss, evaluation counts, the stop flag and
    checkpoint saves go through ``pretrain.collective`` on its device; Accelerate's own collectives stay
    on the engine's."""
    from accelerate.state import AcceleratorState

    from finetune.config import FinetuneConfig
    from finetune.train import train as finetune
    from pretrain.config import apply_overrides
    from test_finetune_preempt import tiny_overrides

    overrides = [*tiny_overrides(tmp_path, demo_shards), f"data.eval_shards={demo_shards}", "eval.every_steps=1",
                 "eval.max_batches=2", "schedule.total_steps=2", "checkpoint.every_steps=1"]
    try:
        assert finetune(apply_overrides(FinetuneConfig(), overrides)) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    placed = collectives_on_a_gpu.placed
    # 2 logged losses + 1 start-up stop flag + 2 stop flags + 2 saves + eval batches and counts, at least.
    assert placed.get("all_reduce", 0) >= 2 + 1 + 2 + 2 + 2 and placed.get("barrier", 0) >= 2 * 2, placed
