"""Builders of image files for the decode tests and the bad-image corpus (:mod:`tests.bad_images`):
valid photos of every format, and byte-level pieces (PNG chunks, TIFF IFDs, EXIF segments, GIF
and BMP headers) to damage them with.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

#: Streaming message-size limit the ``oversize`` case must exceed.
ONE_MB = 1 << 20




def photo(width: int = 320, height: int = 240, seed: int = 0) -> np.ndarray:
    """A photo-like RGB uint8 image: smooth gradients, a few shapes, mild sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        128 + 100 * np.sin(x / (17 + seed) + y / 41),
        128 + 90 * np.cos(y / (23 + seed) - x / 57),
        128 + 80 * np.sin((x + y) / (31 + seed)),
    ], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        x1, y1 = x0 + int(rng.integers(5, width // 3)), y0 + int(rng.integers(5, height // 3))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str, **params) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def jpeg(width: int = 320, height: int = 240, seed: int = 0, **params) -> bytes:
    params.setdefault("quality", 90)
    return encode(photo(width, height, seed), "JPEG", **params)


def png_chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    if crc is None:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_raw(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes,
            extra: bytes = b"") -> bytes:
    """A PNG from an already-compressed IDAT payload (``extra`` chunks go before IDAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return PNG_MAGIC + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_from_rows(rows: np.ndarray, bit_depth: int, colour_type: int) -> bytes:
    """A PNG from big-endian sample rows ``[H, W*samples]`` (filter 0 on every row)."""
    height = rows.shape[0]
    dtype = ">u2" if bit_depth == 16 else np.uint8
    body = np.asarray(rows, dtype=dtype).reshape(height, -1).tobytes()
    stride = len(body) // height
    raw = b"".join(b"\x00" + body[i * stride:(i + 1) * stride] for i in range(height))
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    width = rows.reshape(height, -1).shape[1] // samples
    return png_raw(width, height, bit_depth, colour_type, zlib.compress(raw, 9))


def png16_gray(values: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG (Pillow opens it as mode ``I;16``)."""
    return png_from_rows(values, 16, 0)


def png16_rgb(values: np.ndarray) -> bytes:
    """A 16-bit RGB PNG ``[H, W, 3]`` (Pillow keeps the high byte of each sample)."""
    height, width, _ = values.shape
    return png_from_rows(values.reshape(height, width * 3), 16, 2)


def exif_jpeg(orientation: int, width: int = 320, height: int = 240) -> tuple[bytes, np.ndarray]:
    """A JPEG whose stored pixels need EXIF ``orientation`` to look like ``upright``.

    ``upright`` (returned too) is a grey ``width x height`` image with a red square in its
    top-left corner and a blue one in its top-right, so a test can see where they end up.
    """
    upright = np.full((height, width, 3), 160, np.uint8)
    upright[:40, :40] = (255, 0, 0)
    upright[:40, -40:] = (0, 0, 255)
    image = Image.fromarray(upright)
    # exif_transpose undoes these: 6 -> rotate 270 (clockwise), 8 -> rotate 90, 3 -> 180.
    stored = {1: image, 3: image.transpose(Image.Transpose.ROTATE_180),
              6: image.transpose(Image.Transpose.ROTATE_90),
              8: image.transpose(Image.Transpose.ROTATE_270)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes()), upright


def gif_frames(colours: list[tuple[int, int, int]], size: tuple[int, int] = (64, 48)) -> bytes:
    frames = [Image.new("RGB", size, colour) for colour in colours]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_with_transparency(size: tuple[int, int] = (64, 48)) -> bytes:
    """Mode P: index 0 is transparent red (left half), index 1 opaque blue (right half)."""
    image = Image.new("P", size, 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    ImageDraw.Draw(image).rectangle((size[0] // 2, 0, size[0], size[1]), fill=1)
    return encode(image, "PNG", transparency=0)


def colour_keyed_png() -> bytes:
    """RGB + tRNS colour key (0, 0, 0): the black 16x16 top-left square is transparent."""
    pixels = photo(96, 64, seed=3)
    pixels[pixels.sum(axis=-1) == 0] = (1, 1, 1)  # only the square is keyed
    pixels[:16, :16] = 0
    return encode(pixels, "PNG", transparency=(0, 0, 0))


def cmyk_jpeg(colour: tuple[int, int, int, int] = (255, 0, 0, 0), size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(Image.new("CMYK", size, colour), "JPEG", quality=95)


def wide_tiff(values: np.ndarray) -> bytes:
    """A one-channel TIFF of float32 (mode F) or int32 (mode I) samples, as scientific cameras write."""
    return encode(Image.fromarray(values), "TIFF")


def heif(image: Image.Image | np.ndarray, fmt: str = "HEIF", **params) -> bytes:
    """A HEIC (through pillow-heif) or AVIF (Pillow's own plugin) file."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    params.setdefault("quality", 90)
    return encode(image, fmt, **params)


#: TIFF field types used below (TIFF 6.0 section 2).
SHORT, LONG, ASCII, RATIONAL, DOUBLE = 3, 4, 2, 5, 12


def tiff_ifd(entries: list[tuple[int, int, int, bytes]], offset: int = 8) -> bytes:
    """A little-endian IFD at ``offset`` from ``(tag, type, count, value bytes)``; long values follow it."""
    entries = sorted(entries)
    spill_at = offset + 2 + 12 * len(entries) + 4
    body, spill = b"", b""
    for tag, kind, count, value in entries:
        if len(value) <= 4:
            body += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
        else:
            body += struct.pack("<HHII", tag, kind, count, spill_at + len(spill))
            spill += value + b"\0" * (len(value) % 2)
    return struct.pack("<H", len(entries)) + body + b"\0\0\0\0" + spill


def exif_app1(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """An APP1 payload: ``Exif\\0\\0`` + a TIFF header + one IFD."""
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + tiff_ifd(entries)


def with_app1(data: bytes, payload: bytes) -> bytes:
    """``data`` (a JPEG) with an APP1 segment carrying ``payload`` right after SOI."""
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def gray_tiff(overrides: dict[int, tuple[int, int, bytes]] | None = None, side: int = 16) -> bytes:
    """A hand-made ``side`` x ``side`` 8-bit grey strip TIFF; ``overrides`` replace tags (type, count, value)."""
    tags = {256: (SHORT, 1, struct.pack("<H", side)), 257: (SHORT, 1, struct.pack("<H", side)),
            258: (SHORT, 1, struct.pack("<H", 8)), 259: (SHORT, 1, struct.pack("<H", 1)),
            262: (SHORT, 1, struct.pack("<H", 1)), 277: (SHORT, 1, struct.pack("<H", 1)),
            278: (LONG, 1, struct.pack("<I", side)), 279: (LONG, 1, struct.pack("<I", side * side)),
            273: (LONG, 1, b"\0\0\0\0")}
    tags.update(overrides or {})
    pixels_at = 8 + len(tiff_ifd([(tag, *field) for tag, field in tags.items()]))
    if 273 not in (overrides or {}):
        tags[273] = (LONG, 1, struct.pack("<I", pixels_at))
    pixels = (np.arange(side * side) % 256).astype(np.uint8).tobytes()
    return b"II*\0" + struct.pack("<I", 8) + tiff_ifd([(tag, *field) for tag, field in tags.items()]) + pixels


def _jpeg_segments(data: bytes) -> dict[int, int]:
    """Offsets of the first occurrence of each marker before the scan data (SOI..SOS)."""
    found: dict[int, int] = {}
    pos = 2
    while pos < len(data) - 4:
        assert data[pos] == 0xFF, f"not at a marker: {pos}"
        marker = data[pos + 1]
        found.setdefault(marker, pos)
        if marker == 0xDA:
            break
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return found


def _sos_end(data: bytes) -> int:
    sos = _jpeg_segments(data)[0xDA]
    return sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]


def _gif_header(width: int, height: int) -> bytes:
    palette = bytes([0, 0, 0, 255, 255, 255])  # 2 colours
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + palette
    return screen


def _gif_image(width: int, height: int, lzw: bytes, min_code_size: int = 2) -> bytes:
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    blocks = b"".join(bytes([len(lzw[i:i + 255])]) + lzw[i:i + 255] for i in range(0, len(lzw), 255))
    return descriptor + bytes([min_code_size]) + blocks + b"\x00"


def _bmp_header(width: int, height: int, bits: int = 24) -> bytes:
    """A BITMAPINFOHEADER BMP header declaring ``width x height`` (pixels not included)."""
    row = ((width * bits + 31) // 32) * 4
    image_size = row * height
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, image_size & 0xFFFFFFFF, 2835, 2835, 0, 0)
    file_header = b"BM" + struct.pack("<IHHI", (54 + image_size) & 0xFFFFFFFF, 0, 0, 54)
    return file_header + info


def _png_bomb(side: int = 30000) -> bytes:
    """1-bit grey PNG of ``side x side`` zeros: 112 MB of pixels (2.7 GB as RGB) in ~110 KB."""
    row = b"\x00" * (1 + (side + 7) // 8)
    block = row * 1000
    packer = zlib.compressobj(9)
    parts = [packer.compress(block) for _ in range(side // 1000)]
    parts.append(packer.compress(row * (side % 1000)))
    parts.append(packer.flush())
    return png_raw(side, side, 1, 0, b"".join(parts))


def _oversize_jpeg() -> bytes:
    """Valid JPEG noise over 1 MiB (about 1.6 MB: noise defeats compression)."""
    rng = np.random.default_rng(7)
    data = encode(rng.integers(0, 256, (1000, 1400, 3), dtype=np.uint8), "JPEG", quality=95)
    assert len(data) > ONE_MB, len(data)
    return data
