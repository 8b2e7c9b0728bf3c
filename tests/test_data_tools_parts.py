"""``convert --part I/N`` + ``--merge``: N independent processes give exactly the single-process result.

The reference is a plain single-process conversion of the same source; parts run
as concurrent CLI subprocesses (they race on the plan, ``classes.json`` and the
foreign-shard check, as SLURM array tasks do).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from data_tools.__main__ import main
from data_tools.convert import ConversionError, convert
from data_tools.manifest import read_info
from data_tools.plan import Part
from data_tools.verify import verify, verify_merge

COUNTS = {"ant": 9, "bee": 8, "cow": 7}
PER_SHARD = 2  # 24 images -> 12 shards, 4 per part of 3


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("train-*.tar"))}


def cli(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_tools", "convert", str(source), str(out), "--samples-per-shard",
            str(PER_SHARD), "--no-progress", *extra]


def test_concurrent_parts_then_merge_equal_a_single_process_conversion(tmp_path, dt_imagefolder):
    source = dt_imagefolder(COUNTS)
    single, parted = tmp_path / "single", tmp_path / "parted"
    convert(source, single, samples_per_shard=PER_SHARD, name="src", progress=False)

    procs = [subprocess.Popen(cli(source, parted, "--part", f"{i}/3"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    assert all("4 shards (4 written now)" in text for text in outputs), outputs
    assert not (parted / "_info.json").exists() and (parted / "_work" / "train" / "plan.json").is_file()
    assert not list(parted.glob(".*.tmp"))
    assert shard_bytes(parted).keys() == shard_bytes(single).keys()

    done = subprocess.run(cli(source, parted, "--merge"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "0 written now" in done.stdout
    assert shard_bytes(parted) == shard_bytes(single)
    assert read_info(parted) == read_info(single)
    assert (parted / "classes.json").read_text() == (single / "classes.json").read_text()
    assert not (parted / "_work").exists()
    assert verify(parted) == []


def test_parts_write_only_their_round_robin_shards_and_resume(tmp_path, dt_imagefolder):
    source = dt_imagefolder(COUNTS)
    out = tmp_path / "out"
    first = convert(source, out, samples_per_shard=PER_SHARD, part=Part(1, 3), progress=False)
    assert (first["shards"], first["shards_written"], first["planned_samples"]) == (4, 4, 8)
    assert sorted(p.name for p in out.glob("train-*.tar")) == [f"train-{i:06d}.tar" for i in (1, 4, 7, 10)]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    again = convert(source, out, samples_per_shard=PER_SHARD, part=Part(1, 3), progress=False)
    assert again["shards_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")} == before


def test_merge_with_a_part_missing_names_the_missing_shards_and_writes_nothing(tmp_path, dt_imagefolder, capsys):
    source = dt_imagefolder(COUNTS)
    out = tmp_path / "out"
    for index in (0, 2):
        convert(source, out, samples_per_shard=PER_SHARD, part=Part(index, 3), progress=False)
    written = shard_bytes(out)
    assert main(["convert", str(source), str(out), "--samples-per-shard", str(PER_SHARD), "--merge"]) == 1
    error = capsys.readouterr().err
    assert "4 of 12 planned shards are missing" in error
    assert all(f"train-{i:06d}.tar" in error for i in (1, 4, 7, 10)), error
    assert "train-000000.tar" not in error and "--part I/N" in error
    assert shard_bytes(out) == written and not (out / "_info.json").exists()

    convert(source, out, samples_per_shard=PER_SHARD, part=Part(1, 3), progress=False)
    summary = convert(source, out, samples_per_shard=PER_SHARD, merge=True, progress=False)
    assert summary["num_samples"] == sum(COUNTS.values()) and summary["shards_written"] == 0
    assert verify(out) == []
    assert convert(source, out, samples_per_shard=PER_SHARD, merge=True, progress=False)["shards"] == 12


def test_a_different_dataset_is_still_refused_but_another_parts_shards_are_not(tmp_path, dt_imagefolder):
    source = dt_imagefolder(COUNTS)
    out = tmp_path / "out"
    convert(source, out, samples_per_shard=PER_SHARD, part=Part(0, 2), progress=False)
    convert(source, out, samples_per_shard=PER_SHARD, part=Part(1, 2), progress=False)  # sees part 0's shards
    with pytest.raises(ConversionError, match="unfinished conversion .* other images or settings"):
        convert(source, out, samples_per_shard=PER_SHARD + 1, part=Part(0, 2), progress=False)
    with pytest.raises(ConversionError, match="unfinished conversion"):
        convert(source, out, samples_per_shard=PER_SHARD, seed=1, merge=True, progress=False)


@pytest.mark.parametrize("text, message", [
    ("3/3", "index must be in 0..2"), ("0/0", "at least 1"), ("-1/3", "not understood"),
    ("1", "not understood"), ("a/b", "not understood"), ("1/2/3", "not understood"),
])
def test_bad_part_values_are_rejected_with_the_reason(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path), str(tmp_path / "out"), f"--part={text}"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_part_and_merge_exclude_each_other(tmp_path, dt_imagefolder):
    with pytest.raises(ValueError, match="either part .* or merge"):
        convert(dt_imagefolder(COUNTS), tmp_path / "out", part=Part(0, 2), merge=True, progress=False)
    assert Part.parse(" 2 / 5 ") == Part(2, 5) and [i for i in range(12) if Part(2, 5).owns(i)] == [2, 7]
    assert str(Part(2, 5)) == "2/5"


def test_verify_merge_finds_what_every_part_run_misses(tmp_path, dt_imagefolder, capsys):
    """Keys repeated in shards of two parts and a wrong total pass every ``verify --part``; ``--merge`` names them."""
    source, out = dt_imagefolder(COUNTS), tmp_path / "out"
    for index in range(2):
        convert(source, out, samples_per_shard=PER_SHARD, part=Part(index, 2), progress=False)
    convert(source, out, samples_per_shard=PER_SHARD, merge=True, progress=False)
    assert verify_merge(out) == []
    for suffix in ("", ".idx"):  # shard 1 (part 1) becomes a copy of shard 0 (part 0), manifest updated to match
        (out / f"train-000001.tar{suffix}").write_bytes((out / f"train-000000.tar{suffix}").read_bytes())
    info = json.loads((out / "_info.json").read_text())
    entry = info["splits"]["train"]
    entry["sha256"][1] = entry["sha256"][0]
    entry["num_samples"] += 1
    (out / "_info.json").write_text(json.dumps(info))
    keys = [s["__key__"] for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)]

    assert [verify(out, part=Part(index, 2)) for index in range(2)] == [[], []]
    assert verify_merge(out, workers=2) == [f"train-000001.tar sample {key}: key used twice in this split"
                                            for key in keys] + [
        "split train: num_samples 25 != sum of shard_lengths (24)",
        "split train: num_samples 25 != sum of per-class counts (24)"]
    assert main(["verify", str(out), "--merge"]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 4

    (out / "train-000001.tar.idx").unlink()  # rebuilt from the tar headers: the repeat cannot hide
    (out / "train-000003.tar.idx").write_text((out / "train-000005.tar.idx").read_text())  # another shard's
    assert len(verify_merge(out)) == 4
    assert verify(out, part=Part(1, 2)) == [
        "train-000003.tar: its index train-000003.tar.idx lists other keys than the shard holds: rebuild it with "
        f"`python -m data_tools index {out} --force`"]


def test_verify_part_and_merge_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(tmp_path), "--part", "0/2", "--merge"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
