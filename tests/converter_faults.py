"""Run ``python -m data_tools ARGS`` and SIGKILL it just before its K-th file-system operation.

``python tests/converter_faults.py K LOG -- ARGS``: the operations are the calls where a
crash can split the converter's work (``OPERATIONS``: every data flush, rename, link,
removal and folder creation), plus each sample added to a shard (a kill with a shard half
written). Each one is appended to LOG as ``<operation> <arguments>`` before it runs; K = 0
kills nothing (a dry run that counts them). The process kills itself with SIGKILL: no
``finally``, no atexit, no flush, as when a node fails or SLURM's kill timeout expires.
Test-side wrapping of the standard library, so the product carries no fault hook.
Run with ``--workers 1``: every operation then happens in this one process.
"""

from __future__ import annotations

import os
import signal
import sys

OPERATIONS = ("fsync", "replace", "rename", "link", "unlink", "rmdir", "mkdir")


def arm(kill_at: int, log_path: str) -> None:
    """Wrap ``OPERATIONS`` and ``ShardSink.add`` so that operation ``kill_at`` (1-based) is never reached."""
    from data_tools.writer import ShardSink

    log = open(log_path, "a", buffering=1)
    count = 0

    def moment(name: str, target: object) -> None:
        nonlocal count
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        log.write(f"{name} {target}\n")

    def wrapped(name, real):
        def call(*args, **kwargs):
            moment(name, " ".join(str(arg) for arg in args[:2]))
            return real(*args, **kwargs)
        return call

    for name in OPERATIONS:
        setattr(os, name, wrapped(name, getattr(os, name)))
    add = ShardSink.add

    def add_sample(self, *args, **kwargs):
        moment("add", self.name)
        return add(self, *args, **kwargs)

    ShardSink.add = add_sample


if __name__ == "__main__":
    arm(int(sys.argv[1]), sys.argv[2])
    from data_tools.__main__ import main

    sys.exit(main(sys.argv[sys.argv.index("--") + 1:]))
