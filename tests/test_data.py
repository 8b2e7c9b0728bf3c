"""The streaming input pipeline: even ranks, exact eval coverage, bit-exact resume, corrupt data, transforms.

Two ranks are simulated by building one stream per rank with ``world_size=2``;
every sample of the ``st_make_shards`` fixture has its global index as label, so
labels identify samples.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
from PIL import Image

import pretrain.data as data
import pretrain.transforms as transforms
from pretrain.config import DataConfig
from pretrain.data import StreamPosition, build_eval_stream, build_train_stream
from pretrain.shards import resolve_shards
from pretrain.transforms import BatchPreprocessor, EvalResize, TrainCrop, build_eval_transform, decode_rgb

IMG = 16


def _cfg(shards, **kw) -> DataConfig:
    base = dict(train_shards=str(shards), eval_shards=str(shards), global_batch_size=8, micro_batch_size=2,
                samples_per_epoch=40, num_workers=2, shuffle_buffer=6, eval_split="val")
    return DataConfig(**{**base, **kw})


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_ranks_yield_equal_batches_with_uneven_and_few_shards(st_make_shards):
    # 3 shards of 7, 1 and 12 samples for 2 ranks x 2 workers = 4 readers.
    shards = st_make_shards([7, 1, 12])
    cfg = _cfg(shards)
    streams = [build_train_stream(cfg, img_size=IMG, seed=3, rank=r, world_size=2) for r in (0, 1)]
    # 40 samples per epoch / global batch 8 = 5 steps x (8 / (2 x 2)) = 2 micro-batches each.
    assert [s.batches_per_epoch for s in streams] == [10, 10]
    per_rank = [_take(s, 2 * 10 + 3) for s in streams]
    for stream, batches in zip(streams, per_rank):
        assert stream.position() == StreamPosition(epoch=2, batch=3, lanes=2)
        for images, labels in batches:
            assert images.shape == (2, 3, IMG, IMG) and images.dtype == torch.uint8
            assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 20
    labels = [torch.cat([b[1] for b in batches]) for batches in per_rank]
    assert not torch.equal(labels[0], labels[1]), "ranks must draw different samples"
    assert len(set(torch.cat(labels).tolist())) > 12, "resampling should reach most samples"


def test_resume_reproduces_next_batches_bit_for_bit(st_make_shards):
    shards = st_make_shards([7, 1, 12])
    cfg = _cfg(shards, randaugment=[2, 9], samples_per_epoch=24)  # 6 batches per epoch
    reference = _take(build_train_stream(cfg, img_size=IMG, seed=5, rank=1, world_size=2), 10)
    first = build_train_stream(cfg, img_size=IMG, seed=5, rank=1, world_size=2)
    assert _same(_take(first, 3), reference[:3])
    saved = StreamPosition.from_dict(first.position().to_dict())
    assert saved == StreamPosition(epoch=0, batch=3, lanes=2)
    first.close()
    resumed = build_train_stream(cfg, img_size=IMG, seed=5, rank=1, world_size=2, position=saved)
    assert _same(_take(resumed, 7), reference[3:])  # crosses into epoch 1
    # Another worker count keeps the stream: the lanes come from the saved position.
    single = build_train_stream(_cfg(shards, randaugment=[2, 9], samples_per_epoch=24, num_workers=0),
                                img_size=IMG, seed=5, rank=1, world_size=2, position=StreamPosition(1, 1, 2))
    assert _same(_take(single, 3), reference[7:10])
    other_seed = build_train_stream(cfg, img_size=IMG, seed=6, rank=1, world_size=2, position=saved)
    assert not _same(_take(other_seed, 3), reference[3:6])


def test_fast_forward_decodes_no_skipped_image(st_make_shards, monkeypatch):
    shards = st_make_shards([9, 9])
    cfg = _cfg(shards, num_workers=0)
    reference = _take(build_train_stream(cfg, img_size=IMG, seed=0, rank=0, world_size=2), 6)
    decoded = []
    monkeypatch.setattr(transforms, "decode_rgb", lambda *a, **kw: decoded.append(a[0]) or decode_rgb(*a, **kw))
    resumed = build_train_stream(cfg, img_size=IMG, seed=0, rank=0, world_size=2, position=StreamPosition(0, 5, 1))
    assert _same(_take(resumed, 1), reference[5:])
    assert len(decoded) == cfg.micro_batch_size


def test_train_stream_leaves_the_callers_rng_alone(st_make_shards):
    cfg = _cfg(st_make_shards([5]), num_workers=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _take(build_train_stream(cfg, img_size=IMG, seed=0, rank=0, world_size=1), 2)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("sizes", [[5, 1, 4], [3, 2, 4, 1, 5, 2]], ids=["fewer-shards-than-readers", "more"])
def test_eval_sees_every_sample_exactly_once(st_make_shards, sizes):
    shards = st_make_shards(sizes, split="val")
    cfg = _cfg(shards, eval_batch_size=3)
    seen: Counter = Counter()
    batch_counts = []
    for rank in (0, 1):
        stream = build_eval_stream(cfg, img_size=IMG, rank=rank, world_size=2)
        assert stream.num_samples == sum(sizes)
        batches = list(stream)
        batch_counts.append(len(batches))
        for images, labels in batches:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, IMG, IMG) and 1 <= len(labels) <= 3
            seen.update(labels.tolist())
        assert list(stream) and stream.corrupt_samples == 0  # re-iterable
    assert seen == Counter(range(sum(sizes)))


CORRUPT = {2: "bytes", 5: "truncated", 8: "nocls", 11: "bytes"}


def test_corrupt_samples_are_skipped_and_counted_in_eval(st_make_shards):
    shards = st_make_shards([7, 6], split="val", corrupt=CORRUPT)
    cfg = _cfg(shards, eval_batch_size=4)
    seen, corrupt = Counter(), 0
    for rank in (0, 1):
        stream = build_eval_stream(cfg, img_size=IMG, rank=rank, world_size=2)
        seen.update(label for _, labels in stream for label in labels.tolist())
        corrupt += stream.corrupt_samples
    assert corrupt == len(CORRUPT)
    assert seen == Counter(set(range(13)) - set(CORRUPT))


def test_corrupt_samples_are_replaced_in_train_batches(st_make_shards):
    shards = st_make_shards([7, 6], corrupt=CORRUPT)
    cfg = _cfg(shards, samples_per_epoch=16)
    streams = [build_train_stream(cfg, img_size=IMG, seed=1, rank=r, world_size=2) for r in (0, 1)]
    batches = [_take(s, 12) for s in streams]
    assert sum(s.corrupt_samples for s in streams) > 0
    labels = set(torch.cat([b[1] for rank in batches for b in rank]).tolist())
    assert labels and not labels & set(CORRUPT)
    assert all(images.shape == (2, 3, IMG, IMG) for rank in batches for images, _ in rank)
    resumed = build_train_stream(cfg, img_size=IMG, seed=1, rank=1, world_size=2, position=StreamPosition(1, 1, 2))
    assert _same(_take(resumed, 3), batches[1][5:8])


def test_all_corrupt_batches_are_refilled_and_all_corrupt_data_fails(st_make_shards, monkeypatch):
    good = {3, 10}
    shards = st_make_shards([6, 6], corrupt={i: "bytes" for i in range(12) if i not in good})
    cfg = _cfg(shards, num_workers=0, samples_per_epoch=8, micro_batch_size=4)
    stream = build_train_stream(cfg, img_size=IMG, seed=0, rank=0, world_size=2)
    batches = _take(stream, 4)
    assert set(torch.cat([labels for _, labels in batches]).tolist()) <= good
    assert stream.corrupt_samples >= 4 * 4 - 2 * 4
    monkeypatch.setattr(data, "MAX_CORRUPT_DRAWS", 20)
    hopeless = st_make_shards([5], corrupt={i: "nocls" for i in range(5)}, directory=shards.parent / "bad")
    with pytest.raises(RuntimeError, match="20 samples in a row are corrupt"):
        next(build_train_stream(_cfg(hopeless, num_workers=0), img_size=IMG, seed=0, rank=0, world_size=1))


def test_bad_shard_specs_fail_at_build_time(st_make_shards, tmp_path):
    shards = st_make_shards([2])
    with pytest.raises(ValueError, match="data.train_shards is empty"):
        build_train_stream(DataConfig(train_shards=[]), img_size=IMG, seed=0, rank=0, world_size=1)
    with pytest.raises(FileNotFoundError, match=r"7 of 8 shards do not exist, first .*train-000001.tar"):
        resolve_shards(str(shards / "train-{000000..000007}.tar"), "train")
    with pytest.raises(FileNotFoundError, match="is not a converted shard directory"):
        resolve_shards(str(tmp_path), "train")
    with pytest.raises(KeyError, match="no split 'val'"):
        resolve_shards(str(shards), "val")
    assert resolve_shards([str(shards / "train-000000.tar"), "pipe:cat x.tar"], "train").urls[1] == "pipe:cat x.tar"
    with pytest.raises(ValueError, match="less than one global batch"):
        build_train_stream(_cfg(shards, samples_per_epoch=0), img_size=IMG, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="non-negative ints"):
        StreamPosition.from_dict({"epoch": 1, "batch": -1, "lanes": 2})


def test_pipe_urls_read_like_local_paths(st_make_shards):
    shards = st_make_shards([4, 3], split="val")
    cfg = _cfg(shards, eval_shards=[f"pipe:cat {shards}/val-00000{i}.tar" for i in (0, 1)], num_workers=0)
    stream = build_eval_stream(cfg, img_size=IMG, rank=0, world_size=1)
    assert sorted(label for _, labels in stream for label in labels.tolist()) == list(range(7))


def test_reads_data_tools_shards_like_imagefolder(demo_shards):
    """Shards written by ``data_tools`` (demo digits): eval labels match torchvision's ImageFolder."""
    from torchvision.datasets import ImageFolder

    cfg = DataConfig(train_shards=str(demo_shards), eval_shards=str(demo_shards), global_batch_size=32,
                     micro_batch_size=16, num_workers=2, shuffle_buffer=50, eval_batch_size=64)
    labels: Counter = Counter()
    for rank in (0, 1):
        stream = build_eval_stream(cfg, img_size=32, rank=rank, world_size=2)
        labels.update(label for _, batch in stream for label in batch.tolist())
    folder = ImageFolder(str(demo_shards.parent / "images" / "val"))
    assert stream.num_samples == len(folder) and labels == Counter(folder.targets)
    train = build_train_stream(cfg, img_size=32, seed=0, rank=0, world_size=1)
    images, batch_labels = next(train)
    assert images.shape == (16, 3, 32, 32) and batch_labels.max() < len(folder.classes)


# ---------------------------------------------------------------- transforms


def _photo(size=(300, 200)) -> Image.Image:
    """A smooth image (JPEG-friendly, like a photo) with structure in both directions."""
    x, y = np.meshgrid(np.linspace(0, 6, size[0]), np.linspace(0, 4, size[1]))
    rgb = np.stack([np.sin(x) * np.cos(y), np.cos(x + y), np.sin(x * y / 3)], -1)
    return Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=95)
    return buf.getvalue()


def _decoded(data: bytes) -> torch.Tensor:
    """Full-scale decode, independent of our code: PIL -> RGB -> v2.PILToTensor."""
    return v2.PILToTensor()(Image.open(io.BytesIO(data)).convert("RGB"))


def test_eval_transform_matches_torchvision_resize_center_crop():
    png = _encoded(_photo(), "PNG")
    ours = build_eval_transform(DataConfig(eval_crop_pct=0.875), 56)(png)
    reference = v2.Compose([v2.Resize(64), v2.CenterCrop(56)])(_decoded(png))
    assert ours.dtype == torch.uint8 and torch.equal(ours, reference)
    assert EvalResize(64)(png).shape == (3, 64, 96)
    jpeg = _encoded(_photo((640, 480)), "JPEG")  # decoded at 1/4 scale: 160x120 still >= 64
    ours, reference = EvalResize(64)(jpeg), v2.Resize(64)(_decoded(jpeg))
    assert ours.shape == reference.shape and (ours.float() - reference.float()).abs().mean() < 1.0


@pytest.mark.parametrize("fmt,size", [("PNG", 48), ("JPEG", 48), ("JPEG", 300)])
def test_train_crop_matches_torchvision_random_resized_crop(fmt, size):
    """Same seed, same box as v2.RandomResizedCrop; a JPEG crop >= 2 x size decodes at a reduced DCT scale."""
    data = _encoded(_photo((640, 480)), fmt)
    full = _decoded(data)
    diffs = []
    for seed in range(8):
        torch.manual_seed(seed)
        ours = TrainCrop(size, (0.3, 1.0))(data)
        torch.manual_seed(seed)
        reference = v2.RandomResizedCrop(size, scale=(0.3, 1.0))(full)
        assert ours.shape == (3, size, size) and ours.dtype == torch.uint8
        diffs.append((ours.float() - reference.float()).abs().mean().item())
    if fmt == "JPEG" and size == 48:
        # Every box here is >= 2 x 48 px, so all decode at 1/2 to 1/8 scale; the box edges then round to
        # whole pixels of the reduced image (up to 4 original pixels). A misplaced box differs by tens.
        assert 0 < max(diffs) < 3, diffs
    else:  # full-scale decode (300 px crops of a 640x480 image can never halve)
        assert max(diffs) == 0, diffs


def test_batch_preprocessor_normalisation_and_targets():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    images[0] = 0
    images[1] = 255
    labels = torch.tensor([0, 3, 1, 4])
    x, y = BatchPreprocessor(DataConfig(normalize="imagenet"), 5)(images, labels, "cpu")
    reference = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(images.float() / 255)
    assert x.dtype == torch.float32 and torch.allclose(x, reference, atol=1e-5) and torch.equal(y, labels)
    x, _ = BatchPreprocessor(DataConfig(normalize="inception"), 5)(images, labels, "cpu", dtype=torch.bfloat16)
    assert x.dtype == torch.bfloat16 and x.min() == -1 and x.max() == 1
    _, y = BatchPreprocessor(DataConfig(), 5, target="multihot")(images, labels, "cpu")
    assert torch.equal(y, torch.eye(5)[labels])
    mixer = BatchPreprocessor(DataConfig(mixup=0.8, cutmix=1.0), 5)
    x, y = mixer(images, labels, "cpu")
    assert y.shape == (4, 5) and torch.allclose(y.sum(1), torch.ones(4)) and (y < 1).any()
    _, y = mixer(images, labels, "cpu", train=False)
    assert torch.equal(y, labels)
    with pytest.raises(ValueError, match="model.num_classes"):
        mixer(images, labels + 3, "cpu")
