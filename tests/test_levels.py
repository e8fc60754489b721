"""Multi-level layer specs (``prelogits+block_14+block_15``) through the backbone contract.

The real EfficientNet-Lite0: a spec must resolve, size and compute the same way on every path
(``Backbone.run``, the batch featurizer, the stream's :class:`~pipeline.model.inference.Inference`).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import DeeperError
from pipeline.model.featurize import feature_meta, featurize_photos
from pipeline.model.inference import Inference
from pipeline.model.nets.efficientnet_lite import LITE0 as lite0
from pipeline.model.nets import inception_v1
from pipeline.model.nets.base import combine_levels
from pipeline.model.photos import find_photos
from tests.conftest import EXAMPLES

SPEC = "prelogits+block_14+block_15"


def test_specs_resolve_part_by_part():
    info = lite0.INFO
    assert info.resolve_layer("global_pool+stage_6+stage_7") == SPEC
    assert info.resolve_layer("prelogits") == "prelogits"  # one end point: unchanged
    assert info.end_points[SPEC] == info.layer_dim(SPEC) == 1280 + 192 + 320
    assert info.end_points["block_15"] == 7 * 7 * 320  # a single spatial end point stays flattened
    assert "prelogits+block_15" not in info.end_points  # membership lists real end points only
    with pytest.raises(ValueError, match="no layer 'block_99'"):
        info.resolve_layer("prelogits+block_99")
    with pytest.raises(ValueError, match="twice"):
        info.resolve_layer("prelogits+global_pool")
    with pytest.raises(KeyError):
        info.end_points["prelogits+block_99"]
    inception = inception_v1.INFO
    assert inception.resolve_layer("prelogits+Mixed_5c") == "AvgPool_0a_7x7+Mixed_5c"
    assert inception.end_points["AvgPool_0a_7x7+Mixed_5c"] == 1024 + 1024


def test_run_pools_normalises_and_concatenates(effnet):
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    out = effnet.run(batch, [SPEC, "prelogits", "block_15"])
    assert out[SPEC].shape == (2, 1792) and out[SPEC].dtype == np.float32
    # the single end points are untouched by the spec computed alongside them
    assert not np.allclose(np.linalg.norm(out["prelogits"], axis=1), 1.0)
    block_15 = out["block_15"].reshape(2, 7, 7, 320).mean(axis=(1, 2))
    parts = [out["prelogits"], effnet.run(batch, ["block_14"])["block_14"].reshape(2, 7, 7, 192).mean(axis=(1, 2)),
             block_15]
    expected = np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts], axis=1)
    np.testing.assert_allclose(out[SPEC], expected, rtol=1e-4, atol=1e-6)
    for start, stop in ((0, 1280), (1280, 1472), (1472, 1792)):
        np.testing.assert_allclose(np.linalg.norm(out[SPEC][:, start:stop], axis=1), 1.0, rtol=1e-5)


def test_batch_and_stream_paths_carry_the_spec(effnet):
    photos = find_photos([EXAMPLES / "test"])[:3]
    result = featurize_photos(photos, effnet, "global_pool+stage_6+stage_7", batch_size=2, progress=False)
    assert not result.failures
    assert result.meta.layer == SPEC and result.meta.dim == 1792  # the spec is the recorded feature layer
    singles = {layer: featurize_photos(photos, effnet, layer, progress=False) for layer in SPEC.split("+")}
    expected = combine_levels({layer: np.stack([r.vector for r in res.rows]) for layer, res in singles.items()},
                              SPEC.split("+"), effnet.info)
    np.testing.assert_allclose(np.stack([r.vector for r in result.rows]), expected, rtol=1e-4, atol=1e-6)
    stream = Inference(effnet, "global_pool+block_14+stage_7")  # what the featurizer consumer builds
    assert stream.layer == SPEC and feature_meta(effnet, stream.layer).dim == 1792  # as the featurizer records it


def test_an_unknown_level_is_a_clear_error(effnet):
    photos = find_photos([EXAMPLES / "test"])[:1]
    with pytest.raises(DeeperError, match="block_42"):
        featurize_photos(photos, effnet, "prelogits+block_42", progress=False)
