"""Kill the converter CLI with SIGKILL mid-run, rerun the same command, check every image lands exactly once.

Deterministic without any test hook in the product: one source "image" is a
named pipe. The worker that reaches it blocks on it while the other worker
finishes every other shard; the test sees the reader arrive, waits for those
shards, then kills the whole process group (the main process and both workers).
On the rerun the test feeds a real PNG through the pipe.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds

from data_tools.manifest import read_split
from data_tools.verify import verify

pytestmark = pytest.mark.slow
DEADLINE_S = 120


def open_pipe_writer(pipe: Path, deadline: float) -> int:
    """Open ``pipe`` for writing once a reader has it open (non-blocking polls, so a missing reader fails)."""
    while time.monotonic() < deadline:
        try:
            return os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
        time.sleep(0.05)
    raise AssertionError(f"no worker opened {pipe} in time")


def has_reader(pipe: Path) -> bool:
    try:
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        return True
    except OSError as err:
        if err.errno != errno.ENXIO:
            raise
        return False


def wait_for(condition, deadline: float, what: str) -> None:
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigkill_then_rerun_converts_every_image_exactly_once(tmp_path, dt_imagefolder, dt_make_image):
    root = dt_imagefolder({"a": 10, "b": 10, "c": 10})
    pipe = root / "b" / "pipe.png"
    os.mkfifo(pipe)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_tools", "convert", str(root), str(out), "--samples-per-shard", "3",
               "--workers", "2", "--no-progress"]
    num_shards = 11  # 31 items, 3 per shard
    final = lambda: sorted(out.glob("train-*.tar"))  # noqa: E731
    deadline = time.monotonic() + DEADLINE_S

    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        writer = open_pipe_writer(pipe, deadline)  # a worker is now blocked reading the pipe
        wait_for(lambda: len(final()) == num_shards - 1, deadline, "the other shards")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    os.close(writer)
    assert first.returncode == -signal.SIGKILL
    # The killed worker may still hold the pipe for a moment; feeding it would lose the bytes.
    wait_for(lambda: not has_reader(pipe), time.monotonic() + DEADLINE_S, "the killed worker to exit")
    assert not (out / "_info.json").exists()
    assert len(list(out.glob("*.partial"))) <= 1  # the blocked shard's, if an image before the pipe was written
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in final()}

    second = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        writer = open_pipe_writer(pipe, time.monotonic() + DEADLINE_S)
        png = dt_make_image((11, 9), fmt="PNG", seed=99)
        os.set_blocking(writer, True)
        os.write(writer, png)
        os.close(writer)
        output, _ = second.communicate(timeout=DEADLINE_S)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    assert second.returncode == 0, output.decode()
    assert "1 written now" in output.decode()

    assert {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in ((n, out / n) for n in finished)} == finished
    shards, lengths, _ = read_split(out, "train")
    assert len(shards) == num_shards and sum(lengths) == 31
    paths = [json.loads(s["json"])["path"] for shard in shards for s in wds.WebDataset(str(shard), shardshuffle=False)]
    expected = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_fifo()]
    assert sorted(paths) == sorted(expected) and len(set(paths)) == 31
    piped = [s for shard in shards for s in wds.WebDataset(str(shard), shardshuffle=False)
             if json.loads(s["json"])["path"] == "b/pipe.png"]
    assert piped[0]["png"] == png
    assert not list(out.glob("*.partial")) and not (out / "_work").exists()
    assert verify(out) == []
