"""The input pipeline: the order's steps on any world size, exact eval coverage, bit-exact O(1) resume,
corrupt data, bounded memory, transforms.

Several ranks are simulated by building one stream per rank;
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

from pretrain.config import DataConfig
from pretrain.data.eval_stream import build_eval_stream
from pretrain.data.order import Order
from pretrain.data.shards import resolve_shards
import pretrain.data.train_stream as train_stream
from pretrain.data.train_stream import StreamPosition, build_train_stream, loader_memory
import pretrain.data.transforms as transforms
from pretrain.data.transforms import BatchPreprocessor, EvalResize, TrainCrop, build_eval_transform, decode_rgb

IMG = 16


def _cfg(shards, **kw) -> DataConfig:
    base = dict(train_shards=str(shards), eval_shards=str(shards), global_batch_size=8, micro_batch_size=2,
                num_workers=2, eval_split="val")
    return DataConfig(**{**base, **kw})


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def _global_steps(cfg, world_size, steps, seed=3, position=None):
    """Per step, the (label, image) of every slot in slot order, gathered from ``world_size`` rank streams."""
    accum = cfg.global_batch_size // (cfg.micro_batch_size * world_size)
    streams = [build_train_stream(cfg, img_size=IMG, seed=seed, rank=r, world_size=world_size, position=position)
               for r in range(world_size)]
    out = []
    for _ in range(steps):
        batches = [b for s in streams for b in _take(s, accum)]
        out.append((torch.cat([b[1] for b in batches]), torch.cat([b[0] for b in batches])))
    return out, streams


def test_steps_are_the_orders_samples_on_every_world_size_and_worker_count(st_make_shards):
    """Uneven, few shards: each step holds the order's samples, slot for slot, with the same crop per slot,
    for 1, 2 and 4 ranks and 0 or 2 workers; epochs cover every sample once."""
    shards = st_make_shards([7, 1, 12, 10])
    cfg = _cfg(shards, global_batch_size=8, micro_batch_size=2)
    order = Order(np.array([7, 1, 12, 10]), 8, 8, seed=3)
    reference, streams = _global_steps(cfg, 1, 2 * order.steps_per_epoch + 1)
    assert streams[0].position() == StreamPosition(2, 1, 3, 8, streams[0].position().plan)
    for step, (labels, images) in enumerate(reference):
        assert labels.tolist() == order.samples(*order.where(step)).tolist()
        assert images.shape == (8, 3, IMG, IMG) and images.dtype == torch.uint8
    epoch0 = torch.cat([labels for labels, _ in reference[:order.steps_per_epoch]]).tolist()
    assert len(set(epoch0)) == len(epoch0) == 24
    for world, workers in ((2, 2), (4, 0), (2, 0)):
        other, _ = _global_steps(_cfg(shards, num_workers=workers), world, len(reference))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(reference, other)), world


def test_resume_reproduces_next_batches_bit_for_bit(st_make_shards):
    shards = st_make_shards([7, 1, 12])
    cfg = _cfg(shards, randaugment=[2, 9])  # 20 samples: 2 steps of 8 per epoch, 2 micro-batches per rank
    reference = _take(build_train_stream(cfg, img_size=IMG, seed=5, rank=1, world_size=2), 10)
    first = build_train_stream(cfg, img_size=IMG, seed=5, rank=1, world_size=2)
    assert _same(_take(first, 2), reference[:2])
    saved = StreamPosition.from_dict(first.position().to_dict())
    assert (saved.epoch, saved.step, saved.seed, saved.streams) == (0, 1, 5, 8)
    with pytest.raises(RuntimeError, match="inside a step"):
        next(first) and first.position()
    first.close()
    resumed = build_train_stream(cfg, img_size=IMG, seed=5, rank=1, world_size=2, position=saved)
    assert _same(_take(resumed, 8), reference[2:])  # crosses into epochs 1 and 2
    single = build_train_stream(_cfg(shards, randaugment=[2, 9], num_workers=0), img_size=IMG, seed=5, rank=1,
                                world_size=2, position=StreamPosition(1, 1, 5, 8, saved.plan))
    assert _same(_take(single, 2), reference[6:8])
    other_seed = build_train_stream(cfg, img_size=IMG, seed=6, rank=1, world_size=2)
    assert not _same(_take(other_seed, 3), reference[:3])


def test_resume_reads_and_decodes_only_the_steps_samples(st_make_shards, monkeypatch):
    """Resuming late in an epoch reads what resuming early reads: the step's samples and their indexes."""
    shards = st_make_shards([40, 40, 40, 40])
    cfg = _cfg(shards, num_workers=0, global_batch_size=16, micro_batch_size=16, streams=4)
    reference = build_train_stream(cfg, img_size=IMG, seed=0, rank=0, world_size=1)
    steps = _take(reference, 10)
    plan = reference.position().plan
    decoded, read = [], {}
    monkeypatch.setattr(transforms, "decode_rgb", lambda *a, **kw: decoded.append(a[0]) or decode_rgb(*a, **kw))
    for at in (1, 9):
        resumed = build_train_stream(cfg, img_size=IMG, seed=0, rank=0, world_size=1,
                                     position=StreamPosition(0, at, 0, 4, plan))
        assert _same(_take(resumed, 1), steps[at:at + 1])
        read[at] = resumed.bytes_read
    assert len(decoded) == 2 * cfg.micro_batch_size
    sample_bytes = sum(path.stat().st_size for path in shards.glob("*.tar")) / 160
    assert abs(read[9] - read[1]) < 8 * 16 * sample_bytes * 0.05, read


def test_train_stream_leaves_the_callers_rng_alone(st_make_shards):
    cfg = _cfg(st_make_shards([5, 5]), num_workers=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _take(build_train_stream(cfg, img_size=IMG, seed=0, rank=0, world_size=1), 2)
    assert torch.equal(torch.rand(3), expected)


def test_loader_memory_is_bounded_in_bytes(st_make_shards, caplog):
    prefetch, bound = loader_memory(DataConfig(micro_batch_size=128, num_workers=10, loader_memory_mb=2048), 224)
    batch_mb = 128 * 3 * 224 * 224 / 2**20
    assert prefetch == 4 and bound == pytest.approx(10 * (4 * batch_mb + 64)) and bound <= 2048
    assert loader_memory(DataConfig(micro_batch_size=128, num_workers=10, loader_memory_mb=1100), 224)[0] == 2
    with pytest.raises(ValueError, match="data.loader_memory_mb=600 holds less than one decoded micro-batch"):
        loader_memory(DataConfig(micro_batch_size=128, num_workers=10, loader_memory_mb=600), 224)
    caplog.set_level("INFO")
    build_train_stream(_cfg(st_make_shards([5, 5])), img_size=IMG, seed=0, rank=0, world_size=1)
    assert "loader memory per rank <=" in caplog.text and "has no sample index beside it" in caplog.text

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
    """Corrupt samples are counted and replaced by good ones, batch sizes stay exact, and the replacement
    is a function of the slot: the same on 1 or 2 ranks and after a resume."""
    shards = st_make_shards([7, 6, 3], corrupt=CORRUPT)
    cfg = _cfg(shards)
    reference, streams = _global_steps(cfg, 2, 4, seed=1)
    assert sum(s.corrupt_samples for s in streams) > 0
    labels = set(torch.cat([labels for labels, _ in reference]).tolist())
    assert labels and not labels & set(CORRUPT)
    assert all(images.shape == (8, 3, IMG, IMG) for _, images in reference)
    single, _ = _global_steps(_cfg(shards, num_workers=0), 1, 4, seed=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(reference, single))
    plan = streams[0].position().plan
    resumed, _ = _global_steps(cfg, 2, 2, seed=1, position=StreamPosition(1, 0, 1, 8, plan))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(reference[2:], resumed))


def test_all_corrupt_data_fails_with_a_clear_error(st_make_shards, monkeypatch):
    monkeypatch.setattr(train_stream, "MAX_CORRUPT_DRAWS", 20)
    hopeless = st_make_shards([5, 5], corrupt={i: "nocls" for i in range(10)})
    with pytest.raises(RuntimeError, match="20 replacement samples in a row are corrupt"):
        next(build_train_stream(_cfg(hopeless, num_workers=0), img_size=IMG, seed=0, rank=0, world_size=1))


def test_bad_shard_specs_and_world_sizes_fail_at_build_time(st_make_shards, tmp_path):
    shards = st_make_shards([2, 6])
    with pytest.raises(ValueError, match="data.train_shards is empty"):
        build_train_stream(DataConfig(train_shards=[]), img_size=IMG, seed=0, rank=0, world_size=1)
    with pytest.raises(FileNotFoundError, match=r"6 of 8 shards do not exist, first .*train-000002.tar"):
        resolve_shards(str(shards / "train-{000000..000007}.tar"), "train")
    with pytest.raises(FileNotFoundError, match="is not a converted shard directory"):
        resolve_shards(str(tmp_path), "train")
    with pytest.raises(KeyError, match="no split 'val'"):
        resolve_shards(str(shards), "val")
    assert resolve_shards([str(shards / "train-000000.tar"), "pipe:cat x.tar"], "train").urls[1] == "pipe:cat x.tar"
    with pytest.raises(ValueError, match="must be a shard directory with _info.json"):
        build_train_stream(_cfg(shards, train_shards=[str(shards / "train-000000.tar")]), img_size=IMG, seed=0,
                           rank=0, world_size=1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_train_stream(_cfg(shards, global_batch_size=16), img_size=IMG, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="world size 3 does not divide data.streams=2"):
        build_train_stream(_cfg(shards, micro_batch_size=1, global_batch_size=6, streams=2), img_size=IMG, seed=0,
                           rank=0, world_size=3)
    with pytest.raises(ValueError, match="non-negative ints"):
        StreamPosition.from_dict({"epoch": 1, "step": -1, "seed": 0, "streams": 8, "plan": ""})


def test_pipe_urls_read_like_local_paths(st_make_shards):
    shards = st_make_shards([4, 3], split="val")
    cfg = _cfg(shards, eval_shards=[f"pipe:cat {shards}/val-00000{i}.tar" for i in (0, 1)], num_workers=0)
    stream = build_eval_stream(cfg, img_size=IMG, rank=0, world_size=1)
    assert sorted(label for _, labels in stream for label in labels.tolist()) == list(range(7))


def test_reads_data_tools_shards_like_imagefolder(demo_shards):
    """Shards written by ``data_tools`` (demo digits): eval labels match torchvision's ImageFolder."""
    from torchvision.datasets import ImageFolder

    cfg = DataConfig(train_shards=str(demo_shards), eval_shards=str(demo_shards), global_batch_size=32,
                     micro_batch_size=16, num_workers=2, eval_batch_size=64)
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


def test_a_checkpoint_position_of_the_old_stream_names_the_way_out():
    """Checkpoints before ``pretrain.data.order`` saved {epoch, batch, lanes}; they cannot resume onto the new order."""
    with pytest.raises(ValueError, match="from before the train order .* start a new run.dir"):
        StreamPosition.from_dict({"epoch": 3, "batch": 120, "lanes": 4})
    with pytest.raises(ValueError, match="non-negative ints"):
        StreamPosition.from_dict({"epoch": -1, "step": 0, "seed": 0, "streams": 4, "plan": "x"})
