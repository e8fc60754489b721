"""The one decode path: image bytes -> RGB uint8 pixels, or a typed :class:`DecodeError`.

Batch commands and the stream featurizer both call :func:`decode_image`, so an image that is
accepted (or refused) in one is treated the same in the other. (The tf.data pipeline decodes
plain JPEGs in the graph instead, to the same pixels: :func:`graph_plan` picks them, and
:mod:`pipeline.model.graph_decode` hands back to :func:`decode_image` any it can't take.)
Decoding never raises anything but :class:`DecodeError`: a bad image is one row's problem,
never its batch's.

Choices, and why:
- Pillow, not ``tf.io.decode_image``: it handles EXIF orientation, CMYK, 16-bit and palette
  transparency, and refuses truncated files instead of padding them with grey.
- The pixel-count limit is checked from the header *before* pixels are allocated, so a
  decompression bomb costs a few bytes of parsing, not gigabytes of memory.
- Containment: Pillow's parsers raise almost anything on malformed input (``TypeError`` from
  an EXIF tag of an odd type, ``struct.error`` from a short header, ...). Whatever is raised
  inside Pillow (or pillow-heif), or is an I/O-style error, is the file's fault and gets a
  reason code (:func:`_failure`); anything else is a bug of ours and becomes ``internal_error``
  with the exception in its detail, still a :class:`DecodeError`, so it never kills a stream.
- EXIF orientation is read defensively (:func:`_orientation`): unreadable EXIF means "no
  rotation", and the pixels are kept. Pillow's ``exif_transpose`` is not used because it
  re-serialises the EXIF block, which is where malformed tags blow up.
- Transparent images (alpha, palette or colour-key transparency) are composited on white,
  the usual convention for product photos.
- Wide samples are scaled, never clipped (:func:`_wide_to_rgb`): a float TIFF in [0, 1] does
  not come out black, and 32-bit integers above 65535 do not saturate.
- ``min_side``: a caller that only needs a small image (the backbones see 224 px) asks for it,
  and JPEGs are then decoded by libjpeg's DCT-domain scaling (1/2, 1/4, 1/8): at 1/8 a camera
  photo skips most of the inverse DCT and all of the full-size colour conversion, and the result
  equals a box downscale of the full decode. Other formats are box-reduced after loading (which
  still saves the full-size conversion and copies). The reported width and height stay those
  of the full upright image (they describe the original in Parquet).
- A JPEG cut short *and* closed with an EOI marker is not refused by libjpeg: it warns and
  fills the missing blocks with flat grey. Pillow does not surface the warning, so
  :func:`_check_jpeg_padding` looks for that fill (see there for the limits of the check).
- When Pillow cannot open a file whose signature says it is one of our formats, the plugin's
  own error is recovered (:func:`_open_error`), so a PNG with a bad header CRC is ``corrupt``,
  not ``unsupported_format``.
- HEIC/HEIF open through pillow-heif (registered once, on first use); AVIF through Pillow's
  own plugin. Both follow the same rules (pixel limit from the header, orientation).
"""

from __future__ import annotations

import io
import math
import os
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import PIL
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.errors import DecodeError

#: Formats we accept (camera JPEGs that Pillow reports as MPO open through JPEG); TIFF is common
#: in archives, HEIF/AVIF on phones. Everything else (SVG, HTML, PSD, ...) is ``unsupported_format``.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "HEIF", "AVIF")
#: Default pixel budget: 40 megapixels covers every camera photo; bombs are far larger.
DEFAULT_MAX_PIXELS = 40_000_000
#: Smallest side we accept: below this a CNN sees nothing but interpolation.
MIN_SIDE = 8
#: The central crop every backbone keeps before resizing (``CENTRAL_FRACTION`` in
#: pipeline/model/nets/*.py; a test keeps them in step): what :func:`covering_side` must cover.
CENTRAL_FRACTION = 0.875

ImageFile.LOAD_TRUNCATED_IMAGES = False  # never silently pad a truncated file
# Our own pixel limit (checked from the header before any pixel is allocated) replaces Pillow's
# bomb *warning*; its hard DecompressionBombError still applies. A process-wide filter, set once,
# because ``warnings.catch_warnings`` is not thread-safe and tf.data decodes in parallel threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: Errors that mean "malformed input" wherever they come from (``struct.error`` escapes some
#: plugins' header parsers); other exception types count only when raised inside a decoder.
_INPUT_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
_TOO_LARGE = (MemoryError, Image.DecompressionBombWarning, Image.DecompressionBombError)
#: Where the decoders' Python code lives: an exception raised there is the file's problem.
_DECODER_DIRS = [os.path.dirname(PIL.__file__) + os.sep]
#: EXIF orientation -> the transpose that makes the stored pixels upright.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
#: Modes ``Image.reduce`` handles (P, 1 and I;16 are refused by it; they are rare at camera size).
_REDUCIBLE = ("L", "RGB", "RGBA", "LA", "I", "F", "CMYK", "YCbCr")


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8 [H, W, 3], EXIF orientation applied; smaller than width x height with min_side
    width: int  # of the full-size upright image, whatever size ``pixels`` were decoded at
    height: int
    format: str


def covering_side(image_size: int, central_fraction: float = CENTRAL_FRACTION) -> int:
    """The smallest short side whose central crop still has ``image_size`` real pixels.

    A backbone keeps the central ``central_fraction`` of each side and resizes it to
    ``image_size`` square; decoding any smaller would make it upsample, any larger only costs
    time. 224 px at 0.875 -> 256.
    """
    return math.ceil(image_size / central_fraction)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> DecodedImage:
    """Decode ``data`` to upright RGB pixels or raise :class:`DecodeError` with a reason code.

    ``min_side`` (None: full size) lets the decoder shrink the image by an integer factor as
    long as its short side stays ``>= min_side`` (see :func:`covering_side`): JPEGs through
    DCT scaling (the largest of 1/8, 1/4, 1/2 that fits), other formats by box reduction.
    ``width``/``height`` are always the full-size upright dimensions.

    Reason codes: ``empty``, ``unsupported_format``, ``too_large``, ``too_small``,
    ``truncated``, ``corrupt``; ``internal_error`` is a bug of ours (detail: the exception).
    """
    if not data:
        raise DecodeError("empty", "zero bytes")
    try:
        return _decode(data, max_pixels, min_side)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 (the boundary: nothing but DecodeError leaves)
        raise _failure(exc, data) from None


def _decode(data: bytes, max_pixels: int, min_side: int | None) -> DecodedImage:
    image = _open(data, max_pixels)
    fmt = image.format or ""
    image.seek(0)  # animated GIF/WebP/TIFF: first frame
    stored_width, stored_height = image.size
    jpeg = fmt in ("JPEG", "MPO")
    if jpeg and min_side:
        image.draft(image.mode, (min_side, min_side))  # DCT scaling: before load
    image.load()
    if jpeg:
        _check_jpeg_padding(image)  # before any transpose: the fill is at the stored bottom
    orientation = _orientation(image)
    if min_side and not jpeg:
        image = _reduce(image, min_side)
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
    pixels = _to_rgb(image)
    width, height = upright_size(stored_width, stored_height, orientation)
    return DecodedImage(pixels=pixels, width=width, height=height, format=fmt)


@dataclass(frozen=True)
class GraphPlan:
    """A JPEG that TensorFlow's libjpeg may decode instead of Pillow (:mod:`pipeline.model.graph_decode`)."""

    width: int  # stored, before the EXIF orientation
    height: int
    orientation: int


def graph_plan(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> GraphPlan | None:
    """The stored size and orientation of a JPEG that the graph decode may take, else ``None``.

    Only what the graph reproduces exactly: a JPEG (not MPO) that ends with its EOI marker, RGB
    or grey, and whose short side is under ``2 * min_side`` (larger ones are DCT-scaled by
    Pillow's ``draft``, which is the faster decode at that size). Everything else, including
    every header :func:`decode_image` would refuse, gets ``None`` and goes through
    :func:`decode_image`, so refusals keep their reasons. Reads the header only.
    """
    if not data.startswith(b"\xff\xd8\xff") or not data.endswith(b"\xff\xd9"):
        return None
    try:
        image = _open(data, max_pixels)
        width, height = image.size
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        if min_side and min(width, height) >= 2 * min_side:
            return None
        return GraphPlan(width, height, _orientation(image))
    except Exception:  # noqa: BLE001 (whatever is wrong with it, decode_image says what)
        return None


def upright_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """(width, height) of a stored image once its EXIF orientation is applied (5-8 turn it)."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _failure(exc: Exception, data: bytes) -> DecodeError:
    """The DecodeError for an exception raised while decoding ``data`` (see the module notes)."""
    detail = f"{type(exc).__name__}: {exc}"[:200]
    if isinstance(exc, _TOO_LARGE):
        return DecodeError("too_large", str(exc)[:200] or detail)
    if isinstance(exc, _INPUT_ERRORS) or _raised_in_decoder(exc):
        return DecodeError(_classify(exc, data), str(exc)[:200] or detail)
    return DecodeError("internal_error", detail)


def _raised_in_decoder(exc: BaseException) -> bool:
    """Whether the innermost Python frame of ``exc`` is Pillow's (or a Pillow plugin's) code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(tuple(_DECODER_DIRS))


def _orientation(image: Image.Image) -> int:
    """EXIF orientation (1..8), or 1 when the EXIF block is missing, unreadable or nonsense.

    A broken EXIF block must not cost the pixels: Pillow's EXIF parser raises ``TypeError``,
    ``SyntaxError``, ... on malformed tags, and an orientation of the wrong type or range means
    nothing we could apply.
    """
    try:
        value = image.getexif().get(0x0112, 1)
        number = int(value)  # a RATIONAL 6/1 is 6; a string, tuple or 6/0 is not a number
        return number if number == value and number in _UPRIGHT else 1
    except Exception:  # noqa: BLE001 (any EXIF parse failure: no orientation)
        return 1


def _reduce(image: Image.Image, min_side: int) -> Image.Image:
    """Box-reduce a loaded non-JPEG image by the largest integer factor keeping ``min_side``.

    Colour-keyed images are left alone (averaging would break the exact key colour), as are
    modes ``reduce`` refuses.
    """
    factor = min(image.size) // min_side
    if factor < 2 or image.mode not in _REDUCIBLE or "transparency" in image.info:
        return image
    return image.reduce(factor)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the format and check the declared size without decoding pixels."""
    _register_heif()
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise _open_error(data) from None
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
    if data[4:8] == b"ftyp":  # ISO base media file: the brand says which
        return _HEIF_BRANDS.get(data[8:12])
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


_HEIF_BRANDS = {**dict.fromkeys((b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"), "HEIF"),
                b"avif": "AVIF", b"avis": "AVIF"}
_heif_lock = threading.Lock()
_heif_registered = False


def _register_heif() -> None:
    """Register pillow-heif's HEIF opener, once, on first use (importing it loads libheif).

    Without pillow-heif installed, HEIF files are simply ``unsupported_format``.
    """
    global _heif_registered
    if _heif_registered:
        return
    with _heif_lock:
        if _heif_registered:
            return
        try:
            import pillow_heif
        except ImportError:
            pass
        else:
            pillow_heif.register_heif_opener()
            _DECODER_DIRS.append(os.path.dirname(pillow_heif.__file__) + os.sep)
        _heif_registered = True


def _open_error(data: bytes) -> DecodeError:
    """Why ``Image.open`` could not identify ``data``.

    ``Image.open`` hides a plugin's error behind ``UnidentifiedImageError`` (it moves on to the
    next plugin). When the signature names one of our formats, run that plugin alone to get
    its real error and classify it.
    """
    fmt = _sniff(data)
    if fmt is None or fmt not in Image.OPEN:
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
    """Convert any Pillow mode to RGB uint8, keeping wide ranges and honouring transparency."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _wide_to_rgb(image)
    if mode in ("P", "L", "RGB") and "transparency" in image.info:  # palette or colour-key tRNS
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def _wide_to_rgb(image: Image.Image) -> np.ndarray:
    """Grey 16-bit, 32-bit integer or float samples -> RGB uint8, scaled, never clipped.

    Pillow's ``convert('RGB')`` clips at 255 (a float TIFF in [0, 1] comes out black). The rule:

    - ``I;16`` (16-bit PNG/TIFF): 0..65535 -> 0..255.
    - ``I`` (32-bit integers): values within 0..255 are kept (8-bit data in a wide container),
      within 0..65535 are scaled as 16-bit; anything else (negative, or above 65535) is
      stretched min..max of this image -> 0..255.
    - ``F`` (32-bit float): values within [0, 1] are scaled x255 (the usual convention);
      anything else is stretched min..max. NaN or infinity is refused (``corrupt``): there is
      no honest grey for it.

    Min-max stretching is per image, so the absolute level is lost; a constant image comes out black.
    """
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F" and not np.isfinite(values).all():
        raise DecodeError("corrupt", "float pixels include NaN or infinity")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    elif image.mode == "I" and low >= 0 and high <= 65535:
        low, high = 0.0, (255.0 if high <= 255 else 65535.0)
    span = (high - low) or 1.0
    gray = np.clip((values - low) * (255.0 / span) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
