"""data_tools: sources, class maps, manifest, shuffling/keys, bad input, verify, info, timm as independent reader."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.__main__ import main
from data_tools.convert import ConversionError, convert
from data_tools.manifest import read_errors, read_info, read_split
from data_tools.plan import parse_size, sample_key
from data_tools.verify import verify

COUNTS = {"cat": 7, "dog": 5, "n01440764": 6}


def read_samples(out: Path, split: str = "train") -> list[dict]:
    """Every sample of a split, read with webdataset (shard order), json sidecar parsed."""
    shards, lengths, _ = read_split(out, split)
    samples = []
    for shard, length in zip(shards, lengths):
        got = [dict(s, meta=json.loads(s["json"])) for s in wds.WebDataset(str(shard), shardshuffle=False)]
        assert len(got) == length, shard
        samples += got
    return samples


def image_ext(sample: dict) -> str:
    (ext,) = [e for e in ("jpg", "png", "webp") if e in sample]
    return ext


def source_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_imagefolder_samples_labels_keys_and_manifest(tmp_path, dt_imagefolder):
    root = dt_imagefolder(COUNTS)
    out = tmp_path / "out"
    summary = convert(root, out, samples_per_shard=4, progress=False)

    files = source_files(root)
    samples = read_samples(out)
    assert summary["num_samples"] == len(files) == len(samples) == 18
    classes = json.loads((out / "classes.json").read_text())
    assert classes == sorted(COUNTS)
    for s in samples:  # original bytes, label of the class folder, key from the path
        rel = s["meta"]["path"]
        assert s["jpg"] == files[rel]
        assert classes[int(s["cls"])] == rel.split("/")[0]
        assert s["__key__"] == sample_key(rel) and "." not in s["__key__"]
        assert (s["meta"]["width"], s["meta"]["height"]) == Image.open(io.BytesIO(files[rel])).size
    assert sorted(s["meta"]["path"] for s in samples) == sorted(files)

    entry = read_info(out)["splits"]["train"]
    assert entry["filenames"] == [f"train-{i:06d}.tar" for i in range(5)]
    assert entry["shard_lengths"] == [4, 4, 4, 4, 2] and entry["num_samples"] == 18
    assert entry["sha256"] == [hashlib.sha256((out / n).read_bytes()).hexdigest() for n in entry["filenames"]]
    assert not (out / "_work").exists() and not list(out.glob("*.partial"))
    assert verify(out) == []


def test_class_tars_give_the_same_samples_as_the_unpacked_folder(tmp_path, dt_imagefolder, dt_class_tars):
    tars = dt_class_tars(COUNTS, prefix={"dog": "./"})
    root = dt_imagefolder(COUNTS)  # the folder the tars were packed from
    convert(root, tmp_path / "a", samples_per_shard=5, progress=False)
    summary = convert(tars, tmp_path / "b", samples_per_shard=5, progress=False)  # format detected

    assert summary["num_samples"] == 18
    a, b = read_samples(tmp_path / "a"), read_samples(tmp_path / "b")
    shard_of = lambda samples: {s["__key__"]: (i // 5, s["cls"], s["jpg"]) for i, s in enumerate(samples)}  # noqa: E731
    assert shard_of(a) == shard_of(b)  # the same shard for every sample, whatever the source layout
    for start in range(0, 18, 5):  # within a shard: each tar's members together, in their order in the tar
        names = [s["meta"]["path"] for s in b[start:start + 5]]
        classes = [n.split("/")[0] for n in names]
        runs = [cls for i, cls in enumerate(classes) if i == 0 or classes[i - 1] != cls]
        assert len(runs) == len(set(runs))
        assert names == sorted(names, key=lambda n: (runs.index(n.split("/")[0]), int(n.split("_")[1][:-4])))
    assert list((tmp_path / "b").iterdir())  # nothing unpacked next to the tars
    assert sorted(p.name for p in tars.iterdir()) == [f"{c}.tar" for c in sorted(COUNTS)]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_list_with_numeric_labels(tmp_path, dt_make_image, suffix):
    (tmp_path / "img").mkdir()
    rows = [["path", "label"]]
    for i in range(9):
        (tmp_path / "img" / f"{i}.png").write_bytes(dt_make_image((9, 9), fmt="PNG", seed=i))
        rows.append([f"img/{i}.png", ("2", "10", "7")[i % 3]])
    rows += [["img/missing.png", "2"], ["only-one-field"], ["img/0.png", "7"]]
    listing = tmp_path / f"list{suffix}"
    with open(listing, "w", newline="") as handle:
        csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",").writerows(rows)

    summary = convert(listing, tmp_path / "out", samples_per_shard=4, progress=False)

    assert summary["num_samples"] == 9 and summary["skipped"] == 3
    assert json.loads((tmp_path / "out/classes.json").read_text()) == ["2", "7", "10"]  # numeric order
    labels = {s["meta"]["path"]: int(s["cls"]) for s in read_samples(tmp_path / "out")}
    assert labels == {f"img/{i}.png": {"2": 0, "7": 1, "10": 2}[("2", "10", "7")[i % 3]] for i in range(9)}
    reasons = {e["path"]: e["reason"] for e in read_errors(tmp_path / "out")}
    assert "cannot read" in reasons["img/missing.png"]
    assert any("expected 2 fields" in r for r in reasons.values())
    assert any("duplicate entry" in r for r in reasons.values())


def test_val_split_uses_train_class_indices(tmp_path, dt_imagefolder):
    out = tmp_path / "out"
    convert(dt_imagefolder(COUNTS, "train"), out, samples_per_shard=8, progress=False)
    convert(dt_imagefolder({"n01440764": 3}, "val"), out, split="val", progress=False)  # reuses classes.json

    info = read_info(out)
    assert set(info["splits"]) == {"train", "val"} and info["splits"]["val"]["num_samples"] == 3
    assert {int(s["cls"]) for s in read_samples(out, "val")} == {2}
    shards, lengths, classes = read_split(out, "val")
    assert [p.name for p in shards] == ["val-000000.tar"] and lengths == [3] and classes == sorted(COUNTS)

    with pytest.raises(ConversionError, match="not in the class map"):
        convert(dt_imagefolder({"zebra": 2}, "bad"), out, split="test", progress=False)
    assert not list(out.glob("test-*"))


@pytest.mark.parametrize("kind", ["txt", "name_to_index", "index_to_name"])
def test_given_class_map(tmp_path, dt_imagefolder, kind):
    order = ["n01440764", "dog", "cat", "unused"]
    path = tmp_path / ("map.txt" if kind == "txt" else "map.json")
    if kind == "txt":
        path.write_text("\n".join(order) + "\n")
    elif kind == "name_to_index":
        path.write_text(json.dumps({n: i for i, n in enumerate(order)}))
    else:
        path.write_text(json.dumps({str(i): n for i, n in enumerate(order)}))
    out = tmp_path / "out"
    convert(dt_imagefolder(COUNTS), out, class_map=path, progress=False)

    assert json.loads((out / "classes.json").read_text()) == order
    assert Counter(int(s["cls"]) for s in read_samples(out)) == {order.index(c): n for c, n in COUNTS.items()}


def test_bad_class_map_is_rejected(tmp_path, dt_imagefolder):
    gap = tmp_path / "gap.json"
    gap.write_text(json.dumps({"cat": 0, "dog": 2}))
    with pytest.raises(ValueError, match="without gaps"):
        convert(dt_imagefolder(COUNTS), tmp_path / "out", class_map=gap, progress=False)


def test_shuffle_is_seeded_mixes_classes_and_output_is_reproducible(tmp_path, dt_imagefolder):
    root = dt_imagefolder({"a": 20, "b": 20, "c": 20})
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        convert(root, tmp_path / name, samples_per_shard=10, seed=seed, progress=False)
    s0, again, s1 = (read_samples(tmp_path / n) for n in ("s0", "s0_again", "s1"))

    assert read_info(tmp_path / "s0")["splits"]["train"]["sha256"] == \
        read_info(tmp_path / "s0_again")["splits"]["train"]["sha256"]
    assert [s["__key__"] for s in s0] == [s["__key__"] for s in again]
    assert [s["__key__"] for s in s0] != [s["__key__"] for s in s1]
    assert sorted(s["__key__"] for s in s0) == sorted(s["__key__"] for s in s1)
    assert len({s["__key__"] for s in s0}) == 60
    for start in range(0, 60, 10):  # no shard holds one class
        assert len({s["cls"] for s in s0[start:start + 10]}) > 1


def test_shard_size_limit_in_bytes(tmp_path, dt_imagefolder):
    root = dt_imagefolder({"a": 6, "b": 6})
    sizes = sorted(p.stat().st_size for p in root.rglob("*.jpg"))
    limit = 3 * sizes[-1]
    convert(root, tmp_path / "out", shard_size=limit, progress=False)
    shards, lengths, _ = read_split(tmp_path / "out", "train")
    assert len(shards) > 1 and sum(lengths) == 12
    for s in read_samples(tmp_path / "out"):
        assert len(s["jpg"]) <= limit
    assert parse_size("1GB") == 10**9 and parse_size("256MiB") == 256 * 2**20
    with pytest.raises(ValueError, match="not understood"):
        parse_size("lots")


def test_bad_and_unusual_images(tmp_path, dt_make_image):
    root = tmp_path / "src"
    for folder in ("good", "bad", "empty"):
        (root / folder).mkdir(parents=True)
    jpeg = dt_make_image((160, 120), seed=5)
    high = (np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100)
    buf = io.BytesIO()
    Image.fromarray(high).save(buf, format="PNG")
    bmp = io.BytesIO()
    Image.open(io.BytesIO(dt_make_image((10, 8), fmt="PNG", seed=6))).save(bmp, format="BMP")
    png = bytearray(dt_make_image((40, 30), fmt="PNG", seed=8))
    png[len(png) // 2] ^= 0xFF  # CRC of the image data no longer matches
    kept = {
        "good/cmyk.jpg": dt_make_image((10, 8), mode="CMYK", seed=1),
        "good/grey.png": dt_make_image((10, 8), mode="L", fmt="PNG", seed=2),
        "good/rgba.png": dt_make_image((10, 8), mode="RGBA", fmt="PNG", seed=3),
        "good/café_ü.jpg": dt_make_image((10, 8), seed=4),
        "good/grey.webp": dt_make_image((10, 8), mode="L", fmt="WEBP", seed=7),
    }
    converted = {"good/deep.png": buf.getvalue(), "good/pic.bmp": bmp.getvalue()}
    broken = {
        "bad/zero.jpg": (b"", "zero-byte"),
        "bad/notes.txt": (b"just some text\n", "not an image"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "bad/flipped.png": (bytes(png), "corrupt PNG"),
        "bad/garbage.jpg": (b"\xff\xd8\xff" + bytes(range(256)) * 4, "not an image"),
    }
    for rel, data in {**kept, **converted, **{k: v for k, (v, _) in broken.items()}}.items():
        (root / rel).write_bytes(data)
    (root / "bad" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    broken["bad/dangling.jpg"] = (b"", "cannot read file")

    summary = convert(root, tmp_path / "out", progress=False)

    samples = {s["meta"]["path"]: s for s in read_samples(tmp_path / "out")}
    assert set(samples) == set(kept) | set(converted)
    for rel, data in kept.items():  # original bytes, whatever the mode
        assert samples[rel][image_ext(samples[rel])] == data
    deep = Image.open(io.BytesIO(samples["good/deep.png"]["png"]))
    assert deep.mode == "RGB"  # 16-bit rescaled, not clipped to white
    np.testing.assert_allclose(np.asarray(deep)[..., 0], high / 257.0, atol=1)
    bmp_back = Image.open(io.BytesIO(samples["good/pic.bmp"]["png"]))
    assert bmp_back.mode == "RGB"
    assert np.array_equal(np.asarray(bmp_back), np.asarray(Image.open(bmp).convert("RGB")))

    reasons = {e["path"]: e["reason"] for e in read_errors(tmp_path / "out")}
    for rel, (_, reason) in broken.items():
        assert reason in reasons[rel], (rel, reasons[rel])
    assert "empty class folder" in reasons["empty/"]
    assert summary["skipped"] == len(broken) + 1
    assert json.loads((tmp_path / "out/classes.json").read_text()) == ["bad", "empty", "good"]
    assert verify(tmp_path / "out") == []


def test_resize_max_reencodes_only_large_images(tmp_path, dt_make_image):
    root = tmp_path / "src" / "x"
    root.mkdir(parents=True)
    large, small = dt_make_image((80, 60), fmt="PNG", seed=1), dt_make_image((20, 10), seed=2)
    (root / "large.png").write_bytes(large)
    (root / "small.jpg").write_bytes(small)
    convert(root.parent, tmp_path / "out", resize_max=40, quality=80, progress=False)

    samples = {s["meta"]["path"]: s for s in read_samples(tmp_path / "out")}
    assert samples["x/small.jpg"]["jpg"] == small
    shrunk = Image.open(io.BytesIO(samples["x/large.png"]["jpg"]))
    assert (shrunk.format, shrunk.mode, shrunk.size) == ("JPEG", "RGB", (40, 30))
    reference = Image.open(io.BytesIO(large)).convert("RGB").resize((40, 30), Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(shrunk, float) - np.asarray(reference, float)).mean() < 6


def test_errors_before_any_work(tmp_path, dt_imagefolder, capsys):
    root = dt_imagefolder({"a": 3})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match="not a directory|not writable"):
        convert(root, tmp_path / "file", progress=False)
    with pytest.raises(ConversionError, match="not writable"):
        convert(root, tmp_path / "file" / "sub", progress=False)
    with pytest.raises(ValueError, match="not both"):
        convert(root, tmp_path / "out", samples_per_shard=2, shard_size="1GB", progress=False)

    out = tmp_path / "out"
    convert(root, out, samples_per_shard=2, progress=False)
    again = convert(root, out, samples_per_shard=2, progress=False)
    assert again["shards_written"] == 0 and again["num_samples"] == 3
    with pytest.raises(ConversionError, match="already holds split 'train'"):
        convert(root, out, samples_per_shard=3, progress=False)

    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_summary_counts_skipped_images_by_reason(tmp_path, dt_imagefolder, capsys):
    root = dt_imagefolder({"a": 3})
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "notes.txt").write_text("hello")
    assert main(["convert", str(root), str(tmp_path / "out"), "--no-progress", "--samples-per-shard", "2"]) == 0
    report = capsys.readouterr().out
    assert "train: 3 samples in 3 shards (3 written now), 2 skipped" in report
    assert "skipped 1: zero-byte file" in report and "skipped 1: not an image" in report


def test_nothing_convertible_exits_non_zero(tmp_path, capsys):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(b"nope")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "no image" in capsys.readouterr().err
    assert read_errors(tmp_path / "out")[0]["path"] == "a/x.jpg"


def test_verify_names_a_tampered_shard(tmp_path, dt_imagefolder, capsys):
    out = tmp_path / "out"
    convert(dt_imagefolder(COUNTS), out, samples_per_shard=6, progress=False)
    assert main(["verify", str(out)]) == 0

    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    first = tarfile.open(shard).getmembers()
    image = next(m for m in first if m.name.endswith(".jpg"))
    for i in range(image.offset_data + 200, image.offset_data + image.size - 2):  # wipe the entropy data
        data[i] = 0
    shard.write_bytes(bytes(data))
    (out / "train-000002.tar").unlink()

    assert main(["verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert "train-000001.tar: sha256 differs" in report
    assert f"train-000001.tar sample {image.name.split('.')[0]}: image does not decode" in report
    assert "train-000002.tar: missing" in report
    assert "train-000000.tar" not in report


def test_info_reports_splits_classes_and_sizes(tmp_path, dt_imagefolder, capsys):
    out = tmp_path / "out"
    convert(dt_imagefolder(COUNTS), out, samples_per_shard=6, progress=False)
    assert main(["info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    train = summary["splits"]["train"]
    assert train["classes"] == COUNTS and train["samples"] == 18 and train["shards"] == 3
    assert train["bytes"] == sum(p.stat().st_size for p in out.glob("train-*.tar"))
    sides = [max(Image.open(p).size) for p in (tmp_path / "src").rglob("*.jpg")]
    assert train["max_side"] == max(sides) and sum(train["longer_side"].values()) == 18
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "18 samples in 3 shards" in text and "cat: 7" in text


def test_timm_reads_our_shards(tmp_path, dt_imagefolder):
    from timm.data import create_dataset

    root = dt_imagefolder(COUNTS)
    out = tmp_path / "out"
    convert(root, out, samples_per_shard=5, progress=False, name="tiny")
    dataset = create_dataset("wds/tiny", root=str(out), split="train")
    classes = sorted(COUNTS)
    got = Counter()
    for image, target in dataset:
        assert image.mode == "RGB"
        got[classes[target]] += 1
    assert got == COUNTS


def test_demo_dataset(demo_shards):
    info = read_info(demo_shards)
    assert info["name"] == "digits"
    assert {s: e["num_samples"] for s, e in info["splits"].items()} == {"train": 1497, "val": 300}
    lengths = info["splits"]["train"]["shard_lengths"]
    assert len(lengths) > 2 and len(set(lengths)) > 1
    assert json.loads((demo_shards / "classes.json").read_text()) == [str(d) for d in range(10)]
    from sklearn.datasets import load_digits

    totals = Counter(load_digits().target.tolist())
    samples = read_samples(demo_shards, "val")
    val = Counter(int(s["cls"]) for s in samples)
    train = Counter(int(s["cls"]) for s in read_samples(demo_shards, "train"))
    assert train + val == totals
    assert all(abs(val[d] - 300 * totals[d] / 1797) <= 1 for d in range(10))  # stratified
    image = Image.open(io.BytesIO(samples[0]["png"]))
    assert image.size == (32, 32) and image.mode == "RGB"
    assert all(s["meta"]["path"].split("/")[0] == str(int(s["cls"])) for s in samples)
