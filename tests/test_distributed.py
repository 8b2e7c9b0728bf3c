"""``DistEnv.from_env``: one reader for torchrun / DeepSpeed-launcher and SLURM variables; GPU and CPU placement."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import pytest

from pretrain.distributed import (SLURM_PORT_BASE, SLURM_PORT_SPAN, DistEnv, check_cpu_budget, cpu_list, device_for,
                                  first_host, init_distributed, log_nccl)


def test_torchrun_variables() -> None:
    env = DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                            "MASTER_PORT": "29600", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert env == DistEnv(rank=3, world_size=8, local_rank=1, master_addr="node7", master_port=29600, source="env")
    assert not env.is_main


def test_slurm_variables_derive_host_and_port() -> None:
    env = DistEnv.from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                            "SLURM_JOB_NODELIST": "gpu-[007-010,12],cpu1", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 8, 1, "slurm")
    assert env.master_addr == "gpu-007"
    assert env.master_port == SLURM_PORT_BASE + 123456 % SLURM_PORT_SPAN
    # A user-set MASTER_PORT / MASTER_ADDR wins.
    env = DistEnv.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a1",
                            "MASTER_PORT": "4242", "MASTER_ADDR": "login"})
    assert (env.master_addr, env.master_port) == ("login", 4242)


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("node[1-4]", "node1"), ("gpu-[003-005,9],cpu1", "gpu-003"), ("n[12,3]x", "n12x"),
    ("a,b", "a"), ("rack1-[09]", "rack1-09"),
])
def test_first_host(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_single_process_gets_a_free_port() -> None:
    env = DistEnv.from_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single") and 0 < env.master_port < 65536


@pytest.mark.parametrize("environ,match", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "outside world size"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "outside world size"),
])
def test_bad_values_name_the_variable(environ: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistEnv.from_env(environ)


# ------------------------------------------------------------ GPU selection under SLURM


@pytest.fixture
def slurm_gpus(monkeypatch: pytest.MonkeyPatch):
    """Set a SLURM task's environment with ``CUDA_VISIBLE_DEVICES``; torch's CUDA queries follow that variable.

    This machine has no GPU, so ``torch.cuda.is_available`` / ``device_count`` are answered
    from ``CUDA_VISIBLE_DEVICES`` as the CUDA runtime would (one device per listed entry).
    """
    import torch

    def layout(local_rank: int, visible: str) -> DistEnv:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.setenv(key, "")  # recorded, so what export() writes is undone after the test
            monkeypatch.delenv(key)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count",
                            lambda: len(os.environ["CUDA_VISIBLE_DEVICES"].split(",")))
        environ = {"SLURM_PROCID": str(8 + local_rank), "SLURM_NTASKS": "16", "SLURM_LOCALID": str(local_rank),
                   "SLURM_JOB_NODELIST": "gpu-[01-02]", "SLURM_JOB_ID": "77"}
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        return DistEnv.from_env()
    return layout


def test_task_bound_to_one_gpu_uses_device_0_and_exports_it_as_local_rank(slurm_gpus) -> None:
    """``--gpus-per-task=1`` / ``--gpu-bind=single:1``: local rank 3 sees only its own GPU, as device 0."""
    env = slurm_gpus(local_rank=3, visible="3")
    device = device_for(env)
    assert (device.type, device.index) == ("cuda", 0)
    env.export(device)
    # DeepSpeed and Accelerate call set_device(LOCAL_RANK): it must be a valid ordinal for this task.
    assert (os.environ["LOCAL_RANK"], os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "11", "16")


def test_task_that_sees_all_gpus_takes_its_local_rank(slurm_gpus) -> None:
    env = slurm_gpus(local_rank=3, visible="0,1,2,3,4,5,6,7")
    device = device_for(env)
    assert (device.type, device.index) == ("cuda", 3)
    env.export(device)
    assert os.environ["LOCAL_RANK"] == "3"


def test_more_tasks_than_visible_gpus_is_refused_with_the_fix(slurm_gpus) -> None:
    env = slurm_gpus(local_rank=5, visible="4,5")
    with pytest.raises(ValueError, match=r"local rank 5 sees 2 GPUs \(CUDA_VISIBLE_DEVICES=4,5\).*--gpus-per-task=1"):
        device_for(env)


def test_cpu_budget_is_logged_and_too_many_workers_warned(caplog: pytest.LogCaptureFixture) -> None:
    allowed = len(os.sched_getaffinity(0))
    with caplog.at_level(logging.INFO, logger="pretrain.distributed"):
        assert check_cpu_budget(DistEnv(), num_workers=allowed - 1) == allowed
    assert f"may use {allowed} CPUs" in caplog.text and "lower data.num_workers" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pretrain.distributed"):
        check_cpu_budget(DistEnv(), num_workers=allowed)
    assert f"--cpus-per-task={allowed + 1}" in caplog.text and "lower data.num_workers" in caplog.text


@pytest.mark.parametrize("cpus,text", [([0, 1, 2, 3, 8, 10, 11], "0-3,8,10-11"), ([5], "5"), ([], "")])
def test_cpu_list_notation(cpus: list[int], text: str) -> None:
    assert cpu_list(cpus) == text


EXIT_SCRIPT = """
import atexit, logging, os, socket, sys
import torch.distributed as dist
from pretrain.cli import exit_process
from pretrain.distributed import shutdown_distributed
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
import deepspeed
from deepspeed.utils import groups
from pretrain.engine import without_inference_comm_build
without_inference_comm_build()  # as before every DeepSpeed start here (a minute of JIT build in a new environment)
deepspeed.init_distributed("gloo")
groups._get_data_parallel_group()
if sys.argv[1] == "destroyed":
    dist.destroy_process_group()  # by another owner first, as Accelerate's state reset does
shutdown_distributed()
print("deepspeed world group released:", groups._WORLD_GROUP is None, end="")
logging.basicConfig()
logging.getLogger("t").warning("last log line")
atexit.register(lambda: print("ATEXIT RAN", flush=True))
exit_process(75)
"""


@pytest.mark.parametrize("torch_group", ["alive", "destroyed"])
def test_exit_process_releases_groups_flushes_and_skips_the_interpreter_teardown(torch_group: str) -> None:
    """Why ``exit_process`` exists: see its docstring (SIGABRT at exit from process groups alive in C++).

    The status comes through, block-buffered stdout and logging are flushed, DeepSpeed's cached
    group is released by ``shutdown_distributed`` (also when torch's group was destroyed by another
    owner first), and no atexit handler (nor C++ static destructor) runs.
    """
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, torch_group], capture_output=True, text=True, timeout=180,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 75, result.stderr[-3000:]
    assert result.stdout.endswith("deepspeed world group released: True"), result.stdout
    assert "last log line" in result.stderr
    assert "ATEXIT RAN" not in result.stdout


# ----------------------------------------------------- starting the group on a GPU


@pytest.fixture
def group_start(slurm_gpus, monkeypatch: pytest.MonkeyPatch):
    """``init_distributed`` on a faked GPU task (rank 8, local rank 0 of 8 visible): what
    ``init_process_group`` is given, with and without ``device_id`` in the installed torch's signature."""
    import torch
    import torch.distributed as dist

    given: dict = {}

    def with_device_id(backend=None, init_method=None, timeout=None, world_size=-1, rank=-1, device_id=None):
        given.update(backend=backend, timeout=timeout, device_id=device_id)

    def without_device_id(backend=None, init_method=None, timeout=None, world_size=-1, rank=-1):
        given.update(backend=backend, timeout=timeout)

    def start(takes_device_id: bool, **kwargs):
        env = slurm_gpus(local_rank=0, visible="0,1,2,3,4,5,6,7")
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
        monkeypatch.setattr(dist, "init_process_group", with_device_id if takes_device_id else without_device_id)
        return init_distributed(env, **kwargs), given
    return start


def test_the_group_is_bound_to_this_gpu_with_the_configured_timeout(group_start) -> None:
    import torch

    device, given = group_start(True, timeout_min=45)
    assert given == dict(backend="nccl", timeout=timedelta(minutes=45), device_id=torch.device("cuda", 0))
    assert device == given["device_id"]


def test_a_torch_without_device_id_starts_the_group_without_it(group_start) -> None:
    _, given = group_start(False)
    assert given == dict(backend="nccl", timeout=timedelta(minutes=30))


def test_rank_0_logs_the_nccl_version_and_environment(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 3))
    for key in [k for k in os.environ if k.startswith(("NCCL_", "TORCH_NCCL_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    monkeypatch.setenv("MY_NCCL_NOTE", "not NCCL's")
    with caplog.at_level(logging.INFO, logger="pretrain.distributed"):
        log_nccl(DistEnv(rank=1, world_size=2))
        assert caplog.text == ""
        log_nccl(DistEnv(rank=0, world_size=2))
    assert f"NCCL 2.27.3 (torch {torch.__version__}); NCCL_SOCKET_IFNAME=ib0 TORCH_NCCL_ASYNC_ERROR_HANDLING=1" \
        in caplog.text
    assert "MY_NCCL_NOTE" not in caplog.text
