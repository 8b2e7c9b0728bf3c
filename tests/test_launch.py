"""Launchers without a cluster: ``DRY_RUN=1`` of the sbatch scripts and ``launch/local.sh``'s command.

The sbatch scripts' real behaviour (srun, USR1, requeue) is proven on a real
SLURM in ``test_slurm.py``; here the parts a user sees before submitting: the
resolved config, the DeepSpeed config derived for the job's world size, the
srun command, and clear refusals.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fork_server import run_python, run_ranks

from pretrain.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
PRETRAIN_CFG = REPO / "configs" / "pretrain" / "demo.yaml"
FINETUNE_CFG = REPO / "configs" / "finetune" / "demo.yaml"


def _env(**extra: str) -> dict[str, str]:
    """This environment minus any SLURM job it may run in, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, **extra)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _sections(stdout: str) -> dict[str, str]:
    """Split launcher output at its ``# resolved`` / ``# derived`` headers and its DRY_RUN line."""
    out: dict[str, list[str]] = {"head": []}
    current = "head"
    for line in stdout.splitlines():
        if line.startswith("# resolved"):
            current = "config"
        elif line.startswith("# derived DeepSpeed"):
            current = "deepspeed"
        elif "DRY_RUN=1, would run:" in line:
            current = "command"
        else:
            out.setdefault(current, []).append(line)
            continue
        out.setdefault(current, [])
    return {k: "\n".join(v) for k, v in out.items()}


@pytest.fixture
def data_dir(demo_shards: Path) -> Path:
    """Converted shards for the data paths: DRY_RUN and local.sh read their manifests (``pretrain.preflight``)."""
    return demo_shards


def test_pretrain_dry_run_prints_resolved_config_deepspeed_config_and_srun(tmp_path: Path, data_dir: Path) -> None:
    overrides = [f"data.train_shards={data_dir}", f"data.eval_shards={data_dir}", "data.micro_batch_size=8",
                 "deepspeed.zero_stage=3", "run.name=dry"]
    proc = _run([str(LAUNCH / "pretrain.sh"), str(PRETRAIN_CFG), *overrides],
                _env(DRY_RUN="1", SLURM_NTASKS="4", SLURM_CPUS_PER_TASK="12"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    parts = _sections(proc.stdout)
    assert "tasks 4" in parts["head"]

    expected = load_config(PRETRAIN_CFG, overrides)
    assert yaml.safe_load(parts["config"]) == config_to_dict(expected)

    ds = json.loads(parts["deepspeed"])
    assert ds["train_batch_size"] == expected.data.global_batch_size == 64
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 64 // (8 * 4)
    assert ds["zero_optimization"]["stage"] == 3

    command = shlex.split(parts["command"].strip())
    # srun no longer inherits --cpus-per-task from sbatch (Slurm >= 22.05); a dead rank must end the step.
    assert command == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=cores", "--cpus-per-task=12", sys.executable, "-m",
                       "pretrain", "--config", str(PRETRAIN_CFG), *overrides]


def test_finetune_dry_run_prints_config_and_srun(tmp_path: Path, data_dir: Path) -> None:
    init = tmp_path / "model.safetensors"
    init.write_bytes(b"")
    overrides = [f"init={init}", f"data.train_shards={data_dir}", f"data.eval_shards={data_dir}"]
    proc = _run([str(LAUNCH / "finetune.sh"), str(FINETUNE_CFG), *overrides],
                _env(DRY_RUN="1", SLURM_NTASKS="2"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    parts = _sections(proc.stdout)
    resolved = yaml.safe_load(parts["config"])
    assert resolved["init"] == str(init) and resolved["model"]["img_size"] == 48
    assert "deepspeed" not in parts
    command = shlex.split(parts["command"].strip())
    assert command[:6] == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=cores", sys.executable, "-m", "finetune"]
    assert command[-3:] == overrides


@pytest.mark.parametrize("override, message", [
    ("optim.weight_decy=0.1", "did you mean 'weight_decay'"),
    ("data.train_shards=/no/such/shards", "/no/such/shards does not exist"),
])
def test_dry_run_rejects_a_bad_config_with_status_2(tmp_path: Path, data_dir: Path, override: str,
                                                    message: str) -> None:
    args = [str(LAUNCH / "pretrain.sh"), str(PRETRAIN_CFG), f"data.train_shards={data_dir}",
            f"data.eval_shards={data_dir}", override]
    proc = _run(args, _env(DRY_RUN="1", SLURM_NTASKS="2"), tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "would run" not in proc.stdout


def test_sbatch_script_refuses_to_run_outside_a_job(tmp_path: Path) -> None:
    proc = _run([str(LAUNCH / "pretrain.sh"), str(PRETRAIN_CFG)], _env(), tmp_path)
    assert proc.returncode == 2
    assert "sbatch" in proc.stderr and "local.sh" in proc.stderr


def test_sbatch_script_names_a_missing_config(tmp_path: Path) -> None:
    proc = _run([str(LAUNCH / "finetune.sh"), "configs/finetune/nope.yaml"], _env(DRY_RUN="1"), tmp_path)
    assert proc.returncode == 2
    assert "configs/finetune/nope.yaml" in proc.stderr and "usage" in proc.stderr


# ------------------------------------------------------------------ local.sh


@pytest.fixture
def shim(tmp_path: Path) -> tuple[Path, Path]:
    """A PYTHON that records the torchrun call instead of training (describe.py runs for real),
    and a bin folder for a fake ``nvidia-smi``."""
    record = tmp_path / "torchrun_args"
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/bash\n"
        f'case "$1" in *describe.py) exec {shlex.quote(sys.executable)} "$@" ;; esac\n'
        f'printf "%s\\n" "$@" > {shlex.quote(str(record))}\n'
    )
    python.chmod(0o755)
    (tmp_path / "bin").mkdir()
    return python, record


def _fake_gpus(bin_dir: Path, count: int) -> None:
    smi = bin_dir / "nvidia-smi"
    lines = "".join(f"GPU {i}: NVIDIA H100 (UUID: GPU-{i})\\n" for i in range(count))
    smi.write_text(f'#!/bin/bash\nprintf "{lines}"\n')
    smi.chmod(0o755)


@pytest.mark.parametrize("nproc_arg, gpus, expected_nproc", [("3", 2, "3"), (None, 2, "2")],
                         ids=["explicit", "one-per-gpu"])
def test_local_sh_runs_torchrun_with_n_processes(tmp_path: Path, data_dir: Path, shim: tuple[Path, Path],
                                                 nproc_arg: str, gpus: int, expected_nproc: str) -> None:
    python, record = shim
    _fake_gpus(tmp_path / "bin", gpus)
    overrides = [f"data.train_shards={data_dir}", f"data.eval_shards={data_dir}", "data.global_batch_size=96",
                 "data.micro_batch_size=16"]
    env = _env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    env["PYTHON"] = str(python)
    args = [str(LAUNCH / "local.sh"), str(PRETRAIN_CFG), *([nproc_arg] if nproc_arg else []), *overrides]
    proc = _run(args, env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines() == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                               expected_nproc, "-m", "pretrain", "--config", str(PRETRAIN_CFG),
                                               *overrides]


def test_local_sh_stops_on_a_bad_config_before_starting_processes(tmp_path: Path, shim: tuple[Path, Path]) -> None:
    python, record = shim
    env = _env()
    env["PYTHON"] = str(python)
    proc = _run([str(LAUNCH / "local.sh"), str(PRETRAIN_CFG), "2", "model.depht=3"], env, tmp_path)
    assert proc.returncode == 2
    assert "did you mean 'depth'" in proc.stderr
    assert not record.exists()


def test_gpu_check_refuses_without_a_gpu(tmp_path: Path) -> None:
    """``make gpu-check`` on a machine without CUDA: a clear refusal, exit 2, nothing run."""
    proc = _run([str(LAUNCH / "gpu_check.sh")], _env(CUDA_VISIBLE_DEVICES=""), tmp_path)
    assert proc.returncode == 2
    assert "no CUDA GPU visible" in proc.stderr and "make test" in proc.stderr


def launch_module(name: str):
    """``launch/<name>.py`` imported as a module (``launch`` is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_decode_check_runs_its_cpu_mode_through_the_converter(tmp_path: Path) -> None:
    """``launch/gpu_decode_check.py`` (a gpu-check section) on the CPU: its JPEGs go through ``data_tools``'
    converter, and with libjpeg on both sides ``data.decode=gpu`` equals ``cpu_full`` pixel for pixel
    (``tests/test_decode.py`` says why), resumes exactly and reports a decode speed."""
    figures = launch_module("gpu_decode_check").main(tmp_path, "cpu")
    info = json.loads((tmp_path / "shards" / "_info.json").read_text())["splits"]["train"]
    assert info["num_samples"] == figures["images"] == 512 and len(list((tmp_path / "shards").glob("*.tar.idx"))) == 4
    assert figures["mean_abs_levels"] == 0 and figures["max_abs_levels"] == 0
    assert figures["resume_exact"] is True and figures["device_decode_images_per_s"] > 0


def test_gpu_check_takes_prebuilt_demo_shards_or_names_the_fix(demo_shards: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU machine has no scikit-learn: gpu-check verifies and uses the shards ``make gpu-wheels`` built."""
    gpu_check = launch_module("gpu_check")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "sklearn" else find_spec(name, *args))

    monkeypatch.setattr(gpu_check, "DEMO_SHARDS", demo_shards)
    assert gpu_check.demo_shards(tmp_path) == demo_shards
    assert not (tmp_path / "data").exists()                       # nothing rebuilt

    damaged = shutil.copytree(demo_shards, tmp_path / "damaged")
    next(damaged.glob("train-*.tar")).unlink()
    monkeypatch.setattr(gpu_check, "DEMO_SHARDS", damaged)
    with pytest.raises(gpu_check.CheckFailed, match="verify the prebuilt shards"):
        gpu_check.demo_shards(tmp_path)

    monkeypatch.setattr(gpu_check, "DEMO_SHARDS", tmp_path / "absent")
    with pytest.raises(gpu_check.CheckFailed,
                       match="no prebuilt shards .* scikit-learn, which builds them, is not installed. Run `make gpu-wheels`"):
        gpu_check.demo_shards(tmp_path)


def test_gpu_check_runs_every_section_past_a_failure_and_skips_only_what_needs_it(
        capsys: pytest.CaptureFixture) -> None:
    """One short GPU lease must show every failure: a failed section does not stop the check; the sections
    that use its output are skipped and named; ``--only`` runs a section with the sections it needs."""
    gpu_check = launch_module("gpu_check")
    assert gpu_check.with_inputs(["predict"]) == {"predict", "export_finetune_evaluate", "pretrain_zero2_kill_resume",
                                                   "data"}
    assert set(gpu_check.NEEDS) <= set(gpu_check.SECTIONS)
    sections = gpu_check.Sections({"seconds": {}})

    def broken() -> None:
        raise gpu_check.CheckFailed("pretrain ZeRO-2: exit 1")

    assert sections("data", lambda: "shards") == "shards"
    sections("pretrain_zero2_kill_resume", broken)
    assert sections("decode_gpu", lambda: {"ok": 1}) == {"ok": 1}          # independent: still runs
    assert sections("export_finetune_evaluate", lambda: pytest.fail("ran without its input")) is None
    assert sections("predict", lambda: pytest.fail("ran without its input")) is None
    assert sections.failed == {"pretrain_zero2_kill_resume": "pretrain ZeRO-2: exit 1"}
    assert sections.skipped == {"export_finetune_evaluate": "needs pretrain_zero2_kill_resume",
                                "predict": "needs export_finetune_evaluate"}
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(line["section"], line["ok"]) for line in lines] == [
        ("data", True), ("pretrain_zero2_kill_resume", False), ("decode_gpu", True)]

    only = gpu_check.Sections({"seconds": {}}, gpu_check.with_inputs(["decode_gpu"]))
    assert only("data", lambda: pytest.fail("not asked for")) is None and not only.skipped


@pytest.mark.slow
def test_train_step_benchmark_feeds_the_engine_from_shards_on_each_decode_path(demo_shards: Path) -> None:
    """``benchmarks/train_step.py --shards``: the engine trained from the train stream next to synthetic
    input, with the ratio gpu-check reports as "data path on/off"; on CPU both decode paths run."""
    for decode in ("cpu", "gpu"):
        proc = run_python("benchmarks/train_step.py", "--variant", "Ti/16", "--img-size", "32", "--batch", "8",
                          "--steps", "2", "--warmup", "1", "--repeats", "1", "--workers", "1", "--only",
                          "ours_engine,ours_engine_data", "--shards", str(demo_shards), "--decode", decode,
                          env=_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["decode"] == decode and result["ours_engine_data_images_per_s"] > 0
        data, synthetic = result["ours_engine_data_images_per_s"], result["ours_engine_images_per_s"]
        # Both rates are printed rounded to 0.01 img/s and the ratio to 0.001: recomputing the ratio from
        # the rounded rates is off by up to ratio * (0.005 / data + 0.005 / synthetic) + 0.0005 (at a few
        # img/s on a loaded CPU that is ~0.003, more than a fixed 1e-3).
        ratio = data / synthetic
        slack = ratio * (0.005 / data + 0.005 / synthetic) + 0.0005
        assert result["data_vs_synthetic"] == pytest.approx(ratio, abs=slack)


@pytest.mark.slow
def test_train_step_benchmark_runs_the_engine_across_processes_for_weak_scaling() -> None:
    """gpu-check's weak-scaling figure launches ``benchmarks/train_step.py`` under ``torch.distributed.run`` on
    every visible GPU; the same launch on 2 CPU processes (gloo; the ranks forked as torchrun starts them) must
    train the engine across both and report its per-process images/s and ATen calls per step (rank 0 prints
    the one JSON line)."""
    proc = run_ranks(2, "benchmarks/train_step.py", "--variant", "Ti/16", "--img-size", "32", "--batch", "4",
                     "--steps", "2", "--warmup", "1", "--repeats", "1", "--only", "ours_engine",
                     env=_env(OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1, proc.stdout[-2000:]
    assert results[0]["world_size"] == 2 and results[0]["ours_engine_images_per_s"] > 0
    assert results[0]["ours_engine_aten_calls_per_step"] > 0


# ------------------------------------------------------------------ preemption under --kill-on-bad-exit


def test_preemption_requeues_when_kill_on_bad_exit_ends_the_step_with_a_signal(tmp_path: Path,
                                                                              data_dir: Path) -> None:
    """After a USR1, srun may report 143, not 75: the first task's exit 75 is a "bad exit" to
    --kill-on-bad-exit, which kills the others mid-exit (seen on the real SLURM tests). The job
    must still be requeued, since the restart resumes from the latest complete checkpoint."""
    bin_dir, started, requeued = tmp_path / "bin", tmp_path / "srun_started", tmp_path / "scontrol_args"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(  # the step: waits for the forwarded USR1, ends as srun does after the kill
        f"#!/bin/bash\ntrap 'exit 143' USR1\ntouch {shlex.quote(str(started))}\nwhile :; do sleep 0.05; done\n")
    (bin_dir / "scontrol").write_text(  # `show job` finds the script (as under sbatch), `requeue` is recorded
        f'#!/bin/bash\nif [ "$1" = show ]; then echo "   Command={LAUNCH / "pretrain.sh"}"; exit; fi\n'
        f'echo "$@" > {shlex.quote(str(requeued))}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = _env(SLURM_JOB_ID="4242", SLURM_NTASKS="2", PATH=f"{bin_dir}:{os.environ['PATH']}")
    args = [str(LAUNCH / "pretrain.sh"), str(PRETRAIN_CFG), f"data.train_shards={data_dir}",
            f"data.eval_shards={data_dir}"]
    proc = subprocess.Popen(["bash", *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert requeued.read_text().split() == ["requeue", "4242"], out
    assert "srun exited 143 after the USR1" in out and "requeueing job 4242" in out


@pytest.mark.parametrize("user,rendezvous", [
    ({}, "rendezvous 127.0.0.1:15000"),
    ({"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29999"}, "rendezvous 10.1.2.3:29999"),
])
def test_the_users_master_addr_and_port_win(tmp_path: Path, data_dir: Path, user: dict[str, str],
                                            rendezvous: str) -> None:
    """Without them the job derives its port (15000 + job id % 20000; no job here); a user's (an open port)
    is kept, as ``pretrain.distributed.DistEnv`` keeps it."""
    env = {k: v for k, v in _env(DRY_RUN="1", SLURM_NTASKS="2").items()
           if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = _run([str(LAUNCH / "pretrain.sh"), str(PRETRAIN_CFG), f"data.train_shards={data_dir}",
                 f"data.eval_shards={data_dir}"], {**env, **user}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert rendezvous in _sections(proc.stdout)["head"]


@pytest.mark.slow
def test_train_step_benchmark_compares_the_flat_gradient_path_with_deepspeeds() -> None:
    """``benchmarks/train_step.py``'s ``ours_engine_ds_grads`` (the engine on DeepSpeed's gradient path) beside
    ``ours_engine`` and the plain loop, with ``--python``: ATen calls per step are exact, so the flat path's
    saving is asserted (at least 10 calls per tensor of Ti/16's 152: DeepSpeed's hooks, copies and flattening
    dispatch about 13) and its count against the plain loop's (at most 1 more per tensor); the Python self
    times and the speed-up ratio are reported."""
    proc = run_python("benchmarks/train_step.py", "--variant", "Ti/16", "--img-size", "32", "--batch", "2",
                      "--steps", "1", "--warmup", "1", "--repeats", "1", "--python", "--only",
                      "ours_plain,ours_engine,ours_engine_ds_grads", env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    calls = {name: result[f"{name}_aten_calls_per_step"] for name in ("ours_plain", "ours_engine",
                                                                       "ours_engine_ds_grads")}
    assert calls["ours_engine"] <= calls["ours_engine_ds_grads"] - 10 * 152, calls
    assert calls["ours_engine"] <= calls["ours_plain"] + 152, calls
    assert all(result[f"{name}_python_ms_per_step"] > 0 for name in calls) and result["flat_grads_speedup"] > 0
