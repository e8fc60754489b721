"""The novelty score: distance to the training photos, calibrated on them, stored with a version.

Real scikit-learn fits on synthetic blobs (where "far from everything" is known), a real
registry on disk. The real-photo goal (cars model vs photos of other things) is measured by
``bench/novelty.py``; ``tests/test_cli_unknown.py`` checks the command line end to end.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from pipeline.errors import DeeperError, RegistryError
from pipeline.learning import novelty
from pipeline.learning.classifier import Classifier, ClassifierSpec
from pipeline.learning.registry import Registry
from pipeline.learning.scoring import NOVEL, UNCONFIDENT, UNKNOWN_LABEL, score, unknown_reason
from pipeline.learning.training import train, train_and_register
from pipeline.identity import FeatureId

DIM = 16
META = FeatureId("efficientnet_lite0", "ab" * 32, "prelogits", DIM, "central_crop(0.875)")
SPEC = ClassifierSpec()


def blobs(n_classes: int = 3, per_class: int = 20, seed: int = 0):
    """Tight clusters around random directions: cosine distance inside a class is small."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (n_classes, DIM)) * 3 + 5
    x = np.concatenate([centres[c] + rng.normal(0, 0.4, (per_class, DIM)) for c in range(n_classes)])
    y = [f"c{c}" for c in range(n_classes) for _ in range(per_class)]
    return x.astype(np.float32), y, centres


def far_away(n: int = 10, seed: int = 9) -> np.ndarray:
    """Vectors pointing elsewhere (another region of feature space)."""
    return (np.random.default_rng(seed).normal(0, 1.0, (n, DIM)) * 3 - 5).astype(np.float32)


def _ids(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(n)]


# -- the score and its calibration ----------------------------------------------------------------
def test_leave_one_out_leaves_each_photo_out_of_its_own_comparison():
    x, y, _ = blobs()
    index = np.array([int(c[1]) for c in y])
    found = novelty.fit(x, index, index)
    assert found.held_out.min() > 0  # with itself in the summary every distance would be 0
    inside = novelty.distances(x, found.arrays["novelty_vectors"], found.arrays["novelty_classes"],
                               novelty.DEFAULT_SPEC, index)
    assert np.allclose(inside, 0, atol=1e-3)  # scored against a summary holding them: ~0


@pytest.mark.parametrize("budget", [0.05, 0.2])
def test_the_threshold_marks_at_most_the_budget_of_training_photos_novel(budget):
    x, y, _ = blobs(per_class=20)
    index = np.array([int(c[1]) for c in y])
    found = novelty.fit(x, index, index, max_false_novel=budget)
    assert found.held_out_novel.mean() <= budget
    k = int(budget * (len(x) + 1))  # conformal: the k-th largest held-out score
    assert found.held_out_novel.sum() == k - 1


@pytest.mark.parametrize("n, budget, k", [(20, 0.05, 1), (60, 0.05, 3), (99, 0.05, 5), (10, 0.05, 1), (20, 0.2, 4)])
def test_the_conformal_threshold_keeps_the_budget_for_new_photos(n, budget, k):
    scores = np.arange(n, dtype=float)[::-1]  # n-1, ..., 0: the k-th largest is n - k
    assert novelty.choose_threshold(scores, budget) == n - k
    assert k / (n + 1) <= budget or k == 1  # a new exchangeable score exceeds it with probability k / (n + 1)
    assert novelty.choose_threshold(scores, budget, novelty.TRAINING_SHARE) == n - 1 - int(budget * n)


def test_on_new_photos_of_the_same_classes_the_rate_holds():
    """Many draws of training and new photos from the same classes: the novel share of the new
    photos stays near the budget (about twice that with the training-share rule)."""
    rates = {novelty.CONFORMAL: [], novelty.TRAINING_SHARE: []}
    for seed in range(60):  # 20 training photos: conformal k = 1 (1/21 = 4.8 %), training share k = 2 (9.5 %)
        x, y, centres = blobs(n_classes=2, per_class=10, seed=seed)
        noise = np.random.default_rng(10_000 + seed).normal(0, 0.4, (40, DIM))
        fresh = (np.repeat(centres, 20, axis=0) + noise).astype(np.float32)  # never seen, same classes
        index = np.array([int(c[1]) for c in y])
        for rule in rates:
            found = novelty.fit(x, index, index, rule=rule)
            scores = novelty.distances(fresh, found.arrays["novelty_vectors"], found.arrays["novelty_classes"],
                                       novelty.DEFAULT_SPEC)
            rates[rule].append(float((scores > found.threshold).mean()))
    assert np.mean(rates[novelty.CONFORMAL]) <= 0.05 + 0.02, rates
    assert np.mean(rates[novelty.TRAINING_SHARE]) > 1.5 * np.mean(rates[novelty.CONFORMAL]), rates


def test_photos_far_from_the_training_set_are_novel_and_near_ones_not():
    x, y, centres = blobs()
    trained = train(x, y, SPEC)
    near = centres + np.random.default_rng(5).normal(0, 0.4, centres.shape)
    results = score(trained.classifier, np.vstack([near, far_away()]).astype(np.float32))
    assert [r.unknown_reason for r in results[:3]] == [None, None, None]
    assert all(r.label == UNKNOWN_LABEL and r.unknown_reason == NOVEL for r in results[3:])
    assert all(r.novelty > trained.novelty.threshold for r in results[3:])
    assert all(r.top_class in {"c0", "c1", "c2"} for r in results)  # still says what came closest


def test_kth_neighbour_and_per_class_rules():
    summary = novelty.normalize(np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0]], np.float32))
    classes = np.array([0, 0, 1], np.int32)
    query = np.array([[1, 0, 0]], np.float32)
    first = novelty.distances(query, summary, classes, novelty.NoveltySpec(k=1))
    second = novelty.distances(query, summary, classes, novelty.NoveltySpec(k=2))
    assert first[0] == pytest.approx(0, abs=1e-6) and 0 < second[0] < 0.01
    per_class = novelty.distances(query, summary, classes, novelty.NoveltySpec(per_class=True), np.array([1]))
    assert per_class[0] == pytest.approx(1.0, abs=1e-6)  # predicted class 1: only [0, 1, 0] counts
    with pytest.raises(DeeperError, match="predicted class"):
        novelty.distances(query, summary, classes, novelty.NoveltySpec(per_class=True))
    with pytest.raises(DeeperError, match="at least 1"):
        novelty.NoveltySpec(k=0)


def test_a_large_training_set_keeps_a_bounded_summary_per_class():
    x, y, centres = blobs(per_class=60)
    index = np.array([int(c[1]) for c in y])
    found = novelty.fit(x, index, index, cap=30)
    summary, classes = found.arrays["novelty_vectors"], found.arrays["novelty_classes"]
    assert len(summary) <= 31 and summary.dtype == np.float16 and set(classes.tolist()) == {0, 1, 2}
    assert "k-means" in found.summary
    assert found.held_out_novel.mean() <= 0.05  # calibrated on held-out folds, not on the centroids' own data
    far = novelty.distances(far_away(), summary, classes, novelty.DEFAULT_SPEC)
    assert (far > found.threshold).all()


def test_rule_novel_wins_over_unconfident_and_zero_turns_each_off():
    assert unknown_reason(0.9, 0.5, 0.3, 0.6) == NOVEL
    assert unknown_reason(0.1, 0.5, 0.3, 0.6) == UNCONFIDENT
    assert unknown_reason(0.9, 0.0, 0.9, 0.6) is None  # novelty off
    assert unknown_reason(0.1, 0.5, 0.3, 0.0) is None  # confidence off
    assert unknown_reason(None, None, 0.3, 0.6) == UNCONFIDENT  # a model without a summary


def test_a_threshold_out_of_range_is_refused():
    x, y, _ = blobs()
    index = np.array([int(c[1]) for c in y])
    with pytest.raises(DeeperError, match="cosine distance"):
        novelty.fit(x, index, index, threshold=2.5)


# -- registry: stored as arrays, old versions keep working ---------------------------------------
def test_the_summary_is_saved_as_arrays_and_reloads(tmp_path):
    x, y, _ = blobs()
    registry = Registry(tmp_path)
    outcome = train_and_register(_ids(len(y)), y, x, META, SPEC, registry)
    version = registry.load(outcome.version)
    npz = np.load(io.BytesIO((registry.versions_dir / outcome.version / "model.npz").read_bytes()),
                  allow_pickle=False)
    assert set(novelty.KEYS) <= set(npz.files)
    assert version.classifier.novelty_threshold == pytest.approx(outcome.novelty_threshold)
    meta = version.metadata
    assert meta["novelty"]["summary_size"] == len(y) and meta["novelty"]["threshold_rule"].startswith("conformal")
    cost = meta["unknown_cost"]
    assert cost["n"] == len(y) and cost["coverage"] == pytest.approx(1 - cost["novel"] - cost["unconfident"], abs=1e-5)
    fixed = train_and_register(_ids(len(y)), y, x, META, SPEC, registry, novelty_threshold=0)
    assert registry.load(fixed.version).classifier.novelty_threshold == 0
    assert all(r.unknown_reason != NOVEL for r in score(registry.load(fixed.version).classifier, far_away()))


def test_a_version_saved_before_novelty_existed_is_never_novel(tmp_path):
    x, y, _ = blobs()
    registry = Registry(tmp_path)
    trained = train(x, y, SPEC)
    old_arrays = {k: v for k, v in trained.classifier.arrays.items() if not k.startswith("novelty_")}
    version = registry.save(Classifier(SPEC, trained.classifier.classes, old_arrays), META, {"n_train": len(y)})
    loaded = registry.load(version).classifier
    assert loaded.novelty_threshold is None and loaded.novelty(far_away()) is None
    results = score(loaded, far_away())
    assert all(r.novelty is None and r.unknown_reason != NOVEL for r in results)


@pytest.mark.parametrize("damage", ["wrong_dim", "missing_key", "bad_class", "nan_threshold"])
def test_a_version_with_broken_novelty_arrays_is_refused(tmp_path, damage):
    x, y, _ = blobs()
    registry = Registry(tmp_path)
    arrays = dict(train(x, y, SPEC).classifier.arrays)
    if damage == "wrong_dim":
        arrays["novelty_vectors"] = arrays["novelty_vectors"][:, :5]
    elif damage == "missing_key":
        del arrays["novelty_k"]
    elif damage == "bad_class":
        arrays["novelty_classes"] = arrays["novelty_classes"] + 7
    else:
        arrays["novelty_threshold"] = np.array(np.nan)
    with pytest.raises(RegistryError, match="novelty"):
        registry.save(Classifier(SPEC, ["c0", "c1", "c2"], arrays), META, {})


def test_model_json_says_how_novelty_was_chosen(tmp_path):
    x, y, _ = blobs()
    registry = Registry(tmp_path)
    outcome = train_and_register(_ids(len(y)), y, x, META, SPEC, registry, novelty_threshold=0.2)
    meta = json.loads((registry.versions_dir / outcome.version / "model.json").read_text())
    assert meta["novelty"]["threshold"] == 0.2 and meta["novelty"]["threshold_rule"] == "fixed"
    assert "cosine distance to the nearest training photo" in meta["novelty"]["method"]
