"""The one decode path: every bad or unusual file gets the right outcome, and only DecodeError.

Files come from :mod:`tests.bad_images` (made in code at test time). Each case either decodes
to an upright RGB uint8 image of the expected size or is refused with the expected reason;
the specific tests below check the pixels themselves (orientation, 16-bit range, transparency,
CMYK, first frame) and that bombs are refused from the header, before pixels are allocated.
"""

from __future__ import annotations

import hashlib
import io
import time
import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.model import decode
from pipeline.model.decode import ACCEPTED_FORMATS, DEFAULT_MAX_PIXELS, DecodedImage, covering_side, decode_image
from schemas.messages import image_id
from pipeline.errors import DecodeError
from tests import bad_images
from tests.bad_images import Case, cases

CASES = cases()
REASONS = {"empty", "unsupported_format", "too_large", "too_small", "truncated", "corrupt"}


def _decode(data: bytes, **kwargs) -> DecodedImage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow's "Corrupt EXIF data" and friends
        return decode_image(data, **kwargs)


def _reason(data: bytes, **kwargs) -> str:
    with pytest.raises(DecodeError) as caught:
        _decode(data, **kwargs)
    return caught.value.reason


# --------------------------------------------------------------------------- the catalogue


def test_catalogue_is_broad_and_documented():
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)
    for case in CASES:
        assert case.why, f"{case.name} has no one-line why"
        assert case.expect in ("ok", "dead_letter"), case
        if case.expect == "ok":
            assert case.reason is None and case.size is not None, case
        else:
            assert case.reason in REASONS, case
        assert case.gap is None or case.gap in REASONS, case
    oversize = [case for case in CASES if case.oversize]
    assert oversize and all(len(case.data) > bad_images.ONE_MB for case in oversize)
    assert all(len(case.data) <= bad_images.ONE_MB for case in CASES if not case.oversize)
    assert {case.name for case in CASES if case.bomb} >= {"png_bomb_30000", "gif_bomb", "bmp_bomb"}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case_outcome(case: Case):
    """Either a correct DecodedImage or DecodeError(expected reason); never anything else."""
    try:
        decoded = _decode(case.data)
    except DecodeError as exc:
        assert case.expect == "dead_letter", f"{case.name} refused ({exc}); expected ok: {case.why}"
        assert exc.reason == case.reason, f"{case.name}: got {exc.reason!r} ({exc.detail}); expected {case.reason!r}"
        assert str(exc).startswith(exc.reason)
        return
    assert case.expect == "ok", f"{case.name} decoded; expected {case.reason!r}: {case.why}"
    assert isinstance(decoded, DecodedImage)
    pixels = decoded.pixels
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.flags.c_contiguous
    assert (decoded.width, decoded.height) == case.size
    assert pixels.shape[:2] == (decoded.height, decoded.width)
    assert decoded.format in ACCEPTED_FORMATS + ("MPO",)


GAPS = [case for case in CASES if case.gap]


@pytest.mark.parametrize("case", GAPS, ids=[case.name for case in GAPS])
def test_known_gap_still_open(case: Case, request):
    """What decode *should* say about these; strict xfail, so closing a gap is noticed."""
    request.applymarker(pytest.mark.xfail(strict=True, reason=f"known gap: {case.why}"))
    assert _reason(case.data) == case.gap


BOMBS = [case for case in CASES if case.bomb]


@pytest.mark.parametrize("case", BOMBS, ids=[case.name for case in BOMBS])
def test_bomb_refused_before_allocating_pixels(case: Case, monkeypatch):
    """Refused from the header: no pixel buffer is allocated, little memory, no time."""
    allocations: list[tuple[str, tuple[int, int]]] = []
    for name in ("new", "fill"):
        original = getattr(Image.core, name)

        def spy(mode, size, *args, _original=original):
            allocations.append((mode, tuple(size)))
            return _original(mode, size, *args)

        monkeypatch.setattr(Image.core, name, spy)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        reason = _reason(case.data)
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert reason == "too_large"
    assert elapsed < 0.5, f"{case.name} took {elapsed:.2f}s to refuse"
    assert peak < 8 * 2**20 + 4 * len(case.data), f"{case.name} peaked at {peak / 2**20:.1f} MiB"
    assert all(w * h <= 1_000_000 for _, (w, h) in allocations), allocations


def test_decode_never_raises_anything_but_decode_error():
    """Random damage to every good file: only DecodedImage or DecodeError, never a crash."""
    rng = np.random.default_rng(2024)
    outcomes: set[str] = set()
    for case in CASES:
        if case.expect != "ok" or case.oversize:
            continue
        for trial in range(12):
            data = bytearray(case.data)
            start = int(rng.integers(0, len(data)))
            width = int(rng.integers(1, 16)) if trial % 2 else 1
            data[start:start + width] = rng.bytes(min(width, len(data) - start))
            try:
                _decode(bytes(data))
                outcomes.add("ok")
            except DecodeError as exc:
                assert exc.reason in REASONS
                outcomes.add(exc.reason)
    assert "ok" in outcomes and len(outcomes) > 2


# --------------------------------------------------------------------------- specific behaviour


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_makes_pixels_upright(orientation: int):
    data, upright = bad_images.exif_jpeg(orientation)
    stored = Image.open(io.BytesIO(data))
    assert stored.size == ((240, 320) if orientation in (6, 8) else (320, 240))
    decoded = _decode(data)
    assert (decoded.width, decoded.height) == (320, 240)
    red_corner = decoded.pixels[5:35, 5:35].reshape(-1, 3).mean(axis=0)
    blue_corner = decoded.pixels[5:35, -35:-5].reshape(-1, 3).mean(axis=0)
    bottom = decoded.pixels[-35:-5].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(red_corner, (255, 0, 0), atol=12)
    np.testing.assert_allclose(blue_corner, (0, 0, 255), atol=12)
    np.testing.assert_allclose(bottom, (160, 160, 160), atol=6)
    assert np.abs(decoded.pixels.astype(int) - upright).mean() < 3


def test_sixteen_bit_gray_keeps_its_range():
    values = np.zeros((8, 32), np.uint16)
    values[:, 8:16], values[:, 16:24], values[:, 24:] = 32768, 65535, 257
    decoded = _decode(bad_images.png16_gray(values))
    assert Image.open(io.BytesIO(bad_images.png16_gray(values))).mode.startswith("I;16")
    row = decoded.pixels[4]
    assert (row[:8] == 0).all() and (row[16:24] == 255).all() and (row[24:] == 1).all()
    assert np.abs(row[8:16].astype(int) - 128).max() <= 1
    assert (decoded.pixels[..., 0] == decoded.pixels[..., 2]).all()


def test_sixteen_bit_rgb_keeps_its_range():
    values = np.zeros((8, 16, 3), np.uint16)
    values[:, :8] = (65535, 32768, 0)
    values[:, 8:] = (0, 65535, 32768)
    decoded = _decode(bad_images.png16_rgb(values))
    assert tuple(decoded.pixels[3, 3]) == (255, 128, 0)
    assert tuple(decoded.pixels[3, 12]) == (0, 255, 128)


def test_palette_transparency_is_composited_on_white():
    decoded = _decode(bad_images.palette_with_transparency())
    assert tuple(decoded.pixels[10, 5]) == (255, 255, 255)  # transparent index (red underneath)
    assert tuple(decoded.pixels[10, 50]) == (0, 0, 255)  # opaque blue


def test_colour_key_transparency_is_composited_on_white():
    decoded = _decode(bad_images.colour_keyed_png())
    assert (decoded.pixels[:16, :16] == 255).all()
    assert not (decoded.pixels[16:, 16:] == 255).all(axis=-1).any()


def test_grey_colour_key_and_alpha_are_composited_on_white():
    gray = np.full((16, 16), 90, np.uint8)
    gray[:8] = 0
    decoded = _decode(bad_images.encode(gray, "PNG", transparency=0))
    assert (decoded.pixels[:8] == 255).all() and (decoded.pixels[8:] == 90).all()
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 8:, 3] = 255  # left half fully transparent, right half opaque red-ish
    decoded = _decode(bad_images.encode(rgba, "PNG"))
    assert (decoded.pixels[:, :8] == 255).all()
    assert (decoded.pixels[:, 8:] == (200, 0, 0)).all()
    half = np.dstack([np.zeros((16, 16), np.uint8), np.full((16, 16), 128, np.uint8)])  # LA: black, 50% alpha
    decoded = _decode(bad_images.encode(Image.fromarray(half, "LA"), "PNG"))
    assert np.abs(decoded.pixels.astype(int) - 127).max() <= 1


@pytest.mark.parametrize("cmyk, rgb", [((255, 0, 0, 0), (0, 255, 255)), ((0, 0, 0, 255), (0, 0, 0)),
                                       ((0, 255, 255, 0), (255, 0, 0))])
def test_cmyk_jpeg_is_converted_to_rgb(cmyk, rgb):
    data = bad_images.cmyk_jpeg(cmyk)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = _decode(data)
    np.testing.assert_allclose(decoded.pixels.reshape(-1, 3).mean(axis=0), rgb, atol=10)


def test_first_frame_of_animations_is_used():
    gif = _decode(bad_images.gif_frames([(255, 0, 0), (0, 255, 0), (0, 0, 255)]))
    assert (gif.pixels == (255, 0, 0)).all()
    assert (gif.width, gif.height) == (64, 48)
    webp = _decode(bad_images.by_name("webp_animated").data)
    np.testing.assert_allclose(webp.pixels.reshape(-1, 3).mean(axis=0), (255, 0, 0), atol=8)
    tiff = _decode(bad_images.by_name("tiff_multipage").data)
    assert (tiff.width, tiff.height) == (96, 64)  # the first page, not the 20x20 green second one


def test_max_pixels_is_respected():
    data = bad_images.encode(bad_images.photo(100, 80), "PNG")
    assert _decode(data, max_pixels=8000).pixels.shape == (80, 100, 3)
    assert _reason(data, max_pixels=7999) == "too_large"
    assert _decode(data).width == 100  # the default budget
    assert DEFAULT_MAX_PIXELS >= 24_000_000  # a 24 MP camera photo is fine by default
    header_only = bad_images.png_raw(7000, 6000, 8, 2, b"")  # 42 MP
    assert _reason(header_only) == "too_large"
    assert _reason(header_only, max_pixels=50_000_000) == "truncated"  # allowed, but no pixels


def test_truncated_jpeg_closed_with_eoi_is_refused_wherever_it_is_cut():
    """libjpeg fills the rest with grey; decode must not hand those pixels on."""
    data = bad_images.jpeg(320, 240, seed=5)
    scan = bad_images._sos_end(data)
    before_last_block_row = int(len(data) * 0.9)  # a cut inside the last 16 rows goes unnoticed
    for cut in np.linspace(scan + 20, before_last_block_row, 12).astype(int):
        assert _reason(data[:cut] + b"\xff\xd9") == "truncated", cut


def test_grey_background_photos_are_not_mistaken_for_truncation():
    """The grey-fill check must not refuse a product shot on a #808080 background."""
    pixels = np.full((240, 320, 3), 128, np.uint8)
    pixels[60:180, 100:220] = (200, 30, 30)
    for fmt_kwargs in ({}, {"progressive": True}, {"subsampling": 0}):
        decoded = _decode(bad_images.encode(pixels, "JPEG", quality=90, **fmt_kwargs))
        assert decoded.pixels[-1].tolist() == [[128, 128, 128]] * 320
    gray = _decode(bad_images.encode(Image.fromarray(pixels).convert("L"), "JPEG"))
    assert gray.height == 240


def test_bad_header_checksum_is_corrupt_not_unsupported():
    assert _reason(bad_images.by_name("png_bad_crc_ihdr").data) == "corrupt"
    assert _reason(b"\x89PNG\r\n\x1a\n") == "truncated"  # only the signature
    assert _reason(b"GIF89a") == "truncated"
    assert _reason(b"BM\x00\x01") == "truncated"
    assert _reason(b"RIFF\x10\x00\x00\x00WEBP") == "truncated"  # RIFF header promises 16 bytes


def test_float_tiff_in_unit_range_is_scaled_not_black():
    values = np.zeros((16, 32), np.float32)
    values[:, 8:16], values[:, 16:24], values[:, 24:] = 0.5, 1.0, 0.25
    data = bad_images.wide_tiff(values)
    assert Image.open(io.BytesIO(data)).mode == "F"
    row = _decode(data).pixels[4, :, 0]
    assert (row[:8] == 0).all() and (row[16:24] == 255).all()
    assert np.abs(row[8:16].astype(int) - 128).max() <= 1 and np.abs(row[24:].astype(int) - 64).max() <= 1


def test_float_tiff_outside_unit_range_is_stretched_min_to_max():
    values = np.full((16, 32), -1000.0, np.float32)
    values[:, 16:] = 3000.0
    values[:, 8:16] = 1000.0
    row = _decode(bad_images.wide_tiff(values)).pixels[4, :, 0]
    assert (row[:8] == 0).all() and (row[16:] == 255).all() and np.abs(row[8:16].astype(int) - 128).max() <= 1
    flat = _decode(bad_images.wide_tiff(np.full((16, 16), 7.5, np.float32)))
    assert (flat.pixels == 0).all()  # constant: no range to stretch (documented)


def test_int32_tiff_is_not_saturated():
    values = np.zeros((16, 32), np.int32)
    values[:, 8:16], values[:, 16:] = 500_000, 1_000_000
    data = bad_images.wide_tiff(values)
    assert Image.open(io.BytesIO(data)).mode == "I"
    row = _decode(data).pixels[4, :, 0]
    assert (row[:8] == 0).all() and (row[16:] == 255).all() and np.abs(row[8:16].astype(int) - 128).max() <= 1
    sixteen = _decode(bad_images.wide_tiff(np.full((16, 16), 65535 // 2, np.int32))).pixels
    assert (np.abs(sixteen.astype(int) - 128) <= 1).all()  # 16-bit data in a 32-bit container: /65535
    eight = _decode(bad_images.wide_tiff(np.full((16, 16), 200, np.int32))).pixels
    assert (eight == 200).all()  # 8-bit data in a wide container: as is
    negative = values - 300_000
    assert _decode(bad_images.wide_tiff(negative)).pixels[4, 0, 0] == 0


def test_malformed_exif_keeps_pixels_and_other_tags_do_not_matter():
    """The TypeError cases: pixels decoded, orientation applied when it is readable."""
    data, upright = bad_images.exif_jpeg(6)
    tag = (0x011A, bad_images.ASCII, 4, b"72\0\0")  # XResolution typed ASCII
    orientation = (0x0112, bad_images.SHORT, 1, bytes([6, 0]))
    stripped = bad_images.encode(Image.open(io.BytesIO(data)), "JPEG", quality=95)
    decoded = _decode(bad_images.with_app1(stripped, bad_images.exif_app1([orientation, tag])))
    assert (decoded.width, decoded.height) == (320, 240)
    assert np.abs(decoded.pixels.astype(int) - upright).mean() < 3


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heif_and_avif_follow_the_same_rules(fmt):
    """Orientation ends upright, the pixel limit applies, the format is reported."""
    data, upright = bad_images.exif_jpeg(6)
    stored = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = 6
    encoded = bad_images.heif(stored, fmt, exif=exif.tobytes())
    decoded = _decode(encoded)
    assert decoded.format == fmt
    assert (decoded.width, decoded.height) == (320, 240)
    assert np.abs(decoded.pixels.astype(int) - upright).mean() < 6
    assert _reason(encoded, max_pixels=320 * 240 - 1) == "too_large"
    small = _decode(encoded, min_side=60)
    assert (small.width, small.height) == (320, 240) and small.pixels.shape == (60, 80, 3)


def test_min_side_decodes_jpeg_smaller_but_reports_the_full_upright_size():
    data = bad_images.jpeg(2000, 1200, seed=4)
    full = _decode(data)
    for min_side, short in ((256, 300), (150, 150), (600, 600), (1200, 1200), (1201, 1200), (None, 1200)):
        decoded = _decode(data, min_side=min_side)
        assert (decoded.width, decoded.height) == (2000, 1200)
        assert decoded.pixels.shape == (short, short * 5 // 3, 3), min_side
    scaled = _decode(data, min_side=300).pixels  # DCT scaling at 1/4 vs a box reduction of the full decode
    box = np.asarray(Image.fromarray(full.pixels).reduce(4))
    assert np.abs(scaled.astype(int) - box).mean() < 2


def test_min_side_keeps_exif_orientation():
    data, upright = bad_images.exif_jpeg(6, width=1280, height=960)
    decoded = _decode(data, min_side=240)
    assert (decoded.width, decoded.height) == (1280, 960)
    assert decoded.pixels.shape == (240, 320, 3)
    corners = decoded.pixels[2:8, 2:8], decoded.pixels[2:8, -8:-2]  # the 40-px squares are 10 px at 1/4
    np.testing.assert_allclose(corners[0].reshape(-1, 3).mean(axis=0), (255, 0, 0), atol=15)
    np.testing.assert_allclose(corners[1].reshape(-1, 3).mean(axis=0), (0, 0, 255), atol=15)


def test_min_side_reduces_other_formats_except_colour_keyed():
    pixels = bad_images.photo(900, 600, seed=2)
    for fmt in ("PNG", "WEBP", "TIFF", "BMP"):
        decoded = _decode(bad_images.encode(pixels, fmt), min_side=256)
        assert (decoded.width, decoded.height) == (900, 600) and decoded.pixels.shape == (300, 450, 3), fmt
    keyed = pixels.copy()
    keyed[:32, :32] = 0
    decoded = _decode(bad_images.encode(keyed, "PNG", transparency=(0, 0, 0)), min_side=256)
    assert decoded.pixels.shape == (600, 900, 3) and (decoded.pixels[:32, :32] == 255).all()


def test_covering_side_covers_the_central_crop():
    assert covering_side(224) == 256 and covering_side(224, 0.875) * 0.875 >= 224
    assert covering_side(299, 0.875) == 342


def test_our_own_bugs_become_internal_error(monkeypatch):
    """The boundary: an exception raised in our code is a DecodeError('internal_error'), not a crash."""
    def broken(image):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(decode, "_to_rgb", broken)
    with pytest.raises(DecodeError) as caught:
        _decode(bad_images.by_name("png_rgb").data)
    assert caught.value.reason == "internal_error"
    assert "KeyError" in caught.value.detail and "a bug of ours" in caught.value.detail


@pytest.mark.parametrize("name, step, error", [
    ("tiff_strip_offsets_rational", "load", TypeError), ("tiff_strip_offsets_double", "load", TypeError),
    ("jpeg_exif_rational_as_ascii", "exif_transpose", TypeError),
    ("jpeg_exif_string_as_rational", "exif_transpose", AttributeError)])
def test_regression_cases_still_make_pillow_raise_odd_types(name, step, error):
    """These catalogue cases exercise the containment only while plain Pillow raises on them.

    If a Pillow upgrade fixes one, this fails: find a new trigger (the fuzz test) rather than
    keep a case that tests nothing.
    """
    image = Image.open(io.BytesIO(bad_images.by_name(name).data))
    with pytest.raises(error):
        image.load() if step == "load" else ImageOps.exif_transpose(image)


def test_image_id_is_sha256_hex():
    data = bad_images.by_name("jpeg_baseline").data
    ident = image_id(data)
    assert ident == hashlib.sha256(data).hexdigest()
    assert len(ident) == 64 and set(ident) <= set("0123456789abcdef")
    assert image_id(data) == ident and image_id(data + b"\x00") != ident
    assert image_id(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_decode_error_is_typed():
    with pytest.raises(DecodeError) as caught:
        decode_image(b"")
    assert caught.value.reason == "empty" and isinstance(caught.value, Exception)
