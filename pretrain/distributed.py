"""Where this process sits in the job, read once from the launcher's environment.

Why one function: torchrun, the DeepSpeed launcher and SLURM's ``srun`` each
describe the job with their own variables. Reading them in one place means
the rest of the code sees one ``DistEnv`` and launchers can change without
touching the train loop. torchrun and the DeepSpeed launcher both export the
``env://`` set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); under ``srun`` (one task per GPU, no torchrun) only
``SLURM_*`` exists, and the rendezvous host and port are derived from the job.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000
"""Under SLURM the port is ``base + job_id % span``: jobs sharing a node get different ports."""


@dataclass(frozen=True)
class DistEnv:
    """Rank, world size and rendezvous address of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "single"
    """Which launcher described the job: ``env`` (torchrun / DeepSpeed launcher), ``slurm`` or ``single``."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "DistEnv":
        """Read torchrun / DeepSpeed-launcher variables, else SLURM's, else a single process.

        ``MASTER_ADDR`` / ``MASTER_PORT`` set by the user win under SLURM too.
        A single process gets a free local port, so concurrent single-process
        runs on one machine do not collide.
        """
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(
                rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
                local_rank=_int(env, "LOCAL_RANK", "0"), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_int(env, "MASTER_PORT", str(DEFAULT_PORT)), source="env",
            ).checked()
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            job = _int(env, "SLURM_JOB_ID", "0")
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
            return cls(
                rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_NTASKS"),
                local_rank=_int(env, "SLURM_LOCALID", "0"),
                master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
                master_port=_int(env, "MASTER_PORT", str(SLURM_PORT_BASE + job % SLURM_PORT_SPAN)),
                source="slurm",
            ).checked()
        return cls(master_port=_int(env, "MASTER_PORT", "0") or free_port())

    def checked(self) -> "DistEnv":
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"distributed env ({self.source}): rank {self.rank} is outside world size "
                             f"{self.world_size}; check the launcher's RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS")
        return self

    def export(self, device: torch.device) -> None:
        """Write the ``env://`` variables, which DeepSpeed, Accelerate and torch read, for this process.

        ``LOCAL_RANK`` is exported as this process' GPU index (``device``), not its position
        on the node: DeepSpeed (``DeepSpeedEngine._set_distributed_vars``: ``set_device(LOCAL_RANK)``)
        and Accelerate (``PartialState``: ``barrier(device_ids=[LOCAL_RANK])``, DDP
        ``device_ids=[LOCAL_RANK]``) use it as the device ordinal, which under one-GPU-per-task
        binding is 0 for every task. On the CPU it stays the node-local rank.
        """
        local = device.index if device.type == "cuda" else self.local_rank
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(local),
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def _int(env: Mapping[str, str], key: str, default: Optional[str] = None) -> int:
    raw = env.get(key, default)
    try:
        return int(str(raw))
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``gpu-[003-005,9],cpu1`` -> ``gpu-003`` (zero padding kept)."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not match or not (match.group(1) or match.group(2)):
        raise ValueError(f"cannot read a host from SLURM node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix + suffix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gpu_index(local_rank: int, visible: int) -> int:
    """This task's GPU among the ``visible`` ones (``CUDA_VISIBLE_DEVICES``).

    Two layouts are common under SLURM: every task sees all GPUs of its node (the
    default, and torchrun's), so task ``i`` takes GPU ``i``; or each task is bound to
    its own GPU (``--gpus-per-task=1``, ``--gpu-bind=single:1``) and sees exactly one,
    which is then device 0 whatever its local rank.
    """
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise ValueError(
        f"local rank {local_rank} sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give every task all GPUs of its node or exactly one "
        "(srun --gpus-per-task=1), and start no more tasks per node than GPUs")


def device_for(env: DistEnv) -> torch.device:
    """This process' device: its GPU (see ``gpu_index``), or the CPU when there is none."""
    if torch.cuda.is_available():
        return torch.device("cuda", gpu_index(env.local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def single_process_device() -> torch.device:
    """The device of a one-process tool (evaluation, prediction): the first visible GPU, else the CPU."""
    return device_for(DistEnv())


def join(env: DistEnv) -> torch.device:
    """Pick this process' device, make it current and export the ``env://`` set; no process group yet."""
    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env.export(device)
    return device


def init_distributed(env: DistEnv, timeout_min: float = 30.0) -> torch.device:
    """Start the process group (NCCL on GPU, gloo on CPU) and return this process' device.

    The group is created here, not by DeepSpeed, so the backend choice is ours;
    ``deepspeed.initialize`` then reuses it. Collectives of vitscale's own go through
    ``pretrain.collective``, which keeps their tensors on the device NCCL needs.
    ``timeout_min``: ``distributed.timeout_min``. On a GPU the group is bound to this
    process' device (``device_id``, where the installed torch takes it): NCCL then sets
    up its communicator at once, so a wrong device or an unreachable peer fails here, at
    start, instead of in the first collective, and barriers know their device.
    """
    device = join(env)
    if not dist.is_initialized():
        bound = {"device_id": device} if device.type == "cuda" and takes_device_id() else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=timeout_min),
                                **bound)
    log_nccl(env)
    return device


def takes_device_id() -> bool:
    """Whether this torch's ``init_process_group`` has ``device_id`` (added in torch 2.3)."""
    return "device_id" in inspect.signature(dist.init_process_group).parameters


NCCL_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_")


def log_nccl(env: DistEnv) -> None:
    """On a GPU, rank 0 logs torch's NCCL version and every ``NCCL_*`` / ``TORCH_NCCL_*`` variable.

    Why: NCCL settings are cluster-specific and exported by the user before ``sbatch``
    (``launch/common.sh``); when a job hangs or crawls, which NCCL ran and with which
    interface, transport and timeout settings is the first question, and the log of the
    run is where the answer must be.
    """
    if not env.is_main or not torch.cuda.is_available():
        return
    settings = " ".join(f"{key}={value}" for key, value in sorted(os.environ.items())
                        if key.startswith(NCCL_ENV_PREFIXES))
    log.info("NCCL %s (torch %s); %s", ".".join(map(str, torch.cuda.nccl.version())), torch.__version__,
             settings or "no NCCL_* or TORCH_NCCL_* variables set")


def cpu_list(cpus: list[int]) -> str:
    """``[0, 1, 2, 3, 8, 10, 11]`` -> ``0-3,8,10-11`` (the notation of taskset and Slurm)."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def check_cpu_budget(env: DistEnv, num_workers: int) -> int:
    """Log the CPUs this process may use and warn when its data-loader workers do not fit; returns the count.

    Why: under ``srun`` without ``--cpus-per-task`` (not inherited from sbatch since Slurm
    22.05) a task is pinned to one core, and all its decoding workers then share it:
    throughput collapses without an error. The trainer itself needs a core too, so
    ``num_workers + 1`` CPUs are wanted.
    """
    cpus = sorted(os.sched_getaffinity(0))
    log.info("rank %d may use %d CPUs (%s); data.num_workers=%d", env.rank, len(cpus), cpu_list(cpus), num_workers)
    if num_workers + 1 > len(cpus):
        log.warning("rank %d may use only %d CPUs (%s) but runs %d data-loader workers plus itself: give each task "
                    "more CPUs (sbatch/srun --cpus-per-task=%d) or lower data.num_workers", env.rank, len(cpus),
                    cpu_list(cpus), num_workers, num_workers + 1)
    return len(cpus)


def shutdown_distributed() -> None:
    """Destroy every process group, DeepSpeed's references to them included.

    ``dist.destroy_process_group`` drops torch's references only; DeepSpeed keeps its groups in
    ``deepspeed.utils.groups``, which ``deepspeed.comm.destroy_process_group`` releases. Groups
    can still outlive this (importing DeepSpeed adds references from C++), which is why the
    command-line entry points leave through ``pretrain.cli.exit_process``.

    When torch's group is already gone (Accelerate's state reset destroys it through torch),
    DeepSpeed's cached groups are released all the same: left in place, the next process
    group's engine asked DeepSpeed for its world group and got the dead one ("Group ... is not
    registered"), which failed every later engine of a test session.
    """
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if dist.is_initialized():
        if deepspeed_comm is not None and deepspeed_comm.is_initialized():
            deepspeed_comm.destroy_process_group()  # releases DeepSpeed's references too
            return
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and hasattr(groups, "_release_process_group_references"):
        groups._release_process_group_references(group=None)
