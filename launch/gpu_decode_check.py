"""``data.decode=gpu`` on a real GPU (step of ``make gpu-check``): nvJPEG against the CPU path, resume, speed.

    python launch/gpu_decode_check.py WORK_DIR      # needs a CUDA GPU; last line: one JSON object

On a CPU the GPU path's device side runs libjpeg-turbo and equals ``data.decode=cpu_full``
pixel for pixel (``tests/test_decode.py``); on a GPU nvJPEG's IDCT and chroma upsampling
differ from libjpeg's by a few levels, which is what this measures. It writes 512
photo-like JPEGs (500x375 and 375x500, quality 90, as ImageNet's typical size) into shards,
then checks, at 224 px with 4 workers:

* **same samples, close pixels:** the first ``BATCHES`` micro-batches of ``cpu_full`` and of
  ``gpu`` (decoded on ``cuda``) carry the same keys and labels; the mean absolute pixel
  difference is below ``MEAN_LEVELS`` (decoder rounding is about 1 level; a wrong crop, flip
  or channel order moves it by tens);
* **exact resume:** a stream resumed after 2 micro-batches gives the next ones bit-identical to
  the uninterrupted stream (nvJPEG and the resize kernels are deterministic);
* **device decode speed:** images/s of ``finish_batch`` (decode + crop + resize + flip of a
  micro-batch of ``SPEED_BATCH`` on the device), from prepared ``EncodedBatch`` es, against
  the 4,200 img/s one GPU trains ViT-B/16 at.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_tools.convert import convert
from pretrain.config import DataConfig
from pretrain.data.decode import EncodedBatch, finish_batch
from pretrain.data.train_stream import build_train_stream
from pretrain.metrics import finish_device_work

IMAGES, PER_SHARD, IMG_SIZE, BATCHES, SPEED_BATCH = 512, 128, 224, 3, 256
MEAN_LEVELS = 3.0
"""Bar for the mean |nvJPEG path - libjpeg path| in uint8 levels (see the module docstring)."""


def photo_like(rng: np.random.Generator) -> bytes:
    """A JPEG with smooth structure and texture (a coarse colour field upsampled, plus noise), like a photo."""
    size = (500, 375) if rng.random() < 0.75 else (375, 500)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(out: Path) -> Path:
    """``IMAGES`` photo-like JPEGs in 10 classes, written as an ImageFolder tree next to ``out`` and converted
    into shards in ``out`` by ``data_tools`` (JPEGs are stored as they are)."""
    rng = np.random.default_rng(0)
    folder = out.with_name(out.name + "_images")
    for index in range(IMAGES):
        path = folder / f"class_{index % 10}" / f"img{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photo_like(rng))
    convert(folder, out, samples_per_shard=PER_SHARD, progress=False)
    return out


def stream(cfg: DataConfig, device: str | None, position=None):
    return build_train_stream(cfg, img_size=IMG_SIZE, seed=0, rank=0, world_size=1, position=position, device=device)


def main(work: Path, device: str = "cuda") -> dict:
    """The figures; ``device="cpu"`` runs the same code without a GPU (a smoke test of this script)."""
    shards = write_shards(work / "shards")
    base = dict(train_shards=str(shards), global_batch_size=64, micro_batch_size=64, num_workers=4)
    cpu = stream(DataConfig(**base, decode="cpu_full"), None)
    gpu = stream(DataConfig(**base, decode="gpu"), device)
    diffs, maxes = [], []
    for _ in range(BATCHES):
        (want, want_labels), (got, got_labels) = next(cpu), next(gpu)
        if gpu.last_keys != cpu.last_keys or not torch.equal(got_labels.cpu(), want_labels):
            raise AssertionError(f"decode=gpu gave other samples than decode=cpu_full: {gpu.last_keys[:4]}... "
                                 f"vs {cpu.last_keys[:4]}...")
        if got.device.type != device or got.shape != want.shape:
            raise AssertionError(f"decode=gpu batch is {tuple(got.shape)} on {got.device}, expected "
                                 f"{tuple(want.shape)} on {device}")
        delta = (got.cpu().int() - want.int()).abs()
        diffs.append(delta.float().mean().item())
        maxes.append(int(delta.max()))
    mean = sum(diffs) / len(diffs)
    if mean > MEAN_LEVELS:
        raise AssertionError(f"decode=gpu pixels differ from cpu_full by {mean:.2f} levels on average "
                             f"(bar {MEAN_LEVELS}): per batch {diffs}")

    cfg = DataConfig(**base, decode="gpu")
    uninterrupted = stream(cfg, device)
    first = stream(cfg, device)
    expected = [next(uninterrupted) for _ in range(4)][2:]
    for _ in range(2):
        next(first)
    resumed = stream(cfg, device, first.position())
    resume_exact = all(torch.equal(next(resumed)[0], images) for images, _ in expected)
    if not resume_exact:
        raise AssertionError("decode=gpu: the stream resumed after 2 micro-batches differs from the uninterrupted one")

    encoded = stream(DataConfig(**{**base, "micro_batch_size": SPEED_BATCH, "global_batch_size": SPEED_BATCH},
                                decode="gpu"), None)
    batches: list[EncodedBatch] = [next(encoded)[0] for _ in range(IMAGES // SPEED_BATCH)]
    if device == "cuda":
        batches = [EncodedBatch(*(t.pin_memory() for t in b)) for b in batches]
    finish_batch(batches[0], IMG_SIZE, device)
    finish_device_work(torch.device(device))
    start, rounds = time.perf_counter(), 5
    for _ in range(rounds):
        for batch in batches:
            finish_batch(batch, IMG_SIZE, device)
    finish_device_work(torch.device(device))
    per_s = rounds * IMAGES / (time.perf_counter() - start)
    return {"images": IMAGES, "mean_abs_levels": round(mean, 3), "max_abs_levels": max(maxes),
            "resume_exact": resume_exact, "device_decode_images_per_s": round(per_s),
            "device_decode_batch": SPEED_BATCH}


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_decode_check: needs a CUDA GPU (torch.cuda.is_available() is False)")
    print(json.dumps(main(Path(sys.argv[1]))))
