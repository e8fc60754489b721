"""Bad and unusual image files, made in code at test time (nothing binary is committed).

:func:`cases` returns one :class:`Case` per kind of file, each with the outcome
:func:`pipeline.model.decode.decode_image` must give it: ``"ok"`` (an upright RGB image of ``size``)
or ``"dead_letter"`` with a reason code. Every case says *why* in one line, and the
expectations were checked against what Pillow 13 / libjpeg-turbo 3 actually do, not what we
hoped they do (see the module notes on silent concealment below).

Notes on what decoders do with damaged files (measured, and why some expectations look odd):

- A JPEG cut anywhere (even just its 2-byte EOI) is refused by Pillow as truncated, because
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is off. But a JPEG cut mid-scan *with an EOI marker put
  back* decodes "fine" in both Pillow and ``tf.io.decode_jpeg``: libjpeg warns, stops and fills
  the missing blocks with flat grey (128, 128, 128). ``pipeline.model.decode`` looks for that fill
  itself (``_check_jpeg_padding``), so a baseline file cut that way comes back ``truncated``.
- Known gaps (``Case.gap`` names the reason they *should* get; ``expect`` records what decode
  really does, and test_decode keeps a strict xfail on each): garbled entropy-coded data in an
  intact JPEG is concealed by libjpeg (a warning Pillow never shows, garbage pixels out), and a
  progressive JPEG cut in its later scans and closed with an EOI is a whole, blurry image with
  no grey fill. Neither can be told apart from a real image through Pillow's API.
- A PNG whose IDAT CRC is wrong still decodes: Pillow does not check IDAT CRCs, and the pixels
  are protected by zlib's own Adler-32, so nothing is lost ("ok"). A bad IHDR CRC is refused.
- A GIF with no image block, or a header cut short (``struct`` runs out of bytes), reads as
  ``truncated``; a WebP shorter than its RIFF header says is ``truncated`` too (libwebp itself
  only says "could not create decoder object").

- Malformed metadata: Pillow raises ``TypeError``/``AttributeError`` on EXIF or TIFF tags of an
  unexpected type (``jpeg_exif_*``, ``tiff_strip_offsets_*``, found by fuzzing; the IFDs are
  built by hand with :func:`tiff_ifd`). Decode keeps the pixels when only EXIF is broken.

The streaming tests use the ``oversize`` case (a valid JPEG over 1 MiB) for the message limit;
``bomb`` cases must be refused from the header, before any pixel memory is allocated.
"""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image



@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expect: str  # "ok" | "dead_letter"
    reason: str | None  # DecodeError reason for dead letters, None for ok
    why: str = ""
    #: (width, height) of the upright decoded image, for "ok" cases.
    size: tuple[int, int] | None = None
    #: over 1 MB: for the stream's message-size limit (decode itself is "ok").
    oversize: bool = False
    #: declares a huge canvas: must be refused before pixels are allocated.
    bomb: bool = False
    #: a known gap: the reason this file *should* get, when decode cannot tell today and
    #: ``expect``/``reason`` record what it really does (test_decode keeps a strict xfail on it).
    gap: str | None = None

    def __repr__(self) -> str:  # keep pytest ids and failure messages short
        return f"Case({self.name!r}, {len(self.data)} bytes, {self.expect}, {self.reason})"

from tests.image_builders import (  # noqa: F401 - re-exported: tests build files through this module
    ONE_MB,     photo, encode, jpeg, png_chunk, png_raw, png_from_rows, png16_gray, png16_rgb, exif_jpeg, gif_frames,
    palette_with_transparency, colour_keyed_png, cmyk_jpeg, wide_tiff, heif, tiff_ifd, exif_app1, with_app1,
    gray_tiff, _jpeg_segments, _sos_end, _gif_header, _gif_image, _bmp_header, _png_bomb, _oversize_jpeg,
    PNG_MAGIC, SHORT, LONG, ASCII, RATIONAL, DOUBLE)


# --------------------------------------------------------------------------- the cases


def ok(name: str, data: bytes, size: tuple[int, int], why: str, **flags) -> Case:
    return Case(name, data, "ok", None, why, size=size, **flags)


def dead(name: str, data: bytes, reason: str, why: str, **flags) -> Case:
    return Case(name, data, "dead_letter", reason, why, **flags)


@functools.lru_cache(maxsize=1)
def _cases() -> tuple[Case, ...]:
    rng = np.random.default_rng(1234)
    base = jpeg()  # 320x240 baseline, 4:2:0
    scan = _sos_end(base)
    half = base[:len(base) // 2]
    segments = _jpeg_segments(base)
    out: list[Case] = []

    # -- not images at all
    out += [
        dead("empty", b"", "empty", "zero bytes"),
        dead("random_bytes", b"\x13\x37" + rng.bytes(4094), "unsupported_format", "no known signature"),
        dead("svg_text", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
             b'<rect width="64" height="64" fill="red"/></svg>', "unsupported_format",
             "vector text; we never rasterise SVG"),
        dead("html_text", b"<!DOCTYPE html><html><body><img src='cat.jpg'></body></html>\n", "unsupported_format",
             "an HTML error page saved as .jpg"),
        dead("pdf_header", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
             "unsupported_format", "PDF is not an image format we accept"),
    ]
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("photo.jpg", base)
    out.append(dead("zip_of_jpeg", zipped.getvalue(), "unsupported_format", "an archive, even one holding a JPEG"))
    out.append(dead("ico_icon", encode(Image.fromarray(photo(32, 32)), "ICO"), "unsupported_format",
                    "a valid image, but ICO is not in ACCEPTED_FORMATS"))

    # -- JPEG
    sos = segments[0xDA]
    broken_sos = bytearray(base)
    broken_sos[sos + 4] = 7  # SOS claims 7 components
    bad_dht = bytearray(base)
    dht = segments[0xC4]
    bad_dht[dht + 5:dht + 21] = b"\xff" * 16  # code-length counts overflow the code space
    garbled = bytearray(base)
    noise = rng.integers(0, 255, 120, dtype=np.uint8).tobytes()  # no 0xFF: never forms a marker
    garbled[scan + 300:scan + 420] = noise
    header_only = base[:scan]
    huge_header = bytearray(header_only)
    sof = segments[0xC0]
    huge_header[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    progressive = jpeg(progressive=True)
    icc = b"\x00" * 128 + b"acsp" + b"\x00" * 380  # content is not checked by the decoder
    out += [
        ok("jpeg_baseline", base, (320, 240), "the control: an ordinary camera-style JPEG"),
        dead("jpeg_truncated_half", half, "truncated", "an interrupted upload: half the bytes"),
        dead("jpeg_missing_eoi", base[:-2], "truncated",
             "only the 2-byte EOI is gone, but libjpeg-turbo wants the EOI before finishing the scan"),
        dead("jpeg_truncated_eoi_appended", half + b"\xff\xd9", "truncated",
             "half the scan + EOI: libjpeg pads the rest with grey; decode must notice the padding"),
        dead("jpeg_progressive_truncated", progressive[:len(progressive) * 2 // 3], "truncated",
             "later progressive scans missing"),
        dead("jpeg_header_only", header_only, "truncated", "headers up to SOS, no entropy-coded data"),
        dead("jpeg_header_only_huge", bytes(huge_header), "too_large",
             "SOF declares 60000x60000 (3.6 GP): refused from the header", bomb=True),
        dead("jpeg_corrupt_sos", bytes(broken_sos), "corrupt", "SOS header declares 7 components"),
        dead("jpeg_bad_huffman_table", bytes(bad_dht), "corrupt", "DHT code counts overflow the code space"),
        ok("jpeg_garbled_entropy", bytes(garbled), (320, 240),
           "120 bytes of scan data replaced: libjpeg conceals it with a warning Pillow never shows",
           gap="corrupt"),
        ok("jpeg_progressive_truncated_eoi_appended", progressive[:len(progressive) * 2 // 3] + b"\xff\xd9",
           (320, 240), "DC scans complete, detail scans cut + EOI: a blurry but whole image, no grey fill",
           gap="truncated"),
        ok("jpeg_trailing_garbage", base + b"GARBAGE" * 200, (320, 240), "bytes after EOI are ignored"),
        ok("jpeg_progressive", progressive, (320, 240), "progressive JPEGs are common on the web"),
        ok("jpeg_icc_profile", jpeg(icc_profile=icc), (320, 240), "an embedded ICC profile is carried, not applied"),
        ok("jpeg_grayscale", encode(Image.fromarray(photo()).convert("L"), "JPEG"), (320, 240), "1-component JPEG"),
        ok("jpeg_cmyk", cmyk_jpeg(), (64, 48), "Adobe CMYK JPEG is converted to RGB"),
        ok("jpeg_exif_orientation_6", exif_jpeg(6)[0], (320, 240),
           "stored 240x320, EXIF says rotate 90 CW: upright is 320x240"),
        ok("jpeg_exif_orientation_8", exif_jpeg(8)[0], (320, 240),
           "stored 240x320, EXIF says rotate 90 CCW: upright is 320x240"),
        ok("jpeg_oversize_noise", _oversize_jpeg(), (1400, 1000),
           "valid JPEG over 1 MB: decodes; the stream refuses it by size", oversize=True),
    ]
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x05" + b"\xff" * 40  # IFD runs off the end
    bad_exif = base[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + base[2:]
    out.append(ok("jpeg_malformed_exif", bad_exif, (320, 240),
                  "EXIF block is garbage: the pixels are fine, orientation is treated as unknown (1)"))

    # -- PNG
    rgb = photo(96, 64, seed=3)
    png = encode(rgb, "PNG")
    ihdr_bad_crc = bytearray(png)
    ihdr_bad_crc[29:33] = b"\xde\xad\xbe\xef"  # IHDR CRC (8 magic + 4 len + 4 type + 13 data)
    idat = png.index(b"IDAT") - 4
    idat_len = struct.unpack(">I", png[idat:idat + 4])[0]
    idat_bad_crc = bytearray(png)
    idat_bad_crc[idat + 8 + idat_len:idat + 12 + idat_len] = b"\xde\xad\xbe\xef"
    big_text = png_chunk(b"tEXt", b"Comment\x00" + b"lorem ipsum " * 75_000)  # 900 KB of text
    ztxt_bomb = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b" " * 50_000_000, 9))
    out += [
        dead("png_bad_crc_ihdr", bytes(ihdr_bad_crc), "corrupt", "the header chunk fails its CRC"),
        ok("png_bad_crc_idat", bytes(idat_bad_crc), (96, 64),
           "Pillow skips IDAT CRCs; zlib's Adler-32 still guards the pixels, so nothing is lost"),
        dead("png_truncated", png[:len(png) // 2], "truncated", "IDAT stream cut in half"),
        dead("png_header_truncated", png[:20], "truncated", "signature and part of IHDR only"),
        dead("png_bomb_30000", _png_bomb(), "too_large",
             "30000x30000 1-bit zeros in ~110 KB: 2.7 GB as RGB", bomb=True),
        dead("png_declares_10000x10000", png_raw(10000, 10000, 8, 2, zlib.compress(b"\x00" * 1000)), "too_large",
             "100 MP: under Pillow's own bomb error, over our 40 MP budget", bomb=True),
        ok("png_huge_text_chunk", png[:33] + big_text + png[33:], (96, 64),
           "900 KB of tEXt metadata; the pixels are fine"),
        dead("png_ztxt_bomb", png[:33] + ztxt_bomb + png[33:], "corrupt",
             "zTXt inflating to 50 MB: Pillow refuses metadata over MAX_TEXT_CHUNK"),
        ok("png_rgb", png, (96, 64), "plain 8-bit RGB"),
        ok("png_grayscale_L", encode(Image.fromarray(rgb).convert("L"), "PNG"), (96, 64),
           "8-bit grey -> 3 equal channels"),
        ok("png_1bit", encode(Image.fromarray(rgb).convert("1"), "PNG"), (96, 64), "1-bit bilevel"),
        ok("png_LA", encode(Image.fromarray(rgb).convert("LA"), "PNG"), (96, 64), "grey + alpha, composited on white"),
        ok("png_RGBA", encode(Image.fromarray(rgb).convert("RGBA"), "PNG"), (96, 64), "alpha composited on white"),
        ok("png_palette_transparency", palette_with_transparency(), (64, 48), "P + tRNS: transparent index -> white"),
        ok("png_rgb_colour_key", colour_keyed_png(), (96, 64),
           "RGB + tRNS colour key: keyed pixels composited on white"),
        ok("png_16bit_gray", png16_gray(np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)), (64, 48),
           "I;16: scaled 65535 -> 255, not clipped"),
        ok("png_16bit_rgb", png16_rgb(np.linspace(0, 65535, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint16)),
           (64, 48), "48-bit RGB: Pillow keeps the high byte"),
        dead("png_1x1", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "too_small", "a tracking pixel"),
        dead("png_thin_10000x2", encode(Image.new("RGB", (10000, 2), (9, 9, 9)), "PNG"), "too_small",
             "a 2-px rule: under MIN_SIDE"),
    ]

    # -- GIF
    lzw_garbage = bytes([0xFF]) * 40  # codes far beyond the table: invalid LZW
    out += [
        ok("gif_animated", gif_frames([(255, 0, 0), (0, 255, 0), (0, 0, 255)]), (64, 48), "first frame used"),
        dead("gif_bomb", _gif_header(65535, 65535) + _gif_image(65535, 65535, b"\x4c\x01") + b"\x3b", "too_large",
             "screen and frame declare 65535x65535 (4.3 GP)", bomb=True),
        dead("gif_no_frames", _gif_header(64, 48) + b"\x3b", "truncated",
             "screen descriptor then trailer, no image: Pillow hits EOF looking for the first frame"),
        dead("gif_bad_lzw", _gif_header(64, 48) + _gif_image(64, 48, lzw_garbage) + b"\x3b", "corrupt",
             "LZW codes that reference entries not yet in the table"),
    ]

    # -- BMP
    out += [
        ok("bmp", encode(rgb, "BMP"), (96, 64), "24-bit BMP"),
        dead("bmp_bomb", _bmp_header(50000, 50000), "too_large", "header declares 50000x50000, no pixels", bomb=True),
        dead("bmp_truncated", encode(rgb, "BMP")[:4000], "truncated", "pixel rows cut off"),
    ]

    # -- WebP
    frames = [Image.new("RGB", (64, 48), colour) for colour in [(255, 0, 0), (0, 255, 0)]]
    out += [
        ok("webp_lossy", encode(rgb, "WEBP", quality=80), (96, 64), "lossy VP8"),
        ok("webp_lossless", encode(rgb, "WEBP", lossless=True), (96, 64), "lossless VP8L"),
        dead("webp_truncated", encode(rgb, "WEBP", quality=80)[:600], "truncated",
             "shorter than its RIFF header says (libwebp itself only says 'could not create decoder')"),
        ok("webp_animated", encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100),
           (64, 48), "animated WebP: first frame used"),
    ]

    # -- TIFF
    pages = [Image.fromarray(rgb), Image.new("RGB", (20, 20), (0, 255, 0))]
    out += [
        ok("tiff", encode(rgb, "TIFF"), (96, 64), "uncompressed RGB TIFF"),
        ok("tiff_multipage", encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]), (96, 64),
           "first page used"),
    ]

    # -- malformed metadata (Pillow raised TypeError/AttributeError on these, which escaped decode)
    small = jpeg(64, 48)
    orientation_6 = (0x0112, SHORT, 1, struct.pack("<H", 6))
    out += [
        ok("jpeg_exif_rational_as_ascii", with_app1(small, exif_app1([orientation_6, (0x011A, ASCII, 4, b"72\0\0")])),
           (48, 64), "XResolution typed ASCII: Pillow's EXIF re-serialising raised TypeError; orientation 6 applied"),
        ok("jpeg_exif_string_as_rational", with_app1(small, exif_app1([orientation_6, (0x010F, RATIONAL, 1,
                                                                               struct.pack("<II", 1, 3))])),
           (48, 64), "Make typed RATIONAL: Pillow raised AttributeError; orientation 6 applied"),
        ok("jpeg_exif_orientation_rational",
           with_app1(small, exif_app1([(0x0112, RATIONAL, 1, struct.pack("<II", 6, 1))])),
           (48, 64), "orientation typed RATIONAL 6/1: still 6"),
        ok("jpeg_exif_orientation_text", with_app1(small, exif_app1([(0x0112, ASCII, 4, b"six\0")])),
           (64, 48), "orientation typed ASCII: meaningless, so no rotation; the pixels are kept"),
        ok("tiff_hand_made", gray_tiff(), (16, 16), "the control for the hand-made TIFFs below"),
        dead("tiff_strip_offsets_rational", gray_tiff({273: (RATIONAL, 1, struct.pack("<II", 400, 1))}), "corrupt",
             "StripOffsets typed RATIONAL: Pillow raised TypeError from load()"),
        dead("tiff_strip_offsets_double", gray_tiff({273: (DOUBLE, 1, struct.pack("<d", 400.0))}), "corrupt",
             "StripOffsets typed DOUBLE: Pillow raised TypeError from load()"),
    ]

    # -- wide samples: scaled to 0..255, never clipped (see pipeline.model.decode._wide_to_rgb)
    ramp = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    nan = ramp.copy()
    nan[0, 0] = np.nan
    out += [
        ok("tiff_float_unit", wide_tiff(ramp), (64, 48), "float32 in [0, 1]: x255, not black"),
        ok("tiff_float_wide", wide_tiff(ramp * 4000 - 1000), (64, 48), "float32 -1000..3000: stretched min..max"),
        ok("tiff_int32_wide", wide_tiff((ramp * 1_000_000).astype(np.int32)), (64, 48),
           "int32 up to 1e6: stretched min..max, not saturated at 65535"),
        dead("tiff_float_nan", wide_tiff(nan), "corrupt", "a NaN sample has no honest grey"),
    ]

    # -- HEIF (pillow-heif) and AVIF (Pillow)
    heic = heif(rgb)
    out += [
        ok("heic", heic, (96, 64), "HEIC, as iPhones save"),
        dead("heic_truncated", heic[:len(heic) // 2], "corrupt", "half a HEIC: libheif only says the data is invalid"),
        ok("avif", heif(rgb, "AVIF"), (96, 64), "AVIF, through Pillow's own plugin"),
    ]

    names = [case.name for case in out]
    assert len(names) == len(set(names)), "case names must be unique"
    return tuple(out)


def cases() -> list[Case]:
    """Every case (built once per process; the bomb alone takes ~0.4 s to compress)."""
    return list(_cases())


def by_name(name: str) -> Case:
    return next(case for case in _cases() if case.name == name)
