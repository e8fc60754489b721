"""Scaled decoding (``min_side``) keeps what the model sees: the real EfficientNet-Lite0 on 12-MP photos.

The stream decodes camera JPEGs by DCT scaling to the smallest scale that covers the backbone's
central crop (:func:`pipeline.model.decode.covering_side`). These tests check, on 12-MP versions of
the cars photos (upscaled, mild noise, quality 90, as ``bench`` makes them):

- the scaled decode gives the vector of an exact box downscale of the full decode (DCT
  scaling loses nothing a proper downscale would keep);
- the SVM trained on cars/train gives the same labels to full and scaled decodes;
- Inference really decodes scaled and still reports the full upright size.

Full vs scaled vectors are close but not identical (cosine ~0.97): the backbones resize the
full 3500-px crop to 224 bilinearly without antialiasing, so the full-size path samples
sensor noise and aliasing: shifting that full image by 4 px moves its own vector as far as
cosine ~0.99. That bound, not the scaled path, is what limits the agreement.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.common import camera_jpeg
from pipeline.learning.classifier import fit
from pipeline.model.decode import CENTRAL_FRACTION, covering_side, decode_image
from pipeline.model.featurize import featurize_photos
from pipeline.model.inference import ImageRecord, Inference
from pipeline.model.photos import find_photos
from pipeline.learning.training import DEFAULT_LAYER, DEFAULT_SPEC


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def camera_photos(cars) -> list[bytes]:
    return [camera_jpeg(path.read_bytes(), seed=i) for i, path in enumerate(sorted((cars / "test").glob("*.jpg")))]


def test_covering_side_matches_every_backbone():
    """decode.CENTRAL_FRACTION stands for the nets' own: a smaller crop would make scaled decodes too small."""
    from pipeline.model.nets import inception_v1
    from pipeline.model.nets.efficientnet_lite import VARIANTS

    fractions = {"inception_v1": (inception_v1.CENTRAL_FRACTION, inception_v1.INFO.image_size),
                 **{v.name: (v.central_fraction, v.image_size) for v in VARIANTS.values()}}
    for name, (fraction, size) in fractions.items():
        assert fraction >= CENTRAL_FRACTION, name
        assert covering_side(size) * fraction >= size, name


def test_scaled_decode_keeps_the_features_and_the_labels(effnet, cars, camera_photos):
    layer = effnet.info.resolve_layer(DEFAULT_LAYER)
    side = covering_side(effnet.info.image_size)

    def vector(pixels: np.ndarray) -> np.ndarray:
        return effnet.run(np.asarray(effnet.preprocess(pixels))[None], [layer])[layer][0]

    full, scaled, box = [], [], []
    for data in camera_photos:
        whole = decode_image(data)
        small = decode_image(data, min_side=side)
        assert (small.width, small.height) == (whole.width, whole.height) == (4000, 3000)
        assert min(small.pixels.shape[:2]) >= side and small.pixels.shape[:2] == (375, 500)  # 1/8
        full.append(vector(whole.pixels))
        scaled.append(vector(small.pixels))
        box.append(vector(np.asarray(Image.fromarray(whole.pixels).reduce(8))))
    to_box = [_cosine(s, b) for s, b in zip(scaled, box)]
    to_full = [_cosine(s, f) for s, f in zip(scaled, full)]
    assert min(to_box) >= 0.995, to_box
    assert min(to_full) >= 0.95, to_full  # the full path's own aliasing bounds this (module notes)

    train = featurize_photos(find_photos([cars / "train"], labels_from_folders=True), effnet, DEFAULT_LAYER,
                             progress=False)
    classifier = fit(np.stack([r.vector for r in train.rows]), [r.label for r in train.rows], DEFAULT_SPEC)
    assert classifier.predict(np.stack(scaled)) == classifier.predict(np.stack(full))


def test_inference_decodes_scaled_and_reports_full_size(effnet, camera_photos):
    layer = effnet.info.resolve_layer(DEFAULT_LAYER)
    data = camera_photos[0]
    [result] = list(Inference(effnet, DEFAULT_LAYER, batch_size=1).run([ImageRecord("a", data, "camera")]))
    assert (result.width, result.height) == (4000, 3000)
    small = decode_image(data, min_side=covering_side(effnet.info.image_size)).pixels
    expected = effnet.run(np.asarray(effnet.preprocess(small))[None], [layer])[layer][0]
    assert _cosine(result.vector, expected) > 0.9999
