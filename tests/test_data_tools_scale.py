"""data_tools at ImageNet-21k scale, on small data: plan once, sequential tar reads, durable shards, parallel verify.

Class-tar sources are built from the tiny JPEG ImageFolder fixture; what is counted
(listings, opens, seeks, fsyncs) is observed by wrapping the standard library calls
the product makes, not by asking the product.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

import data_tools.convert as convert_module
import data_tools.reads as reads_module
from data_tools.__main__ import main
from data_tools.convert import ConversionError, convert
from data_tools.manifest import read_errors, read_info
from data_tools.plan import Part
from data_tools.lockfile import STALE_S
from data_tools.planfile import LOCK
from data_tools.reads import MAX_WAVES
from data_tools.verify import verify

COUNTS = {f"n{i:08d}": 12 + i for i in range(6)}  # 87 images in 6 class tars
PER_SHARD = 4  # 22 shards


@pytest.fixture
def listings(monkeypatch):
    """Counts the calls of ``list_source`` made by the converter."""
    calls = []
    real = convert_module.list_source

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "list_source", counting)
    return calls


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("train-*.tar"))}


def test_concurrent_parts_list_the_source_once_then_read_the_plan(tmp_path, dt_class_tars, listings):
    source, out = dt_class_tars(COUNTS), tmp_path / "out"
    errors = []

    def run(index):
        try:
            convert(source, out, samples_per_shard=PER_SHARD, part=Part(index, 3), progress=False)
        except Exception as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and len(listings) == 1
    assert not (out / "_work" / "train" / LOCK).exists()
    convert(source, out, samples_per_shard=PER_SHARD, merge=True, progress=False)
    assert len(listings) == 1  # the merge read the plan too

    single = tmp_path / "single"
    convert(source, single, samples_per_shard=PER_SHARD, progress=False)
    assert shard_files(out) == shard_files(single)
    assert read_info(out)["splits"] == read_info(single)["splits"]
    assert verify(out) == []
    convert(source, single, samples_per_shard=PER_SHARD, progress=False)  # done: answered without listing
    assert len(listings) == 2


def test_a_stale_plan_lock_is_taken_over(tmp_path, dt_class_tars, listings):
    source, out = dt_class_tars(COUNTS), tmp_path / "out"
    lock = out / "_work" / "train" / LOCK
    lock.parent.mkdir(parents=True)
    lock.write_text("node17 pid 4242\n")
    old = time.time() - STALE_S - 5
    os.utime(lock, (old, old))
    summary = convert(source, out, samples_per_shard=PER_SHARD, part=Part(0, 2), progress=False)
    assert summary["shards_written"] == 11 and len(listings) == 1 and not lock.exists()


def test_each_class_tar_is_opened_a_bounded_number_of_times_per_part_and_read_forward(tmp_path, dt_class_tars,
                                                                                      monkeypatch):
    source, out = dt_class_tars(COUNTS), tmp_path / "out"
    opens: dict[str, list[list[int]]] = defaultdict(list)

    class Recording:
        def __init__(self, handle, seeks):
            self.handle, self.seeks = handle, seeks

        def seek(self, offset):
            self.seeks.append(offset)
            return self.handle.seek(offset)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def recording_open(path, mode="r"):
        opens[Path(path).name].append([])
        return Recording(open(path, mode), opens[Path(path).name][-1])

    monkeypatch.setattr(reads_module, "open", recording_open, raising=False)
    parts = 2
    for index in range(parts):
        opens.clear()
        summary = convert(source, out, samples_per_shard=PER_SHARD, part=Part(index, parts), progress=False)
        assert summary["shards_written"] == 11
        assert set(opens) == {f"{c}.tar" for c in COUNTS}  # every tar feeds this part's 11 shards
        for tar, handles in opens.items():
            assert len(handles) <= MAX_WAVES, (tar, len(handles))
            for seeks in handles:
                assert seeks == sorted(seeks) and len(set(seeks)) == len(seeks)  # member order, each once
        assert sum(map(len, opens.values())) == summary["tar_opens"]
    convert(source, out, samples_per_shard=PER_SHARD, merge=True, progress=False)
    assert read_info(out)["splits"]["train"]["num_samples"] == sum(COUNTS.values()) and verify(out) == []


def test_shards_and_manifests_are_fsynced_before_their_rename_and_the_folder_after(tmp_path, dt_class_tars,
                                                                                  monkeypatch):
    """Manifests are renamed into place, shards linked (first writer wins): both only after an fsync of the data."""
    events = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def recording(kind, real):
        def call(src, dst):
            events.append((kind, str(src), str(dst)))
            return real(src, dst)
        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", recording("rename", real_replace))
    monkeypatch.setattr(os, "link", recording("rename", real_link))
    out = tmp_path / "out"
    convert(dt_class_tars(COUNTS), out, samples_per_shard=PER_SHARD, progress=False)

    renamed = [e for e in events if e[0] == "rename" and not e[2].endswith(".lock")]  # a crash ends a lock anyway
    finals = {Path(dst).name for _, _, dst in renamed}
    assert {f"train-{i:06d}.tar" for i in range(22)} | {"_info.json", "_errors.jsonl", "classes.json"} <= finals
    for _, src, dst in renamed:
        at = events.index(("rename", src, dst))
        assert ("fsync", src) in events[:at], f"{dst} renamed before its data was fsynced"
        assert ("fsync", str(Path(dst).parent)) in events[at + 1:], f"folder of {dst} not fsynced after the rename"


def test_a_shard_truncated_under_its_final_name_is_found_and_rewritten(tmp_path, dt_class_tars, capsys):
    source, out = dt_class_tars(COUNTS), tmp_path / "out"
    args = ["convert", str(source), str(out), "--samples-per-shard", str(PER_SHARD), "--no-progress"]
    assert main(args + ["--part", "0/2"]) == 0
    good = shard_files(out)
    victim = out / "train-000004.tar"
    victim.write_bytes(good[victim.name][: len(good[victim.name]) // 3])  # the rename outlived the data
    same_size = out / "train-000006.tar"
    flipped = bytearray(good[same_size.name])
    flipped[700] ^= 0xFF
    same_size.write_bytes(bytes(flipped))
    capsys.readouterr()

    assert main(args + ["--part", "0/2"]) == 0
    report = capsys.readouterr().out
    assert "rewrote 2 shards" in report and victim.name in report and same_size.name in report
    assert "(2 written now)" in report
    assert shard_files(out) == good

    assert main(args + ["--part", "1/2"]) == 0
    (out / "train-000003.tar").write_bytes(b"")
    changed = bytearray((out / "train-000005.tar").read_bytes())
    changed[900] ^= 0xFF  # same size: only the merge's sha256 sees it
    (out / "train-000005.tar").write_bytes(bytes(changed))
    assert main(args + ["--merge"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert ("2 of 22 shards differ in size or sha256 from what their part recorded (train-000003.tar, "
            "train-000005.tar)") in error
    assert "--part I/N rewrites the shards that do not match), then merge again" in error
    assert not (out / "_info.json").exists()
    assert main(args + ["--part", "1/2"]) == 0 and main(args + ["--merge"]) == 0
    assert verify(out) == []


def test_verify_in_parallel_and_in_parts_gives_the_same_report(tmp_path, dt_class_tars, capsys):
    out = tmp_path / "out"
    convert(dt_class_tars(COUNTS), out, samples_per_shard=PER_SHARD, progress=False)
    shard = out / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    member = next(m for m in tarfile.open(shard).getmembers() if m.name.endswith(".jpg"))
    data[member.offset_data + 100: member.offset_data + member.size - 2] = bytes(member.size - 102)
    shard.write_bytes(bytes(data))
    (out / "train-000009.tar").unlink()
    twin = out / "train-000010.tar"
    twin.write_bytes((out / "train-000011.tar").read_bytes())  # repeats every key of shard 11

    serial = verify(out)
    assert verify(out, workers=2) == serial
    assert any(line.startswith("train-000002.tar sample") and "does not decode" in line for line in serial)
    assert "train-000009.tar: missing" in serial
    assert sum("train-000011.tar sample" in line and "key used twice" in line for line in serial) == PER_SHARD
    in_parts = [line for index in range(3) for line in verify(out, workers=2, part=Part(index, 3))]
    assert sorted(line for line in in_parts if "key used twice" not in line) == \
        sorted(line for line in serial if "key used twice" not in line)
    assert main(["verify", str(out), "--workers", "2"]) == 1
    assert capsys.readouterr().out.splitlines() == serial
    assert main(["verify", str(out), "--workers", "2", "--part", "2/3"]) == 1


def test_every_skipped_file_is_in_the_errors_file_and_the_counts_add_up(tmp_path, dt_class_tars, dt_make_image):
    jpeg = dt_make_image((30, 20), seed=3)
    extra = {"n00000001": [("cut.jpg", jpeg[: len(jpeg) // 2]), ("img_0.jpg", jpeg)],  # cut; a name twice
             "n00000003": [("notes.txt", b"not an image")]}
    source = dt_class_tars(COUNTS, extra=extra)
    (source / "README").write_text("not a tar")
    (source / "n00000009.tar").write_bytes(b"garbage, not a tar archive" * 40)
    out = tmp_path / "out"
    summary = convert(source, out, samples_per_shard=PER_SHARD, progress=False)

    entry = read_info(out)["splits"]["train"]
    reasons = {e["path"]: e["reason"] for e in read_errors(out)}
    assert "truncated" in reasons["n00000001/cut.jpg"].lower() and "not an image" in reasons["n00000003/notes.txt"]
    assert "duplicate entry: listed 2 times" in reasons["n00000001/img_0.jpg"]
    assert "not a .tar file" in reasons["README"] and "n00000009.tar" in reasons  # read as a tar holding nothing
    stats = entry["stats"]
    written_errors = 2  # cut.jpg, notes.txt: planned, read, skipped
    assert stats["planned"] == sum(COUNTS.values()) + written_errors == entry["num_samples"] + written_errors
    paths = sorted(e["path"] for e in read_errors(out))
    assert paths == sorted(["n00000001/cut.jpg", "n00000003/notes.txt", "n00000001/img_0.jpg", "README"]
                           + ["n00000009.tar"] * len([p for p in paths if p == "n00000009.tar"]))
    assert stats["skipped"] == len(paths) == summary["skipped"]
    assert sum(stats["skipped_reasons"].values()) == stats["skipped"]
    assert sum(entry["shard_lengths"]) == entry["num_samples"] == sum(COUNTS.values())


def test_a_part_with_other_settings_or_a_merge_before_any_plan_is_refused(tmp_path, dt_class_tars):
    source, out = dt_class_tars(COUNTS), tmp_path / "out"
    with pytest.raises(ConversionError, match="nothing to merge .* run the --part"):
        convert(source, out, samples_per_shard=PER_SHARD, merge=True, progress=False)
    convert(source, out, samples_per_shard=PER_SHARD, part=Part(0, 2), progress=False)
    with pytest.raises(ConversionError, match="unfinished conversion .* other images or settings"):
        convert(source, out, samples_per_shard=PER_SHARD, part=Part(1, 2), resize_max=8, progress=False)


PLAN_PROBE = """
import resource, sys
from pathlib import Path
from data_tools.plan import make_plan
from data_tools.planfile import write_plan
from data_tools.sources import FileTable, Listing
files, work = int(sys.argv[1]), Path(sys.argv[2])
table = FileTable()
for i in range(files):
    table.add(f"n{i % 500:08d}/n{i % 500:08d}_{i}.JPEG", i % 500, 1000 + i % 97, i % 500, 512 * (1 + i // 500))
listing = Listing(work, table, [f"n{c:08d}" for c in range(500)], [f"n{c:08d}.tar" for c in range(500)])
plan = make_plan("train", listing, listing.class_names, seed=0, samples_per_shard=1000, shard_size=None, options={})
work.mkdir()
write_plan(work, plan, {"settings": {}, "containers": listing.containers, "root": str(work)}, [])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_planning_memory_grows_by_well_under_a_python_object_per_file(tmp_path):
    """Peak RSS growth per listed file, 20k -> 200k files (``benchmarks/convert_throughput.py --scale``
    measures ~75 bytes; one Python tuple per file, as before, costs ~300). The bound is far outside noise."""
    peaks = {}
    for files in (20_000, 200_000):
        done = subprocess.run([sys.executable, "-c", PLAN_PROBE, str(files), str(tmp_path / str(files))],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        peaks[files] = int(done.stdout.split()[-1]) * 1024
    per_file = (peaks[200_000] - peaks[20_000]) / 180_000
    assert per_file < 200, per_file


def test_tars_cut_or_removed_after_planning_are_reported_per_file(tmp_path, dt_class_tars):
    source, out = dt_class_tars(COUNTS), tmp_path / "out"
    convert(source, out, samples_per_shard=PER_SHARD, part=Part(0, 2), progress=False)
    cut = source / "n00000005.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (source / "n00000002.tar").unlink()
    convert(source, out, samples_per_shard=PER_SHARD, part=Part(1, 2), progress=False)
    convert(source, out, samples_per_shard=PER_SHARD, merge=True, progress=False)

    entry = read_info(out)["splits"]["train"]
    errors = read_errors(out)
    gone = [e for e in errors if e["path"].startswith("n00000002/")]
    short = [e for e in errors if e["path"].startswith("n00000005/")]
    assert gone and all("class tar n00000002.tar cannot be opened" in e["reason"] for e in gone)
    assert short and all("ends" in e["reason"] and "bytes early" in e["reason"] for e in short)
    assert len(gone) < COUNTS["n00000002"] and len(short) < COUNTS["n00000005"]  # part 0's shards had them
    assert entry["stats"]["planned"] == sum(COUNTS.values()) == entry["num_samples"] + len(errors)
    assert verify(out) == []
