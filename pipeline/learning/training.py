"""Training a classifier on feature rows and saving it as a registry version.

Used by ``deeper train DIR`` (featurize, then train) and ``deeper train --features`` (offline
retraining from Parquet the batch job or the stream wrote: no network run at all).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.learning.classifier import (MAX_FALSE_UNKNOWN, ClassifierSpec, CVResult, calibrate, cross_validate, fit,
                                 top_probability)
from pipeline.errors import DeeperError
from pipeline.storage.identity import FeatureId
from pipeline.learning.registry import Registry
from pipeline.learning.scoring import UNKNOWN_LABEL

#: The reference recipe: a linear SVM on the 1001 logits, as in "Inception v1 + SVM".
REFERENCE_LAYER = "logits"
REFERENCE_SPEC = ClassifierSpec("linear-svm", "none", 1.0)
#: What ``deeper train`` uses without flags, chosen by measurement (bench/recipes.py; README
#: "Choosing the recipe"): the pooled features beat the logits under leave-one-out on both real
#: photo sets we have (cars 95% vs 90%, examples 100% vs 96%) and were never worse. ``--reference``
#: brings back the reference recipe. Multi-level specs (``prelogits+block_14+block_15``) tie on
#: cars and examples and gain a few photos on a 7-class set, not yet by a margin the data can
#: show (paired test in bench/recipes.py), so the default stays a single level.
DEFAULT_LAYER = "prelogits"
DEFAULT_SPEC = ClassifierSpec("linear-svm", "none", 1.0)


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


def training_set_hash(image_ids: Sequence[str], labels: Sequence[str]) -> str:
    """Identifies the exact (image, label) set a model saw, independent of order."""
    lines = sorted(f"{i}\t{lab}" for i, lab in zip(image_ids, labels))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def labelled_only(image_ids: Sequence[str], labels: Sequence[str | None], vectors: np.ndarray
                  ) -> tuple[list[str], list[str], np.ndarray]:
    keep = [i for i, label in enumerate(labels) if label]
    if not keep:
        raise DeeperError("no labelled images: put photos in one sub-folder per class, or pass --labels CSV")
    return [image_ids[i] for i in keep], [labels[i] for i in keep], vectors[keep]


def train_and_register(image_ids: Sequence[str], labels: Sequence[str | None], vectors: np.ndarray,
                       meta: FeatureId, spec: ClassifierSpec, registry: Registry,
                       make_current: bool = True, unknown_threshold: float | None = None,
                       max_false_unknown: float = MAX_FALSE_UNKNOWN,
                       unknown_label: str = UNKNOWN_LABEL, provenance: dict | None = None) -> TrainingOutcome:
    """Cross-validate, fit on everything, calibrate, save a version, move ``current``.

    ``unknown_threshold``: None chooses it under cross-validation (the highest threshold that
    marks at most ``max_false_unknown`` of the training photos unknown); a number fixes it
    (0 turns "unknown" off). ``provenance``: where the rows came from (model.json's ``data``,
    shown by ``deeper models``; a table snapshot makes the version reproducible).
    """
    ids, labs, x = labelled_only(image_ids, labels, vectors)
    if unknown_label in labs:
        raise DeeperError(f"{unknown_label!r} is reserved for photos that fit no class; rename that class")
    cv = cross_validate(x, labs, spec)
    classifier = calibrate(fit(x, labs, spec), cv, unknown_threshold, max_false_unknown)
    threshold = float(classifier.unknown_threshold or 0.0)
    false_unknown = float((top_probability(cv.scores, cv.probabilities) < threshold).mean())
    digest = training_set_hash(ids, labs)
    extra = {"cv": cv.to_dict(), "training_set_sha256": digest, "n_train": len(ids),
             "class_counts": {c: labs.count(c) for c in classifier.classes},
             "calibration": {"method": "platt sigmoid per class on out-of-fold scores, normalised",
                             "unknown_threshold": round(threshold, 6),
                             "threshold_rule": ("fixed" if unknown_threshold is not None else
                                                f"highest keeping cv false-unknown <= {max_false_unknown:g}"),
                             "cv_false_unknown": round(false_unknown, 6)}}
    if provenance is not None:
        extra["data"] = provenance
    version = registry.save(classifier, meta, extra, make_current=make_current)
    return TrainingOutcome(version, cv, len(ids), classifier.classes, digest, threshold, false_unknown)


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
    """Labels from a CSV win over stored ones; match by image id, full source, or file name."""
    out = []
    for image_id, source, label in zip(image_ids, sources, labels):
        found = table.get(image_id) or table.get(source) or table.get(Path(source).name)
        out.append(found or label)
    return out
