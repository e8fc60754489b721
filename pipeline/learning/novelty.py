"""How far a photo is from everything the model was trained on: the novelty score.

Why: a calibrated confidence only says which of the *known* classes a photo is closest to. A cat
shown to a classic-vs-modern cars model is still closer to one of the two, often confidently so.
What the cat does differ in is its distance from every training photo in feature space, the
"deep k-nearest-neighbours" out-of-distribution score (Sun et al., 2022): the cosine distance
from the photo's vector to the k-th nearest training vector. It needs no extra training, works
for any classifier on top, and is calibrated the way the confidence threshold is: on the
training photos themselves, each scored without itself (leave-one-out).

What a model version keeps (plain arrays in the registry's npz, no pickles):

* ``novelty_vectors`` float16 [M, dim]: the L2-normalised training vectors, or, beyond
  :data:`MAX_SUMMARY` of them, k-means centroids per class (as many per class as its share of
  the photos), so a version stays a few MB whatever the training set;
* ``novelty_classes`` int32 [M]: each summary vector's class index (for ``per_class``);
* ``novelty_k``, ``novelty_per_class``: the rule (:class:`NoveltySpec`);
* ``novelty_threshold``: the distance above which a photo is "novel" (0: never).

A version without them (trained before novelty existed) scores no novelty and is never novel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from pipeline.errors import DeeperError

#: About the most summary vectors a version keeps (float16: ~3.6 MB at 1792 dimensions; a class
#: share rounds up, so a few more with many classes).
MAX_SUMMARY = 1000
#: Query rows per block of distances: bounds the [rows, M] matrix in memory.
_CHUNK = 1024
KEYS = ("novelty_vectors", "novelty_classes", "novelty_k", "novelty_per_class", "novelty_threshold")


@dataclass(frozen=True)
class NoveltySpec:
    """The distance to the ``k``-th nearest training vector, among all classes or (``per_class``)
    among the predicted class's only."""

    k: int = 1
    per_class: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise DeeperError(f"novelty k must be at least 1, got {self.k}")

    def describe(self) -> str:
        where = "of the predicted class" if self.per_class else "of any class"
        nth = "nearest" if self.k == 1 else f"{self.k}-th nearest"
        return f"cosine distance to the {nth} training photo {where}"


DEFAULT_SPEC = NoveltySpec()


def normalize(vectors: np.ndarray) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def summarize(vectors: np.ndarray, class_index: np.ndarray, cap: int = MAX_SUMMARY,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(summary float16 [M, dim], classes int32 [M], what it is): the normalised vectors
    themselves when there are at most ``cap``, else k-means centroids per class."""
    x = normalize(vectors)
    classes = np.asarray(class_index, dtype=np.int32)
    if len(x) <= cap:
        return x.astype(np.float16), classes, "the training vectors"
    from sklearn.cluster import KMeans

    parts, labels = [], []
    present = np.unique(classes)
    for c in present:
        members = x[classes == c]
        n = max(1, min(len(members), round(cap * len(members) / len(x))))
        centres = members if n == len(members) else KMeans(n, n_init=1, random_state=seed).fit(members).cluster_centers_
        parts.append(normalize(centres))
        labels.append(np.full(len(centres), c, np.int32))
    return np.vstack(parts).astype(np.float16), np.concatenate(labels), f"k-means centroids (about {cap})"


def distances(query: np.ndarray, summary: np.ndarray, summary_classes: np.ndarray, spec: NoveltySpec,
              predicted: np.ndarray | None = None, exclude: np.ndarray | None = None) -> np.ndarray:
    """Each query row's novelty: 1 - cosine to its k-th nearest summary vector.

    ``query`` rows are normalised here. ``predicted`` (class index per row) is needed for
    ``per_class``. ``exclude`` (summary index per row, or -1) leaves a row's own vector out:
    leave-one-out on the training vectors.
    """
    q = normalize(query)
    s = np.asarray(summary, dtype=np.float32)
    out = np.empty(len(q), np.float64)
    for start in range(0, len(q), _CHUNK):
        rows = slice(start, start + _CHUNK)
        d = 1.0 - q[rows] @ s.T
        if exclude is not None:
            own = np.asarray(exclude[rows])
            hit = own >= 0
            d[np.nonzero(hit)[0], own[hit]] = np.inf
        if spec.per_class:
            if predicted is None:
                raise DeeperError("per-class novelty needs each photo's predicted class")
            d = np.where(summary_classes[None, :] == np.asarray(predicted[rows])[:, None], d, np.inf)
        k = min(spec.k, d.shape[1])
        value = d.min(axis=1) if k == 1 else np.partition(d, k - 1, axis=1)[:, k - 1]  # k-th smallest, no sort
        short = ~np.isfinite(value)  # fewer than k left to compare with: the furthest there is
        if short.any():
            value[short] = np.where(np.isfinite(d[short]), d[short], -np.inf).max(axis=1)
        out[rows] = np.where(np.isfinite(value), value, 2.0)  # nothing to compare with: as far as it gets
    return np.clip(out, 0.0, 2.0)


#: How the threshold is read off the held-out training scores (:func:`choose_threshold`).
CONFORMAL, TRAINING_SHARE = "conformal", "training-share"


def choose_threshold(scores: np.ndarray, max_false_novel: float, rule: str = CONFORMAL) -> float:
    """The threshold above which a photo is novel, from the training photos' held-out scores.

    ``conformal`` (the default): the k-th largest score with k = floor(max_false_novel * (n + 1)),
    at least 1. Why: a new in-class photo's score is exchangeable with the n held-out ones, so it
    lands above the k-th largest with probability k / (n + 1) <= ``max_false_novel``: the budget
    holds for *new* photos (split-conformal prediction), and at most k - 1 of the training photos
    are novel. ``training-share``: the (floor(max_false_novel * n) + 1)-th largest, which keeps
    the budget on the training photos themselves but marks about twice as many new in-class photos
    novel on small sets (2 / 21 with 20 photos). With fewer than 1 / max_false_novel - 1 photos
    the conformal k is 1 (the largest score), and the rate on new photos is 1 / (n + 1).
    """
    if not 0.0 <= max_false_novel < 1.0:
        raise DeeperError(f"the false-novel budget must be in [0, 1), got {max_false_novel}")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if rule == CONFORMAL:
        k = max(1, int(np.floor(max_false_novel * (len(ordered) + 1) + 1e-9)))
    elif rule == TRAINING_SHARE:
        k = int(np.floor(max_false_novel * len(ordered) + 1e-9)) + 1
    else:
        raise DeeperError(f"unknown threshold rule {rule!r}")
    return float(ordered[min(k, len(ordered)) - 1])


@dataclass
class NoveltyFit:
    arrays: dict[str, np.ndarray]
    #: each training photo's novelty when it was not part of the summary (leave-one-out, or the
    #: held-out fold of a 5-fold split when the summary is centroids)
    held_out: np.ndarray
    summary: str  # what the summary vectors are

    @property
    def threshold(self) -> float:
        return float(self.arrays["novelty_threshold"])

    @property
    def held_out_novel(self) -> np.ndarray:
        return novel(self.held_out, self.threshold)


def fit(vectors: np.ndarray, class_index: np.ndarray, predicted: np.ndarray, spec: NoveltySpec = DEFAULT_SPEC,
        threshold: float | None = None, max_false_novel: float = 0.05, cap: int = MAX_SUMMARY,
        seed: int = 0, rule: str = CONFORMAL) -> NoveltyFit:
    """The summary of the training vectors, their held-out novelty, and the threshold.

    ``predicted``: each training photo's out-of-fold predicted class (what ``per_class`` compares
    with at scoring time, honestly). ``threshold``: None calibrates (:func:`choose_threshold`:
    at most ``max_false_novel`` of new in-class photos novel), a number fixes it, 0 turns novelty off.
    """
    if threshold is not None and not 0.0 <= threshold <= 2.0:
        raise DeeperError(f"the novelty threshold is a cosine distance in [0, 2], got {threshold}")
    classes = np.asarray(class_index, dtype=np.int32)
    summary, summary_classes, what = summarize(vectors, classes, cap, seed)
    if len(vectors) <= cap:  # the summary is the vectors: leave each one out of its own comparison
        held_out = distances(summary, summary, summary_classes, spec, predicted, exclude=np.arange(len(summary)))
    else:
        held_out = _held_out_by_folds(vectors, classes, predicted, spec, cap, seed)
    if threshold is None:
        threshold = choose_threshold(held_out, max_false_novel, rule)
    arrays = {"novelty_vectors": summary, "novelty_classes": summary_classes, "novelty_k": np.array(spec.k),
              "novelty_per_class": np.array(int(spec.per_class)), "novelty_threshold": np.array(float(threshold))}
    return NoveltyFit(arrays, held_out, what)


def _held_out_by_folds(vectors: np.ndarray, classes: np.ndarray, predicted: np.ndarray, spec: NoveltySpec,
                       cap: int, seed: int, folds: int = 5) -> np.ndarray:
    """Novelty of each vector against a summary built without its fold (centroids can't leave one out)."""
    from sklearn.model_selection import KFold

    out = np.empty(len(vectors))
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(vectors):
        summary, summary_classes, _ = summarize(vectors[train], classes[train], cap, seed)
        out[test] = distances(vectors[test], summary, summary_classes, spec, predicted[test])
    return out


def novel(scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """Which scores are above a (positive) threshold; nothing is novel without one."""
    scores = np.asarray(scores, dtype=np.float64)
    if not threshold:
        return np.zeros(scores.shape, bool)
    return scores > threshold


# -- reading a model's arrays -------------------------------------------------------------------
def has_novelty(arrays: Mapping[str, np.ndarray]) -> bool:
    return all(key in arrays for key in KEYS)


def spec_of(arrays: Mapping[str, np.ndarray]) -> NoveltySpec:
    return NoveltySpec(int(arrays["novelty_k"]), bool(int(arrays["novelty_per_class"])))


def score(arrays: Mapping[str, np.ndarray], vectors: np.ndarray, predicted: np.ndarray) -> np.ndarray | None:
    """Novelty of each vector under a model's arrays; None for a model without a summary."""
    if not has_novelty(arrays):
        return None
    return distances(vectors, arrays["novelty_vectors"], arrays["novelty_classes"], spec_of(arrays), predicted)


def check(arrays: Mapping[str, np.ndarray], dim: int, n_classes: int) -> None:
    """Raise ValueError when a model's novelty arrays can't be scored (the registry refuses it)."""
    present = [key for key in KEYS if key in arrays]
    if not present:
        return
    if len(present) != len(KEYS):
        raise ValueError(f"its novelty arrays are incomplete (has {present})")
    summary, classes = arrays["novelty_vectors"], arrays["novelty_classes"]
    if summary.ndim != 2 or summary.shape[1] != dim or len(summary) == 0 or classes.shape != (len(summary),):
        raise ValueError(f"its novelty summary has shape {summary.shape} for {dim}-d vectors")
    if not np.isfinite(summary.astype(np.float32)).all() or classes.min() < 0 or classes.max() >= n_classes:
        raise ValueError("its novelty summary has non-finite values or unknown classes")
    threshold = float(arrays["novelty_threshold"])
    if not np.isfinite(threshold) or not 0.0 <= threshold <= 2.0 or int(arrays["novelty_k"]) < 1:
        raise ValueError(f"its novelty threshold {threshold} or k is out of range")
