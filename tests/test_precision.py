"""Reduced precision: faithful vectors, recorded as such, never mixed with fp32 ones."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.app.cli import main as deeper
from pipeline.errors import IncompatibleFeatures
from pipeline.model.featurize import featurize_photos
from pipeline.model.nets.factory import load_backbone
from pipeline.model.photos import find_photos
from tests.conftest import EXAMPLES


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def photos():
    return find_photos([EXAMPLES / "test"])


@pytest.mark.parametrize("precision, min_cosine", [("bf16", 0.998), ("fp32-lite", 0.99999)])
def test_reduced_precision_vectors_stay_close_to_fp32(precision, min_cosine, photos, effnet, cache_dir):
    reduced = load_backbone("efficientnet_lite0", cache_dir=cache_dir, progress=False, precision=precision)
    assert reduced.precision == precision and effnet.precision == "fp32"
    fp32 = featurize_photos(photos, effnet, "prelogits", progress=False)
    low = featurize_photos(photos, reduced, "prelogits", progress=False)
    assert low.meta.backbone == "efficientnet_lite0" and low.meta.precision == precision
    assert fp32.meta.backbone == "efficientnet_lite0" and fp32.meta.precision == "fp32"
    assert low.meta.differences(fp32.meta) == [f"precision {precision} vs fp32"]
    cos = _cosines(np.stack([r.vector for r in fp32.rows]), np.stack([r.vector for r in low.rows]))
    assert cos.min() >= min_cosine, cos
    logits_fp32 = featurize_photos(photos, effnet, "logits", progress=False).rows
    logits_low = featurize_photos(photos, reduced, "logits", progress=False).rows
    assert [int(np.argmax(a.vector)) for a in logits_fp32] == [int(np.argmax(b.vector)) for b in logits_low]


def test_a_recorded_name_with_its_precision_loads_that_precision(cache_dir):
    """``NAME@PRECISION`` (how older vectors recorded it) still loads; a contradiction is refused."""
    legacy = load_backbone("efficientnet_lite0@bf16", cache_dir=cache_dir, progress=False)
    assert legacy is load_backbone("efficientnet_lite0", cache_dir=cache_dir, progress=False, precision="bf16")
    assert legacy.precision == "bf16"
    with pytest.raises(IncompatibleFeatures, match="precision"):
        load_backbone("efficientnet_lite0@bf16", cache_dir=cache_dir, progress=False, precision="int8")


def test_fp32_and_bf16_features_are_not_mixed(tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("DEEPER_CACHE_DIR", str(cache_dir))
    train = str(EXAMPLES / "train")
    assert deeper(["featurize", train, "--out", str(tmp_path / "fp32.parquet"), "--model", "efficientnet_lite0",
                   "-q"]) == 0
    assert deeper(["featurize", train, "--out", str(tmp_path / "bf16.parquet"), "--model", "efficientnet_lite0",
                   "--precision", "bf16", "-q"]) == 0
    capsys.readouterr()
    assert deeper(["train", "--features", str(tmp_path / "fp32.parquet"), str(tmp_path / "bf16.parquet"),
                   "--registry", str(tmp_path / "reg"), "-q"]) == 2
    assert "cannot mix features" in capsys.readouterr().err
