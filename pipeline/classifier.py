"""The small classifier on top of the frozen features: train, cross-validate, score.

scikit-learn does the fitting; scoring a saved model uses only numpy arrays
(:class:`Classifier`), so the registry can store plain ``.npz`` arrays instead of pickles and a
model file can never run code when loaded.

Recipes (``ClassifierSpec``): ``linear-svm`` (sklearn ``LinearSVC``, the reference recipe),
``rbf-svm`` (``SVC`` with an RBF kernel) and ``logreg``; features can be L2-normalised or
standardised first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from pipeline.errors import DeeperError

KINDS = ("linear-svm", "rbf-svm", "logreg")
NORMALIZATIONS = ("none", "l2", "standard")


@dataclass(frozen=True)
class ClassifierSpec:
    kind: str = "linear-svm"
    normalize: str = "none"
    C: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DeeperError(f"unknown classifier {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.normalize not in NORMALIZATIONS:
            raise DeeperError(f"unknown normalisation {self.normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")

    def describe(self) -> str:
        return f"{self.kind} (C={self.C:g}, normalize={self.normalize})"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Classifier:
    """A fitted classifier as plain arrays: everything needed to score, nothing executable."""

    spec: ClassifierSpec
    classes: list[str]
    arrays: dict[str, np.ndarray]

    # -- scoring -------------------------------------------------------------------------
    def decision(self, vectors: np.ndarray) -> np.ndarray:
        """Per-class scores, float32 [N, n_classes]; higher means more likely that class."""
        x = self._normalize(np.asarray(vectors, dtype=np.float64))
        if self.spec.kind == "rbf-svm":
            scores = self._rbf_scores(x)
        else:
            raw = x @ self.arrays["coef"].T + self.arrays["intercept"]
            scores = np.hstack([-raw, raw]) if raw.shape[1] == 1 else raw
        return scores.astype(np.float32)

    def predict(self, vectors: np.ndarray) -> list[str]:
        scores = self.decision(vectors)
        return [self.classes[i] for i in np.argmax(scores, axis=1)]

    @property
    def dim(self) -> int:
        return int(self.arrays["dim"])

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DeeperError(f"classifier expects vectors of {self.dim} values, got shape {x.shape}")
        if self.spec.normalize == "l2":
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if self.spec.normalize == "standard":
            return (x - self.arrays["mean"]) / self.arrays["scale"]
        return x

    def _rbf_scores(self, x: np.ndarray) -> np.ndarray:
        """libsvm's one-vs-one decision, turned into per-class scores as sklearn's ``ovr`` does."""
        sv, gamma = self.arrays["support_vectors"], float(self.arrays["gamma"])
        sq = (x**2).sum(1)[:, None] + (sv**2).sum(1)[None, :] - 2 * x @ sv.T
        kernel = np.exp(-gamma * np.maximum(sq, 0))
        dual, intercept = self.arrays["dual_coef"], self.arrays["intercept"]
        if len(self.classes) == 2:  # sklearn flips binary coefficients: positive means classes[1]
            d = kernel @ dual[0] + intercept[0]
            return np.stack([-d, d], axis=1)
        return _ovo_to_ovr(kernel, dual, intercept, self.arrays["n_support"], len(self.classes))


def _ovo_to_ovr(kernel: np.ndarray, dual: np.ndarray, intercept: np.ndarray, n_support: np.ndarray,
                n_classes: int) -> np.ndarray:
    """Pairwise libsvm decisions -> votes plus a bounded confidence (sklearn's ovr shape)."""
    starts = np.concatenate([[0], np.cumsum(n_support)])
    votes = np.zeros((kernel.shape[0], n_classes))
    confidence = np.zeros_like(votes)
    pair = 0
    for i in range(n_classes):
        for j in range(i + 1, n_classes):
            si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
            d = kernel[:, si] @ dual[j - 1, si] + kernel[:, sj] @ dual[i, sj] + intercept[pair]
            votes[:, i] += d >= 0
            votes[:, j] += d < 0
            confidence[:, i] += d
            confidence[:, j] -= d
            pair += 1
    return votes + confidence / (3 * (np.abs(confidence) + 1))


def fit(vectors: np.ndarray, labels: Sequence[str], spec: ClassifierSpec) -> Classifier:
    """Fit ``spec`` on the vectors; return the array form used for scoring and saving."""
    x = np.asarray(vectors, dtype=np.float64)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DeeperError(f"need at least two classes to train, got {classes}")
    arrays: dict[str, np.ndarray] = {"dim": np.array(x.shape[1])}
    if spec.normalize == "standard":
        arrays["mean"] = x.mean(0)
        arrays["scale"] = np.where(x.std(0) > 1e-12, x.std(0), 1.0)
    draft = Classifier(spec, classes, arrays)
    xn = draft._normalize(x)
    model = _estimator(spec).fit(xn, np.asarray(labels))
    assert list(model.classes_) == classes
    if spec.kind == "rbf-svm":
        arrays.update(support_vectors=model.support_vectors_, dual_coef=model.dual_coef_,
                      intercept=model.intercept_, n_support=model.n_support_.astype(np.int64),
                      gamma=np.array(model._gamma))
    else:
        arrays.update(coef=model.coef_, intercept=model.intercept_)
    return Classifier(spec, classes, arrays)


def _estimator(spec: ClassifierSpec):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC, LinearSVC

    if spec.kind == "linear-svm":
        return LinearSVC(C=spec.C, max_iter=20_000)
    if spec.kind == "rbf-svm":
        return SVC(C=spec.C, kernel="rbf", gamma="scale")
    return LogisticRegression(C=spec.C, max_iter=5_000)


@dataclass
class CVResult:
    method: str
    accuracy: float
    classes: list[str]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    predictions: list[str]

    def to_dict(self) -> dict:
        return {"method": self.method, "accuracy": self.accuracy, "classes": self.classes,
                "confusion": self.confusion}


def cross_validate(vectors: np.ndarray, labels: Sequence[str], spec: ClassifierSpec, seed: int = 0) -> CVResult:
    """Leave-one-out for tiny sets (≤ 50 images), stratified 5-fold otherwise."""
    from sklearn.model_selection import LeaveOneOut, StratifiedKFold

    y = np.asarray(labels)
    classes = sorted(set(labels))
    smallest = min(int((y == c).sum()) for c in classes)
    if smallest < 2:
        raise DeeperError("cross-validation needs at least 2 images of every class")
    if len(y) <= 50:
        splitter, method = LeaveOneOut(), "leave-one-out"
    else:
        k = min(5, smallest)
        splitter, method = StratifiedKFold(k, shuffle=True, random_state=seed), f"stratified {k}-fold"
    predictions = np.empty(len(y), dtype=object)
    for train_idx, test_idx in splitter.split(vectors, y):
        model = fit(vectors[train_idx], y[train_idx].tolist(), spec)
        predictions[test_idx] = model.predict(vectors[test_idx])
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for truth, guess in zip(y, predictions):
        confusion[index[truth], index[guess]] += 1
    accuracy = float((predictions == y).mean())
    return CVResult(method, accuracy, classes, confusion.tolist(), predictions.tolist())
