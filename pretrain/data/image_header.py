"""An encoded image's header (format, size, colour mode, progressive) read without decoding the image.

Why not ``PIL.Image.open`` for every image: the loader workers read the header of every training
image (its size draws the crop, format and mode pick the decoder), and PIL's open builds an
``ImageFile`` and parses every marker segment in Python, about 40 us an image here, 2-3 % of
what the CPU path spends on an image. A JPEG (nearly every image of ImageNet-21k) is read here
by walking its marker segments up to the first scan, checking each segment's length and the
quantisation tables' sizes as PIL does, and taking the frame header's precision, height, width
and component count: ``ImageHeader`` then carries the same format, size, mode and progressive
flag as PIL's (``tests/test_image_header.py`` compares them on JPEGs of every kind). Anything else
(PNG, WebP, a JPEG this walk does not accept: 12-bit, a height given later by a DNL marker, a
header cut short, an image over PIL's decompression-bomb limit) goes through PIL, which also
names what is wrong with corrupt bytes.
"""

from __future__ import annotations

import io
from typing import NamedTuple, Optional

from PIL import Image

PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
"""What PIL raises for corrupt or truncated data (``UnidentifiedImageError`` is an ``OSError``)."""

_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
"""Start-of-frame markers, as PIL's JPEG plugin accepts them."""
_PROGRESSIVE = frozenset((0xC2, 0xC6, 0xCA, 0xCE))
_RESTART = frozenset(range(0xD0, 0xD8))
"""RST0-7: markers without a length field."""
_SOS, _DQT = 0xDA, 0xDB
_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
"""PIL's mode of a JPEG by component count."""


class CorruptImageError(ValueError):
    """Encoded image bytes that cannot be parsed or decoded."""


class ImageHeader(NamedTuple):
    """What the decoders need to know of an encoded image before decoding it."""

    format: str
    """PIL's format name: ``JPEG``, ``PNG``, ``WEBP``, ..."""
    size: tuple[int, int]
    """(width, height) in pixels."""
    mode: str
    """PIL's mode: ``RGB`` (a YCbCr or RGB JPEG), ``L``, ``CMYK``, ``RGBA``, ``P``, ..."""
    progressive: bool
    image: Optional[Image.Image]
    """PIL's opened image where PIL read the header; None where the JPEG walk did (``opened`` opens it)."""

    def opened(self, data: bytes) -> Image.Image:
        """PIL's image of ``data`` (these bytes), opened now if the JPEG walk read the header."""
        return self.image if self.image is not None else _pil_open(data)


def read_header(data: bytes) -> ImageHeader:
    """The header of encoded image bytes; ``CorruptImageError`` if neither the JPEG walk nor PIL can read it."""
    header = _jpeg_header(data)
    if header is not None:
        return header
    image = _pil_open(data)
    return ImageHeader(image.format or "", image.size, image.mode, bool(image.info.get("progressive")), image)


def _pil_open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except PIL_ERRORS as exn:
        raise CorruptImageError(f"unreadable image header: {exn!r}") from exn


def _jpeg_header(data: bytes) -> Optional[ImageHeader]:
    """The header of an 8-bit JPEG with its size in the frame header, or None to leave the bytes to PIL."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    frame: Optional[tuple[int, int, int, bool]] = None
    pos, end = 2, len(data)
    while True:
        if pos >= end or data[pos] != 0xFF:
            return None
        while pos < end and data[pos] == 0xFF:                        # the marker, after any fill bytes
            pos += 1
        if pos + 3 > end:
            return None
        marker = data[pos]
        if marker in _RESTART:
            pos += 1
            continue
        if marker < 0xC0 or marker in (0xD8, 0xD9):                   # not a segment: PIL's rules for junk
            return None
        length = int.from_bytes(data[pos + 1:pos + 3], "big")
        body, pos = pos + 3, pos + 1 + length
        if length < 2 or pos > end:
            return None
        if marker == _SOS:
            break
        if marker in _SOF:
            if frame is not None or length < 8 or data[body] != 8:
                return None
            height, width = int.from_bytes(data[body + 1:body + 3], "big"), int.from_bytes(data[body + 3:body + 5], "big")
            frame = (width, height, data[body + 5], marker in _PROGRESSIVE)
        elif marker == _DQT and not _tables_fit(data, body, pos):
            return None
    if frame is None:
        return None
    width, height, components, progressive = frame
    mode = _MODES.get(components)
    limit = Image.MAX_IMAGE_PIXELS
    if mode is None or width == 0 or height == 0 or (limit is not None and width * height > limit):
        return None
    return ImageHeader("JPEG", (width, height), mode, progressive, None)


def _tables_fit(data: bytes, start: int, end: int) -> bool:
    """Whether a DQT segment's body ``data[start:end]`` is whole quantisation tables (64 entries of 1 or 2 bytes)."""
    while start < end:
        start += 1 + 64 * (2 if data[start] >> 4 else 1)
    return start == end
