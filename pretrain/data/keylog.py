"""``data.log_keys``: which samples each rank used in each optimizer step, one JSON line per step.

``<run.dir>/data_keys/rank-<RANK>.jsonl``: ``{"step": s, "epoch": e, "attempt": a, "keys": [...]}``
with ``s`` the 1-based global step just completed, ``keys`` the ``__key__`` of every sample the
rank used in it (all micro-batches; a corrupt sample's replacement appears under its own key) and
``a`` the number of the process launch (1, 2, ... across resumes). ``python -m pretrain.data.order``
gives the same sets without training, for the whole global batch.

A resumed run appends, so the steps a crashed launch ran after its last checkpoint appear again,
and with another world size the crashed launch's extra ranks are never rewritten. Which lines
count is therefore decided by the attempt: for each step, the lines of the highest attempt that
logged it are the ones the run went on from (``read_step_keys``). A launch takes its attempt
number from the last line of ``rank-0.jsonl`` (every launch has a rank 0); every rank reads it
while setting up, and no rank writes before the first step's gradient reduction, which needs
every rank to have finished setting up, so all ranks of a launch agree on the number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FOLDER = "data_keys"


def rank_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / FOLDER / f"rank-{rank}.jsonl"


def last_line(path: Path, block: int = 1 << 16) -> str:
    """The last newline-terminated line of ``path`` ('' if none), read from the end (the file grows a line a step).

    A launch killed mid-write can leave a last line without its newline; it is not complete and is passed over.
    """
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return ""
    with handle:
        pos = handle.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0:
            start = max(0, pos - block)
            handle.seek(start)
            tail = handle.read(pos - start) + tail
            pos = start
            lines = tail[:tail.rfind(b"\n") + 1].splitlines()
            if len(lines) >= 2 or (lines and pos == 0):  # the last line's start is inside the tail
                return lines[-1].decode()
    return ""


def last_attempt(run_dir: Path) -> int:
    """The attempt number of the last line rank 0 logged (0 when nothing was logged yet)."""
    line = last_line(rank_path(run_dir, 0))
    return json.loads(line).get("attempt", 0) if line else 0


class KeyLog:
    """Appends this rank's lines; each line is flushed, so a killed run loses none it completed."""

    def __init__(self, run_dir: Path, rank: int):
        path = rank_path(run_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.attempt = last_attempt(run_dir) + 1
        self._file = open(path, "a")
        if self._file.tell() and not _ends_with_newline(path):
            self._file.write("\n")  # end the line a killed launch left half-written

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        self._file.write(json.dumps({"step": step, "epoch": epoch, "attempt": self.attempt, "keys": keys}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def read_step_keys(run_dir: Path) -> dict[int, list[str]]:
    """Sorted keys of each global step over all ranks, from the highest attempt that logged the step.

    Half-written lines (a launch killed mid-write) are skipped.
    """
    best: dict[int, tuple[int, list[str]]] = {}
    for path in sorted((Path(run_dir) / FOLDER).glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            step, attempt = row["step"], row.get("attempt", 0)
            held = best.get(step)
            if held is None or attempt > held[0]:
                best[step] = (attempt, list(row["keys"]))
            elif attempt == held[0]:
                held[1].extend(row["keys"])
    return {step: sorted(keys) for step, (_, keys) in sorted(best.items())}
