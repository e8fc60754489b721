"""Reduced precision on CPU: the numeric format a backbone computes in, and the TF-Lite runner.

A backbone is loaded with one ``precision`` (``load_backbone(..., precision=...)``); inputs and
outputs stay float32 whatever it is, so nothing downstream changes. The choices:

``fp32`` (default)
    TensorFlow float32 on oneDNN: the reference every other precision is measured against.
``bf16``
    TensorFlow with bfloat16 compute on oneDNN (fast on CPUs with AVX512_BF16 or AMX; elsewhere
    it is emulated and slower). EfficientNet-Lite0 casts explicitly in the port: the stem and
    the head run in float32, the 16 MBConv blocks in bfloat16 (keeping both ends in float32 is
    what holds the cosine to fp32 at about 0.999). Inception v1 (a tf-slim Session graph) uses
    grappler's ``auto_mixed_precision_onednn_bfloat16`` rewrite.
``fp32-lite``
    The same float32 network converted to TF-Lite and run by XNNPACK. Same math, other
    kernels (vectors within ~1e-5 of fp32); faster than TensorFlow for EfficientNet-Lite0's
    depthwise convolutions.
``int8``
    TF-Lite full-integer post-training quantization (int8 weights per channel, int8
    activations calibrated on photos), run by XNNPACK (AVX512-VNNI). The fastest, and the least
    faithful: see ``bench/run.py``'s ``precision`` figure before relying on it.

The measured speed and fidelity of each (cosine to fp32, top-1 agreement, SVM labels) are a
figure of ``python -m bench.run``; fp32 stays the default because only it is the reference.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from pipeline.config import EXAMPLES_VARIABLE, examples_dir
from pipeline.errors import DeeperError
from pipeline.identity import DEFAULT_PRECISION  # noqa: F401 - re-exported: fp32, named with the identity
from pipeline.storage import sha256_file, write_bytes_atomic

log = logging.getLogger(__name__)

FP32 = "fp32"
BF16 = "bf16"
FP32_LITE = "fp32-lite"
INT8 = "int8"
PRECISIONS: tuple[str, ...] = (FP32, BF16, FP32_LITE, INT8)
#: precisions that run through TF-Lite instead of TensorFlow.
LITE_PRECISIONS = frozenset({FP32_LITE, INT8})
#: bump when the converted TF-Lite layout changes, so stale cached models are ignored.
LITE_CACHE_FORMAT = 1
CALIBRATION_LIMIT = 64


def check(precision: str | None) -> str:
    """``precision`` validated (None means the default); a readable error otherwise."""
    if precision is None:
        return DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise DeeperError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return precision


def is_lite(precision: str) -> bool:
    return precision in LITE_PRECISIONS


# --------------------------------------------------------------------------- the CPU


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is no procfs)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512_BF16 or AMX); bf16 only pays there."""
    flags = cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def warn_if_emulated(precision: str) -> None:
    if precision == BF16 and not native_bf16():
        log.warning("precision bf16 on a CPU without AVX512_BF16/AMX: oneDNN emulates it, expect it to be slower")


# --------------------------------------------------------------------------- TensorFlow sessions


def session_config(intra_op_threads: int = 0, inter_op_threads: int = 0, precision: str = FP32):
    """A v1 ``ConfigProto`` (the one ``slim_compat.new_session`` builds) plus, for ``bf16``,
    grappler's oneDNN bfloat16 auto-mixed-precision rewrite of the Session graph."""
    import tensorflow as tf
    from tensorflow.core.protobuf import rewriter_config_pb2

    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=intra_op_threads,
        inter_op_parallelism_threads=inter_op_threads,
        allow_soft_placement=True,
    )
    if precision == BF16:
        config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = (
            rewriter_config_pb2.RewriterConfig.ON)
    return config


# --------------------------------------------------------------------------- calibration


def default_calibration_photos() -> list[Path]:
    """Photos quantization is calibrated on when the caller gives none: the bundled examples'
    train split (public domain, in the repository: examples/ATTRIBUTION.md), sorted; empty where
    there are none (:func:`pipeline.config.examples_dir`)."""
    examples = examples_dir()
    root = examples / "train" if examples is not None else None
    if root is None or not root.is_dir():
        return []
    suffixes = {".jpg", ".jpeg", ".png"}
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes)[:CALIBRATION_LIMIT]


def calibration_images(preprocess: Callable, photos: Sequence[str | Path] | None = None) -> np.ndarray:
    """Preprocessed float32 ``[N, S, S, 3]`` calibration inputs from ``photos`` (default: examples)."""
    from pipeline.model.decode import decode_image

    photos = list(photos) if photos is not None else default_calibration_photos()
    if not photos:
        raise DeeperError("int8 needs calibration photos: none given, and no examples/train to default to "
                          f"(set {EXAMPLES_VARIABLE} to a checkout's examples/ folder)")
    images = [np.asarray(preprocess(decode_image(Path(p).read_bytes()).pixels)) for p in photos]
    return np.stack(images).astype(np.float32)


def files_digest(photos: Iterable[str | Path]) -> str:
    """sha256 over the files' sha256s (in order): the calibration set's part of a cache key."""
    digest = hashlib.sha256()
    for p in photos:
        digest.update(bytes.fromhex(sha256_file(p)))
    return digest.hexdigest()


# --------------------------------------------------------------------------- TF-Lite


def lite_model_key(network: str, weights_digest: str, precision: str, names: Sequence[str],
                   calibration_photos: Sequence[str | Path] | None) -> tuple[list[str], list[Path] | None]:
    """The cache key of a converted TF-Lite model, and the photos int8 calibrates on (else None).

    The key names everything the converted bytes depend on, the calibration photos' contents
    included, so a cached model is never reused for another network, layer set or calibration.
    """
    photos = None
    if precision == INT8:
        photos = [Path(p) for p in calibration_photos] if calibration_photos is not None \
            else default_calibration_photos()
    key = [network, weights_digest, precision, ",".join(names)]
    if photos is not None:
        key.append(files_digest(photos))
    return key, photos


def quantize(converter, calibration: np.ndarray | None) -> None:
    """Configure ``converter`` for full-integer post-training quantization (float in/out)."""
    import tensorflow as tf

    if calibration is None or len(calibration) == 0:
        raise DeeperError("int8 needs calibration images")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))


def cached_model(cache_dir: str | Path | None, name: str, key_parts: Sequence[str],
                 build: Callable[[], bytes]) -> bytes:
    """The TF-Lite flatbuffer for ``key_parts`` from ``cache_dir``, else built (and cached)."""
    import tensorflow as tf

    key = hashlib.sha256("\n".join([str(LITE_CACHE_FORMAT), tf.__version__, *key_parts]).encode()).hexdigest()
    path = Path(cache_dir) / "tflite" / f"{name}-{key[:32]}.tflite" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return path.read_bytes()
        except OSError as exc:
            log.warning("ignoring unreadable TF-Lite cache %s (%s)", path, exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # converter deprecation chatter
        model = build()
    if path is not None:
        try:
            write_bytes_atomic(path, model)
        except OSError as exc:  # a read-only cache must not stop the run
            log.warning("could not write TF-Lite cache %s: %s", path, exc)
    return model


def _interpreter(model: bytes, num_threads: int):
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "tf.lite.Interpreter is deprecated" (still shipped in 2.21)
        return tf.lite.Interpreter(model_content=model, num_threads=num_threads)


class LiteRunner:
    """One TF-Lite model (XNNPACK) with a float32 input batch of any size and named outputs.

    ``outputs`` maps our layer names to the model's output names (signature keys, or tensor
    names for models converted from a Session). The interpreter is resized only when the batch
    size changes, and a lock makes :meth:`run` safe to call from several threads (one at a time).
    """

    def __init__(self, model: bytes, outputs: Mapping[str, str], num_threads: int | None = None):
        self.model_bytes = len(model)
        self.num_threads = num_threads or os.cpu_count() or 1
        self._it = _interpreter(model, self.num_threads)
        self._lock = threading.Lock()
        signatures = self._it.get_signature_list()
        if signatures:
            runner = self._it.get_signature_runner()
            by_name = {name: d["index"] for name, d in runner.get_output_details().items()}
            self._input = next(iter(runner.get_input_details().values()))["index"]
        else:
            by_name = {d["name"]: d["index"] for d in self._it.get_output_details()}
            self._input = self._it.get_input_details()[0]["index"]
        missing = [model_name for model_name in outputs.values() if model_name not in by_name]
        if missing:
            raise DeeperError(f"TF-Lite model lacks outputs {missing}; it has {sorted(by_name)}")
        self._outputs = {layer: by_name[model_name] for layer, model_name in outputs.items()}
        self._shape: tuple[int, ...] | None = None

    @property
    def layers(self) -> frozenset[str]:
        return frozenset(self._outputs)

    def run(self, batch: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            if self._shape != batch.shape:
                self._it.resize_tensor_input(self._input, list(batch.shape), strict=False)
                self._it.allocate_tensors()
                self._shape = batch.shape
            self._it.set_tensor(self._input, batch)
            self._it.invoke()
            return {layer: np.array(self._it.get_tensor(self._outputs[layer]), dtype=np.float32)
                    .reshape(len(batch), -1) for layer in layers}
