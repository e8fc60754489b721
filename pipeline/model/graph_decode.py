"""JPEG decode inside the tf.data graph, for the photos where it gives exactly what Pillow gives.

Why: decoding is most of the stream's CPU outside the model, and Pillow's decode holds the
interpreter in Python around libjpeg. TensorFlow's ``decode_and_crop_jpeg`` runs in the
tf.data threads without Python, and skips the colour conversion of the columns the central
crop drops. With ``dct_method="INTEGER_ACCURATE"`` (libjpeg's ISLOW, Pillow's default) its
pixels are bit-identical to Pillow's (checked on every reference photo), so a vector does not
depend on which path decoded its photo, and the feature identity is unchanged.

Which photos (:func:`pipeline.model.decode.graph_plan` decides, from the header, in Python):
plain baseline/progressive RGB or grey JPEGs that end with an EOI marker and need no DCT
scaling. Everything else, and every photo the graph decode refuses, goes through
:func:`pipeline.model.decode.decode_image`, so every bad input keeps its outcome and reason:

- A graph op that fails would fail the whole batch's ``get_next``. :func:`decode_central`
  contains it: the decode runs in a one-element dataset with ``ignore_errors``, followed by a
  "failed" element, and the first element left is taken. A failure is a flag, never an error.
- libjpeg fills a JPEG cut short and closed with an EOI with flat grey, without an error;
  Pillow's path refuses it as ``truncated`` (``decode._check_jpeg_padding``). Here any photo
  whose last row is all grey (128) is handed to Pillow, which decides.
- A decoded size other than the header's is handed to Pillow too.

The crop: full height (so the last row can be checked), the central columns; the central rows
are sliced after. ``tf.image.central_crop`` keeps the same margins on both ends of each side,
so cropping the stored image and then applying the EXIF orientation gives the same pixels as
orienting the whole image and cropping it, which is what the Pillow path does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # TensorFlow loads when the first pipeline is built, not on import
    import tensorflow as tf

#: Extra columns decoded each side of the crop: more than any chroma subsampling's reach (4:1:1).
_EDGE = 16
#: libjpeg's fill for blocks after the scan ended early: all-zero coefficients decode to 128.
_GREY_FILL = 128


def central_margin(side: int, central_fraction: float) -> int:
    """The pixels ``tf.image.central_crop`` drops at each end of a side of ``side`` pixels (its formula)."""
    return int((float(side) - float(side) * central_fraction) / 2)


def decode_central(jpeg: tf.Tensor, height: tf.Tensor, width: tf.Tensor, top: tf.Tensor, left: tf.Tensor,
                   orientation: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The central crop of a JPEG's stored pixels, turned upright, and whether it can be used.

    ``height``/``width``: the stored size from the header; ``top``/``left``: the crop margins
    (:func:`central_margin`). Returns ``(uint8 [h, w, 3], ok)``; when ``ok`` is false the
    pixels mean nothing and the photo must go through Pillow.
    """
    import tensorflow as tf

    # libjpeg-turbo's crop upsamples the last column's chroma from the edge, not its neighbour
    # (up to 14 levels off in 4:2:0 photos): decode a few columns more each side and cut them after
    start = tf.maximum(0, left - _EDGE)
    stop = tf.minimum(width, width - left + _EDGE)
    window = tf.stack([0, start, height, stop - start])

    def attempt(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pixels = tf.io.decode_and_crop_jpeg(data, window, channels=3, dct_method="INTEGER_ACCURATE")
        return pixels, tf.constant(True)

    failed = tf.data.Dataset.from_tensors((tf.zeros([1, 1, 3], tf.uint8), tf.constant(False)))
    pixels, decoded = (tf.data.Dataset.from_tensors(jpeg).map(attempt).ignore_errors()
                       .concatenate(failed).take(1).get_single_element())
    pixels.set_shape([None, None, 3])
    shape = tf.shape(pixels)
    expected = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], stop - start))
    ok = tf.logical_and(decoded, expected)
    # grey last row: maybe libjpeg's fill after a cut (checked only when the size is right)
    ok = tf.logical_and(ok, tf.logical_not(tf.reduce_all(tf.equal(pixels[-1], _GREY_FILL))))
    cropped = pixels[top:height - top, left - start:width - left - start]
    return tf.cond(ok, lambda: upright(cropped, orientation), lambda: pixels), ok


def upright(pixels: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Apply an EXIF orientation (1..8) the way ``decode._UPRIGHT``'s Pillow transposes do."""
    import tensorflow as tf

    def transpose(image: tf.Tensor) -> tf.Tensor:
        return tf.transpose(image, [1, 0, 2])

    branches = [
        lambda: pixels,  # 1 (and anything unknown): as stored
        lambda: tf.reverse(pixels, [1]),  # 2: FLIP_LEFT_RIGHT
        lambda: tf.reverse(pixels, [0, 1]),  # 3: ROTATE_180
        lambda: tf.reverse(pixels, [0]),  # 4: FLIP_TOP_BOTTOM
        lambda: transpose(pixels),  # 5: TRANSPOSE
        lambda: transpose(tf.reverse(pixels, [0])),  # 6: ROTATE_270 (90 degrees clockwise)
        lambda: transpose(tf.reverse(pixels, [0, 1])),  # 7: TRANSVERSE
        lambda: transpose(tf.reverse(pixels, [1])),  # 8: ROTATE_90 (counter-clockwise)
    ]
    index = tf.where(tf.logical_and(orientation >= 1, orientation <= 8), orientation - 1, 0)
    return tf.switch_case(index, branches)
