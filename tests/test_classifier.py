"""The numpy scorer must agree with scikit-learn, and cross-validation must pick the right scheme.

A saved model is scored with plain numpy (:class:`pipeline.learning.classifier.Classifier`) so the
registry never unpickles anything; these tests fit the same estimators directly with
scikit-learn (their own normalisation, not ours) and require identical decisions.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import LeaveOneOut, StratifiedKFold
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from pipeline.learning.classifier import KINDS, NORMALIZATIONS, ClassifierSpec, cross_validate, fit
from pipeline.errors import DeeperError

CLASS_NAMES = ["bird", "cat", "dog", "eel"]


def blobs(n_classes: int, per_class: int = 12, dim: int = 24, seed: int = 0, spread: float = 1.5,
          test_per_class: int = 0):
    """Overlapping Gaussian blobs with feature-dependent scales (so normalisation matters).

    With ``test_per_class`` also returns held-out points drawn from the same blobs.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_classes, dim))
    scales = rng.uniform(0.1, 5.0, dim)
    offset = rng.normal(0, 2, dim)

    def draw(count):
        x = np.concatenate([centres[c] + rng.normal(0, spread, (count, dim)) for c in range(n_classes)])
        x = (x * scales + offset).astype(np.float32)
        x[:, 3] = 7.0  # a constant feature: 'standard' must not divide by zero
        labels = [CLASS_NAMES[c] for c in range(n_classes) for _ in range(count)]
        order = rng.permutation(len(labels))
        return x[order], [labels[i] for i in order]

    train = draw(per_class)
    return (*train, *draw(test_per_class)) if test_per_class else train


def sklearn_reference(x_train, y_train, x_test, spec: ClassifierSpec):
    """(decision_function, predict) of the same recipe built from scikit-learn parts only."""
    if spec.normalize == "l2":
        scaler = Normalizer().fit(x_train)
    elif spec.normalize == "standard":
        scaler = StandardScaler().fit(x_train)
    else:
        scaler = None
    xt = scaler.transform(x_train) if scaler else x_train
    xs = scaler.transform(x_test) if scaler else x_test
    if spec.kind == "linear-svm":
        model = LinearSVC(C=spec.C, max_iter=20_000)
    elif spec.kind == "rbf-svm":
        # break_ties: predict = argmax of the one-vs-rest scores (libsvm's own vote would pick
        # the first tied class), which is what a per-class score is for.
        model = SVC(C=spec.C, kernel="rbf", gamma="scale", break_ties=len(set(y_train)) > 2)
    else:
        model = LogisticRegression(C=spec.C, max_iter=5_000)
    model.fit(xt.astype(np.float64), np.asarray(y_train))
    return model.classes_.tolist(), model.decision_function(xs.astype(np.float64)), model.predict(xs.astype(np.float64))


@pytest.mark.parametrize("n_classes", [2, 3, 4])
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_numpy_scoring_equals_sklearn(kind, normalize, n_classes):
    x, y, x_test, _ = blobs(n_classes, seed=n_classes, test_per_class=8)
    spec = ClassifierSpec(kind, normalize, 0.7)
    ours = fit(x, y, spec)
    classes, decision, predicted = sklearn_reference(x, y, x_test, spec)

    assert ours.classes == classes == sorted(set(y))
    assert ours.dim == x.shape[1]
    scores = ours.decision(x_test)
    assert scores.shape == (len(x_test), n_classes) and scores.dtype == np.float32
    if n_classes == 2:
        # sklearn gives one column, positive meaning classes[1]; ours gives (-d, d)
        np.testing.assert_allclose(scores[:, 1], decision, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(scores[:, 0], -decision, rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_allclose(scores, decision, rtol=1e-4, atol=1e-4)
    assert ours.predict(x_test) == predicted.tolist()
    # the problem is not trivial: the recipes disagree with a constant guess
    assert len(set(predicted.tolist())) > 1


def test_scoring_checks_the_dimension():
    x, y = blobs(2)
    model = fit(x, y, ClassifierSpec())
    with pytest.raises(DeeperError, match="24 values"):
        model.decision(x[:, :10])


def test_unknown_recipe_is_refused():
    with pytest.raises(DeeperError, match="unknown classifier"):
        ClassifierSpec("random-forest")
    with pytest.raises(DeeperError, match="unknown normalisation"):
        ClassifierSpec("linear-svm", "minmax")


def test_single_class_is_an_error():
    x, _ = blobs(2)
    with pytest.raises(DeeperError, match="at least two classes"):
        fit(x, ["cat"] * len(x), ClassifierSpec())
    with pytest.raises(DeeperError, match="at least two classes"):
        cross_validate(x, ["cat"] * len(x), ClassifierSpec())


def test_cross_validation_needs_two_of_each_class():
    x, y = blobs(2, per_class=5)
    y = list(y)
    y[0] = "eel"  # a class with one image cannot be held out and still trained on
    with pytest.raises(DeeperError, match="at least 2 images of every class"):
        cross_validate(x, y, ClassifierSpec())


def _manual_predictions(x, y, spec, splitter):
    predictions = np.empty(len(y), dtype=object)
    for train, test in splitter.split(x, np.asarray(y)):
        _, _, pred = sklearn_reference(x[train], [y[i] for i in train], x[test], spec)
        predictions[test] = pred
    return predictions.tolist()


@pytest.mark.parametrize("n_classes,per_class", [(2, 25), (3, 5)])
def test_leave_one_out_up_to_50_images(n_classes, per_class):
    x, y = blobs(n_classes, per_class=per_class, seed=7)
    assert len(y) <= 50
    spec = ClassifierSpec("logreg", "standard", 1.0)
    cv = cross_validate(x, y, spec)
    assert cv.method == "leave-one-out"
    assert cv.predictions == _manual_predictions(x, y, spec, LeaveOneOut())
    _check_confusion(cv, y)


def test_stratified_k_fold_above_50_images():
    x, y = blobs(3, per_class=17, seed=3)  # 51 images
    spec = ClassifierSpec("linear-svm", "l2", 1.0)
    cv = cross_validate(x, y, spec, seed=0)
    assert cv.method == "stratified 5-fold"
    assert cv.predictions == _manual_predictions(x, y, spec, StratifiedKFold(5, shuffle=True, random_state=0))
    _check_confusion(cv, y)


def test_k_is_limited_by_the_smallest_class():
    x, y = blobs(2, per_class=50, seed=5)
    birds = [i for i, label in enumerate(y) if label == "bird"][:3]
    cats = [i for i, label in enumerate(y) if label == "cat"]
    keep = sorted(birds + cats)
    x, y = x[keep], [y[i] for i in keep]
    assert len(y) == 53 and y.count("bird") == 3
    cv = cross_validate(x, y, ClassifierSpec())
    assert cv.method == "stratified 3-fold"
    _check_confusion(cv, y)


def _check_confusion(cv, y):
    confusion = np.asarray(cv.confusion)
    assert cv.classes == sorted(set(y))
    assert confusion.shape == (len(cv.classes), len(cv.classes))
    assert confusion.sum() == len(y)
    # rows are the true classes
    assert confusion.sum(axis=1).tolist() == [y.count(c) for c in cv.classes]
    assert confusion.sum(axis=0).tolist() == [cv.predictions.count(c) for c in cv.classes]
    assert np.trace(confusion) == round(cv.accuracy * len(y))
    assert cv.accuracy == pytest.approx(np.mean([a == b for a, b in zip(cv.predictions, y)]))
    assert cv.to_dict()["confusion"] == cv.confusion


def test_cross_validation_accuracy_reflects_separability():
    easy_x, easy_y = blobs(3, per_class=10, seed=1, spread=0.05)
    hard_x, hard_y = blobs(3, per_class=10, seed=1, spread=50.0)
    spec = ClassifierSpec("linear-svm", "standard", 1.0)
    assert cross_validate(easy_x, easy_y, spec).accuracy == 1.0
    assert cross_validate(hard_x, hard_y, spec).accuracy < 0.8
