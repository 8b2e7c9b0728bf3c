"""Per-sample decode + augmentation (in data workers) and per-batch preprocessing (on the device).

Why the split: workers hand out uint8 crops (4x fewer bytes through shared memory
and pinned copies than float), and the float conversion, normalisation and
MixUp/CutMix run on the accelerator where they cost next to nothing.

Why our own crop step instead of ``v2.RandomResizedCrop`` on a PIL image (the
usual ImageFolder recipe):

* the crop box is drawn from the image *header* (``pretrain.data.image_header``: a walk
  of a JPEG's markers, PIL for other formats; nothing is decoded), with
  ``v2.RandomResizedCrop``'s own ``make_params``, so the crop is torchvision's, draw for draw;
* a JPEG whose box is at least twice ``img_size`` on each side is decoded at the
  smallest DCT scale (1/2, 1/4, 1/8) that keeps the box >= ``img_size`` (PIL
  ``draft``; ``data.decode=cpu``, the default; ``cpu_full`` never does): crops the
  resize would shrink anyway keep their resolution, smaller crops (which are
  upsampled) decode at full scale. Pixels differ slightly from a full decode (mean
  absolute difference < 3/255, box edges rounded to whole pixels of the reduced image).
  At 224 px train crops of ImageNet-sized (~500x375) images it never applies (a box
  needs >= 448 px sides); it does for large source images and for eval resizes;
* a full-scale YCbCr or grey JPEG is decoded by torchvision's libjpeg-turbo straight
  into a tensor: the same pixels as PIL's decode (same library and settings; asserted
  in the tests) without PIL's copy of the image into numpy, about 10 % less CPU per image;
* the crop box is a view of the decoded image, and the antialiased resize runs on
  the uint8 tensor (torch's vectorised uint8 kernel, faster than PIL's resize on this
  kind of CPU; pixel values within about 1/255 of PIL's). ``crop_resize`` is the same
  step for the GPU decode path (``pretrain.data.decode``), on the device.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple, Optional

import numpy as np
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.io import ImageReadMode

from pretrain.config import DataConfig
from pretrain.data.image_header import PIL_ERRORS, CorruptImageError, ImageHeader, read_header

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
"""Sample fields that may hold the encoded image, in order of preference."""

_DCT_SCALES = (8, 4, 2)
_PIXEL = torch.zeros(1, 1, 1, dtype=torch.uint8)
"""Expanded (no copy) to an image's shape for ``RandomResizedCrop.make_params``, which reads only the shape."""
LIBJPEG_RGB_MODES = ("RGB", "L")
"""PIL modes of JPEGs (YCbCr or grey coded) that libjpeg itself outputs as RGB, on the CPU and in nvJPEG."""
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
"""Mean and std per channel on the [0, 1] scale; inception maps pixels to [-1, 1]."""


def decode_jpeg_tensor(data: bytes | list[torch.Tensor], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Decode JPEGs (bytes, or a list of 1-D uint8 CPU tensors) to RGB uint8 (3, H, W) tensors on ``device``.

    torchvision's libjpeg-turbo on the CPU, batched nvJPEG on CUDA: the operators that
    ``torchvision.io.decode_jpeg`` calls, called as it calls them. The function itself issues a
    deprecation warning on every call (torchvision 0.29 moves image decoding to TorchCodec), and
    issuing and silencing it cost 34 us an image, 2 % of all the CPU path spends on one.
    ``tests/test_decode.py`` checks the pixels against ``decode_jpeg``'s.
    """
    inputs = [torch.frombuffer(bytearray(data), dtype=torch.uint8)] if isinstance(data, bytes) else data
    device = torch.device(device)
    if device.type == "cuda":
        return torch.ops.image.decode_jpegs_cuda(inputs, ImageReadMode.RGB.value, device)
    return [torch.ops.image.decode_jpeg(encoded, ImageReadMode.RGB.value, False) for encoded in inputs]


def decode_rgb(header: ImageHeader, data: bytes, reduce: int = 1) -> tuple[torch.Tensor, float, float]:
    """Decode an opened image to RGB uint8 (3, H, W), a JPEG at 1/``reduce`` scale rounded down to a DCT scale.

    Returns the image and the (x, y) factors from original to decoded coordinates.
    Greyscale, CMYK, palette and RGBA inputs come out as RGB. The tensor is a
    channels-last view, which torch's resize prefers.
    """
    scale = next((s for s in _DCT_SCALES if s <= reduce), 1) if header.format == "JPEG" else 1
    width, height = header.size
    if scale == 1 and header.format == "JPEG" and header.mode in LIBJPEG_RGB_MODES:
        try:
            return decode_jpeg_tensor(data)[0], 1.0, 1.0
        except RuntimeError as exn:
            raise CorruptImageError(f"undecodable JPEG image: {exn}") from exn
    opened = header.opened(data)
    try:
        if scale > 1:  # PIL picks the largest scale s with size // requested >= s: request size // s
            opened.draft(opened.mode, (width // scale, height // scale))
        opened.load()
        image = opened if opened.mode == "RGB" else opened.convert("RGB")
    except PIL_ERRORS as exn:
        raise CorruptImageError(f"undecodable {header.format} image: {exn!r}") from exn
    return to_tensor(image), image.size[0] / width, image.size[1] / height


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W) tensor (a channels-last view, which torch's resize prefers)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


class CropParams(NamedTuple):
    """One sample's random crop, in the original image's pixels, and whether it is mirrored."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """Cut ``box`` (left, top, right, bottom) out of a uint8 (3, H, W) image, resize it antialiased to
    ``size`` x ``size`` and mirror it if ``flip``; on whatever device the image is."""
    left, top, right, bottom = box
    crop = image[:, top:bottom, left:right]
    if image.stride(0) == 1 and not crop.is_contiguous(memory_format=torch.channels_last):
        # An interleaved (HWC) decode cut to a box is no longer channels-last contiguous, and torch's resize
        # would read it strided and write planar (CHW) pixels, which the channels-last batch then transposes
        # back: copying the box's rows first costs less than either (0.10-0.15 of 0.4 CPU-ms at 224 px).
        crop = crop.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    out = F.resize(crop, [size, size], antialias=True)
    return F.horizontal_flip(out) if flip else out


class TrainCrop:
    """Inception-style random resized crop (+ horizontal flip) of encoded bytes, with reduced-size JPEG decoding.

    ``params`` draws a sample's crop from the global torch RNG in the order the usual
    ``v2.RandomResizedCrop`` + ``v2.RandomHorizontalFlip`` pipeline draws it, with that
    transform's own ``make_params`` (60 us a draw; torchvision's older static ``get_params``
    makes the same draws in 79, rebuilding the log of the ratios each time); ``apply``
    decodes and cuts it. The GPU decode path draws with the same ``params``.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: bool = False, draft: bool = True):
        self.size = size
        self.hflip = hflip
        self.draft = draft
        self._crop = v2.RandomResizedCrop(size, scale=scale, ratio=ratio)

    def params(self, header: ImageHeader) -> CropParams:
        width, height = header.size  # torchvision takes a tensor's shape as the image's size
        box = self._crop.make_params([_PIXEL.expand(1, height, width)])
        return CropParams(box["top"], box["left"], box["height"], box["width"],
                          self.hflip and bool(torch.rand(1) < 0.5))

    def apply(self, header: ImageHeader, data: bytes, crop: CropParams) -> torch.Tensor:
        reduce = min(crop.height, crop.width) // self.size if self.draft else 1
        image, fx, fy = decode_rgb(header, data, reduce)
        box = (round(crop.left * fx), round(crop.top * fy), round((crop.left + crop.width) * fx),
               round((crop.top + crop.height) * fy))
        return crop_resize(image, box, self.size, crop.flip)

    def __call__(self, data: bytes) -> torch.Tensor:
        header = read_header(data)
        return self.apply(header, data, self.params(header))


class EvalResize:
    """Resize the shorter side of encoded bytes to ``size`` (JPEGs decoded at a reduced DCT scale if possible)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, data: bytes) -> torch.Tensor:
        header = read_header(data)
        image, _, _ = decode_rgb(header, data, min(header.size) // self.size)
        return F.resize(image, [self.size], antialias=True)


def eval_resize_size(img_size: int, crop_pct: float) -> int:
    """Shorter side before the center crop: ``int(img_size / crop_pct)`` (timm's rule, 224/0.875 = 256)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"data.eval_crop_pct={crop_pct} must be in (0, 1]: e.g. 0.875 (256 -> 224) or 1.0")
    return int(img_size / crop_pct)


def build_train_crop(cfg: DataConfig, img_size: int) -> TrainCrop:
    """The crop + flip of ``cfg`` (draft decoding only with ``data.decode=cpu``)."""
    if len(cfg.rrc_scale) != 2 or not 0 < cfg.rrc_scale[0] <= cfg.rrc_scale[1] <= 1:
        raise ValueError(f"data.rrc_scale={cfg.rrc_scale} must be [min, max] with 0 < min <= max <= 1")
    return TrainCrop(img_size, (cfg.rrc_scale[0], cfg.rrc_scale[1]), hflip=cfg.hflip, draft=cfg.decode == "cpu")


def build_train_transform(cfg: DataConfig, img_size: int) -> Callable[[bytes], torch.Tensor]:
    """Encoded bytes -> uint8 (3, img_size, img_size) with RRC, flip and optional RandAugment.

    All randomness comes from the global torch RNG, which the stream reseeds per sample.
    Raises ``CorruptImageError`` for bytes that do not decode.
    """
    steps: list[Callable] = [build_train_crop(cfg, img_size)]
    if cfg.randaugment is not None:
        if len(cfg.randaugment) != 2:
            raise ValueError(f"data.randaugment must be [num_ops, magnitude], got {cfg.randaugment}")
        num_ops, magnitude = cfg.randaugment
        steps.append(v2.RandAugment(num_ops=num_ops, magnitude=magnitude))
    return steps[0] if len(steps) == 1 else v2.Compose(steps)


def build_eval_transform(cfg: DataConfig, img_size: int) -> Callable[[bytes], torch.Tensor]:
    """Encoded bytes -> uint8 (3, img_size, img_size): resize shorter side, center crop."""
    return v2.Compose([EvalResize(eval_resize_size(img_size, cfg.eval_crop_pct)), v2.CenterCrop(img_size)])


class BatchPreprocessor:
    """uint8 batch from the stream -> normalised float input and loss target, on the device.

    ``target='index'`` gives int64 class indices (softmax loss); ``'multihot'`` gives a float
    (B, num_classes) one-hot for the sigmoid loss. With MixUp/CutMix configured, training
    targets are always the mixed soft (B, num_classes) float rows, each summing to 1.
    MixUp/CutMix draw from the global torch RNG of the training process (checkpointed by the engine).
    """

    def __init__(self, cfg: DataConfig, num_classes: int, target: Literal["index", "multihot"] = "index"):
        if target not in ("index", "multihot"):
            raise ValueError(f"target={target!r} must be 'index' (softmax) or 'multihot' (sigmoid)")
        mean, std = NORMALIZATION[cfg.normalize]
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255
        self._placed: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.num_classes = num_classes
        self.target = target
        mixers = [m(alpha=a, num_classes=num_classes) for m, a in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if a > 0]
        self.mix: Optional[Callable] = None if not mixers else mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std on ``device``, copied there once: a copy per micro-batch would wait for the device."""
        if device not in self._placed:
            self._placed[device] = (self.mean.to(device), self.std.to(device))
        return self._placed[device]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str,
                 dtype: torch.dtype = torch.float32, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels span [{int(labels.min())}, {int(labels.max())}] but the model has {self.num_classes} "
                "classes: set model.num_classes to the dataset's class count (classes.json)"
            )
        device = torch.device(device)
        non_blocking = device.type == "cuda"
        x = images.to(device, non_blocking=non_blocking).float()
        y = labels.to(device, non_blocking=non_blocking)
        mean, std = self._constants(device)
        x = (x - mean) / std
        if train and self.mix is not None:
            x, y = self.mix(x, y)
        elif self.target == "multihot":
            y = torch.nn.functional.one_hot(y, self.num_classes).float()
        return x.to(dtype), y
