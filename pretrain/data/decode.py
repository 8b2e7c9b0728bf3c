"""The GPU decode path (``data.decode=gpu``): workers hand over JPEG bytes and crops, the device decodes.

Why: decoding a 500x375 JPEG costs the CPU about 0.65 ms, most of the ~1.5 CPU-ms an image
costs the CPU path; at 4,200 img/s per GPU that alone is ~3 cores per GPU. Batched nvJPEG
(``torchvision.io.decode_jpeg`` with a list and a CUDA device) moves it onto the GPU.

* **Workers** (``EncodedCrop``) parse each image's header, draw its crop and flip with
  ``TrainCrop.params`` from the same per-slot seed as the CPU path (so the same sample gets
  the same crop on either path, any world size or worker count, and across resumes), and
  pass the encoded bytes on. Images nvJPEG is not given (not a JPEG, CMYK/YCCK,
  progressive) are cropped in the worker with the same parameters, at full scale.
* **Corrupt samples** are found in the worker, as on the CPU path: an unparsable header,
  or a JPEG with no end-of-image marker after its last scan (a truncated file); they are
  replaced by the stream's deterministic rule. Damage inside the entropy-coded data is not
  seen before decoding on either path (libjpeg decodes it with a warning); if nvJPEG
  rejects a batch, ``finish_batch`` fails with the batch's keys rather than skip samples
  the order promised.
* **The training process** (``finish_batch``) decodes the micro-batch in one call and
  crops, resizes (antialiased) and flips each image on the device with the CPU path's
  ``crop_resize``; normalisation and MixUp/CutMix follow in ``BatchPreprocessor`` as on
  the CPU path. RandAugment is not run here (the config rejects the combination).

One micro-batch travels as one flat byte tensor plus lengths (one shared-memory block
per batch, not one per image).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pretrain.config import DataConfig
from pretrain.data.image_header import CorruptImageError, ImageHeader, read_header
from pretrain.data.transforms import (LIBJPEG_RGB_MODES, CropParams, TrainCrop, build_train_crop, crop_resize,
                                      decode_jpeg_tensor)

_SOS, _EOI = b"\xff\xda", b"\xff\xd9"


class EncodedBatch(NamedTuple):
    """A micro-batch as the workers hand it over (a NamedTuple, so the DataLoader pins each field)."""

    data: torch.Tensor
    """uint8 (total bytes,): the JPEGs for the device, back to back, in slot order."""
    lengths: torch.Tensor
    """int64 (number of those JPEGs,): their byte lengths."""
    crops: torch.Tensor
    """int64 (B, 5): top, left, height, width (original pixels) and flip of every slot."""
    cropped: torch.Tensor
    """uint8 (R, 3, S, S): the slots the workers cropped themselves, in slot order."""
    on_cpu: torch.Tensor
    """bool (B,): which slots those are."""


EncodedSample = tuple[bytes | torch.Tensor, CropParams]
"""JPEG bytes for the device, or the worker's finished uint8 (3, S, S) crop; and the sample's crop."""


def for_nvjpeg(header: ImageHeader, data: bytes) -> bool:
    """Whether the device decodes this image: a baseline YCbCr or grey JPEG with its end-of-image marker."""
    if header.format != "JPEG" or header.mode not in LIBJPEG_RGB_MODES or header.progressive:
        return False
    if data.rfind(_EOI) < data.rfind(_SOS):
        raise CorruptImageError("truncated JPEG: no end-of-image marker after the last scan")
    return True


class EncodedCrop:
    """Worker side: encoded bytes -> (bytes, crop) for the device, or (finished crop, crop) for the rest."""

    def __init__(self, crop: TrainCrop):
        self.crop = crop

    def __call__(self, data: bytes) -> EncodedSample:
        header = read_header(data)
        params = self.crop.params(header)
        return (data if for_nvjpeg(header, data) else self.crop.apply(header, data, params)), params


def build_encoded_crop(cfg: DataConfig, img_size: int) -> EncodedCrop:
    """The worker transform of ``data.decode=gpu``; ``ValueError`` for settings it cannot honour."""
    errors = cfg.decode_errors()
    if errors:
        raise ValueError(errors[0])
    return EncodedCrop(build_train_crop(cfg, img_size))


def collate_encoded(samples: list[tuple[EncodedSample, int]]) -> tuple[EncodedBatch, torch.Tensor]:
    """Pack ``(EncodedSample, label)`` pairs into one ``EncodedBatch`` and int64 labels."""
    payloads = [payload for (payload, _), _ in samples]
    jpegs = [p for p in payloads if isinstance(p, bytes)]
    cropped = [p for p in payloads if isinstance(p, torch.Tensor)]
    data = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8) if jpegs else torch.empty(0, dtype=torch.uint8)
    batch = EncodedBatch(
        data=data,
        lengths=torch.tensor([len(p) for p in jpegs], dtype=torch.int64),
        crops=torch.tensor([list(params) for (_, params), _ in samples], dtype=torch.int64),
        cropped=torch.stack(cropped) if cropped else torch.empty((0, 3, 0, 0), dtype=torch.uint8),
        on_cpu=torch.tensor([isinstance(p, torch.Tensor) for p in payloads]),
    )
    return batch, torch.tensor([label for _, label in samples], dtype=torch.int64)


def finish_batch(batch: EncodedBatch, size: int, device: torch.device | str) -> torch.Tensor:
    """Decode, crop, resize and flip a micro-batch on ``device``: uint8 (B, 3, size, size), channels-last."""
    device = torch.device(device)
    jpegs = list(batch.data.split(batch.lengths.tolist())) if len(batch.lengths) else []
    decoded = iter(decode_jpeg_tensor(jpegs, device) if jpegs else [])
    cropped = iter(batch.cropped.to(device, non_blocking=device.type == "cuda"))
    out = torch.empty((len(batch.crops), 3, size, size), dtype=torch.uint8, device=device,
                      memory_format=torch.channels_last)
    for slot, (crop, on_cpu) in enumerate(zip(batch.crops.tolist(), batch.on_cpu.tolist())):
        if on_cpu:
            out[slot] = next(cropped)
        else:
            top, left, height, width, flip = crop
            out[slot] = crop_resize(next(decoded), (left, top, left + width, top + height), size, bool(flip))
    return out
