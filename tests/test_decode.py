"""The decode paths (``data.decode``): same samples and crops on each, the GPU path's device side run on the CPU.

``decode_jpeg(list, device="cpu")`` is the same call as the batched nvJPEG one with
``device="cuda"``; on the CPU it runs libjpeg-turbo, as PIL does, so the paths agree
pixel for pixel here (on a GPU nvJPEG's IDCT and upsampling make them differ slightly).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from pretrain.config import ConfigError, DataConfig, load_config
from pretrain.data.decode import EncodedBatch, build_encoded_crop, collate_encoded, finish_batch
from pretrain.data.sample_table import sample_table
from pretrain.data.train_stream import _Builder, _Plan, build_train_stream
from pretrain.data.image_header import CorruptImageError, read_header
from pretrain.data.transforms import TrainCrop, decode_jpeg_tensor, decode_rgb

IMG = 16


def _cfg(shards, **kw) -> DataConfig:
    base = dict(train_shards=str(shards), global_batch_size=8, micro_batch_size=4, num_workers=0)
    return DataConfig(**{**base, **kw})


def _jpeg(size, mode="RGB", seed=0, progressive=False) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def test_cpu_and_gpu_paths_give_the_same_samples_crops_and_pixels(st_make_shards):
    """RGB/grey JPEGs go to decode_jpeg, CMYK and PNG are cropped in the worker, corrupt ones (a truncated
    RGB JPEG among them) are replaced:
    the same keys, replacements and pixels as data.decode=cpu_full, over two epochs, 0 and 2 workers."""
    shards = st_make_shards([9, 7, 8], corrupt={4: "truncated", 5: "bytes", 11: "nocls"})
    cpu = build_train_stream(_cfg(shards, decode="cpu_full"), img_size=IMG, seed=1, rank=0, world_size=1)
    reference = [(next(cpu), cpu.last_keys) for _ in range(12)]
    assert cpu.corrupt_samples >= 3
    for workers in (0, 2):
        gpu = build_train_stream(_cfg(shards, decode="gpu", num_workers=workers), img_size=IMG, seed=1, rank=0,
                                 world_size=1)
        for (images, labels), keys in reference:
            got, got_labels = next(gpu)
            assert gpu.last_keys == keys and torch.equal(got_labels, labels)
            # Same libjpeg-turbo decode and the same crop_resize on the CPU: exactly equal (measured max 0).
            assert got.shape == images.shape and torch.equal(got, images)
        assert gpu.corrupt_samples == cpu.corrupt_samples


def test_gpu_path_hands_over_jpeg_bytes_and_the_cpu_paths_crops(st_make_shards):
    """The workers' batch: encoded bytes for RGB/grey JPEGs only, and per slot the crop the CPU path draws."""
    shards = st_make_shards([16])
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    plan = _Plan(urls, [16], _cfg(shards, decode="gpu", global_batch_size=16, micro_batch_size=16), IMG, 4, 16, 0, 1,
                 sample_table(urls, [16]))
    batch, labels, _, keys, *_ = _Builder(plan).batch(0)
    assert isinstance(batch, EncodedBatch) and len(keys) == 16
    modes = ["RGB", "L", "RGBA", "CMYK"]  # st_make_shards: sample i has mode i % 4, PNG for RGBA and i % 5 == 0
    expect_cpu = [modes[i % 4] in ("RGBA", "CMYK") or i % 5 == 0 for i in labels.tolist()]
    assert batch.on_cpu.tolist() == expect_cpu and len(batch.lengths) == expect_cpu.count(False)
    assert batch.cropped.shape == (expect_cpu.count(True), 3, IMG, IMG)
    assert int(batch.lengths.sum()) == batch.data.numel()
    flips = batch.crops[:, 4].tolist()
    assert 0 < sum(flips) < 16  # both kinds occur, so the comparison with the CPU path covers flips


def test_worker_routes_odd_jpegs_to_the_cpu_and_rejects_truncated_ones():
    encoded = build_encoded_crop(DataConfig(), IMG)
    torch.manual_seed(0)
    data, _ = encoded(_jpeg((40, 30)))
    assert isinstance(data, bytes)
    for odd in (_jpeg((40, 30), "CMYK"), _jpeg((40, 30), progressive=True)):
        cropped, _ = encoded(odd)
        assert isinstance(cropped, torch.Tensor) and cropped.shape == (3, IMG, IMG)
    whole = _jpeg((40, 30))
    with pytest.raises(CorruptImageError, match="truncated"):
        encoded(whole[: len(whole) * 2 // 3])


def test_decode_jpeg_tensor_gives_torchvisions_pixels_without_its_warning():
    """The operators ``torchvision.io.decode_jpeg`` calls, called directly: its pixels, no deprecation warning."""
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [_jpeg((40, 30), seed=1), _jpeg((30, 44), "L", seed=2), _jpeg((33, 17), progressive=True)]
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = [decode_jpeg_tensor(data)[0] for data in datas] + decode_jpeg_tensor(tensors)
        assert not caught
        reference = decode_jpeg(tensors, mode=ImageReadMode.RGB)
    assert [w.category for w in caught] == [DeprecationWarning]      # what the function would have cost each call
    for got, want in zip(ours, reference + reference):
        assert got.shape == want.shape and torch.equal(got, want)


def test_finish_batch_crops_each_image_where_the_worker_said():
    """A hand-made batch: the device output equals crop_resize of a full decode with the given box and flip."""
    images = [_jpeg((40, 30), seed=1), _jpeg((30, 44), "L", seed=2)]
    samples = [((images[0], (3, 5, 20, 24, 1)), 0), ((images[1], (0, 0, 44, 30, 0)), 1)]
    batch, labels = collate_encoded(samples)
    out = finish_batch(batch, IMG, "cpu")
    assert out.shape == (2, 3, IMG, IMG) and labels.tolist() == [0, 1]
    assert out.is_contiguous(memory_format=torch.channels_last)
    for slot, (data, (top, left, height, width, flip)) in enumerate(p for p, _ in samples):
        full = decode_rgb(read_header(data), data)[0]
        expected = F.resize(full[:, top:top + height, left:left + width], [IMG, IMG], antialias=True)
        assert torch.equal(out[slot], expected.flip(-1) if flip else expected)


def test_gpu_decode_resumes_exactly(st_make_shards):
    shards = st_make_shards([10, 14])
    cfg = _cfg(shards, decode="gpu", num_workers=2)
    stream = build_train_stream(cfg, img_size=IMG, seed=2, rank=0, world_size=1)
    reference = [next(stream) for _ in range(8)]
    first = build_train_stream(cfg, img_size=IMG, seed=2, rank=0, world_size=1)
    for _ in range(6):
        next(first)
    resumed = build_train_stream(cfg, img_size=IMG, seed=2, rank=0, world_size=1, position=first.position())
    for images, labels in reference[6:]:
        got, got_labels = next(resumed)
        assert torch.equal(got, images) and torch.equal(got_labels, labels)


def test_draft_decodes_odd_sized_jpegs_at_a_reduced_scale():
    """PIL's draft keeps the largest DCT scale s with size // requested >= s: a 501x375 JPEG halves."""
    data = _jpeg((501, 375))
    image, fx, fy = decode_rgb(read_header(data), data, 2)
    assert image.shape == (3, 188, 251) and fx == 251 / 501 and fy == 188 / 375
    torch.manual_seed(0)
    assert TrainCrop(64, (0.9, 1.0), draft=False)(data).shape == (3, 64, 64)


def test_gpu_decode_with_randaugment_is_a_config_error(tmp_path):
    cfg = load_config(overrides=["data.decode=gpu", "data.randaugment=[2,9]", f"data.train_shards={tmp_path}"])
    with pytest.raises(ConfigError, match="data.decode=gpu does not run RandAugment.*data.decode=cpu"):
        cfg.validate(1)
    with pytest.raises(ValueError, match="RandAugment"):
        build_encoded_crop(cfg.data, IMG)
    with pytest.raises(ConfigError, match="not one of"):
        load_config(overrides=["data.decode=nvjpeg"])
