"""Inception v1 (GoogLeNet with batch norm), TF-Slim's network and its official checkpoint.

The network is ``tf_slim.nets.inception.inception_v1`` with slim's own arg scope, so the
variable names are exactly those of ``inception_v1_2016_08_28.tar.gz`` (1001 outputs:
index 0 is background). It is built once, in its own ``tf.compat.v1.Graph`` with
``is_training=False``, every variable is restored from the checkpoint, and one Session runs
every batch: built eagerly or in a ``tf.function``, slim would create new random variables
on each call (see :mod:`pipeline.model.nets.slim_compat`).

``precision`` (see :mod:`pipeline.model.precision`): ``bf16`` turns on grappler's oneDNN bfloat16
auto-mixed-precision rewrite for the Session; ``fp32-lite``/``int8`` freeze the restored graph
into a TF-Lite model (int8: calibrated on photos) run by XNNPACK.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from pipeline.model import precision as precision_lib
from pipeline.model import weights as weights_lib
from pipeline.errors import WeightsUnavailable
from pipeline.model.nets.base import Backbone, BackboneInfo, imagenet_class_names
from pipeline.model.nets.slim_compat import slim

IMAGE_SIZE = 224
NUM_CLASSES = 1001
CENTRAL_FRACTION = 0.875

#: The official checkpoint. Size and sha256 are those published in OpenVINO's Open Model Zoo
#: (``models/public/googlenet-v1-tf/model.yml``); the sha256 is also pinned, independently,
#: in the README of ajbouh/tfi. Neither could be re-checked against the file from here.
WEIGHTS = weights_lib.WeightsSpec(
    name="inception_v1",
    url="http://download.tensorflow.org/models/inception_v1_2016_08_28.tar.gz",
    archive_name="inception_v1_2016_08_28.tar.gz",
    checkpoint_name="inception_v1.ckpt",
    sha256="7a620c430fcaba8f8f716241f5148c4c47c035cce4e49ef02cfbe6cd1adf96a6",
    size=24642554,
)

#: The pooled features: slim names the 7x7 average pool's scope ``MaxPool_0a_7x7`` (a
#: historical misnomer kept for checkpoint compatibility); the newer slim calls the end
#: point ``AvgPool_0a_7x7``, which is the name we expose.
POOL_END_POINT = "AvgPool_0a_7x7"
POOL_TENSOR = "InceptionV1/Logits/MaxPool_0a_7x7/AvgPool:0"

#: Every end point, in network order, with its flattened size for a 224x224 input.
_END_POINTS: dict[str, int] = {
    "Conv2d_1a_7x7": 112 * 112 * 64,
    "MaxPool_2a_3x3": 56 * 56 * 64,
    "Conv2d_2b_1x1": 56 * 56 * 64,
    "Conv2d_2c_3x3": 56 * 56 * 192,
    "MaxPool_3a_3x3": 28 * 28 * 192,
    "Mixed_3b": 28 * 28 * 256,
    "Mixed_3c": 28 * 28 * 480,
    "MaxPool_4a_3x3": 14 * 14 * 480,
    "Mixed_4b": 14 * 14 * 512,
    "Mixed_4c": 14 * 14 * 512,
    "Mixed_4d": 14 * 14 * 512,
    "Mixed_4e": 14 * 14 * 528,
    "Mixed_4f": 14 * 14 * 832,
    "MaxPool_5a_2x2": 7 * 7 * 832,
    "Mixed_5b": 7 * 7 * 832,
    "Mixed_5c": 7 * 7 * 1024,
    POOL_END_POINT: 1024,
    "Logits": NUM_CLASSES,
    "Predictions": NUM_CLASSES,
}

#: H*W of each spatial end point (pooled over in multi-level specs); the rest are vectors.
_POSITIONS: dict[str, int] = {
    name: side * side
    for side, names in (
        (112, ["Conv2d_1a_7x7"]),
        (56, ["MaxPool_2a_3x3", "Conv2d_2b_1x1", "Conv2d_2c_3x3"]),
        (28, ["MaxPool_3a_3x3", "Mixed_3b", "Mixed_3c"]),
        (14, ["MaxPool_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"]),
        (7, ["MaxPool_5a_2x2", "Mixed_5b", "Mixed_5c"]),
    )
    for name in names
}

INFO = BackboneInfo(
    name="inception_v1",
    image_size=IMAGE_SIZE,
    num_classes=NUM_CLASSES,
    end_points=_END_POINTS,
    preprocessing="inception eval: central_crop(0.875), bilinear resize 224x224, scale to [-1,1]",
    weights_source=WEIGHTS.url,
    default_layer="logits",
    aliases={"logits": "Logits", "prelogits": POOL_END_POINT},
    positions=_POSITIONS,
)


def _resize_bilinear_legacy(images: tf.Tensor, size: int) -> tf.Tensor:
    """``tf.compat.v1.image.resize_bilinear(images, [size, size], align_corners=False)``.

    That function is exactly this op (with ``half_pixel_centers=False``); calling the op
    directly avoids its deprecation log line, and pins the kernel: ``tf.image.resize``
    would use half-pixel centres, which is *not* what the checkpoint was evaluated with.
    """
    return tf.raw_ops.ResizeBilinear(images=images, size=[size, size], align_corners=False, half_pixel_centers=False)


def preprocess(image: tf.Tensor) -> tf.Tensor:
    """uint8 ``[H, W, 3]`` -> float32 ``[224, 224, 3]`` in ``[-1, 1]``.

    The same function as slim's ``inception_preprocessing.preprocess_for_eval`` (which tf_slim
    does not ship): scale to [0, 1], keep the central 87.5%, resize bilinearly with the
    legacy ``align_corners=False`` kernel the checkpoint was evaluated with, map to [-1, 1].
    For uint8 input the crop and the resize come first and the scaling (``convert_image_dtype``'s
    ``* 1/255``) after: both commute with it, so the values are the same up to float rounding
    (~1e-7) and only 224x224 pixels are scaled instead of the whole photo.
    Pure TF ops, so it runs eagerly, in a ``tf.function`` or in ``tf.data``'s ``map``.
    """
    return preprocess_cropped(tf.image.central_crop(tf.convert_to_tensor(image), central_fraction=CENTRAL_FRACTION))


def preprocess_cropped(image: tf.Tensor) -> tf.Tensor:
    """:func:`preprocess` after its central crop (cropping commutes with the dtype conversion)."""
    image = tf.convert_to_tensor(image)
    scale = None
    if image.dtype == tf.uint8:
        scale = 1.0 / 255.0
    else:
        image = tf.image.convert_image_dtype(image, tf.float32)
    image = _resize_bilinear_legacy(image[tf.newaxis], IMAGE_SIZE)[0]  # float32 whatever the input
    if scale is not None:
        image = image * scale
    image = (image - 0.5) * 2.0
    return tf.ensure_shape(image, [IMAGE_SIZE, IMAGE_SIZE, 3])


def _build(graph: tf.Graph) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """Build the inference network in ``graph``; return its input and flattened end points."""
    from tf_slim.nets import inception

    with graph.as_default():
        inputs = tf.compat.v1.placeholder(tf.float32, [None, IMAGE_SIZE, IMAGE_SIZE, 3], name="input")
        with slim.arg_scope(inception.inception_v1_arg_scope()):
            _, end_points = inception.inception_v1(inputs, num_classes=NUM_CLASSES, is_training=False)
        end_points = {**end_points, POOL_END_POINT: graph.get_tensor_by_name(POOL_TENSOR)}
        flat = {name: tf.reshape(end_points[name], [-1, size]) for name, size in _END_POINTS.items()}
    return inputs, flat


def _check_checkpoint(graph: tf.Graph, checkpoint: str) -> list[tf.Variable]:
    """All of the graph's variables, after checking the checkpoint holds each with its shape.

    ``Saver.restore`` would also fail, but with a long op-level error; this names exactly
    what is missing so a wrong or partial checkpoint is obvious.
    """
    try:
        stored = tf.compat.v1.train.NewCheckpointReader(checkpoint).get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as exc:  # missing, unreadable or corrupt file
        raise WeightsUnavailable(f"cannot read checkpoint {checkpoint}: {exc}") from exc
    variables = graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
    missing = [v.op.name for v in variables if v.op.name not in stored]
    wrong = [
        f"{v.op.name} {stored[v.op.name]} != {v.shape.as_list()}"
        for v in variables
        if v.op.name in stored and list(stored[v.op.name]) != v.shape.as_list()
    ]
    if missing or wrong:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} variable(s): {', '.join(missing)}" if missing else "",
            f"wrong shapes: {', '.join(wrong)}" if wrong else "",
        ]))
        raise WeightsUnavailable(f"checkpoint {checkpoint} does not fit inception_v1: {detail}")
    return variables


class InceptionV1(Backbone):
    """The loaded network: one graph, one Session, every variable restored.

    With a TF-Lite ``precision`` (``fp32-lite``, ``int8``) the restored Session is frozen into
    a TF-Lite model per set of requested layers (logits + prelogits at load); the Session stays
    open for other layer sets.
    """

    info = INFO
    DEFAULT_LAYERS = ("Logits", POOL_END_POINT)

    def __init__(
        self,
        resolved: weights_lib.ResolvedWeights,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        precision: str = "fp32",
        cache_dir: str | os.PathLike[str] | None = None,
        calibration_photos: Sequence[str | os.PathLike[str]] | None = None,
    ):
        self.weights_digest = resolved.digest
        self.checkpoint = str(resolved.checkpoint)
        self.precision = precision_lib.check(precision)
        precision_lib.warn_if_emulated(self.precision)
        self.class_names = imagenet_class_names(with_background=True)
        self.graph = tf.Graph()
        self._inputs, self._outputs = _build(self.graph)
        variables = _check_checkpoint(self.graph, self.checkpoint)
        config = precision_lib.session_config(intra_op_threads, inter_op_threads, self.precision)
        self.session = tf.compat.v1.Session(graph=self.graph, config=config)
        try:
            with self.graph.as_default():  # outside it, Saver assumes eager mode
                tf.compat.v1.train.Saver(var_list=variables).restore(self.session, self.checkpoint)
        except tf.errors.OpError as exc:  # e.g. a corrupt data file that the index hid
            self.session.close()
            raise WeightsUnavailable(f"cannot restore {self.checkpoint}: {exc.message}") from exc
        self.graph.finalize()  # any later op creation is a bug (it would leak per batch)
        self._lite: list[precision_lib.LiteRunner] = []
        self._cache_dir = cache_dir
        self._calibration_photos = calibration_photos
        self._num_threads = intra_op_threads or None
        if precision_lib.is_lite(self.precision):
            self._lite_runner(frozenset(self.DEFAULT_LAYERS))

    central_fraction = CENTRAL_FRACTION

    def preprocess_cropped(self, image: tf.Tensor) -> tf.Tensor:
        return preprocess_cropped(image)

    def _run(self, batch: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        unknown = [layer for layer in layers if layer not in self._outputs]
        if unknown:
            raise ValueError(f"inception_v1 has no end point(s) {unknown}; use INFO.resolve_layer first")
        if precision_lib.is_lite(self.precision):
            return self._lite_runner(frozenset(layers)).run(batch, layers)
        fetches = {layer: self._outputs[layer] for layer in layers}
        results: Mapping[str, np.ndarray] = self.session.run(fetches, {self._inputs: batch})
        return {layer: np.asarray(value, dtype=np.float32) for layer, value in results.items()}

    def _lite_runner(self, layers: frozenset[str]) -> precision_lib.LiteRunner:
        """A TF-Lite model of the restored graph with (at least) ``layers`` as outputs."""
        for runner in self._lite:
            if layers <= runner.layers:
                return runner
        names = sorted(layers | frozenset(self.DEFAULT_LAYERS))
        key, photos = precision_lib.lite_model_key(INFO.name, self.weights_digest, self.precision, names,
                                                   self._calibration_photos)
        outputs = [self._outputs[name] for name in names]

        def build() -> bytes:
            converter = tf.compat.v1.lite.TFLiteConverter.from_session(self.session, [self._inputs], outputs)
            if photos is not None:  # int8
                calibration = precision_lib.calibration_images(lambda x: preprocess(x).numpy(), photos)
                precision_lib.quantize(converter, calibration)
            return converter.convert()

        model = precision_lib.cached_model(self._cache_dir, f"{INFO.name}-{self.precision}", key, build)
        runner = precision_lib.LiteRunner(model, {name: t.name.split(":")[0] for name, t in zip(names, outputs)},
                                          self._num_threads)
        self._lite.append(runner)
        return runner

    def close(self) -> None:
        """Free the Session (and its memory); the object is unusable afterwards."""
        self.session.close()

    def __enter__(self) -> "InceptionV1":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    *,
    spec: weights_lib.WeightsSpec = WEIGHTS,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    precision: str = "fp32",
    calibration_photos: Sequence[str | os.PathLike[str]] | None = None,
) -> InceptionV1:
    """Resolve the checkpoint (explicit path, cache, download) and load the network.

    ``spec`` lets tests (or mirrors) point at another URL/digest. Thread counts of 0 mean
    TensorFlow's default (one per core); set them to share a machine with other work.
    ``precision``: see :mod:`pipeline.model.precision`; ``calibration_photos`` (int8 only) default to
    the bundled examples. TF-Lite models are cached in ``cache_dir``.
    Raises :class:`WeightsUnavailable` if the weights can't be found or don't fit.
    """
    precision = precision_lib.check(precision)
    resolved = weights_lib.resolve(spec, weights, cache_dir, progress=progress)
    return InceptionV1(resolved, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads,
                       precision=precision, cache_dir=cache_dir, calibration_photos=calibration_photos)


def available(weights: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether :func:`load` can work without the network (for the factory's ``auto`` mode)."""
    return weights_lib.available(WEIGHTS, weights, cache_dir)
