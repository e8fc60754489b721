"""Fuzzing the one decode path: damaged bytes get a DecodedImage or a DecodeError, nothing else.

Seeds are the catalogue in :mod:`tests.bad_images` (its small files) plus small valid files of
every accepted format made here, with EXIF where the format carries it. Each example applies a
few byte mutations (bit flips, byte sets, truncation, deletion, duplication, splices from
another seed) and decodes at full size and shrunk (``min_side``: the JPEG DCT-scaling and
reduce paths). Derandomized, so CI always runs the same examples; the deadline bounds the time
of one decode. What it finds is fixed in pipeline/model/decode.py and kept as a named case in
tests/bad_images.py.
"""

from __future__ import annotations

import functools
import warnings
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.model.decode import DecodedImage, decode_image
from pipeline.errors import DecodeError
from tests import bad_images

#: What a damaged file may get; ``internal_error`` (a bug of ours) is a failure here.
REASONS = {"empty", "unsupported_format", "too_large", "too_small", "truncated", "corrupt"}
#: Keeps every decode small and fast (the oversize JPEG and the PNG bomb are left out).
MAX_SEED_BYTES = 64 * 1024


@functools.lru_cache(maxsize=1)
def seeds() -> tuple[bytes, ...]:
    pixels = bad_images.photo(48, 40, seed=9)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "fuzz"
    made = [
        bad_images.encode(pixels, "JPEG", quality=85, exif=exif.tobytes()),
        bad_images.encode(pixels, "JPEG", quality=85, progressive=True),
        bad_images.encode(pixels, "PNG", exif=exif.tobytes()),
        bad_images.encode(Image.fromarray(pixels).convert("RGBA"), "PNG"),
        bad_images.encode(pixels, "TIFF", exif=exif.tobytes()),
        bad_images.encode(pixels, "TIFF", compression="tiff_lzw"),
        bad_images.encode(pixels, "WEBP", quality=80, exif=exif.tobytes()),
        bad_images.encode(pixels, "WEBP", lossless=True),
        bad_images.gif_frames([(255, 0, 0), (0, 0, 255)], size=(48, 40)),
        bad_images.encode(pixels, "BMP"),
        bad_images.wide_tiff(np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(40, 48)),
        bad_images.heif(pixels),
        bad_images.heif(pixels, "AVIF"),
    ]
    corpus = [case.data for case in bad_images.cases() if case.data and len(case.data) <= MAX_SEED_BYTES]
    return tuple(made + corpus)


@pytest.fixture(scope="module")
def corpus() -> tuple[bytes, ...]:
    """Built once, before the examples run (the catalogue takes a second to make)."""
    return seeds()


MUTATION = st.tuples(st.sampled_from(["flip", "set", "truncate", "delete", "duplicate", "splice"]),
                     st.floats(0, 1), st.integers(0, 255), st.integers(1, 64))


def mutate(data: bytes, mutations: list[tuple[str, float, int, int]], donor: bytes) -> bytes:
    out = bytearray(data)
    for kind, where, value, length in mutations:
        if not out:
            break
        at = min(int(where * len(out)), len(out) - 1)
        if kind == "flip":
            out[at] ^= 1 << (value % 8)
        elif kind == "set":
            out[at] = value
        elif kind == "truncate":
            del out[at:]
        elif kind == "delete":
            del out[at:at + length]
        elif kind == "duplicate":
            out[at:at] = out[at:at + length]
        else:
            start = min(int(where * len(donor)), max(len(donor) - 1, 0))
            out[at:at] = donor[start:start + length]
    return bytes(out)


@settings(derandomize=True, max_examples=1200, deadline=timedelta(seconds=2), database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), donor=st.integers(0, 10_000),
       mutations=st.lists(MUTATION, min_size=1, max_size=4), min_side=st.sampled_from([None, 24, 256]))
def test_damaged_bytes_give_an_image_or_a_decode_error(corpus, seed, donor, mutations, min_side):
    data = mutate(corpus[seed % len(corpus)], mutations, corpus[donor % len(corpus)])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data" and friends
            decoded = decode_image(data, min_side=min_side)
    except DecodeError as exc:
        assert exc.reason in REASONS, f"{exc.reason}: {exc.detail}"
        return
    assert isinstance(decoded, DecodedImage)
    pixels = decoded.pixels
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.flags.c_contiguous
    if min_side is None:
        assert pixels.shape[:2] == (decoded.height, decoded.width)
    else:
        assert pixels.shape[0] <= decoded.height and pixels.shape[1] <= decoded.width


def test_seeds_cover_every_accepted_format():
    """The fuzz test starts from valid files of every format, or it fuzzes less than it claims."""
    from pipeline.model.decode import ACCEPTED_FORMATS

    found = set()
    for data in seeds():
        try:
            found.add(decode_image(data).format)
        except DecodeError:
            pass
    assert found >= set(ACCEPTED_FORMATS)
