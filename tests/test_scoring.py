"""Calibrated probabilities, the "unknown" rule, the one scoring function, label records v1/v2/v3.

No mocks: real scikit-learn fits on synthetic blobs (where the truth is known), a real registry
on disk, real label-record bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.learning.classifier import (ClassifierSpec, brier_score, calibrate, choose_unknown_threshold, cross_validate,
                                 fit, fit_platt, platt_probabilities, top_probability)
from pipeline.errors import DeeperError, SchemaError
from pipeline.identity import FeatureId
from pipeline.learning.registry import Registry
from pipeline.learning.scoring import UNKNOWN_LABEL, score
from pipeline.learning.training import train_and_register
from schemas.messages import LabelRecord, decode_label, encode_label

DIM = 12
META = FeatureId("efficientnet_lite0", "ab" * 32, "prelogits", DIM, "central_crop(0.875)")
SPEC = ClassifierSpec()


def blobs(n_classes: int = 3, per_class: int = 20, spread: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, (n_classes, DIM))
    x = np.concatenate([centres[c] + rng.normal(0, spread, (per_class, DIM)) for c in range(n_classes)])
    y = [f"c{c}" for c in range(n_classes) for _ in range(per_class)]
    return x.astype(np.float32), y, centres


# -- Platt scaling ------------------------------------------------------------------------------
def test_platt_matches_scikit_learns_sigmoid_calibration():
    """Same smoothed-target sigmoid as sklearn's CalibratedClassifierCV(method="sigmoid")."""
    calibration = pytest.importorskip("sklearn.calibration")
    reference = getattr(calibration, "_sigmoid_calibration", None)
    if reference is None:
        pytest.skip("this scikit-learn has no _sigmoid_calibration to compare with")
    rng = np.random.default_rng(1)
    s = np.concatenate([rng.normal(1, 1, 30), rng.normal(-1, 1, 50)])
    y = np.array([1] * 30 + [0] * 50)
    a, b = fit_platt(np.stack([-s, s], axis=1), np.stack([1 - y, y], axis=1).astype(float))
    ra, rb = reference(s, y)
    assert a[1] == pytest.approx(ra, rel=1e-4) and b[1] == pytest.approx(rb, abs=1e-4)


def test_probabilities_are_normalised_and_follow_the_scores():
    scores = np.array([[2.0, -1.0, -1.0], [-1.0, 0.5, 0.4], [0.0, 0.0, 0.0]])
    p = platt_probabilities(scores, np.full(3, -2.0), np.zeros(3))
    assert np.allclose(p.sum(axis=1), 1.0)
    assert (np.argmax(p, axis=1)[:2] == [0, 1]).all()
    assert np.allclose(p[2], 1 / 3)


def test_cross_validated_probabilities_are_honest():
    """Out-of-fold confidence tracks out-of-fold accuracy, and beats a uniform guess by far."""
    x, y, _ = blobs(n_classes=3, per_class=40, spread=2.2, seed=3)
    cv = cross_validate(x, y, SPEC)
    assert cv.method.startswith("stratified") and cv.probabilities.shape == (len(y), 3)
    confidence = top_probability(cv.scores, cv.probabilities)
    assert 0.6 < cv.accuracy < 0.98  # overlapping: calibration has something to say
    assert abs(confidence.mean() - cv.accuracy) < 0.1
    assert cv.brier == pytest.approx(brier_score(cv.probabilities, cv.truth_onehot()))
    assert cv.brier < 0.75 * (1 - 1 / 3)  # a uniform 1/3 each scores 2/3
    assert cv.to_dict()["brier"] == pytest.approx(cv.brier, abs=1e-6)


def test_tiny_sets_are_not_overconfident():
    """20 photos, perfectly separable: Platt's smoothed targets keep probabilities short of 1."""
    x, y, _ = blobs(n_classes=2, per_class=10, spread=0.3)
    cv = cross_validate(x, y, SPEC)
    assert cv.method == "leave-one-out" and cv.accuracy == 1.0
    assert cv.probabilities.max() < 0.97


# -- the unknown threshold ----------------------------------------------------------------------
def test_threshold_rule_is_the_highest_that_keeps_the_false_unknown_budget():
    top = np.linspace(0.40, 0.99, 20)
    assert choose_unknown_threshold(top, 0.05) == pytest.approx(top[1])  # 1 of 20 may fall below
    assert choose_unknown_threshold(top, 0.10) == pytest.approx(top[2])
    assert choose_unknown_threshold(top, 0.0) == pytest.approx(top[0])  # none may: the minimum
    assert (top < choose_unknown_threshold(top, 0.05)).mean() <= 0.05
    with pytest.raises(DeeperError):
        choose_unknown_threshold(top, 1.0)


def test_calibrate_stores_arrays_and_chooses_the_threshold_under_cv():
    x, y, _ = blobs(n_classes=3, per_class=20, spread=1.8, seed=2)
    cv = cross_validate(x, y, SPEC)
    model = calibrate(fit(x, y, SPEC), cv)
    assert model.calibrated and {"platt_a", "platt_b", "unknown_threshold"} <= set(model.arrays)
    expected = choose_unknown_threshold(top_probability(cv.scores, cv.probabilities))
    assert model.unknown_threshold == pytest.approx(expected)
    assert calibrate(fit(x, y, SPEC), cv, unknown_threshold=0.0).unknown_threshold == 0.0
    with pytest.raises(DeeperError):
        calibrate(fit(x, y, SPEC), cv, unknown_threshold=1.5)


# -- score(): the one scoring function ------------------------------------------------------------
def test_score_uncalibrated_model_has_no_confidence_and_no_unknown():
    x, y, _ = blobs()
    model = fit(x, y, SPEC)
    results = score(model, x)
    assert [r.label for r in results] == model.predict(x)
    assert all(r.probabilities is None and r.confidence is None and not r.unknown for r in results)
    assert results[0].scores == pytest.approx(dict(zip(model.classes, model.decision(x[:1])[0].tolist())))
    assert score(model, np.zeros((0, DIM))) == []


def test_score_marks_out_of_class_vectors_unknown():
    """The midpoint of all class centres fits no class: it must come back unknown."""
    x, y, centres = blobs(n_classes=3, per_class=20, spread=0.8, seed=4)
    model = calibrate(fit(x, y, SPEC), cross_validate(x, y, SPEC))
    assert 0.34 < model.unknown_threshold < 1.0
    inside = score(model, centres.astype(np.float32))
    assert [r.label for r in inside] == ["c0", "c1", "c2"] and not any(r.unknown for r in inside)
    (outside,) = score(model, centres.mean(axis=0, keepdims=True).astype(np.float32), unknown_label="none-of-these")
    assert outside.unknown and outside.label == "none-of-these" and outside.top_class in model.classes
    assert outside.confidence < model.unknown_threshold
    assert sum(outside.probabilities.values()) == pytest.approx(1.0)
    assert outside.confidence == pytest.approx(outside.probabilities[outside.top_class])
    # turning unknown off gives the top class back
    off = calibrate(fit(x, y, SPEC), cross_validate(x, y, SPEC), unknown_threshold=0.0)
    assert score(off, centres.mean(axis=0, keepdims=True))[0].label == outside.top_class


# -- registry and training ----------------------------------------------------------------------
def test_training_saves_calibration_and_old_versions_still_score(tmp_path):
    x, y, centres = blobs(n_classes=3, per_class=10, spread=0.8, seed=5)
    ids = [f"{i:064x}" for i in range(len(y))]
    registry = Registry(tmp_path / "registry")
    old = registry.save(fit(x, y, SPEC), META, {})  # a version from before calibration: no arrays
    outcome = train_and_register(ids, y, x, META, SPEC, registry)
    assert outcome.version != old and outcome.cv_false_unknown <= 0.05
    loaded = registry.load(outcome.version)
    assert loaded.classifier.unknown_threshold == pytest.approx(outcome.unknown_threshold)
    assert loaded.metadata["calibration"]["unknown_threshold"] == pytest.approx(outcome.unknown_threshold, abs=1e-6)
    assert loaded.metadata["cv"]["brier"] == pytest.approx(outcome.cv.brier, abs=1e-6)
    fresh = [r.probabilities for r in score(loaded.classifier, centres)]
    assert all(p is not None and max(p.values()) > 0.5 for p in fresh)

    legacy = registry.load(old).classifier
    assert not legacy.calibrated and legacy.unknown_threshold is None
    assert [r.confidence for r in score(legacy, centres)] == [None, None, None]

    fixed = train_and_register(ids, y, x, META, SPEC, registry, unknown_threshold=0.9)
    assert registry.load(fixed.version).classifier.unknown_threshold == pytest.approx(0.9)
    assert registry.load(fixed.version).metadata["calibration"]["threshold_rule"] == "fixed"


def test_a_class_named_like_the_unknown_label_is_refused(tmp_path):
    x, y, _ = blobs(n_classes=2, per_class=5)
    y = [UNKNOWN_LABEL if label == "c0" else label for label in y]
    with pytest.raises(DeeperError, match="reserved"):
        train_and_register([f"{i:064x}" for i in range(len(y))], y, x, META, SPEC, Registry(tmp_path))


# -- label records ------------------------------------------------------------------------------
def test_label_record_v3_round_trip():
    record = LabelRecord("ab" * 32, UNKNOWN_LABEL, {"a": -0.2, "b": -0.1}, "v0002", "efficientnet_lite0",
                         "prelogits+block_15", "cam/1.jpg", probabilities={"a": 0.45, "b": 0.55}, confidence=0.55,
                         unknown=True, novelty=0.61, unknown_reason="novel")
    key, value, headers = encode_label(record)
    assert json.loads(value)["schema_version"] == "3" and dict(headers)["schema-version"] == b"3"
    assert json.loads(value)["novelty"] == 0.61 and json.loads(value)["unknown_reason"] == "novel"
    assert decode_label(value) == record


def test_label_record_v2_still_decodes_without_novelty():
    v2 = {"schema_version": "2", "image_id": "cd" * 32, "label": UNKNOWN_LABEL, "scores": {"a": -0.2, "b": -0.1},
          "classifier_version": "v0003", "backbone": "efficientnet_lite0", "layer": "prelogits", "source": "x.jpg",
          "scored_at": "2026-11-22T18:30:00.123+00:00", "probabilities": {"a": 0.45, "b": 0.55},
          "confidence": 0.55, "unknown": True, "origin": "deeper.features/0/7", "image_origin": "", "kafka_key": None}
    record = decode_label(json.dumps(v2).encode())
    assert record.novelty is None and record.unknown_reason == "unconfident"  # the only reason v2 knew
    known = decode_label(json.dumps({**v2, "label": "b", "unknown": False}).encode())
    assert known.novelty is None and known.unknown_reason is None


def test_label_record_v1_still_decodes_without_confidence():
    v1 = {"schema_version": "1", "image_id": "cd" * 32, "label": "modern", "scores": {"classic": -0.8, "modern": 0.8},
          "classifier_version": "v0003", "backbone": "efficientnet_lite0", "layer": "prelogits",
          "source": "cam-7/000123.jpg", "scored_at": "2026-11-22T18:30:00.123+00:00"}
    record = decode_label(json.dumps(v1).encode())
    assert record.label == "modern" and record.confidence is None and record.probabilities is None
    assert record.unknown is False
    with pytest.raises(SchemaError, match="version"):
        decode_label(json.dumps({**v1, "schema_version": "4"}).encode())
