"""The small classifier on top of the frozen features: train, cross-validate, score.

scikit-learn does the fitting; scoring a saved model uses only numpy arrays
(:class:`Classifier`), so the registry can store plain ``.npz`` arrays instead of pickles and a
model file can never run code when loaded.

Recipes (``ClassifierSpec``): ``linear-svm`` (sklearn ``LinearSVC``, the reference recipe),
``rbf-svm`` (``SVC`` with an RBF kernel) and ``logreg``; features can be L2-normalised or
standardised first.

Calibration: raw scores (SVM margins) say which class wins, not how sure that is. Each class
gets a Platt sigmoid ``p_k = 1 / (1 + exp(a_k * s_k + b_k))`` fitted on *out-of-fold* scores
(every photo scored by a model that never saw it, from the same cross-validation that measures
accuracy), then the per-class sigmoids are normalised to sum to 1 (what scikit-learn's
``CalibratedClassifierCV(method="sigmoid")`` does for one-vs-rest). The sigmoid parameters and
the "unknown" threshold are stored as arrays (``platt_a``, ``platt_b``, ``unknown_threshold``)
next to the classifier's own, so the registry needs no new format; a model without them is
uncalibrated and gets no probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from pipeline.errors import DeeperError
from pipeline.learning import novelty as novelty_lib

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
        """The top-scoring class of each vector, never "unknown" (see :mod:`pipeline.learning.scoring`)."""
        scores = self.decision(vectors)
        return [self.classes[i] for i in np.argmax(scores, axis=1)]

    @property
    def calibrated(self) -> bool:
        return "platt_a" in self.arrays and "platt_b" in self.arrays

    def probabilities(self, vectors: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray | None:
        """Calibrated per-class probabilities [N, n_classes] (rows sum to 1); None if uncalibrated."""
        if not self.calibrated:
            return None
        scores = self.decision(vectors) if scores is None else scores
        return platt_probabilities(scores, self.arrays["platt_a"], self.arrays["platt_b"])

    @property
    def unknown_threshold(self) -> float | None:
        """Top probability below which a photo is "unknown"; None if uncalibrated (never unknown)."""
        if not self.calibrated or "unknown_threshold" not in self.arrays:
            return None
        return float(self.arrays["unknown_threshold"])

    @property
    def novelty_threshold(self) -> float | None:
        """Distance above which a photo is "novel" (0: never); None when the model keeps no
        summary of its training vectors (trained before novelty existed: never novel)."""
        if not novelty_lib.has_novelty(self.arrays):
            return None
        return float(self.arrays["novelty_threshold"])

    def novelty(self, vectors: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray | None:
        """Each vector's distance from the training photos (:mod:`pipeline.learning.novelty`);
        None for a model without a summary."""
        scores = self.decision(vectors) if scores is None else scores
        return novelty_lib.score(self.arrays, vectors, np.argmax(scores, axis=1))

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
        # liblinear's dual solver visits samples in a random order: a fixed seed makes the same
        # rows give the same coefficients (``deeper train --reproduce``), not ones 1e-5 apart
        return LinearSVC(C=spec.C, max_iter=20_000, random_state=0)
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
    #: out-of-fold scores [N, n_classes]: each row from a model that never saw that photo.
    scores: np.ndarray | None = None
    #: out-of-fold calibrated probabilities: each row's sigmoids fitted without that row's fold.
    probabilities: np.ndarray | None = None
    labels: list[str] | None = None  # the true labels, in input order

    @property
    def brier(self) -> float | None:
        """Multi-class Brier score of the out-of-fold probabilities (0 perfect, 2 worst)."""
        if self.probabilities is None:
            return None
        return brier_score(self.probabilities, self.truth_onehot())

    def truth_onehot(self) -> np.ndarray:
        """[N, n_classes]: 1 where the column is the photo's true class."""
        if self.labels is None:
            raise DeeperError("this cross-validation result has no labels")
        return (np.asarray(self.labels)[:, None] == np.asarray(self.classes)[None, :]).astype(np.float64)

    def to_dict(self) -> dict:
        out = {"method": self.method, "accuracy": self.accuracy, "classes": self.classes,
               "confusion": self.confusion}
        if self.brier is not None:
            out["brier"] = round(self.brier, 6)
        return out


def _splitter(y: np.ndarray, seed: int, leave_one_out: bool | None):
    """Leave-one-out for tiny sets (≤ 50 images, or when asked), stratified k-fold otherwise."""
    from sklearn.model_selection import LeaveOneOut, StratifiedKFold

    smallest = min(int((y == c).sum()) for c in set(y.tolist()))
    if smallest < 2:
        raise DeeperError("cross-validation needs at least 2 images of every class")
    if leave_one_out or (leave_one_out is None and len(y) <= 50):
        return LeaveOneOut(), "leave-one-out"
    k = min(5, smallest)
    return StratifiedKFold(k, shuffle=True, random_state=seed), f"stratified {k}-fold"


def cross_validate(vectors: np.ndarray, labels: Sequence[str], spec: ClassifierSpec, seed: int = 0,
                   leave_one_out: bool | None = None) -> CVResult:
    """Out-of-fold predictions, scores and calibrated probabilities.

    Leave-one-out for tiny sets (≤ 50 images), stratified 5-fold otherwise (``leave_one_out``
    forces either). The probabilities are honest twice over: a photo's score comes from a model
    that never saw it, and the sigmoids that turn it into a probability are fitted on the
    *other* folds' out-of-fold scores. (Those other scores came from models that did see this
    photo: a small leak, the price of not nesting a second cross-validation.)
    """
    y = np.asarray(labels)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DeeperError(f"need at least two classes to train, got {classes}")
    splitter, method = _splitter(y, seed, leave_one_out)
    folds = list(splitter.split(vectors, y))
    predictions = np.empty(len(y), dtype=object)
    scores = np.zeros((len(y), len(classes)))
    for train_idx, test_idx in folds:
        model = fit(vectors[train_idx], y[train_idx].tolist(), spec)
        fold_scores = model.decision(vectors[test_idx])
        predictions[test_idx] = [model.classes[i] for i in np.argmax(fold_scores, axis=1)]
        scores[test_idx] = _align(fold_scores, model.classes, classes)
    probabilities = np.zeros_like(scores)
    onehot = (y[:, None] == np.asarray(classes)[None, :]).astype(np.float64)
    for train_idx, test_idx in folds:
        a, b = fit_platt(scores[train_idx], onehot[train_idx])
        probabilities[test_idx] = platt_probabilities(scores[test_idx], a, b)
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for truth, guess in zip(y, predictions):
        confusion[index[truth], index[guess]] += 1
    accuracy = float((predictions == y).mean())
    return CVResult(method, accuracy, classes, confusion.tolist(), predictions.tolist(), scores, probabilities,
                    y.tolist())


def _align(scores: np.ndarray, have: list[str], want: list[str]) -> np.ndarray:
    """Scores of a fold model (which may lack a class) in the full class order; missing: -inf-ish."""
    if have == want:
        return scores
    out = np.full((scores.shape[0], len(want)), scores.min() - 1.0)
    for j, c in enumerate(have):
        out[:, want.index(c)] = scores[:, j]
    return out


# -- calibration -------------------------------------------------------------------------------
def fit_platt(scores: np.ndarray, onehot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Platt sigmoid per class (one-vs-rest) on out-of-fold scores -> (a, b), each [n_classes].

    Platt's smoothed targets ((n+ + 1)/(n+ + 2) and 1/(n- + 2) instead of 1 and 0) keep the
    slope finite when the scores separate the classes perfectly, as they often do on 20 photos.
    """
    a = np.zeros(scores.shape[1])
    b = np.zeros(scores.shape[1])
    for k in range(scores.shape[1]):
        a[k], b[k] = _platt_1d(scores[:, k], onehot[:, k] > 0.5)
    return a, b


def _platt_1d(s: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    from scipy.optimize import minimize

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    t = np.where(positive, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    scale = max(float(np.std(s)), 1e-12)  # fit on standardised scores: well-conditioned whatever C is
    z = s / scale

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        f = params[0] * z + params[1]
        # -log p and -log(1-p) for p = sigmoid(-f), computed stably
        nll = t * np.logaddexp(0, f) + (1 - t) * np.logaddexp(0, -f)
        d = 1 / (1 + np.exp(-np.clip(f, -500, 500))) - (1 - t)  # dnll/df = sigmoid(f) - (1 - t)
        grad = np.array([(d * z).sum(), d.sum()])
        return float(nll.sum()), grad

    prior = np.log((n_neg + 1.0) / (n_pos + 1.0))
    found = minimize(loss, np.array([0.0, prior]), jac=True, method="L-BFGS-B")
    return float(found.x[0] / scale), float(found.x[1])


def platt_probabilities(scores: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-class sigmoids of the scores, normalised so each row sums to 1."""
    f = np.asarray(scores, dtype=np.float64) * a + b
    p = 1 / (1 + np.exp(np.clip(f, -500, 500)))
    total = p.sum(axis=1, keepdims=True)
    return np.where(total > 0, p / np.maximum(total, 1e-300), 1.0 / p.shape[1])


def top_probability(scores: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """The probability of each row's top-scoring class: what "confidence" means everywhere."""
    return probabilities[np.arange(len(scores)), np.argmax(scores, axis=1)]


def brier_score(probabilities: np.ndarray, onehot: np.ndarray) -> float:
    """Mean over photos of sum_k (p_k - y_k)^2."""
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


#: The default rule for "unknown": at most this share of the training photos, scored under
#: cross-validation, may fall below the threshold.
MAX_FALSE_UNKNOWN = 0.05


def choose_unknown_threshold(top_probabilities: np.ndarray, max_false_unknown: float = MAX_FALSE_UNKNOWN) -> float:
    """The highest threshold that marks at most ``max_false_unknown`` of in-class photos unknown.

    ``top_probabilities`` are the out-of-fold top probabilities of the training photos; a photo
    is unknown when its top probability is *below* the threshold, so the answer is the
    (k+1)-th smallest of them with k = floor(max_false_unknown * n).
    """
    if not 0.0 <= max_false_unknown < 1.0:
        raise DeeperError(f"the false-unknown budget must be in [0, 1), got {max_false_unknown}")
    ordered = np.sort(np.asarray(top_probabilities, dtype=np.float64))
    allowed = int(np.floor(max_false_unknown * len(ordered) + 1e-9))
    return float(ordered[allowed])


def calibrate(classifier: Classifier, cv: CVResult, unknown_threshold: float | None = None,
              max_false_unknown: float = MAX_FALSE_UNKNOWN) -> Classifier:
    """``classifier`` plus sigmoids fitted on ``cv``'s out-of-fold scores and an unknown threshold.

    ``unknown_threshold``: a fixed threshold (0 turns "unknown" off); None chooses it from the
    cross-validated probabilities with :func:`choose_unknown_threshold`.
    """
    if cv.scores is None or cv.probabilities is None or cv.classes != classifier.classes:
        raise DeeperError("calibration needs the cross-validation of the same classes")
    if unknown_threshold is not None and not 0.0 <= unknown_threshold <= 1.0:
        raise DeeperError(f"the unknown threshold is a probability in [0, 1], got {unknown_threshold}")
    a, b = fit_platt(cv.scores, cv.truth_onehot())
    if unknown_threshold is None:
        unknown_threshold = choose_unknown_threshold(top_probability(cv.scores, cv.probabilities), max_false_unknown)
    arrays = {**classifier.arrays, "platt_a": a, "platt_b": b, "unknown_threshold": np.array(unknown_threshold)}
    return Classifier(classifier.spec, classifier.classes, arrays)
