"""Training a classifier on feature rows and saving it as a registry version.

Used by ``deeper train DIR`` (featurize, then train) and ``deeper train --features`` (offline
retraining from Parquet the batch job or the stream wrote: no network run at all).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.learning import novelty as novelty_lib
from pipeline.learning.classifier import (MAX_FALSE_UNKNOWN, Classifier, ClassifierSpec, CVResult, calibrate,
                                          cross_validate, fit, top_probability)
from pipeline.errors import DeeperError
from pipeline.identity import FeatureId
from pipeline.learning.registry import Registry
from pipeline.learning.scoring import UNKNOWN_LABEL
from schemas.messages import label_problem

log = logging.getLogger(__name__)

#: The reference recipe: a linear SVM on the 1001 logits, as in "Inception v1 + SVM".
REFERENCE_LAYER = "logits"
REFERENCE_SPEC = ClassifierSpec("linear-svm", "none", 1.0)
#: What ``deeper train`` uses without flags, chosen by measurement (bench/recipes.py; README
#: "Choosing the recipe"): the pooled features beat the logits under leave-one-out on both real
#: photo sets we have (cars 95% vs 90%, examples 100% vs 96%) and were never worse. ``--reference``
#: brings back the reference recipe. Multi-level specs (``prelogits+block_14+block_15``) gain 1.5
#: points of closed-set accuracy 10-shot (bench/fewshot.py: mostly on telescope photos) but not
#: measurably on accuracy with unknown, and EfficientNet-Lite1/Lite2 gain nothing measurable at 2-3x
#: the model time, so the default stays Lite0's single level (README "Choosing the recipe").
DEFAULT_LAYER = "prelogits"
DEFAULT_SPEC = ClassifierSpec("linear-svm", "none", 1.0)
#: Photos a class needs to take part in a training: cross-validation holds one out.
MIN_PER_CLASS = 2


@dataclass
class TrainingOutcome:
    version: str
    cv: CVResult
    n_images: int
    classes: list[str]
    training_set_sha256: str
    #: top probability below which a photo is "unknown" (0: never)
    unknown_threshold: float = 0.0
    #: share of the training photos that threshold marks unknown under cross-validation
    cv_false_unknown: float = 0.0
    #: cosine distance above which a photo is novel (0: never)
    novelty_threshold: float = 0.0
    #: share of the training photos novel when left out of the summary
    cv_novel: float = 0.0
    #: what "unknown" (either reason) costs, under cross-validation: see :class:`UnknownCost`
    cost: "UnknownCost | None" = None
    #: classes left out of this training, and why (too few photos, a name that can't be a class)
    left_out: dict[str, str] = field(default_factory=dict)

    def left_out_line(self) -> str:
        """The one line that says which classes this training left out (empty: none)."""
        if not self.left_out:
            return ""
        return "left out of this training: " + "; ".join(f"{c!r} ({why})" for c, why in self.left_out.items())


@dataclass(frozen=True)
class UnknownCost:
    """What "unknown" costs on in-class photos: how many get an answer, and how good those are.

    Measured on the training photos under cross-validation (each scored by a model that never
    saw it, its novelty against a summary without it), next to the plain accuracy of answering
    every photo with its top class.
    """

    n: int
    accuracy: float  # every photo answered with its top class
    coverage: float  # share answered (neither novel nor unconfident)
    answered_accuracy: float | None  # accuracy of the answered ones; None if none was answered
    novel: float  # share unknown as novel
    unconfident: float  # share unknown as unconfident (and not novel)

    @classmethod
    def measure(cls, correct: np.ndarray, novel: np.ndarray, unconfident: np.ndarray) -> "UnknownCost":
        correct, novel, unconfident = (np.asarray(a, bool) for a in (correct, novel, unconfident))
        answered = ~(novel | unconfident)
        return cls(len(correct), float(correct.mean()), float(answered.mean()),
                   float(correct[answered].mean()) if answered.any() else None, float(novel.mean()),
                   float((unconfident & ~novel).mean()))

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def training_set_hash(image_ids: Sequence[str], labels: Sequence[str]) -> str:
    """Identifies the exact (image, label) set a model saw, independent of order."""
    lines = sorted(f"{i}\t{lab}" for i, lab in zip(image_ids, labels))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def labelled_only(image_ids: Sequence[str], labels: Sequence[str | None], vectors: np.ndarray
                  ) -> tuple[list[str], list[str], np.ndarray]:
    """The labelled rows, in image id order: the same rows give the same model whatever order
    their source lists them in (files, a table's data files, a backfill's chunks), since
    cross-validation folds and the solver both see rows in order."""
    keep = sorted((i for i, label in enumerate(labels) if label), key=lambda i: image_ids[i])
    if not keep:
        raise DeeperError("no labelled images: put photos in one sub-folder per class, or pass --labels CSV")
    return [image_ids[i] for i in keep], [labels[i] for i in keep], vectors[keep]


@dataclass
class Trained:
    """A fitted, calibrated classifier with its novelty summary, and what cross-validation said."""

    classifier: Classifier
    cv: CVResult
    novelty: novelty_lib.NoveltyFit
    cv_false_unknown: float  # share of training photos under the confidence threshold (out of fold)
    cost: UnknownCost


def train(vectors: np.ndarray, labels: Sequence[str], spec: ClassifierSpec, unknown_threshold: float | None = None,
          max_false_unknown: float = MAX_FALSE_UNKNOWN, novelty_threshold: float | None = None,
          max_false_novel: float = MAX_FALSE_UNKNOWN,
          novelty_spec: novelty_lib.NoveltySpec = novelty_lib.DEFAULT_SPEC,
          novelty_rule: str = novelty_lib.CONFORMAL) -> Trained:
    """Cross-validate, fit on everything, calibrate confidence, summarise the vectors for novelty.

    Each threshold: None chooses it on the training photos, each scored without itself: the
    confidence threshold marks at most ``max_false_unknown`` of them unknown, the novelty threshold
    at most ``max_false_novel`` of new in-class photos (``novelty_rule``, see
    :func:`pipeline.learning.novelty.choose_threshold`); a number fixes it, 0 turns it off. The one
    home of "labelled vectors -> a model", used by :func:`train_and_register` and by the benchmarks.
    """
    labels = list(labels)
    cv = cross_validate(vectors, labels, spec)
    classifier = calibrate(fit(vectors, labels, spec), cv, unknown_threshold, max_false_unknown)
    index = {c: i for i, c in enumerate(classifier.classes)}
    found = novelty_lib.fit(vectors, np.array([index[c] for c in labels]),
                            np.array([index[c] for c in cv.predictions]), novelty_spec, novelty_threshold,
                            max_false_novel, rule=novelty_rule)
    classifier = Classifier(classifier.spec, classifier.classes, {**classifier.arrays, **found.arrays})
    unconfident = top_probability(cv.scores, cv.probabilities) < float(classifier.unknown_threshold or 0.0)
    correct = np.asarray(cv.predictions) == np.asarray(labels)
    return Trained(classifier, cv, found, float(unconfident.mean()),
                   UnknownCost.measure(correct, found.held_out_novel, unconfident))


def train_and_register(image_ids: Sequence[str], labels: Sequence[str | None], vectors: np.ndarray,
                       meta: FeatureId, spec: ClassifierSpec, registry: Registry,
                       make_current: bool = True, unknown_threshold: float | None = None,
                       max_false_unknown: float = MAX_FALSE_UNKNOWN, novelty_threshold: float | None = None,
                       unknown_label: str = UNKNOWN_LABEL, provenance: dict | None = None) -> TrainingOutcome:
    """:func:`train` on the labelled rows, then save a version and move ``current``.

    ``unknown_threshold`` (confidence) and ``novelty_threshold`` (distance): None chooses each on
    the training photos (at most ``max_false_unknown`` of them unknown for that reason), a number
    fixes it, 0 turns it off. ``provenance``: where the rows came from (model.json's ``data``,
    shown by ``deeper models``; a table snapshot makes the version reproducible).
    """
    ids, labs, x = labelled_only(image_ids, labels, vectors)
    ids, labs, x, left_out = usable_classes(ids, labs, x, unknown_label)
    if left_out:
        log.warning("left out of this training: %s", "; ".join(f"{c!r} ({why})" for c, why in left_out.items()))
    trained = train(x, labs, spec, unknown_threshold, max_false_unknown, novelty_threshold, max_false_unknown)
    classifier, cv = trained.classifier, trained.cv
    threshold = float(classifier.unknown_threshold or 0.0)
    novelty_threshold_found = trained.novelty.threshold
    digest = training_set_hash(ids, labs)
    rule = (f"conformal: the k-th largest leave-one-out distance, k = floor({max_false_unknown:g} * (n + 1)) >= 1, "
            f"so at most {max_false_unknown:g} of new in-class photos are novel")
    extra = {"cv": cv.to_dict(), "training_set_sha256": digest, "n_train": len(ids), "left_out": left_out,
             "class_counts": {c: labs.count(c) for c in classifier.classes},
             "calibration": {"method": "platt sigmoid per class on out-of-fold scores, normalised",
                             "unknown_threshold": round(threshold, 6),
                             "threshold_rule": ("fixed" if unknown_threshold is not None else
                                                f"highest keeping cv false-unknown <= {max_false_unknown:g}"),
                             "cv_false_unknown": round(trained.cv_false_unknown, 6)},
             "novelty": {"method": novelty_lib.spec_of(classifier.arrays).describe(),
                         "summary": trained.novelty.summary,
                         "summary_size": int(len(classifier.arrays["novelty_vectors"])),
                         "threshold": round(novelty_threshold_found, 6),
                         "threshold_rule": "fixed" if novelty_threshold is not None else rule,
                         "cv_novel": round(trained.cost.novel, 6)},
             "unknown_cost": trained.cost.to_dict()}
    if provenance is not None:
        extra["data"] = provenance
    version = registry.save(classifier, meta, extra, make_current=make_current)
    return TrainingOutcome(version, cv, len(ids), classifier.classes, digest, threshold, trained.cv_false_unknown,
                           novelty_threshold_found, trained.cost.novel, trained.cost, left_out)


def usable_classes(image_ids: list[str], labels: list[str], vectors: np.ndarray, unknown_label: str = UNKNOWN_LABEL
                   ) -> tuple[list[str], list[str], np.ndarray, dict[str, str]]:
    """The photos of classes that can take part; the others' classes and why they can't.

    One photo with an odd label (a producer's typo, a class with one example so far) must not
    stop everyone's retraining: its class is left out of this training, said in one line, and
    the rest trains. Left out: classes with fewer than :data:`MIN_PER_CLASS` photos, the name
    reserved for "no class fits", and names that can't be a class (``label_problem``). Fewer
    than two classes left is an error that names them all.
    """
    counts = Counter(labels)
    left_out: dict[str, str] = {}
    for name, n in sorted(counts.items()):
        problem = label_problem(name)
        if name == unknown_label:
            left_out[name] = "reserved for photos that fit no class; rename it"
        elif problem:
            left_out[name] = f"not a class name: {problem}"
        elif n < MIN_PER_CLASS:
            left_out[name] = f"{n} photo; cross-validation needs at least {MIN_PER_CLASS} images of every class"
    kept = sorted(set(counts) - set(left_out))
    if len(kept) < 2:
        why = "; ".join(f"{c!r}: {w}" for c, w in left_out.items()) or "none left out"
        raise DeeperError(f"need at least two classes with at least {MIN_PER_CLASS} images each, "
                          f"found {len(kept)} ({', '.join(map(repr, kept)) or 'none'}); left out: {why}")
    keep = [i for i, label in enumerate(labels) if label not in left_out]
    return [image_ids[i] for i in keep], [labels[i] for i in keep], vectors[keep], left_out


def labels_from_csv(path: str | Path) -> dict[str, str]:
    """Read ``key,label`` rows where key is an image id (sha256) or a source path/file name."""
    out: dict[str, str] = {}
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DeeperError(f"{path} is empty")
        if len(header) < 2:
            raise DeeperError(f"{path}: expected two columns (image id or source, label)")
        if not _looks_like_header(header):
            out[header[0].strip()] = header[1].strip()
        for row in reader:
            if len(row) >= 2 and row[0].strip():
                out[row[0].strip()] = row[1].strip()
    return out


def _looks_like_header(row: list[str]) -> bool:
    return row[1].strip().lower() in {"label", "class", "labels"}


def apply_labels(image_ids: Sequence[str], sources: Sequence[str], labels: Sequence[str | None],
                 table: dict[str, str]) -> list[str | None]:
    """Labels from a CSV win over stored ones; matched by image id, else by source path: the
    longest tail of the source's path that is a key, so ``fish/goldfish.jpg``, the file name or
    the whole path all match ``/lake/train/fish/goldfish.jpg`` or ``s3://bucket/train/fish/goldfish.jpg``
    (a backfill stores absolute paths and URIs; a CSV usually has the paths it was made with)."""
    keys = {key.removeprefix("./"): label for key, label in table.items()}
    out = []
    for image_id, source, label in zip(image_ids, sources, labels):
        found = table.get(image_id) or _by_path(source, keys)
        out.append(found or label)
    return out


def _by_path(source: str, keys: dict[str, str]) -> str | None:
    parts = source.split("/")
    return next((keys[tail] for tail in ("/".join(parts[i:]) for i in range(len(parts))) if tail in keys), None)
