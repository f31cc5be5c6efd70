"""A zoo of inputs a user's raw data really contains, made from real photos where it matters.

`zoo_files(photo)` returns {filename: (bytes, expected reject reason or None)}; `photo` is the
bytes of a real JPEG from the repository's fixtures (tests/fixtures/flowers).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _png_with_header_only(width: int, height: int) -> bytes:
    """A tiny file whose PNG header claims width x height: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rotated_jpeg(photo: bytes) -> bytes:
    """A landscape photo stored 60x40 with EXIF orientation 6 (display rotated 90 degrees cw)."""
    img = Image.open(io.BytesIO(photo)).convert("RGB").resize((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", exif=exif.tobytes(), quality=95)


def cmyk_jpeg(photo: bytes) -> bytes:
    return _save(Image.open(io.BytesIO(photo)).convert("RGB").resize((64, 48)).convert("CMYK"), "JPEG", quality=95)


def gray16_png() -> bytes:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    img = Image.new("I;16", (64, 64))
    img.frombytes(ramp.astype("<u2").tobytes())
    return _save(img, "PNG")


def palette_alpha_png() -> bytes:
    img = Image.new("P", (48, 48), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    for x in range(24, 48):
        for y in range(48):
            img.putpixel((x, y), 1)
    return _save(img, "PNG", transparency=0)  # left half: transparent red -> white


def zoo_files(photo: bytes) -> dict[str, tuple[bytes, str | None]]:
    return {
        "empty.jpg": (b"", "empty_file"),
        "truncated.jpg": (photo[: len(photo) // 2], "truncated"),
        "text_named.jpg": (b"this is a text file, not a picture\n" * 20, "not_an_image"),
        "bomb_header.png": (_png_with_header_only(30000, 30000), "decompression_bomb"),
        "bomb_over_limit.png": (_png_with_header_only(8000, 8000), "decompression_bomb"),
        "thin_1x5000.png": (_save(Image.new("RGB", (1, 5000), "gray"), "PNG"), "too_small"),
        "wide_40x400.png": (_save(Image.new("RGB", (400, 40), "gray"), "PNG"), "aspect_ratio"),
        "animated.gif": (_save(Image.new("P", (64, 64)), "GIF"), "format_not_allowed"),
        "cmyk.jpg": (cmyk_jpeg(photo), None),
        "gray16.png": (gray16_png(), None),
        "palette_alpha.png": (palette_alpha_png(), None),
        "rotated.jpg": (rotated_jpeg(photo), None),
        "good.jpg": (photo, None),
    }
