"""``data.log_keys``: which samples each rank used in each optimizer step, one JSON line per step.

``<run.dir>/data_keys/rank-<RANK>.jsonl``: ``{"step": s, "epoch": e, "keys": [...]}`` with ``s`` the
1-based global step just completed and ``keys`` the ``__key__`` of every sample the rank used in
it (all micro-batches; a corrupt sample's replacement appears under its own key). A resumed run
appends, so steps after the last checkpoint appear again after a crash: the last line of a step
is the one the run that went on used. ``python -m pretrain.order`` gives the same sets without
training, for the whole global batch.
"""

from __future__ import annotations

import json
from pathlib import Path


class KeyLog:
    """Appends this rank's lines; each line is flushed, so a killed run loses none it completed."""

    def __init__(self, run_dir: Path, rank: int):
        path = Path(run_dir) / "data_keys" / f"rank-{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        self._file.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
