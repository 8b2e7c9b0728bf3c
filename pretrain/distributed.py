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

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

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

    def export(self) -> None:
        """Write the ``env://`` variables, which DeepSpeed and torch read, for this process."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
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


def device_for(env: DistEnv) -> torch.device:
    """This process' device: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(env: DistEnv, timeout_min: float = 30.0) -> torch.device:
    """Start the process group (NCCL on GPU, gloo on CPU) and return this process' device.

    The group is created here, not by DeepSpeed, so the backend choice is ours;
    ``deepspeed.initialize`` then reuses it.
    """
    env.export()
    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=timeout_min))
    return device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
