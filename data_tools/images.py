"""Check one image's bytes and decide what goes into the shard: the original bytes or an RGB re-encode.

Policy (why each rule):

- JPEG, PNG and WebP that decode are stored as their original bytes, whatever
  their mode (CMYK, greyscale, RGBA, palette): no quality loss, no CPU spent, and
  every reader (ours, timm, open_clip) converts to RGB when it decodes.
- Except 16-bit and float images (``I;16``, ``I``, ``F``): PIL's ``convert("RGB")``
  clips them to 255, so a reader would see a white image. They are rescaled to
  8 bits and stored as RGB PNG (lossless at 8 bits).
- Other formats (BMP, TIFF, GIF, PPM, ...) are stored as RGB PNG: readers and
  webdataset only expect ``jpg|png|webp``, and PNG keeps the pixels.
- With ``resize_max``, images whose longer side exceeds it are shrunk to that side
  (aspect kept, bicubic, JPEG decoded at reduced scale when possible) and stored
  as RGB JPEG at ``quality``: the point of resizing is storage, and JPEG is what
  cuts it. Smaller images follow the rules above.
- Transparency is flattened onto white when re-encoding (RGB has no alpha).

An image is bad when it is empty, not identifiable, fails ``verify()`` or fails to
fully decode (truncated data raises because truncated loading stays off).
"""

from __future__ import annotations

import io
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
"""PIL format -> shard extension for formats stored as original bytes (MPO: camera JPEGs with extra frames)."""
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadImage(Exception):
    """The bytes are not a usable image; ``str(err)`` is the reason written to ``_errors.jsonl``."""


class Prepared(NamedTuple):
    """What to store for one image."""

    data: bytes
    ext: str
    width: int
    height: int
    reencoded: bool


def prepare(data: bytes, resize_max: Optional[int] = None, quality: int = 95) -> Prepared:
    """Check ``data`` decodes and return the bytes to store (see module docstring for the policy)."""
    if not data:
        raise BadImage("zero-byte file")
    fmt = None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            probe.verify()
    except UnidentifiedImageError:
        raise BadImage("not an image: PIL cannot identify the file format") from None
    except Exception as err:  # PIL raises many types (SyntaxError, struct.error, ...) for broken files
        raise BadImage(f"corrupt {fmt} image: {err}" if fmt else f"corrupt image, header unreadable: {err}") from None
    image = Image.open(io.BytesIO(data))
    shrink = resize_max is not None and max(image.size) > resize_max
    try:
        if shrink:
            image.draft(None, _draft_size(image.size, resize_max))
        image.load()
    except Exception as err:
        raise BadImage(f"truncated or corrupt {fmt} data: {err}") from None
    if not shrink and fmt in KEPT_FORMATS and image.mode not in HIGH_DEPTH_MODES:
        return Prepared(data, KEPT_FORMATS[fmt], image.width, image.height, False)
    rgb = to_rgb(image)
    if shrink:
        rgb.thumbnail((resize_max, resize_max), Image.Resampling.BICUBIC)
        return Prepared(_encode(rgb, "JPEG", quality=quality), "jpg", rgb.width, rgb.height, True)
    return Prepared(_encode(rgb, "PNG"), "png", rgb.width, rgb.height, True)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit/float rescaled (not clipped), transparency flattened onto white."""
    if image.mode in HIGH_DEPTH_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode != "F" else 255.0 / max(float(pixels.max()), 1e-12)
        grey = np.clip(pixels * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _draft_size(size: tuple[int, int], resize_max: int) -> tuple[int, int]:
    """Smallest decode size worth asking a JPEG decoder for: twice the target, as ``thumbnail`` does."""
    scale = 2 * resize_max / max(size)
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale))


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()
