"""Run ``python -m MODULE ARGS`` and, just before its K-th file-system operation, SIGKILL it or cap its file size.

``python tests/fault_child.py K LOG [--limit BYTES] [--within TEXT] -- MODULE ARGS``:
MODULE is ``data_tools``, ``pretrain``, ``finetune`` or any module ``python -m`` runs. The operations are the calls where
a crash can split the work (``OPERATIONS``: every data flush, rename, link, removal and
folder creation), plus each sample added to a shard (the converter: a kill with a shard
half written) and each ``torch.save`` and safetensors file (the trainers' checkpoint
files). With ``--within``, only those whose arguments mention TEXT count (a trainer's
checkpoint folder: its caches and temporary files vary from run to run). Each one is
appended to LOG as ``<operation> <arguments>`` (a flushed descriptor or an open file as
its path) before it runs; K = 0 changes nothing (a dry run that counts them).

A ``python -m OTHER ...`` the module starts (DeepSpeed's universal-checkpoint conversion)
runs under this wrapper too, with the same LOG and TEXT, and its operations take their
turn in the count.

At moment K the process kills its process group with SIGKILL (``run_child`` starts each
run in a group of its own): no ``finally``, no atexit, no flush, no survivor, as when a
node fails or SLURM's kill timeout expires. With ``--limit BYTES`` it sets
``RLIMIT_FSIZE`` instead (``SIGXFSZ`` ignored) and goes on: from then on every file that
grows past BYTES fails to write in the kernel with ``EFBIG``, as a write does on a full
disk or quota. Test-side wrapping of the standard library, so the product carries no
fault hook. Run the converter with ``--workers 1``: every operation then happens in this process.

``run_child`` starts each run as a fork of the test process' server (``fork_server.py``), which has
imported torch, DeepSpeed and the commands once (a fault suite starts about 40 trainers).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import random
import resource
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

from fork_server import ForkServer, own_env

OPERATIONS = ("fsync", "replace", "rename", "link", "unlink", "rmdir", "mkdir")
KILLS = 5
SEED = 20


def child_command(moment_k: int, log: Path | str, module: str, *args: str, limit: Optional[int] = None,
                  within: str = "") -> list[str]:
    return [sys.executable, __file__, *child_args(moment_k, log, module, *args, limit=limit, within=within)]


def child_args(moment_k: int, log: Path | str, module: str, *args: str, limit: Optional[int] = None,
               within: str = "") -> list[str]:
    flags = (["--limit", str(limit)] if limit is not None else []) + (["--within", within] if within else [])
    return [str(moment_k), str(log), *flags, "--", module, *args]


def run_child(moment_k: int, log: Path, module: str, *args: str, limit: Optional[int] = None, within: str = "",
              timeout: float = 600, cpus: Optional[set[int]] = None) -> subprocess.CompletedProcess:
    """``python -m module args`` in a forked child of the server (a process group of its own, on ``cpus`` if
    given) with the fault at operation ``moment_k`` (0: none)."""
    return ForkServer.shared().run(child_args(moment_k, log, module, *args, limit=limit, within=within), own_env(),
                                   timeout, cpus)


def operations(log: Path) -> list[str]:
    return log.read_text().splitlines()


def finished(done: subprocess.CompletedProcess) -> str:
    """The output of a child that must have exited 0."""
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss in a trainer's ``metrics.jsonl`` (the last line for a step wins, as for a resumed run)."""
    rows = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def of_step(ops: list[str], tag: str) -> list[int]:
    """The numbers of a trainer's operations that write checkpoint ``tag``, up to and including moving ``latest``."""
    numbers = [n for n, op in enumerate(ops, 1) if tag in op]
    latest = next(n for n, op in enumerate(ops, 1) if n > numbers[-1] and op.endswith("/latest"))
    return list(range(numbers[0], latest + 1))


def moments(candidates: Iterable[int], phase: str, count: int = KILLS) -> list[int]:
    """``count`` distinct operation numbers out of ``candidates``, the same on every run (seeded by the phase)."""
    pool = sorted(candidates)
    return sorted(random.Random(f"{SEED}-{phase}").sample(pool, min(count, len(pool))))


def describe(arg: object) -> str:
    """A descriptor or an open file as the path it writes to, anything else as itself."""
    if isinstance(arg, int) and os.path.islink(f"/proc/self/fd/{arg}"):
        return os.readlink(f"/proc/self/fd/{arg}")
    return str(arg.name if isinstance(arg, io.IOBase) else arg)


def arm(module: str, moment_k: int, log_path: str, limit: Optional[int], within: str) -> None:
    """Wrap ``OPERATIONS`` and the module's writers so that operation ``moment_k`` (1-based) brings the fault."""
    log = open(log_path, "a", buffering=1)
    count = 0

    def moment(name: str, target: str) -> None:
        nonlocal count
        if within not in target:
            return
        count += 1
        if count == moment_k and limit is None:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        elif count == moment_k:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        log.write(f"{name} {target}\n")

    def wrapped(name: str, real: Callable, shown: slice = slice(0, 2)) -> Callable:
        def call(*args, **kwargs):
            moment(name, " ".join(describe(arg) for arg in args[shown]))
            return real(*args, **kwargs)
        return call

    for name in OPERATIONS:
        setattr(os, name, wrapped(name, getattr(os, name)))
    if module == "data_tools":
        from data_tools.writer import ShardSink

        ShardSink.add = wrapped("add", ShardSink.add)
        return
    import safetensors.torch
    import torch

    torch.save = wrapped("torch.save", torch.save, slice(1, 2))
    safetensors.torch.save_file = wrapped("safetensors", safetensors.torch.save_file, slice(1, 2))
    real_run = subprocess.run

    def run(command, *args, **kwargs):
        """``python -m OTHER ...`` under this wrapper, K counting on from here; its operations join the count."""
        nonlocal count
        if not (isinstance(command, list) and command[:2] == [sys.executable, "-m"]):
            return real_run(command, *args, **kwargs)
        before = len(operations(Path(log_path)))
        remaining = moment_k - count if moment_k > count else 0
        done = real_run(child_command(remaining, log_path, *command[2:], limit=limit, within=within), *args, **kwargs)
        count += len(operations(Path(log_path))) - before
        return done

    subprocess.run = run


def main() -> None:
    """``fault_child.py K LOG [--limit BYTES] [--within TEXT] -- MODULE ARGS`` (module docstring)."""
    split = sys.argv.index("--")
    flags = dict(zip(sys.argv[3:split:2], sys.argv[4:split:2]))
    module = sys.argv[split + 1]
    limit = flags.get("--limit")
    arm(module, int(sys.argv[1]), sys.argv[2], None if limit is None else int(limit), flags.get("--within", ""))
    if module not in ("data_tools", "pretrain", "finetune"):
        sys.argv = [module, *sys.argv[split + 2:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        sys.exit(0)
    status = importlib.import_module(f"{module}.__main__").main(sys.argv[split + 2:])
    if module == "data_tools":
        sys.exit(status)
    from pretrain.cli import exit_process

    exit_process(status)


if __name__ == "__main__":
    main()
