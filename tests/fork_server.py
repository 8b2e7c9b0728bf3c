"""Trainer processes for the tests, forked from one server that imported torch, DeepSpeed and the commands once.

Why: a fresh ``python -m pretrain`` spends ~7 CPU-seconds importing torch, torchvision (which
imports ``torch._dynamo``), DeepSpeed and Accelerate before its first line of work, and
``torchrun`` ~3 more; on the 2 cores CI has, the suite's ~100 trainer starts were most of its
time. ``python tests/fork_server.py --serve FD`` (one per test process, started on first use)
imports ``SERVED`` and then forks a child per request. The child is a new process with its own
pid, session and process group, environment, working folder, output files and, if asked,
CPU affinity and thread count; it runs the command as ``python -m`` would and exits as Python
would. Its numbers are those of a fresh process: same seeds, same kernels (``ATEN_CPU_CAPABILITY``
was read at the server's import from the test's environment), same thread count.

Three kinds of request: ``-m MODULE ARGS`` and ``SCRIPT.py ARGS`` (what follows ``python``) and the
arguments of ``fault_child.py`` (a command with a fault armed, see there). ``run_ranks`` starts N
children as ``torchrun --standalone --nproc_per_node N`` starts its workers (the ``env://``
variables, ``OMP_NUM_THREADS=1``, one shared output) and applies its rule that the first
worker to fail ends the others. The tests whose subject is the launcher itself (signals
forwarded by torchrun, srun, ``launch/*.sh``) keep starting the real one.

The server starts no Python thread (checked); the native pool numpy's OpenBLAS starts at
import handles fork itself (``pthread_atfork``), as it must for every DataLoader worker forked
after it. Protocol: a JSON request per line on the server's stdin; on a pipe of its own (what it
imports prints to stdout) ``started PID`` per request and ``ended PID STATUS`` per child
(STATUS negative: the signal that ended it, as ``subprocess`` reports it).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

from pretrain.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SERVED = ("data_tools.__main__", "pretrain.__main__", "finetune.__main__", "pretrain.fewshot.__main__",
          "pretrain.train", "finetune.train", "deepspeed", "accelerate")
"""What the server imports before it forks (the commands' lazy imports included)."""
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_")
"""What a test's own environment must not pass on to a child: the child's launcher (or none) sets them."""


class ForkServer:
    """The test side of ``--serve``."""

    _shared: Optional["ForkServer"] = None

    def __init__(self) -> None:
        self.answers, write_end = os.pipe()
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(write_end)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=(write_end,))
        os.close(write_end)
        self.pending = b""
        self.ended: dict[int, int] = {}

    @classmethod
    def shared(cls) -> "ForkServer":
        if cls._shared is None or cls._shared.proc.poll() is not None:
            cls._shared = cls()
        return cls._shared

    def _line(self, deadline: float) -> list[str]:
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.answers], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.answers, 4096)
            if not chunk:
                raise RuntimeError(f"the fork server ended (exit {self.proc.wait()}); its errors are above")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode().split()

    def start(self, args: list[str], env: dict[str, str], out: Path, err: Path, cwd: Path = REPO,
              cpus: Optional[set[int]] = None) -> int:
        """Fork a child running ``args`` (appending to ``out`` and ``err``); its pid."""
        request = dict(args=args, env=env, cwd=str(cwd), out=str(out), err=str(err),
                       cpus=sorted(cpus) if cpus else None)
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + 120
        while True:
            answer = self._line(deadline)
            if answer[0] == "started":
                return int(answer[1])
            self.ended[int(answer[1])] = int(answer[2])

    def wait_any(self, pids: set[int], timeout: float) -> tuple[int, int]:
        """The pid and exit status of the first of ``pids`` to end (``TimeoutError`` after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not pids & self.ended.keys():
            answer = self._line(deadline)
            if answer[0] == "ended":
                self.ended[int(answer[1])] = int(answer[2])
        pid = min(pids & self.ended.keys())
        return pid, self.ended.pop(pid)

    def kill(self, pids: set[int]) -> None:
        """SIGKILL each child's process group (its loader workers and converters too) and reap them."""
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in pids:
            self.wait_any(pids, 120)

    def run(self, args: list[str], env: dict[str, str], timeout: float, cpus: Optional[set[int]] = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
        """One child, waited for like ``subprocess.run(capture_output=True, text=True)``."""
        return self.run_group([(args, env)], timeout, cpus, cwd)

    def run_group(self, children: list[tuple[list[str], dict[str, str]]], timeout: float,
                  cpus: Optional[set[int]] = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
        """Children sharing one stdout and one stderr; the first to fail ends the others (torchrun's rule).

        The status is the first failure's (0 if none failed); torchrun itself would exit 1 there.
        """
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            running = {self.start(args, env, out, err, cwd, cpus) for args, env in children}
            status = 0
            deadline = time.monotonic() + timeout
            try:
                while running:
                    pid, ended = self.wait_any(running, deadline - time.monotonic())
                    running.discard(pid)
                    if ended != 0 and status == 0:
                        status = ended
                        self.kill(running)
                        running.clear()
            except TimeoutError:
                self.kill(running)
                raise subprocess.TimeoutExpired(children[0][0], timeout) from None
            return subprocess.CompletedProcess(children[0][0], status, out.read_text(), err.read_text())


def own_env(env: Optional[dict[str, str]] = None) -> dict[str, str]:
    """``env`` (default: this process') without the launcher's variables."""
    return {k: v for k, v in (os.environ if env is None else env).items() if not k.startswith(LAUNCHER_VARS)}


def torchrun(nproc: int, *argv: str) -> list[str]:
    """The real ``torchrun --standalone --nproc_per_node nproc ARGV``, for the tests whose subject is what it does."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *argv]


def run_python(*argv: str, env: Optional[dict[str, str]] = None, timeout: float = 600,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python ARGV`` (``-m MODULE ARGS`` or ``SCRIPT ARGS``) as a forked child, in ``env`` (default: this
    process' environment)."""
    return ForkServer.shared().run(list(argv), dict(os.environ if env is None else env), timeout, cwd=cwd)


def run_module(module: str, *args: str, env: Optional[dict[str, str]] = None, timeout: float = 600,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m module args`` as a forked child."""
    return run_python("-m", module, *args, env=env, timeout=timeout, cwd=cwd)


def run_ranks(nproc: int, *argv: str, env: Optional[dict[str, str]] = None, timeout: float = 600,
              cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc ARGV`` (``python ARGV`` for 1) as forked children."""
    if nproc == 1:
        return run_python(*argv, env=own_env(env), timeout=timeout, cwd=cwd)
    base = {"OMP_NUM_THREADS": "1", **own_env(env), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    ranks = [(list(argv), {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(nproc)]
    return ForkServer.shared().run_group(ranks, timeout, cwd=cwd)


def serve(answers: int) -> None:
    """Import ``SERVED``, then fork a child per request on stdin, answering on descriptor ``answers``."""
    for name in SERVED:
        importlib.import_module(name)
    assert threading.active_count() == 1, "a Python thread would not survive the fork"
    running: set[int] = set()
    pending = b""
    while True:
        if select.select([0], [], [], 0.02 if running else None)[0]:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    os.close(answers)
                    child(json.loads(line))
                running.add(pid)
                os.write(answers, f"started {pid}\n".encode())
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running.discard(pid)
            os.write(answers, f"ended {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
    for pid in running:  # the test process is gone: so are its children
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:  # ended since the last reap
            pass


def child(request: dict) -> None:
    """In the forked child: become the process asked for, run the command, exit as Python would."""
    status = 1
    try:
        os.setsid()
        if request["cpus"]:
            os.sched_setaffinity(0, request["cpus"])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import torch

        # What a fresh interpreter's OpenMP would size itself to: OMP_NUM_THREADS, else its CPUs.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))))
        appending = os.O_WRONLY | os.O_CREAT | os.O_APPEND  # ranks share one stdout and one stderr
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], appending),
                                (2, request["err"], appending)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        args = request["args"]
        if args[0] == "-m":
            for loaded in (args[1], f"{args[1]}.__main__"):  # imported by the server: runpy runs a fresh copy
                if not hasattr(sys.modules.get(loaded), "__path__"):
                    sys.modules.pop(loaded, None)
            sys.path[0] = os.getcwd()
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif args[0].endswith(".py"):
            sys.path[0] = str(Path(args[0]).resolve().parent)
            sys.argv = list(args)
            runpy.run_path(args[0], run_name="__main__")
        else:
            from fault_child import main

            sys.argv = [str(Path(__file__).with_name("fault_child.py")), *args]
            main()
        status = 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            status = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()  # what the interpreter runs at exit (a command that ends by os._exit skips them too)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    serve(int(sys.argv[2]))
