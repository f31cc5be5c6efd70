"""Safe image decoding: bytes in, an oriented 8-bit sRGB RGB image out, or a reason why not.

The same function validates at ingest and renders at shard time, so a sample that passed ingest
decodes to the same pixels later. Checks run cheapest first: size, magic bytes (never the file
extension), the header's pixel count (decompression bombs are refused before any pixel is
decoded), minimum side and aspect ratio, and only then the full decode.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# Reject reasons: stable codes that rejects.parquet and the tests use.
EMPTY_FILE = "empty_file"
FILE_TOO_LARGE = "file_too_large"
NOT_AN_IMAGE = "not_an_image"
FORMAT_NOT_ALLOWED = "format_not_allowed"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
ASPECT_RATIO = "aspect_ratio"
TRUNCATED = "truncated"
CORRUPT = "corrupt"

_SRGB = ImageCms.createProfile("sRGB")
_WHITE = (255, 255, 255)


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeLimits:
    allowed_formats: tuple[str, ...]
    max_file_bytes: int
    max_image_pixels: int
    min_side_px: int
    max_aspect_ratio: float

    @classmethod
    def from_config(cls, ingest) -> DecodeLimits:
        return cls(
            allowed_formats=tuple(ingest.allowed_formats),
            max_file_bytes=ingest.max_file_bytes,
            max_image_pixels=ingest.max_image_pixels,
            min_side_px=ingest.min_side_px,
            max_aspect_ratio=ingest.max_aspect_ratio,
        )


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, 8-bit sRGB, EXIF orientation applied, no metadata
    format: str  # as read from the bytes: JPEG, PNG, ...
    source_mode: str  # the mode before conversion: CMYK, P, I;16, ...
    width: int  # full-resolution size after orientation
    height: int


def decode_image(data: bytes, limits: DecodeLimits, draft_px: int | None = None, convert: bool = True) -> Decoded:
    """Decode `data` or raise `Rejected`. `draft_px` lets JPEG decode at a reduced DCT scale
    that still keeps both sides >= draft_px (a large speed-up when only thumbnails are needed);
    width/height always report the full size. `convert=False` validates only: the pixels are
    decoded (so truncation is caught) but not converted to sRGB RGB."""
    if len(data) == 0:
        raise Rejected(EMPTY_FILE, "0 bytes")
    if len(data) > limits.max_file_bytes:
        raise Rejected(FILE_TOO_LARGE, f"{len(data)} bytes > max_file_bytes={limits.max_file_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Rejected(DECOMPRESSION_BOMB, str(exc)) from None
        except UnidentifiedImageError:
            raise Rejected(NOT_AN_IMAGE, "no known image format in the bytes") from None
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: a decoder may raise anything
            raise Rejected(CORRUPT, f"header: {type(exc).__name__}: {exc}") from None
    if img.format not in limits.allowed_formats:
        raise Rejected(FORMAT_NOT_ALLOWED, f"{img.format} not in {list(limits.allowed_formats)}")
    width, height = img.size
    if width * height > limits.max_image_pixels:
        raise Rejected(
            DECOMPRESSION_BOMB,
            f"{width}x{height} = {width * height} px > max_image_pixels={limits.max_image_pixels}",
        )
    if min(width, height) < limits.min_side_px:
        raise Rejected(TOO_SMALL, f"{width}x{height}, shorter side < min_side_px={limits.min_side_px}")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise Rejected(ASPECT_RATIO, f"{width}x{height} exceeds max_aspect_ratio={limits.max_aspect_ratio}")
    source_mode, image_format = img.mode, img.format
    if draft_px is not None and img.format == "JPEG":
        img.draft("RGB", (draft_px, draft_px))
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: one bad file must not fail a block
        reason = TRUNCATED if "truncat" in str(exc).lower() else CORRUPT
        raise Rejected(reason, f"{type(exc).__name__}: {exc}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        pass  # unreadable EXIF: keep the stored orientation rather than lose the image
    if _swapped(img.size, (width, height)):
        width, height = height, width
    return Decoded(_to_srgb_rgb(img) if convert else img, image_format, source_mode, width, height)


def _swapped(now: tuple[int, int], header: tuple[int, int]) -> bool:
    """True if orientation swapped the axes (compared by aspect, since draft may have scaled)."""
    return (now[0] > now[1] and header[0] < header[1]) or (now[0] < now[1] and header[0] > header[1])


def _to_srgb_rgb(img: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB in sRGB, deterministically; alpha is composited over white."""
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "RGBA", "CMYK", "L"):
        try:
            img = ImageCms.applyTransform(img, _to_srgb_transform(icc, img.mode))
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to treating the values as sRGB
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grey: map 0..65535 to 0..255 with rounding.
        values = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, _WHITE)
        background.paste(img, mask=img.getchannel("A"))
        img = background
    if img.mode != "RGB":
        img = img.convert("RGB")
    # A fresh image carries no EXIF, ICC or text chunks into anything we encode.
    return Image.frombytes("RGB", img.size, img.tobytes())


@lru_cache(maxsize=64)
def _to_srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """Building a colour transform costs more than decoding a photo; most files of a source
    share one embedded profile, so transforms are cached by (profile bytes, mode)."""
    out_mode = "RGBA" if mode == "RGBA" else "RGB"
    return ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB, mode, out_mode)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (width, height) bucket whose aspect ratio is nearest the image's, on a log scale (so
    2:1 and 1:2 are equally far from 1:1); ties go to the earlier bucket."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def render(
    img: Image.Image, resolution_px: int, resize_mode: str, bucket: tuple[int, int] | None = None
) -> Image.Image:
    """Resize for one training resolution: a centered square crop, or the shorter side scaled
    to the resolution with the aspect ratio kept; with a (width, height) `bucket`, scaled to
    cover the bucket and centre-cropped to it (the aspect mismatch: a few per cent of a side)."""
    if bucket is not None:
        return cover_crop(img, *bucket)
    width, height = img.size
    scale = resolution_px / min(width, height)
    new_size = (max(resolution_px, round(width * scale)), max(resolution_px, round(height * scale)))
    resized = img.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if resize_mode == "shorter_side":
        return resized
    left = (new_size[0] - resolution_px) // 2
    top = (new_size[1] - resolution_px) // 2
    return resized.crop((left, top, left + resolution_px, top + resolution_px))


def cover_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled to cover width x height, aspect kept, then centre-cropped to it."""
    scale = max(width / img.width, height / img.height)
    new_size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    resized = img.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_size[0] - width) // 2, (new_size[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))


def encode(img: Image.Image, image_format: str, jpeg_quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, "PNG", compress_level=6)
    elif image_format == "jpeg":
        img.save(buf, "JPEG", quality=jpeg_quality, subsampling=0)
    elif image_format == "webp":
        img.save(buf, "WEBP", quality=jpeg_quality, method=4)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return buf.getvalue()


EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
