"""Safe decoding: every bad input is refused with its reason; odd-but-valid images become
deterministic 8-bit sRGB RGB with orientation applied and metadata gone."""

import io

import numpy as np
import pytest
from PIL import Image

from sfumato.data.decode import DecodeLimits, Rejected, decode_image, encode, render
from zoo import zoo_files

LIMITS = DecodeLimits(("JPEG", "PNG", "WEBP"), 10 * 2**20, 40_000_000, 16, 3.0)


@pytest.fixture(scope="module")
def zoo(flowers_dir):
    photo = sorted(flowers_dir.rglob("*.jpg"))[0].read_bytes()
    return zoo_files(photo)


def test_every_zoo_member_gets_its_reason(zoo):
    for name, (data, reason) in zoo.items():
        if reason is None:
            out = decode_image(data, LIMITS)
            assert out.image.mode == "RGB", name
        else:
            with pytest.raises(Rejected) as err:
                decode_image(data, LIMITS)
            assert err.value.reason == reason, f"{name}: {err.value}"


def test_file_size_cap_is_checked_before_decoding(zoo):
    data, _ = zoo["good.jpg"]
    with pytest.raises(Rejected, match="file_too_large"):
        decode_image(data, DecodeLimits(("JPEG",), len(data) - 1, 40_000_000, 16, 3.0))


def test_exif_orientation_is_applied(zoo):
    out = decode_image(zoo["rotated.jpg"][0], LIMITS)
    assert (out.width, out.height) == (40, 60)
    assert out.image.size == (40, 60)


def test_conversions_are_deterministic_and_correct(zoo):
    cmyk = decode_image(zoo["cmyk.jpg"][0], LIMITS)
    assert cmyk.source_mode == "CMYK" and cmyk.image.mode == "RGB"
    assert cmyk.image.tobytes() == decode_image(zoo["cmyk.jpg"][0], LIMITS).image.tobytes()

    gray = decode_image(zoo["gray16.png"][0], LIMITS)
    pixels = np.asarray(gray.image)
    assert gray.source_mode.startswith("I;16")
    assert pixels.dtype == np.uint8 and pixels[..., 0].max() == round(4095 * 16 / 257)
    assert (pixels[..., 0] == pixels[..., 2]).all()

    pal = np.asarray(decode_image(zoo["palette_alpha.png"][0], LIMITS).image)
    assert (pal[:, :24] == 255).all(), "transparent pixels composite over white"
    assert (pal[:, 24:] == [0, 0, 255]).all()


def test_metadata_is_stripped(zoo):
    out = decode_image(zoo["rotated.jpg"][0], LIMITS)
    assert not out.image.info and not out.image.getexif()
    again = Image.open(io.BytesIO(encode(out.image, "jpeg")))
    assert not again.getexif() and "icc_profile" not in again.info


def test_draft_decoding_keeps_full_size_metadata(flowers_dir):
    photo = sorted(flowers_dir.rglob("*.jpg"))[0].read_bytes()
    full = decode_image(photo, LIMITS)
    draft = decode_image(photo, LIMITS, draft_px=32)
    assert (draft.width, draft.height) == (full.width, full.height)
    assert min(draft.image.size) >= 32


@pytest.mark.parametrize("mode, expect", [("center_crop", (32, 32)), ("shorter_side", (48, 32))])
def test_render_modes(mode, expect):
    img = Image.new("RGB", (300, 200), "red")
    assert render(img, 32, mode).size == expect


def test_corrupted_bytes_are_rejected_never_raised(zoo):
    """Random byte damage to real files: each is decoded or rejected with a reason, nothing else."""
    rng = np.random.default_rng(0)
    originals = [zoo["good.jpg"][0], zoo["palette_alpha.png"][0], zoo["gray16.png"][0]]
    outcomes = set()
    for trial in range(150):
        data = bytearray(originals[trial % 3])
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 40))):
            data[pos] = int(rng.integers(0, 256))
        try:
            decode_image(bytes(data), LIMITS)
            outcomes.add("ok")
        except Rejected as rej:
            outcomes.add(rej.reason)
    assert "ok" in outcomes and outcomes - {"ok"}, outcomes
