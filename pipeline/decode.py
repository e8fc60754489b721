"""The one decode path: image bytes -> RGB uint8 pixels, or a typed :class:`DecodeError`.

Batch commands and the stream featurizer both call :func:`decode_image`, so an image that is
accepted (or refused) in one is treated the same in the other. Decoding never raises anything
but :class:`DecodeError`: a bad image is one row's problem, never its batch's.

Choices, and why:
- Pillow, not ``tf.io.decode_image``: it handles EXIF orientation, CMYK, 16-bit and palette
  transparency, and refuses truncated files instead of padding them with grey.
- The pixel-count limit is checked from the header *before* pixels are allocated, so a
  decompression bomb costs a few bytes of parsing, not gigabytes of memory.
- Transparent images (alpha, palette or colour-key transparency) are composited on white,
  the usual convention for product photos.
- A JPEG cut short *and* closed with an EOI marker is not refused by libjpeg: it warns and
  fills the missing blocks with flat grey. Pillow does not surface the warning, so
  :func:`_check_jpeg_padding` looks for that fill (see there for the limits of the check).
- When Pillow cannot open a file whose signature says it is one of our formats, the plugin's
  own error is recovered (:func:`_open_error`), so a PNG with a bad header CRC is ``corrupt``,
  not ``unsupported_format``.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.errors import DecodeError

#: Formats we accept (camera JPEGs that Pillow reports as MPO open through JPEG); TIFF is common
#: in archives. Everything else (SVG, HTML, PSD, ...) is ``unsupported_format``.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
#: Default pixel budget: 40 megapixels covers every camera photo; bombs are far larger.
DEFAULT_MAX_PIXELS = 40_000_000
#: Smallest side we accept: below this a CNN sees nothing but interpolation.
MIN_SIDE = 8

ImageFile.LOAD_TRUNCATED_IMAGES = False  # never silently pad a truncated file
# Our own pixel limit (checked from the header before any pixel is allocated) replaces Pillow's
# bomb *warning*; its hard DecompressionBombError still applies. A process-wide filter, set once,
# because ``warnings.catch_warnings`` is not thread-safe and tf.data decodes in parallel threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: What Pillow raises on malformed input (``struct.error`` escapes some plugins' header parsers).
_DECODE_FAILURES = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, MemoryError,
                    Image.DecompressionBombWarning, Image.DecompressionBombError)


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8 [H, W, 3], EXIF orientation applied
    width: int  # of the upright image
    height: int
    format: str


def image_id(data: bytes) -> str:
    """The image's identity everywhere (Kafka key, Parquet row, cache): sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode ``data`` to upright RGB pixels or raise :class:`DecodeError` with a reason code.

    Reason codes: ``empty``, ``unsupported_format``, ``too_large``, ``too_small``,
    ``truncated``, ``corrupt``.
    """
    if not data:
        raise DecodeError("empty", "zero bytes")
    image = _open(data, max_pixels)
    fmt = image.format or ""
    try:
        image.seek(0)  # animated GIF/WebP/TIFF: first frame
        image.load()
        if fmt in ("JPEG", "MPO"):
            _check_jpeg_padding(image)  # before exif_transpose: the fill is at the stored bottom
        image = ImageOps.exif_transpose(image) or image
        pixels = _to_rgb(image)
    except DecodeError:
        raise
    except _DECODE_FAILURES as exc:
        raise DecodeError(_classify(exc, data), str(exc)[:200]) from None
    height, width = pixels.shape[:2]
    return DecodedImage(pixels=pixels, width=width, height=height, format=fmt)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the format and check the declared size without decoding pixels."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise _open_error(data) from None
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", str(exc)[:200]) from None
    except _DECODE_FAILURES as exc:
        raise DecodeError(_classify(exc, data), str(exc)[:200]) from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError("too_large", f"{width}x{height} pixels exceeds the limit of {max_pixels}")
    if min(width, height) < MIN_SIDE:
        raise DecodeError("too_small", f"{width}x{height}; the smallest side must be at least {MIN_SIDE} px")
    return image


#: Leading bytes of the accepted formats: a file that starts like one of them but that Pillow
#: cannot open is damaged (``corrupt``/``truncated``), not of an ``unsupported_format``.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"), (b"BM", "BMP"),
)


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def _open_error(data: bytes) -> DecodeError:
    """Why ``Image.open`` could not identify ``data``.

    ``Image.open`` hides a plugin's error behind ``UnidentifiedImageError`` (it moves on to the
    next plugin). When the signature names one of our formats, run that plugin alone to get
    its real error and classify it.
    """
    fmt = _sniff(data)
    if fmt is None:
        return DecodeError("unsupported_format", f"not one of {', '.join(ACCEPTED_FORMATS)}")
    factory = Image.OPEN[fmt][0]
    try:
        factory(io.BytesIO(data), "").close()
    except Image.DecompressionBombError as exc:
        return DecodeError("too_large", str(exc)[:200])
    except Exception as exc:  # noqa: BLE001 (any plugin failure is this file's problem, classified)
        cause = exc.__cause__ or exc  # ImageFile wraps EOFError/struct.error in SyntaxError
        detail = f"{fmt} signature but unreadable: {exc}"[:200]
        return DecodeError(_classify(cause, data), detail)
    return DecodeError("corrupt", f"{fmt} signature but Pillow could not identify the file")


def _riff_short(data: bytes) -> bool:
    """A RIFF (WebP) file shorter than the size its header declares."""
    return data[:4] == b"RIFF" and len(data) >= 8 and len(data) < 8 + struct.unpack("<I", data[4:8])[0]


def _check_jpeg_padding(image: Image.Image) -> None:
    """Refuse a JPEG whose scan ended early and that libjpeg padded with flat grey.

    When the entropy-coded data stops at a marker (a file cut short and closed with an EOI,
    or a broken writer), libjpeg warns and decodes every remaining block as all-zero
    coefficients: exactly (128, 128, 128) from there to the end of the image. Pillow ignores
    the warning, so we look for it: the last pixel row exactly 128 everywhere while the first
    row is not. A real photo with a uniform #808080 background is grey at the top too, so it
    still passes; a cut inside the last row of 8x8/16x16 blocks, or a progressive JPEG whose
    later (detail) scans are missing, cannot be told from a real image and passes as well.
    """
    if image.mode not in ("RGB", "L"):
        return  # CMYK/YCCK fill decodes to other values
    width, height = image.size

    def all_grey(row: int) -> bool:
        return bool((np.asarray(image.crop((0, row, width, row + 1))) == 128).all())

    if all_grey(height - 1) and not all_grey(0):
        raise DecodeError("truncated", "scan data ends early: the bottom of the image is libjpeg's grey fill")


def _classify(exc: BaseException, data: bytes = b"") -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError)):
        return "too_large"
    text = str(exc).lower()
    if "truncated" in text or isinstance(exc, EOFError) or "premature end" in text:
        return "truncated"
    if isinstance(exc, struct.error) and "requires a buffer" in text:  # a header read ran out of bytes
        return "truncated"
    if _riff_short(data):  # libwebp only says "could not create decoder object"
        return "truncated"
    return "corrupt"


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to RGB uint8, keeping 16-bit range and honouring transparency."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _sixteen_bit_to_rgb(image)
    if mode in ("P", "L", "RGB") and "transparency" in image.info:  # palette or colour-key tRNS
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def _sixteen_bit_to_rgb(image: Image.Image) -> np.ndarray:
    """Pillow's ``convert('RGB')`` clips 16-bit values at 255; scale instead."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
    gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
