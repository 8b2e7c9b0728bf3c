"""The train reader's cost and its indexes (``pretrain.data.sample_table``, ``pretrain.data.reader``).

Counts, not timings: opens of shard files per worker over a whole epoch, index files
read by workers, files written into the dataset folder. Stale indexes (a same-size shard
swapped in, a shard of another size, fewer samples than the manifest) fail before launch.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import ConfigError, DataConfig, load_config
from pretrain.data.order import Order
from pretrain.data import reader
from pretrain.data.reader import ShardReader, tar_members
from pretrain.data.sample_table import cached_index_path, sample_table
from pretrain.data.train_stream import build_train_stream
from pretrain.preflight import preflight

REPO = Path(__file__).resolve().parents[1]
IMG = 16


def _copy(demo_shards: Path, to: Path, indexes: bool = True) -> Path:
    shutil.copytree(demo_shards, to, ignore=None if indexes else shutil.ignore_patterns("*.idx"))
    return to


def _preflight_error(shards: Path, cache: Path) -> str:
    cfg = load_config(REPO / "configs" / "pretrain" / "demo.yaml",
                      [f"data.train_shards={shards}", f"data.eval_shards={shards}", f"data.cache_dir={cache}"])
    with pytest.raises(ConfigError) as info:
        preflight(cfg, 1)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_stale_indexes_fail_before_launch_naming_the_shard_and_the_fix(demo_shards: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    swapped = _copy(demo_shards, tmp_path / "swapped")
    first, second = swapped / "train-000001.tar", swapped / "train-000002.tar"
    assert first.stat().st_size == second.stat().st_size  # the demo's shards 1-5 share a size
    first.rename(tmp_path / "moved.tar")
    second.rename(first)
    (tmp_path / "moved.tar").rename(second)
    message = _preflight_error(swapped, cache)
    assert message.startswith(f"data.train_shards: {first}.idx is stale: the tar header at byte 0 names '")
    assert message.endswith(f"rebuild it with `python -m data_tools index --force {swapped}` (or rewrite the shard "
                            "if it is the damaged one)")
    from data_tools.__main__ import main as data_tools_main
    assert data_tools_main(["index", "--force", str(swapped)]) == 0  # the fix the message gives
    preflight(load_config(REPO / "configs" / "pretrain" / "demo.yaml", [
        f"data.train_shards={swapped}", f"data.eval_shards={swapped}", f"data.cache_dir={cache}"]), 1)

    grown = _copy(demo_shards, tmp_path / "grown")
    with open(grown / "train-000003.tar", "ab") as f:
        f.write(b"\0" * 10240)
    assert _preflight_error(grown, cache) == (
        f"data.train_shards: {grown}/train-000003.tar.idx is stale: the shard is 849,920 bytes, its index was built "
        f"for 839,680; rebuild it with `python -m data_tools index --force {grown}` (or rewrite the shard if it is "
        "the damaged one)")

    fewer = _copy(demo_shards, tmp_path / "fewer")
    info = json.loads((fewer / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][0] += 1
    info["splits"]["train"]["num_samples"] += 1
    (fewer / "_info.json").write_text(json.dumps(info))
    assert _preflight_error(fewer, cache) == (
        f"data.train_shards: {fewer}/train-000000.tar holds 200 samples but _info.json says 201: the shard or the "
        f"manifest is damaged; run `python -m data_tools verify {fewer}`")


def test_a_dataset_without_indexes_is_never_written_to(demo_shards: Path, tmp_path: Path) -> None:
    """Indexes go to ``data.cache_dir``; the stream reads the same samples as from the indexed original."""
    bare, cache = _copy(demo_shards, tmp_path / "bare", indexes=False), tmp_path / "cache"
    before = sorted(p.name for p in bare.iterdir())
    cfg = DataConfig(train_shards=str(bare), global_batch_size=32, micro_batch_size=32, num_workers=0,
                     cache_dir=str(cache))
    stream = build_train_stream(cfg, img_size=IMG, seed=1, rank=0, world_size=1)
    images, labels = next(stream)
    keys = stream.last_keys
    assert sorted(p.name for p in bare.iterdir()) == before
    assert all(cached_index_path(str(bare / f"train-{i:06d}.tar"), cache).is_file() for i in range(8))
    assert len(list((cache / "tables").glob("*.npy"))) == 1
    original = build_train_stream(DataConfig(**{**cfg.__dict__, "train_shards": str(demo_shards)}), img_size=IMG,
                                  seed=1, rank=0, world_size=1)
    other_images, other_labels = next(original)
    assert original.last_keys == keys and np.array_equal(other_labels, labels)
    assert np.array_equal(other_images.numpy(), images.numpy())


def test_a_sample_past_a_shards_end_is_a_clear_error(st_make_shards, tmp_path: Path) -> None:
    shards = st_make_shards([3, 2])
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    reader = ShardReader(urls, sample_table(urls, [3, 2], str(tmp_path)))
    assert reader.read(1, 1)["__key__"] == "s000004"
    with pytest.raises(ValueError, match=r"sample 2 is past the end of .*train-000001.tar, which holds 2 samples"):
        reader.read(1, 2)


def test_one_epoch_opens_each_shard_once_per_worker_and_reads_no_index(st_make_shards, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """W = 1, 120 shards of 10 samples, global batch 64 in 4 micro-batches: before the sample table, a
    16-descriptor LRU cycled through the 64 streams' shards and opened about one shard per sample read."""
    lengths = [10] * 120
    shards = st_make_shards(lengths)
    cfg = DataConfig(train_shards=str(shards), global_batch_size=64, micro_batch_size=16, num_workers=2,
                     cache_dir=str(tmp_path / "cache"))
    order = Order(np.array(lengths), 64, 64, seed=0)
    micro_batches = order.steps_per_epoch * 4
    stream = build_train_stream(cfg, img_size=IMG, seed=0, rank=0, world_size=1)
    for _ in range(micro_batches):
        next(stream)
    assert (stream.position().epoch, stream.position().step) == (1, 0)
    touched = Counter()  # shards each worker reads in the epoch, from the order alone
    for micro in range(micro_batches):
        step, k = divmod(micro, 4)
        shard, _ = order.locate(order.samples(0, step, order.micro_slots(0, 1, 16, k)))
        touched.update((micro % 2, s) for s in set(shard.tolist()))
    assert set(stream.shard_opens) == set(touched)
    assert max(stream.shard_opens.values()) == 1, stream.shard_opens.most_common(3)
    assert sum(stream.shard_opens.values()) <= 2 * len(lengths)
    stream.close()

    opened: Counter = Counter()  # the same epoch in-process: the real os.open calls, index files included
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **kw: opened.update([Path(path).suffix]) or
                        real_open(path, *a, **kw))
    single = build_train_stream(DataConfig(**{**cfg.__dict__, "num_workers": 0}), img_size=IMG, seed=0, rank=0,
                                world_size=1)
    for _ in range(micro_batches):
        next(single)
    assert opened[".tar"] == sum(single.shard_opens.values()) == len({s for _, s in touched})
    assert opened[".idx"] == 0


def test_reader_scale_benchmark_counts_one_open_per_shard_where_the_old_reader_reopened(tmp_path: Path) -> None:
    """``benchmarks/reader_scale.py`` at a tenth of ImageNet-21k's shard size (1.4 M samples, 1,400 shards, 8
    ranks): the real reader opens each shard its worker touches once; the replayed old policy reopens."""
    import runpy

    bench = runpy.run_path(str(REPO / "benchmarks" / "reader_scale.py"))
    row = bench["measure"](1400, 8, 8, tmp_path, 0.001, samples=1_400_000)
    assert row["opens"] == row["shards_touched"] and row["max_opens_per_shard"] == 1
    steps, accum = 1_400_000 // 4096, 4096 // (8 * 256)  # micro-batch 256: 2 per rank and step
    assert row["samples_read"] == -(-steps * accum // 8) * 256  # worker 0 of 8 builds every 8th micro-batch
    assert row["baseline_opens"] > 50 * row["opens"], row  # 7,560 vs 88 here


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for info, payload in members:
            info.size = len(payload) if info.isfile() else 0
            archive.addfile(info, io.BytesIO(payload) if info.isfile() else None)
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_reads_what_tarfile_reads(fmt: int) -> None:
    """The reader's header parser against ``tarfile`` itself: plain, empty and 512-byte members, a directory
    and a symlink (skipped), a ustar prefix (a 150-byte path), a long and a non-ASCII name (pax or GNU
    extended headers where the format has them); a damaged header or a cut member fails as tarfile fails."""
    def info(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        made = tarfile.TarInfo(name)
        made.type = kind
        return made

    names = ["a/key.jpg", "a/key.cls", "a/empty.txt", f"{'p' * 120}/{'k' * 30}.json"]
    if fmt != tarfile.USTAR_FORMAT:  # ustar cannot hold these names
        names += [f"{'n' * 140}.jpg", "clé.cls"]
    members = [(info(name), bytes(range(256)) * (i + 1) if i != 2 else b"") for i, name in enumerate(names)]
    members += [(info("a/dir", tarfile.DIRTYPE), b""), (info("a/link", tarfile.SYMTYPE), b""),
                (info("a/block.jpg"), b"x" * 512)]
    data = _tar(members, fmt)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        expected = [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]
    assert len(expected) == len(names) + 1 and tar_members(data) == expected
    with pytest.MonkeyPatch.context() as patch:  # plain ustar headers never need tarfile
        patch.setattr(reader, "_tarfile_members", None)
        assert tar_members(_tar(members[:4] + members[-3:], tarfile.USTAR_FORMAT)) == expected[:4] + expected[-1:]

    damaged = bytearray(data)
    damaged[3] ^= 1  # a name byte of the first header: its checksum fails
    with pytest.raises(tarfile.TarError):
        tar_members(bytes(damaged))
    with pytest.raises(tarfile.TarError):
        tar_members(data[:512 + 100])  # the first member's 256 bytes cut to 100
