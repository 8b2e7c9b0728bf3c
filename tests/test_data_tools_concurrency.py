"""The converter under concurrency: overlapping writers of one shard, merges at once, the plan lock, leftovers.

Where a race decides the outcome, the test forces the interleaving (two sinks driven
step by step, forked processes meeting at a barrier, a rename that lets another holder
in) instead of hoping for it, so each test fails when its guard is taken out.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import webdataset as wds

import data_tools.lockfile as lockfile
import data_tools.manifest as manifest_module
import data_tools.planfile as planfile
from data_tools.convert import convert
from data_tools.images import prepare
from data_tools.manifest import read_errors, read_info
from data_tools.plan import Part
from data_tools.verify import verify
from data_tools.writer import ShardSink, file_sha256, record_path, writer_id

COUNTS = {"ant": 5, "bee": 4, "cow": 3}
PER_SHARD = 2  # 12 images -> 6 shards
FORK = multiprocessing.get_context("fork")
BARRIER_S = 1.0
"""How long a forked process waits at a barrier for the other: long enough to meet, short when it must not."""


def source_with_a_broken_file(dt_imagefolder) -> Path:
    root = dt_imagefolder(COUNTS)
    (root / "cow" / "broken.jpg").write_bytes(b"not an image")  # one line in _errors.jsonl
    return root


def in_forked_processes(target, *args_per_process) -> list:
    """Run ``target(barrier, *args)`` in one forked process per argument tuple; their results, in order."""
    barrier, results = FORK.Barrier(len(args_per_process)), FORK.Queue()

    def child(number, args):
        try:
            results.put((number, target(barrier, *args)))
        except BaseException as err:  # reported by the parent's assertion
            results.put((number, repr(err)))

    procs = [FORK.Process(target=child, args=(n, a)) for n, a in enumerate(args_per_process)]
    for proc in procs:
        proc.start()
    gathered = dict(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    return [gathered[n] for n in range(len(procs))]


def test_two_writers_of_one_shard_leave_the_first_complete_shard_and_no_other_bytes(tmp_path, dt_make_image):
    out, work = tmp_path / "out", tmp_path / "out" / "_work" / "train"
    work.mkdir(parents=True)
    images = [prepare(dt_make_image((8 + i, 6), seed=i)) for i in range(3)]
    first, second = ShardSink(out, work, "train-000000.tar", 3), ShardSink(out, work, "train-000000.tar", 3)
    for number, image in enumerate(images):  # interleaved, as two overlapping runs of a part write
        first.add(f"key{number}", image, number, f"c/{number}.jpg")
        second.add(f"key{number}", image, number, f"c/{number}.jpg")
    assert first.partial != second.partial
    assert first.commit() is True
    shard = out / "train-000000.tar"
    kept = shard.stat().st_ino
    assert second.commit() is False
    assert shard.stat().st_ino == kept and not list(out.glob("*.partial"))
    assert file_sha256(shard) == json.loads(record_path(work, shard.name).read_text())["sha256"]
    assert [s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False)] == ["key0", "key1", "key2"]


def _convert_part_in_lockstep(barrier, source: Path, out: Path) -> dict:
    """``convert --part 0/1`` whose every shard commit waits for the other process's: both race on each shard."""
    real = ShardSink.commit

    def commit(self):
        barrier.wait(timeout=30)
        return real(self)

    ShardSink.commit = commit
    return convert(source, out, samples_per_shard=PER_SHARD, part=Part(0, 1), progress=False)


def test_two_parts_converting_the_same_shards_at_once_give_one_valid_shard_each(tmp_path, dt_imagefolder):
    source, out = source_with_a_broken_file(dt_imagefolder), tmp_path / "out"
    summaries = in_forked_processes(_convert_part_in_lockstep, (source, out), (source, out))
    assert all(isinstance(s, dict) for s in summaries), summaries
    shards = 7  # 13 files, 2 per shard
    assert sum(s["shards_written"] for s in summaries) == shards
    assert sum(s["shards_lost_to_another_writer"] for s in summaries) == shards
    assert not list(out.glob("*.partial"))
    convert(source, out, samples_per_shard=PER_SHARD, merge=True, progress=False)
    assert verify(out) == []
    single = tmp_path / "single"
    convert(source, single, samples_per_shard=PER_SHARD, progress=False)
    assert read_info(out)["splits"] == read_info(single)["splits"]


def _merge_with_a_slow_write(barrier, source: Path, out: Path, split: str) -> int:
    """Merge ``split``, every manifest write held until the other merge also writes (or ``BARRIER_S`` passed).

    Without the manifest lock both merges read the old files before either writes, and
    the last write drops the other split; with it, the first waits at the barrier alone,
    times out and writes, and the second reads what the first wrote.
    """
    real = manifest_module.write_text_atomic

    def slow(path, text):
        try:
            barrier.wait(timeout=BARRIER_S)
        except threading.BrokenBarrierError:
            pass
        real(path, text)

    manifest_module.write_text_atomic = slow
    return convert(source, out, split=split, samples_per_shard=PER_SHARD, merge=True, progress=False)["num_samples"]


def test_two_splits_merged_at_once_both_land_in_info_and_errors(tmp_path, dt_imagefolder):
    out = tmp_path / "out"
    sources = {split: source_with_a_broken_file(lambda counts, name=split: dt_imagefolder(counts, name=name))
               for split in ("train", "val")}
    for split, source in sources.items():
        convert(source, out, split=split, samples_per_shard=PER_SHARD, part=Part(0, 1), progress=False)
    assert in_forked_processes(_merge_with_a_slow_write, *[(s, out, n) for n, s in sources.items()]) == [12, 12]
    assert sorted(read_info(out)["splits"]) == ["train", "val"]
    assert sorted(e["split"] for e in read_errors(out)) == ["train", "val"]
    assert not list(out.glob(".*.tmp")) and not (out / "_work").exists()
    assert verify(out) == []


def test_a_killed_manifest_writers_temporary_files_go_with_the_next_lock(tmp_path):
    out = tmp_path
    left = [out / "._info.json.0123abcd.tmp", out / ".classes.json.4567.tmp", out / "._errors.jsonl.89.tmp"]
    other = out / ".train-000001.tar.idx.ab.tmp"  # a shard index's: not the manifest lock's to delete
    for path in left + [other]:
        path.write_text("half")
    manifest_module.write_split(out, "train", {"name": "train", "filenames": [], "shard_lengths": [],
                                               "num_samples": 0}, "ds")
    assert [p.exists() for p in left] == [False, False, False] and other.exists()
    assert read_info(out)["splits"]["train"]["num_samples"] == 0


def test_a_manifest_update_waits_for_a_live_holder_and_takes_a_killed_ones_lock_over(tmp_path):
    lock = tmp_path / manifest_module.LOCK_FILE
    entry = {"name": "train", "filenames": [], "shard_lengths": [], "num_samples": 0}
    update = threading.Thread(target=manifest_module.write_split, args=(tmp_path, "train", entry, "ds"))
    with lockfile.hold(lock):
        update.start()
        update.join(timeout=2 * lockfile.POLL_S)
        assert update.is_alive() and not (tmp_path / "_info.json").exists()
    update.join(timeout=10 * lockfile.POLL_S)
    assert not update.is_alive() and "train" in read_info(tmp_path)["splits"] and not lock.exists()

    lock.write_text("deadtoken node1 pid 1\n")  # a merge killed while holding it
    stale(lock)
    manifest_module.write_split(tmp_path, "val", entry, "ds")
    assert sorted(read_info(tmp_path)["splits"]) == ["train", "val"] and not lock.exists()


def test_releasing_the_plan_lock_leaves_a_lock_another_process_took_over(tmp_path):
    work = tmp_path / "work"
    lock = work / planfile.LOCK

    def build():
        assert lockfile.token_of(lock)  # held, with our token
        lock.write_text("othertoken node9 pid 77\n")  # our lock was taken over; a live holder has it now
        raise RuntimeError("planning failed")

    with pytest.raises(RuntimeError, match="planning failed"):
        planfile.load_or_build(work, build)
    assert lock.read_text() == "othertoken node9 pid 77\n"
    assert sorted(p.name for p in work.iterdir()) == [planfile.LOCK]


def stale(path: Path) -> None:
    old = time.time() - lockfile.STALE_S - 5
    os.utime(path, (old, old))


def test_a_stale_take_over_does_not_remove_a_lock_renewed_since_it_looked(tmp_path, monkeypatch):
    lock = tmp_path / planfile.LOCK
    lock.write_text("deadtoken node1 pid 1\n")
    stale(lock)
    real_rename = os.rename

    def rename(src, dst):  # between the waiter's look and its move, another waiter takes over and a new holder locks
        if Path(src) == lock and lock.read_text().startswith("deadtoken"):
            lock.unlink()
            lock.write_text("livetoken node2 pid 2\n")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    lockfile._take_over_if_stale(lock)
    assert lock.read_text() == "livetoken node2 pid 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [planfile.LOCK]


@pytest.mark.parametrize("content, refreshed, removed", [
    ("deadtoken node1 pid 1\n", False, True),      # the lock the waiter saw go stale
    ("deadtoken node1 pid 1\n", True, False),      # same holder, refreshed since: alive after all
    ("othertoken node2 pid 2\n", False, False),    # another holder's, even a stale one
])
def test_compare_and_delete_removes_only_the_expected_stale_lock(tmp_path, content, refreshed, removed):
    lock = tmp_path / planfile.LOCK
    lock.write_text(content)
    if not refreshed:
        stale(lock)
    assert lockfile._compare_and_delete(lock, "deadtoken", if_stale=True) is removed
    assert lock.exists() is not removed
    assert len(list(tmp_path.iterdir())) == (0 if removed else 1)


def test_the_next_planner_deletes_a_killed_planners_temporary_files_only(tmp_path, dt_imagefolder):
    source, out = dt_imagefolder(COUNTS), tmp_path / "out"
    work = out / "_work" / "train"
    work.mkdir(parents=True)
    killed, live = work / ".plan-samples.npy.dead.tmp", work / ".plan-names.bin.live.tmp"
    for path in (killed, live):
        path.write_bytes(b"\0" * 64)
    stale(killed)
    convert(source, out, samples_per_shard=PER_SHARD, part=Part(0, 2), progress=False)
    assert not killed.exists() and live.exists()


def test_partial_shards_of_dead_writers_go_at_part_start_and_all_at_the_merge(tmp_path, dt_imagefolder):
    source, out = dt_imagefolder(COUNTS), tmp_path / "out"
    out.mkdir()
    gone = _dead_pid()
    host = socket.gethostname()
    dead = out / f"train-000001.tar.{host}~{gone}~aa.partial"
    alive = out / f"train-000003.tar.{host}~{os.getpid()}~bb.partial"
    elsewhere = out / f"train-000005.tar.node-elsewhere~{gone}~cc.partial"
    other_split = out / f"val-000001.tar.{host}~{gone}~dd.partial"
    same_prefix = out / f"train-hard-000001.tar.{host}~{gone}~ee.partial"  # split "train-hard": not train's
    for path in (dead, alive, elsewhere, other_split, same_prefix):
        path.write_bytes(b"half a shard")
    assert writer_id().startswith(f"{host}~{os.getpid()}~")

    convert(source, out, samples_per_shard=PER_SHARD, part=Part(0, 2), progress=False)
    assert [p.exists() for p in (dead, alive, elsewhere, other_split, same_prefix)] == [False, True, True, True, True]
    convert(source, out, samples_per_shard=PER_SHARD, part=Part(1, 2), progress=False)
    convert(source, out, samples_per_shard=PER_SHARD, merge=True, progress=False)
    assert [p.exists() for p in (alive, elsewhere, other_split, same_prefix)] == [False, False, True, True]
    assert verify(out) == []


def _dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
