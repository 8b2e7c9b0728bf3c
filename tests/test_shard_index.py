"""Per-shard sample index (``data_tools.index``): offsets from tar headers, the ``index`` command, staleness."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from data_tools.__main__ import main as data_tools_main
from data_tools.index import build_index, index_path, read_index, stale_reason


def _members(shard: Path, offset: int, length: int) -> dict[str, bytes]:
    with open(shard, "rb") as f:
        f.seek(offset)
        chunk = f.read(length)
    with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive}


def test_each_range_holds_exactly_its_samples_members(st_make_shards) -> None:
    shards = st_make_shards([5, 3])
    for shard in sorted(shards.glob("*.tar")):
        index = build_index(shard)
        expected = list(wds.WebDataset(str(shard), shardshuffle=False))
        assert index.keys == [s["__key__"] for s in expected]
        for offset, length, sample in zip(index.offsets, index.lengths, expected):
            members = _members(shard, offset, length)
            assert members == {f"{sample['__key__']}.{ext}": sample[ext] for ext in sample
                               if not ext.startswith("__")}


def test_index_command_writes_and_keeps_current_indexes(st_make_shards, tmp_path: Path, capsys) -> None:
    shards = st_make_shards([4, 2, 3])
    assert data_tools_main(["index", str(shards)]) == 0
    assert "3 shard indexes written, 0 already current" in capsys.readouterr().out
    assert data_tools_main(["index", str(shards)]) == 0
    assert "0 shard indexes written, 3 already current" in capsys.readouterr().out
    first = shards / "train-000000.tar"
    assert read_index(first).keys == [f"s{i:06d}" for i in range(4)]
    with open(first, "ab") as f:  # the shard changed: its index is stale, and the command rebuilds it
        f.write(b"\0" * 1024)
    assert "its index was built for" in stale_reason(first, read_index(first))
    assert data_tools_main(["index", str(shards)]) == 0
    assert "1 shard indexes written, 2 already current" in capsys.readouterr().out
    assert stale_reason(first, read_index(first)) is None
    index_path(first).write_text("garbage\n")
    with pytest.raises(ValueError, match="is not a vitscale shard index"):
        read_index(first)
    (shards / "train-000001.tar").write_bytes(b"not a tar" * 100)
    assert data_tools_main(["index", str(shards), "--force"]) == 1
    assert "train-000001.tar is not a readable tar file" in capsys.readouterr().err


def test_converter_writes_each_shards_index_equal_to_one_built_from_its_headers(tmp_path: Path) -> None:
    """The converter counts offsets while writing; the reader must get what reading the headers gives."""
    from data_tools.demo import write_demo

    shards = sorted(Path(write_demo(tmp_path)).glob("*.tar"))
    assert shards
    for shard in shards:
        written, built = read_index(shard), build_index(shard)
        assert written is not None, f"no index written beside {shard.name}"
        assert (written.keys, written.offsets, written.lengths, written.shard_bytes) == \
            (built.keys, built.offsets, built.lengths, built.shard_bytes)
