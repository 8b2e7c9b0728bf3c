"""SIGKILL the converter at seeded random moments of planning, of a part and of the merge; the next run recovers.

A moment is the K-th file-system operation of the phase (``fault_child.py``: every
flush, rename, link, removal, folder creation, and each sample added to a shard), K drawn
by a seeded generator from a dry run's count, ``KILLS`` distinct moments a phase. After
each kill the next run (what SLURM's requeue or a rerun of the array task does) must
finish the conversion with shards and ``_info.json`` byte-identical to an uninterrupted
one, ``verify`` and ``verify --merge`` clean, and nothing of the killed process left.
A process killed while holding a lock (the plan's, the manifest's) is waited for until
its lock is stale; the test ages the folder by ``STALE_S`` instead of waiting two minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from data_tools.convert import convert
from data_tools.manifest import read_info
from data_tools.plan import Part
from data_tools.lockfile import STALE_S
from data_tools.planfile import HEADER
from data_tools.verify import verify, verify_merge
from fault_child import moments, operations, run_child

pytestmark = [pytest.mark.slow, pytest.mark.faults]
COUNTS = {"ant": 5, "bee": 4, "cow": 3}
PER_SHARD = 2


def run_killed(source: Path, out: Path, kill_at: int, log: Path, *extra: str) -> int:
    """``convert`` in a subprocess killed before operation ``kill_at`` (0: not killed); its exit status."""
    done = run_child(kill_at, log, "data_tools", "convert", str(source), str(out), "--samples-per-shard",
                     str(PER_SHARD), "--workers", "1", "--no-progress", *extra)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    return done.returncode


def age(folder: Path) -> None:
    """Make every file under ``folder`` look untouched for ``STALE_S``: the time a killed holder's lock needs."""
    old = time.time() - STALE_S - 5
    for path in folder.rglob("*"):
        os.utime(path, (old, old))


def finish(source: Path, out: Path, parts: tuple[int, ...]) -> None:
    """The runs after a kill: the given parts of 2 again, then the merge (in this process)."""
    for index in parts:
        convert(source, out, samples_per_shard=PER_SHARD, part=Part(index, 2), progress=False)
    convert(source, out, samples_per_shard=PER_SHARD, merge=True, progress=False)


def assert_recovered(out: Path, reference: Path) -> None:
    shards = lambda folder: {p.name: p.read_bytes() for p in folder.glob("train-*.tar")}  # noqa: E731
    assert shards(out) == shards(reference)
    assert read_info(out) == read_info(reference)
    assert verify(out) == [] and verify_merge(out) == []
    leftovers = [p.name for p in out.iterdir() if p.name.endswith((".partial", ".tmp")) or p.name.startswith(
        (".write-test", "_work"))]
    assert leftovers == []


@pytest.fixture
def reference(tmp_path, dt_imagefolder):
    """(source, the uninterrupted conversion's folder)."""
    source = dt_imagefolder(COUNTS)
    out = tmp_path / "reference"
    convert(source, out, samples_per_shard=PER_SHARD, progress=False)
    return source, out


def test_sigkill_while_planning_then_the_parts_and_merge_finish(tmp_path, reference):
    source, expected = reference
    dry = tmp_path / "dry.log"
    run_killed(source, tmp_path / "dry", 0, dry, "--part", "0/2")
    planned = next(n for n, op in enumerate(operations(dry), 1) if op.startswith("replace") and op.endswith(HEADER))
    for kill_at in moments(range(1, planned + 1), "planning"):
        out = tmp_path / f"planning-{kill_at}"
        assert run_killed(source, out, kill_at, tmp_path / f"planning-{kill_at}.log", "--part", "0/2") == -9
        assert not (out / "_work" / "train" / HEADER).exists()
        if out.is_dir():
            age(out)
        finish(source, out, (1, 0))
        assert_recovered(out, expected)


def test_sigkill_in_a_part_then_its_rerun_and_the_merge_finish(tmp_path, reference):
    source, expected = reference
    planned = tmp_path / "planned"
    convert(source, planned, samples_per_shard=PER_SHARD, part=Part(0, 2), progress=False)
    dry = tmp_path / "dry.log"
    run_killed(source, shutil.copytree(planned, tmp_path / "dry"), 0, dry, "--part", "1/2")
    for kill_at in moments(range(1, len(operations(dry)) + 1), "part"):
        out = shutil.copytree(planned, tmp_path / f"part-{kill_at}")
        assert run_killed(source, out, kill_at, tmp_path / f"part-{kill_at}.log", "--part", "1/2") == -9
        convert(source, out, samples_per_shard=PER_SHARD, part=Part(1, 2), progress=False)
        assert not list(out.glob("*.partial"))  # the killed writer's, removed by the rerun on this host
        finish(source, out, ())
        assert_recovered(out, expected)


def test_sigkill_in_the_merge_then_the_next_merge_finishes(tmp_path, reference):
    source, expected = reference
    parted = tmp_path / "parted"
    for index in range(2):
        convert(source, parted, samples_per_shard=PER_SHARD, part=Part(index, 2), progress=False)
    dry = tmp_path / "dry.log"
    run_killed(source, shutil.copytree(parted, tmp_path / "dry"), 0, dry, "--merge")
    for kill_at in moments(range(1, len(operations(dry)) + 1), "merge"):
        out = shutil.copytree(parted, tmp_path / f"merge-{kill_at}")
        assert run_killed(source, out, kill_at, tmp_path / f"merge-{kill_at}.log", "--merge") == -9
        age(out)
        finish(source, out, ())
        assert_recovered(out, expected)
