"""``pretrain.data.image_header``: the JPEG marker walk reads what PIL reads, and leaves to PIL what it does not.

The reference is ``PIL.Image.open``: for every JPEG the walk accepts, format, size, mode and the
progressive flag must equal PIL's; everything it declines goes through PIL itself, so its result
and its errors are PIL's by construction. Mutated headers (every byte before the first scan,
changed) check that the walk never accepts what PIL rejects nor reads another size.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pretrain.data.image_header import CorruptImageError, ImageHeader, read_header


def _image(size: tuple[int, int], mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BILINEAR).convert(mode)


def _encoded(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _pil(data: bytes) -> tuple[str, tuple[int, int], str, bool]:
    image = Image.open(io.BytesIO(data))
    return image.format, image.size, image.mode, bool(image.info.get("progressive"))


def _fields(header: ImageHeader) -> tuple[str, tuple[int, int], str, bool]:
    return header.format, header.size, header.mode, header.progressive


JPEGS = {
    "rgb 4:2:0": (_image((500, 375), "RGB"), {"quality": 90}),
    "rgb 4:4:4 odd size": (_image((333, 101), "RGB"), {"quality": 95, "subsampling": 0}),
    "one pixel": (_image((1, 1), "RGB"), {}),
    "grey": (_image((64, 48), "L"), {}),
    "cmyk": (_image((40, 30), "CMYK"), {}),
    "progressive rgb": (_image((120, 90), "RGB"), {"progressive": True}),
    "progressive grey": (_image((90, 120), "L"), {"progressive": True}),
    "optimized huffman": (_image((64, 64), "RGB"), {"optimize": True}),
    "exif and icc": (_image((80, 60), "RGB"), {"exif": Image.Exif().tobytes(), "icc_profile": b"\0" * 3000}),
    "16-bit quantisation tables": (_image((32, 32), "RGB"), {"qtables": [[300] * 64, [2] * 64]}),
    "restart markers": (_image((64, 64), "RGB"), {"restart_marker_blocks": 2}),
}


@pytest.mark.parametrize("name", JPEGS)
def test_the_walk_reads_a_jpegs_header_as_pil_does(name: str) -> None:
    image, options = JPEGS[name]
    data = _encoded(image, **options)
    header = read_header(data)
    assert header.image is None, "the walk declined a JPEG it should read"
    assert _fields(header) == _pil(data)
    assert header.opened(data).size == header.size


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "P"), ("WEBP", "RGB"), ("GIF", "P")])
def test_other_formats_are_read_by_pil(fmt: str, mode: str) -> None:
    data = _encoded(_image((30, 20), mode), fmt)
    header = read_header(data)
    assert header.image is not None and _fields(header) == _pil(data)


def _frame_header(data: bytes) -> int:
    """Offset of the SOF0 segment's marker in a baseline JPEG written by PIL."""
    return data.index(b"\xff\xc0")


def test_what_the_walk_declines_pil_reads_or_rejects() -> None:
    data = _encoded(_image((50, 40), "RGB"))
    sof = _frame_header(data)
    twelve_bit = data[:sof + 4] + bytes([12]) + data[sof + 5:]
    with pytest.raises(CorruptImageError, match="unreadable image header"):   # PIL: "cannot handle 12-bit layers"
        read_header(twelve_bit)
    no_height = data[:sof + 5] + b"\0\0" + data[sof + 7:]           # height from a DNL marker: PIL rejects it
    with pytest.raises(CorruptImageError, match="unreadable image header"):
        read_header(no_height)
    for cut in (3, 10, sof + 3, sof + 9):                             # headers cut short: PIL names the error
        with pytest.raises(CorruptImageError, match="unreadable image header"):
            read_header(data[:cut])
    with pytest.raises(CorruptImageError):
        read_header(b"not an image at all")


def test_an_image_over_pils_pixel_limit_is_left_to_pil(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encoded(_image((50, 40), "RGB"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 40 // 3)
    with pytest.raises(CorruptImageError, match="decompression bomb"):
        read_header(data)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")                # PIL, on the mutated EXIF segments
def test_a_mutated_header_is_never_read_differently_from_pil() -> None:
    """Every byte before the first scan of three JPEGs, set to 4 other values: 5,774 headers. Where the walk
    accepts one, PIL must accept it too, with the same fields; the rest went through PIL (or both reject)."""
    datas = [_encoded(_image((50, 40), "RGB")), _encoded(_image((40, 50), "L"), progressive=True),
             _encoded(_image((20, 20), "RGB"), qtables=[[300] * 64, [2] * 64], exif=Image.Exif().tobytes())]
    walked = checked = 0
    for data in datas:
        for at in range(2, data.index(b"\xff\xda") + 4):
            for value in {0x00, 0xFF, 0xC2, data[at] ^ 0x10} - {data[at]}:
                mutated = data[:at] + bytes([value]) + data[at + 1:]
                try:
                    header = read_header(mutated)
                except CorruptImageError:
                    continue
                checked += 1
                if header.image is None:
                    walked += 1
                    assert _fields(header) == _pil(mutated), (at, value)
    assert walked > 1000 and checked > walked, (walked, checked)  # measured: 5,240 walked of 5,398 read
