"""The inception_v1 backbone: slim compat, checkpoint restore, end points, preprocessing."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import tensorflow as tf

from pipeline.model import weights
from pipeline.errors import WeightsUnavailable
from pipeline.model.nets import inception_v1
from pipeline.model.nets.slim_compat import slim
from tests.checkpoint_factory import (  # noqa: F401  (official_like is a fixture)
    ARCHIVE_NAME,
    OfficialLike,
    copy_checkpoint,
    official_like,
    serve,
)

#: slim builds legacy layers through ``layer.apply``; pytest resets the filter slim_compat sets.
pytestmark = pytest.mark.filterwarnings("ignore:`layer.apply` is deprecated:UserWarning")

BATCH = np.random.default_rng(7).uniform(-1.0, 1.0, (3, 224, 224, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def backbone(official_like: OfficialLike, tmp_path_factory: pytest.TempPathFactory) -> Iterator[inception_v1.InceptionV1]:
    """Loaded the way a user gets it the first time: downloaded into an empty cache."""
    data = official_like.archive.read_bytes()
    with serve({ARCHIVE_NAME: data}) as server:
        spec = weights.WeightsSpec(
            name="inception_v1",
            url=server.url(ARCHIVE_NAME),
            archive_name=ARCHIVE_NAME,
            checkpoint_name="inception_v1.ckpt",
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
        )
        loaded = inception_v1.load(cache_dir=tmp_path_factory.mktemp("cache"), progress=False, spec=spec)
    with loaded:
        yield loaded


# --------------------------------------------------------------------------- static facts


def test_info_describes_the_official_network() -> None:
    info = inception_v1.INFO
    assert (info.name, info.image_size, info.num_classes) == ("inception_v1", 224, 1001)
    assert info.weights_source == "http://download.tensorflow.org/models/inception_v1_2016_08_28.tar.gz"
    assert info.resolve_layer("logits") == "Logits" and info.end_points["Logits"] == 1001
    assert info.resolve_layer("prelogits") == "AvgPool_0a_7x7" and info.end_points["AvgPool_0a_7x7"] == 1024
    assert info.resolve_layer(info.default_layer) == "Logits"
    with pytest.raises(ValueError, match="no layer"):
        info.resolve_layer("Mixed_9z")


def test_end_points_are_exactly_slims_with_their_sizes() -> None:
    from tf_slim.nets import inception

    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, 224, 224, 3])
        with slim.arg_scope(inception.inception_v1_arg_scope()):
            _, end_points = inception.inception_v1(images, num_classes=1001, is_training=False)
        end_points["AvgPool_0a_7x7"] = graph.get_tensor_by_name(inception_v1.POOL_TENSOR)
    sizes = {name: int(np.prod(t.shape.as_list()[1:])) for name, t in end_points.items()}
    assert sizes == dict(inception_v1.INFO.end_points)


def test_class_names_have_background_first(backbone: inception_v1.InceptionV1) -> None:
    assert len(backbone.class_names) == 1001 and backbone.class_names[0] == "background"


def test_available_is_false_on_an_empty_cache(tmp_path: Path) -> None:
    assert not inception_v1.available(cache_dir=tmp_path)


# --------------------------------------------------------------------------- slim compat


def test_slim_batch_norm_works_without_tf_keras() -> None:
    """UPDATE_OPS batch norm (what every slim arg scope uses) builds, computes
    gamma*(x-mean)/sqrt(var+eps)+beta in inference, and queues its updates in training."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    mean, var, beta, gamma = (rng.uniform(0.5, 1.5, 4).astype(np.float32) for _ in range(4))
    graph = tf.Graph()
    with graph.as_default():
        init = {"moving_mean": tf.constant_initializer(mean), "moving_variance": tf.constant_initializer(var),
                "beta": tf.constant_initializer(beta), "gamma": tf.constant_initializer(gamma)}
        with slim.arg_scope([slim.batch_norm], updates_collections=tf.compat.v1.GraphKeys.UPDATE_OPS, scale=True):
            inference = slim.batch_norm(tf.constant(x), is_training=False, param_initializers=init, scope="bn")
            slim.batch_norm(tf.constant(x), is_training=True, scope="train")
        names = sorted(v.op.name for v in tf.compat.v1.global_variables() if v.op.name.startswith("bn/"))
        assert names == ["bn/beta", "bn/gamma", "bn/moving_mean", "bn/moving_variance"]
        assert len(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)) == 2
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            got = session.run(inference)
    np.testing.assert_allclose(got, gamma * (x - mean) / np.sqrt(var + 0.001) + beta, rtol=1e-5, atol=1e-5)
    assert "tf_keras" not in sys.modules


# --------------------------------------------------------------------------- loading


def test_every_variable_is_restored(backbone: inception_v1.InceptionV1, official_like: OfficialLike) -> None:
    reader = tf.compat.v1.train.NewCheckpointReader(str(official_like.checkpoint))
    variables = backbone.graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
    assert len(variables) == len(official_like.variable_names) - 1  # all but global_step
    values = backbone.session.run(variables)
    for variable, value in zip(variables, values):
        assert np.array_equal(value, reader.get_tensor(variable.op.name)), variable.op.name
    assert backbone.weights_digest == weights.sha256_file(official_like.checkpoint)


def test_run_returns_flat_float32_end_points(backbone: inception_v1.InceptionV1) -> None:
    out = backbone.run(BATCH, ["Logits", "AvgPool_0a_7x7", "Predictions", "Mixed_5c"])
    assert out["Logits"].shape == (3, 1001) and out["AvgPool_0a_7x7"].shape == (3, 1024)
    assert out["Mixed_5c"].shape == (3, 7 * 7 * 1024)
    assert all(v.dtype == np.float32 for v in out.values())
    np.testing.assert_allclose(out["Predictions"].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["AvgPool_0a_7x7"], out["Mixed_5c"].reshape(3, 49, 1024).mean(axis=1), rtol=1e-4, atol=1e-5)
    assert np.std(out["Logits"]) > 0.1  # the weights are not (near) zero


def test_run_rejects_bad_input(backbone: inception_v1.InceptionV1) -> None:
    with pytest.raises(ValueError, match="no end point"):
        backbone.run(BATCH, ["logits"])  # aliases must be resolved first
    with pytest.raises(ValueError, match="batch"):
        backbone.run(BATCH[:, :100], ["Logits"])


def test_reload_from_an_explicit_path_gives_bitwise_equal_logits(
    backbone: inception_v1.InceptionV1, official_like: OfficialLike, tmp_path: Path
) -> None:
    with inception_v1.load(weights=official_like.checkpoint, cache_dir=tmp_path, progress=False) as again:
        assert again.weights_digest == backbone.weights_digest
        assert np.array_equal(again.run(BATCH, ["Logits"])["Logits"], backbone.run(BATCH, ["Logits"])["Logits"])


def test_checkpoint_missing_a_variable_is_refused(official_like: OfficialLike, tmp_path: Path) -> None:
    missing = "InceptionV1/Mixed_4d/Branch_1/Conv2d_0b_3x3/BatchNorm/moving_variance"
    partial = tmp_path / "inception_v1.ckpt"
    copy_checkpoint(official_like.checkpoint, partial, drop=[missing])
    with pytest.raises(WeightsUnavailable, match=f"missing 1 variable.*{missing}"):
        inception_v1.load(weights=partial, cache_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------- preprocessing


def _numpy_preprocess_for_eval(image: np.ndarray, size: int = 224, fraction: float = 0.875) -> np.ndarray:
    """slim's inception_preprocessing.preprocess_for_eval, re-implemented in numpy
    (tf_slim does not ship the preprocessing package)."""
    x = image.astype(np.float32) * np.float32(1.0 / 255)
    h, w = x.shape[:2]
    top, left = int((h - h * fraction) / 2), int((w - w * fraction) / 2)
    x = x[top : h - top, left : w - left]
    return (_resize_bilinear_legacy(x, size) - 0.5) * 2.0


def _resize_bilinear_legacy(x: np.ndarray, size: int) -> np.ndarray:
    """tf.compat.v1.image.resize_bilinear(align_corners=False): src = dst * (in / out),
    computed in float32 like TF's kernel (float64 moves weights by ~1e-5)."""

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.arange(size, dtype=np.float32) * np.float32(n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo.astype(np.float32)

    y0, y1, dy = axis(x.shape[0])
    x0, x1, dx = axis(x.shape[1])
    top = x[y0][:, x0] + (x[y0][:, x1] - x[y0][:, x0]) * dx[None, :, None]
    bottom = x[y1][:, x0] + (x[y1][:, x1] - x[y1][:, x0]) * dx[None, :, None]
    return top + (bottom - top) * dy[:, None, None]


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(300, 451, 3), (97, 80, 3), (224, 224, 3)]]


def test_preprocess_matches_slim_eval_preprocessing() -> None:
    try:  # use slim's own function when the installed tf_slim has it
        from tf_slim.preprocessing import inception_preprocessing  # type: ignore[import-not-found]
    except ImportError:
        inception_preprocessing = None
    for image in _images():
        got = inception_v1.preprocess(tf.constant(image)).numpy()
        assert got.shape == (224, 224, 3) and got.dtype == np.float32
        assert got.min() >= -1.0 and got.max() <= 1.0
        np.testing.assert_allclose(got, _numpy_preprocess_for_eval(image), atol=2e-5)
        if inception_preprocessing is not None:
            slims = inception_preprocessing.preprocess_for_eval(tf.constant(image), 224, 224).numpy()
            np.testing.assert_allclose(got, slims, atol=1e-6)


def test_resize_is_slims_v1_bilinear_kernel() -> None:
    image = tf.constant(_images()[0][np.newaxis].astype(np.float32))
    expected = tf.compat.v1.image.resize_bilinear(image, [224, 224], align_corners=False)
    assert np.array_equal(inception_v1._resize_bilinear_legacy(image, 224).numpy(), expected.numpy())


def test_preprocess_runs_inside_tf_data() -> None:
    images = _images()
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(images), output_signature=tf.TensorSpec([None, None, 3], tf.uint8)
    ).map(inception_v1.preprocess)
    assert dataset.element_spec.shape == (224, 224, 3)
    for got, image in zip(dataset.as_numpy_iterator(), images):
        np.testing.assert_allclose(got, inception_v1.preprocess(tf.constant(image)).numpy(), atol=1e-6)
