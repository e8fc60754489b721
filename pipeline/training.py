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

from pipeline.classifier import ClassifierSpec, CVResult, cross_validate, fit
from pipeline.errors import DeeperError
from pipeline.parquet_writer import FeatureMeta
from pipeline.registry import Registry

#: The reference recipe: a linear SVM on the 1001 logits, as in "Inception v1 + SVM".
REFERENCE_LAYER = "logits"
REFERENCE_SPEC = ClassifierSpec("linear-svm", "none", 1.0)
#: What ``deeper train`` uses without flags, chosen by measurement (bench/recipes.py; README
#: "Choosing the recipe"): the pooled features beat the logits under leave-one-out on both real
#: photo sets we have (cars 95% vs 90%, examples 100% vs 96%) and were never worse. ``--reference``
#: brings back the reference recipe.
DEFAULT_LAYER = "prelogits"
DEFAULT_SPEC = ClassifierSpec("linear-svm", "none", 1.0)


@dataclass
class TrainingOutcome:
    version: str
    cv: CVResult
    n_images: int
    classes: list[str]
    training_set_sha256: str


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
                       meta: FeatureMeta, spec: ClassifierSpec, registry: Registry,
                       make_current: bool = True) -> TrainingOutcome:
    """Cross-validate, fit on everything, save a version, move ``current``."""
    ids, labs, x = labelled_only(image_ids, labels, vectors)
    cv = cross_validate(x, labs, spec)
    classifier = fit(x, labs, spec)
    digest = training_set_hash(ids, labs)
    extra = {"cv": cv.to_dict(), "training_set_sha256": digest, "n_train": len(ids),
             "class_counts": {c: labs.count(c) for c in classifier.classes}}
    version = registry.save(classifier, meta, extra, make_current=make_current)
    return TrainingOutcome(version, cv, len(ids), classifier.classes, digest)


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
