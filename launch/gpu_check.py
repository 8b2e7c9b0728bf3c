"""The one-GPU check behind ``make gpu-check`` (started by ``launch/gpu_check.sh``; read its header).

Sections, each a separate process as a user would run it, in this order. A failing section
prints its name and the tail of its output and the check goes on with the next; a section whose
input failed is skipped, named as such. Each section prints one JSON line when it ends; the exit
status is 1 if any failed:

1. ``data``: the demo shards: ``data/demo/shards`` as built beforehand by ``make gpu-wheels``
   (checked with ``data_tools verify``), else built now, which needs scikit-learn;
2. ``pretrain_zero2_kill_resume``: demo pretraining, NCCL (one rank), bf16, ZeRO-2, a checkpoint
   every 10 steps; SIGKILL of the whole process group once a checkpoint is complete and a later
   step was logged; the same command again resumes. The first step after the checkpoint is
   computed from the saved weights, data position and RNG in both runs: its loss must be
   bit-identical; the following steps run through non-deterministic GPU backward kernels
   (SDPA), so they must agree within 2e-3;
3. ``step_sync_check`` (``launch/step_sync_check.py``): steps between sync points make no
   synchronising CUDA call (``torch.cuda.set_sync_debug_mode("warn")``), ours or DeepSpeed's;
4. ``decode_gpu`` (``launch/gpu_decode_check.py``): ``data.decode=gpu`` with nvJPEG against the
   CPU path (same samples, pixels within a few levels), exact resume, device decode img/s;
5. ``train_step``: ``benchmarks/train_step.py`` for ViT-B/16 at 224 in bf16 with synthetic data,
   eager (img/s, MFU, HFU, engine vs plain loop);
6. ``pretrain_zero3``: demo pretraining in bf16 with ZeRO-3 (and its checkpoint);
7. ``export_finetune_evaluate``: export of the ZeRO-2 run; finetuning in bf16 (Accelerate DDP +
   autocast) at 2x the pretraining resolution (32 -> 64 px, pos-embed 8x8 -> 16x16); evaluation;
8. ``predict``: ``finetune.predict`` on the GPU.

``--only SECTION[,SECTION...]`` runs the named sections and the sections they need.

The last line is one JSON object with every figure. Measured on one H200: about 3.5 minutes
(sections 1-6 took 153 s, export + finetune + evaluate 35 s, predict 9 s).

``--bench`` (``make gpu-bench``) runs the benchmark section alone, a separate command so that
each fits a short lease of a GPU: ViT-B/16 at 224 in bf16 eager, ``torch.compile``d (the
engine against a plain compiled bf16 loop), eager with activation recomputation, eager at
micro-batch 256 (engine against plain loop: DeepSpeed's per-step host cost is fixed), the engine
fed from 500x375 JPEG shards through the train stream with ``data.decode=gpu`` and ``cpu``
against synthetic data (``data_vs_synthetic``, the "data path on/off" figure); with more
than one GPU visible, the engine on all of them (weak scaling = per-GPU img/s on N GPUs / on 1).
Budget: about 6 minutes on one H100, most of it compiling (the compiled B/16 run alone, with all three
contenders: about 2 minutes on an H200).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CFG = REPO / "configs" / "pretrain" / "demo.yaml"
FINETUNE_CFG = REPO / "configs" / "finetune" / "demo.yaml"
DEMO_SHARDS = REPO / "data" / "demo" / "shards"
STEPS, EVERY = 50, 10
RESUME_TOLERANCE = 2e-3
BENCH_ARGS = ["benchmarks/train_step.py", "--variant", "B/16", "--img-size", "224", "--batch", "128"]
BENCH = [sys.executable, *BENCH_ARGS]


class CheckFailed(RuntimeError):
    """A step of the check failed."""


def run(step: str, args: list[str], timeout: float = 300, **kwargs: Any) -> str:
    """Run ``args``; its output, or ``CheckFailed`` naming ``step`` with the output's tail."""
    print(f"== {step}: {' '.join(args)}", flush=True)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kwargs)
    if proc.returncode != 0:
        raise CheckFailed(f"{step}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]


def segments(run_dir: Path) -> list[dict[int, float]]:
    """Step -> loss of each process run in ``metrics.jsonl`` (a new segment starts where the step goes back)."""
    out: list[dict[int, float]] = []
    last = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" not in record:
            continue
        if last is None or record["step"] <= last:
            out.append({})
        out[-1][record["step"]] = record["train/loss"]
        last = record["step"]
    return out


def pretrain_args(run_dir: Path, shards: Path, stage: int) -> list[str]:
    return torchrun("-m", "pretrain", "--config", str(PRETRAIN_CFG), f"run.dir={run_dir}",
                    f"data.train_shards={shards}", f"data.eval_shards={shards}", "data.num_workers=4",
                    f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16", f"schedule.total_steps={STEPS}",
                    "schedule.warmup_steps=5", f"checkpoint.every_steps={EVERY}", "logging.every_steps=1",
                    "eval.every_steps=0")


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it, like a lost node.

    torchrun starts each worker in a session of its own, so killing torchrun's process group
    would leave the workers training on (seen on the first GPU run: the "resume" found the
    killed run's final checkpoint, written by its surviving worker).
    """
    import psutil

    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def kill_after_checkpoint(args: list[str], run_dir: Path, timeout: float = 300) -> int:
    """Start ``args``; SIGKILL all its processes once a checkpoint exists and a later step was logged."""
    from pretrain.checkpoint import CheckpointDir

    print(f"== pretrain ZeRO-2 (to be killed): {' '.join(args)}", flush=True)
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            latest = CheckpointDir(run_dir / "checkpoints").find()
            logged = segments(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
            if latest is not None and logged and max(logged[-1]) > latest.step:
                kill_launch(proc)
                return latest.step
            if proc.poll() is not None:
                raise CheckFailed(f"pretrain ZeRO-2 ended (exit {proc.returncode}) before it could be killed:\n"
                                  f"{proc.stdout.read()[-5000:]}")
            time.sleep(0.2)
        raise CheckFailed("pretrain ZeRO-2: no checkpoint within the time limit")
    finally:
        if proc.poll() is None:
            kill_launch(proc)


def compare_resume(run_dir: Path, saved_step: int) -> dict[str, Any]:
    """The resumed run's losses against those the killed run logged for the same steps."""
    parts = segments(run_dir)
    if len(parts) != 2:
        raise CheckFailed(f"resume: expected 2 runs in {run_dir}/metrics.jsonl, found {len(parts)}")
    killed, resumed = parts
    if min(resumed) != saved_step + 1 or max(resumed) != STEPS:
        raise CheckFailed(f"resume: the rerun logged steps {min(resumed)}..{max(resumed)}, expected "
                          f"{saved_step + 1}..{STEPS} (checkpoint {saved_step})")
    shared = sorted(set(killed) & set(resumed))
    diffs = [abs(killed[s] - resumed[s]) for s in shared]
    first = shared[0]
    if killed[first] != resumed[first]:
        raise CheckFailed(f"resume: step {first} loss {resumed[first]!r} after resuming, {killed[first]!r} before: "
                          "the checkpoint did not restore weights, data position or RNG exactly")
    if max(diffs) > RESUME_TOLERANCE:
        raise CheckFailed(f"resume: losses differ by up to {max(diffs):.2e} over steps {shared}")
    return {"checkpoint_step": saved_step, "steps_compared": len(shared), "first_step_identical": True,
            "max_abs_loss_diff": max(diffs)}


def demo_shards(work: Path) -> Path:
    """The demo shards: those ``make gpu-wheels`` built in ``data/demo`` if present, else new ones under ``work``.

    Why prebuilt: the demo images come from scikit-learn's bundled digits, and scikit-learn with
    scipy is about 50 MB of wheels a GPU machine without network would need only for this.
    """
    if (DEMO_SHARDS / "_info.json").is_file():
        run("demo data: verify the prebuilt shards", [sys.executable, "-m", "data_tools", "verify", str(DEMO_SHARDS)])
        return DEMO_SHARDS
    if importlib.util.find_spec("sklearn") is None:
        raise CheckFailed(f"demo data: no prebuilt shards ({DEMO_SHARDS}/_info.json is missing) and scikit-learn, "
                          "which builds them, is not installed. Run `make gpu-wheels` (or `python -m data_tools demo "
                          "data/demo`) on a machine with network and copy data/demo/shards along with the checkout")
    run("demo data", [sys.executable, "-m", "data_tools", "demo", str(work / "data")])
    return work / "data" / "shards"


def an_image(shards: Path, out: Path) -> Path:
    """The first image of the demo's validation shards, as a file for ``finetune.predict``."""
    with tarfile.open(next(iter(sorted(shards.glob("val-*.tar"))))) as tar:
        member = next(m for m in tar.getmembers() if m.name.rsplit(".", 1)[-1] in ("png", "jpg", "webp"))
        path = out / Path(member.name).name
        path.write_bytes(tar.extractfile(member).read())
    return path


def last_json(text: str) -> dict[str, Any]:
    return json.loads(text.strip().splitlines()[-1])


NEEDS: dict[str, tuple[str, ...]] = {
    "pretrain_zero2_kill_resume": ("data",), "step_sync_check": ("data",), "pretrain_zero3": ("data",),
    "export_finetune_evaluate": ("pretrain_zero2_kill_resume",), "predict": ("export_finetune_evaluate",),
    "weak_scaling": ("train_step",),
}
"""The sections whose output each section uses."""
SECTIONS = ("data", "pretrain_zero2_kill_resume", "step_sync_check", "decode_gpu", "train_step", "pretrain_zero3",
            "export_finetune_evaluate", "predict", "train_step_compiled", "train_step_recompute",
            "train_step_batch256", "train_step_data_gpu_decode", "train_step_data_cpu_decode", "weak_scaling")
"""Every section, in the order they run (those after ``predict`` with ``--bench``)."""


def with_inputs(names: list[str]) -> set[str]:
    """``names`` and every section they need, directly or not."""
    out: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(NEEDS.get(name, ()))
    return out


class Sections:
    """Runs the check's sections in order, each to the end even if an earlier one failed (one GPU lease
    shows every failure, not the first); a section whose input failed is skipped, naming it.
    Each result is printed as one JSON line when its section ends, so a killed check still shows them."""

    def __init__(self, summary: dict[str, Any], only: Optional[set[str]] = None):
        self.summary = summary
        self.only = only
        self.failed: dict[str, str] = {}
        self.skipped: dict[str, str] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        if self.only is not None and name not in self.only:
            return None
        lacking = [n for n in NEEDS.get(name, ()) if n in self.failed or n in self.skipped]
        if lacking:
            self.skipped[name] = f"needs {', '.join(lacking)}"
            return None
        start = time.monotonic()
        try:
            result = fn()
        except (CheckFailed, subprocess.TimeoutExpired) as exn:
            self.failed[name] = str(exn)[-4000:]
            print(f"== FAILED {name}: {exn}", file=sys.stderr, flush=True)
            result = None
        seconds = round(time.monotonic() - start, 1)
        self.summary["seconds"][name] = seconds
        print(json.dumps({"section": name, "ok": name not in self.failed, "seconds": seconds,
                          "result": result if isinstance(result, (dict, str, int, float)) else None}), flush=True)
        return result


def check(work: Path, sections: Sections) -> None:
    import torch

    from pretrain.distributed import single_process_device

    summary = sections.summary
    summary.update(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    shards = sections("data", lambda: demo_shards(work))
    zero2, zero3, finetune = work / "pre_zero2", work / "pre_zero3", work / "finetune"

    def zero2_kill_resume() -> dict[str, Any]:
        saved = kill_after_checkpoint(pretrain_args(zero2, shards, 2), zero2)
        run("pretrain ZeRO-2 resume", pretrain_args(zero2, shards, 2))
        return compare_resume(zero2, saved)

    def zero3_run() -> float:
        run("pretrain ZeRO-3", pretrain_args(zero3, shards, 3))
        return segments(zero3)[-1][STEPS]

    def export_finetune_evaluate() -> str:
        run("export", [sys.executable, "-m", "pretrain.export", str(zero2), str(zero2 / "export")])
        run("finetune bf16 at 64 px", torchrun(
            "-m", "finetune", "--config", str(FINETUNE_CFG), f"init={zero2 / 'export' / 'model.safetensors'}",
            f"run.dir={finetune}", f"data.train_shards={shards}", f"data.eval_shards={shards}", "model.img_size=64",
            "accelerate.mixed_precision=bf16", "data.num_workers=4", "schedule.total_steps=60",
            "checkpoint.every_steps=30"))
        return run("evaluate", [sys.executable, "-m", "finetune.evaluate", str(finetune)]).strip().splitlines()[0]

    def predict() -> str:
        if single_process_device().type != "cuda":
            raise CheckFailed("predict: finetune.predict would not pick the GPU")
        image = an_image(shards, work)
        printed = run("predict on the GPU", [sys.executable, "-m", "finetune.predict", str(finetune), str(image),
                                             "--attention-map", str(work / "attention.png")])
        return printed.strip().splitlines()[1].strip()

    summary["resume"] = sections("pretrain_zero2_kill_resume", zero2_kill_resume)
    summary["step_syncs"] = sections("step_sync_check", lambda: last_json(run(
        "no synchronisation between sync points, DeepSpeed's included",
        torchrun("launch/step_sync_check.py", str(shards), str(work / "sync_check")))))
    summary["decode_gpu"] = sections("decode_gpu", lambda: last_json(run(
        "data.decode=gpu against cpu_full, resume, device decode speed",
        [sys.executable, "launch/gpu_decode_check.py", str(work / "decode")])))
    bench_section(sections, "train_step", "")
    summary["zero3_final_loss"] = sections("pretrain_zero3", zero3_run)
    summary["finetune_eval"] = sections("export_finetune_evaluate", export_finetune_evaluate)
    summary["predict"] = sections("predict", predict)


def bench_section(sections: Sections, name: str, label: str, extra: Callable[[], list[str]] = list,
                  timeout: float = 240) -> None:
    """Section ``name``: ``benchmarks/train_step.py`` for ViT-B/16 at 224 in bf16 with ``extra()`` arguments
    (computed when the section runs); its JSON goes into the summary under ``name``."""
    sections.summary[name] = sections(name, lambda: last_json(run(f"train_step ViT-B/16 224 bf16{label}",
                                                                  [*BENCH, *extra()], timeout=timeout)))


def benchmarks(work: Path, sections: Sections) -> None:
    """ViT-B/16 at 224, bf16: synthetic data eager, compiled, recomputation; the engine fed from JPEG shards
    with each decode path against synthetic data; weak scaling over the visible GPUs."""
    import torch

    from gpu_decode_check import write_shards

    out = sections.summary
    made: list[Path] = []

    def shards() -> Path:
        """512 photo-like 500x375 JPEGs in shards (``gpu_decode_check.write_shards``), written on first use."""
        if not made:
            made.append(write_shards(work / "jpeg_shards"))
        return made[0]

    bench_section(sections, "train_step", "")
    bench_section(sections, "train_step_compiled", ", torch.compile", lambda: ["--compile"], timeout=420)
    bench_section(sections, "train_step_recompute", ", recomputation", lambda: ["--grad-checkpointing"])
    # The engine's step costs the host about the same time whatever the micro-batch (with
    # pretrain/lean_zero.py and pretrain/flat_grads.py about 50 ATen calls a step more than the plain loop;
    # train_step's *_aten_calls_per_step), so a larger micro-batch, as data.micro_batch_size=auto picks for
    # the recipes, hides more of it.
    bench_section(sections, "train_step_batch256", ", micro-batch 256",
                  lambda: ["--batch", "256", "--only", "ours_plain,ours_engine"])
    for decode in ("gpu", "cpu"):
        bench_section(sections, f"train_step_data_{decode}_decode", f" fed from JPEG shards, data.decode={decode}",
                      lambda decode=decode: ["--only", "ours_engine,ours_engine_data", "--decode", decode,
                                             "--shards", str(shards())])
    gpus = torch.cuda.device_count()
    if gpus > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                  *BENCH_ARGS]

        def weak_scaling() -> dict[str, Any]:
            scaled = last_json(run(f"train_step ViT-B/16 on {gpus} GPUs", launch, timeout=300))
            return {"gpus": gpus, "engine_images_per_s_per_gpu": scaled["ours_engine_images_per_s"],
                    "efficiency": round(scaled["ours_engine_images_per_s"]
                                        / out["train_step"]["ours_engine_images_per_s"], 3)}

        out["weak_scaling"] = sections("weak_scaling", weak_scaling)


def main(argv: Optional[list[str]] = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", action="store_true", help="the benchmark sections (make gpu-bench)")
    parser.add_argument("--only", default=None, metavar="SECTION[,SECTION...]",
                        help=f"run these sections and those they need, e.g. --only predict; from {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else None
    if only and set(only) - set(SECTIONS):
        parser.error(f"--only: unknown section(s) {sorted(set(only) - set(SECTIONS))}; "
                     f"choose from {', '.join(SECTIONS)}")
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible (torch.cuda.is_available() is False); this check needs one. "
              "On CPU use `make demo` and `make test`.", file=sys.stderr)
        return 2
    start = time.monotonic()
    sections = Sections({"seconds": {}}, with_inputs(only) if only else None)
    with tempfile.TemporaryDirectory(prefix="vitscale_gpu_check_") as tmp:
        if args.bench:
            benchmarks(Path(tmp), sections)
        else:
            check(Path(tmp), sections)
    figures = {key: value for key, value in sections.summary.items() if value is not None}
    summary = {"ok": not sections.failed, **figures, "total_s": round(time.monotonic() - start, 1)}
    if sections.failed or sections.skipped:
        summary.update(failed=sections.failed, skipped=sections.skipped)
        print(f"GPU CHECK FAILED: {', '.join(sections.failed)}" + (f"; skipped: {', '.join(sections.skipped)}"
                                                                    if sections.skipped else ""), file=sys.stderr)
    print(json.dumps(summary))
    return 1 if sections.failed else 0


if __name__ == "__main__":
    sys.exit(main())
