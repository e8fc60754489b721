"""Train from photos: featurize labelled photos, then train and register a classifier.

The one home of "photos on disk -> registry version", used by ``deeper train DIR``; the demo,
the stream tests and the benchmarks do the same thing and belong here too. Photos that fail are
skipped and returned (``features.failures``) for the caller to report, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline.learning.classifier import ClassifierSpec
from pipeline.storage.feature_cache import FeatureCache
from pipeline.model.featurize import FeaturizeResult, featurize_photos
from pipeline.model.inference import Failed
from pipeline.model.nets.base import Backbone
from pipeline.model.photos import PhotoFile, find_photos
from pipeline.learning.registry import Registry
from pipeline.learning.training import DEFAULT_LAYER, DEFAULT_SPEC, TrainingOutcome, apply_labels, train_and_register


@dataclass
class PhotoTraining:
    outcome: TrainingOutcome
    features: FeaturizeResult  # rows used (labelled or not) and the photos that failed


def train_from_photos(photos: Sequence[PhotoFile] | str | Path, backbone: Backbone, registry: Registry,
                      layer: str = DEFAULT_LAYER, spec: ClassifierSpec = DEFAULT_SPEC, *,
                      labels: Mapping[str, str] | None = None, relabel: Callable[[str | None], str | None] | None = None,
                      cache: FeatureCache | None = None, batch_size: int = 32, progress: bool = False,
                      make_current: bool = True,
                      on_failures: Callable[[list[Failed]], None] | None = None,
                      **training: Any) -> PhotoTraining:
    """Featurize ``photos`` (or a directory: labels = sub-folder names), train, register.

    ``labels`` (image id, source or file name -> label, as read by
    :func:`pipeline.learning.training.labels_from_csv`) win over folder labels; ``relabel`` then maps
    each label (tests use it to build deliberately different models). ``on_failures`` hears of
    the photos that failed before training starts, so they are reported even if training fails.
    ``training`` goes to :func:`pipeline.learning.training.train_and_register` as it is.
    """
    if isinstance(photos, (str, Path)):
        photos = find_photos([photos], labels_from_folders=True)
    features = featurize_photos(photos, backbone, layer, batch_size, cache, progress)
    if on_failures is not None and features.failures:
        on_failures(features.failures)
    rows = features.rows
    ids = [r.image_id for r in rows]
    found = [r.label for r in rows]
    if labels:
        found = apply_labels(ids, [r.source for r in rows], found, dict(labels))
    if relabel is not None:
        found = [relabel(label) for label in found]
    vectors = np.stack([r.vector for r in rows]) if rows else np.zeros((0, features.meta.dim), np.float32)
    outcome = train_and_register(ids, found, vectors, features.meta, spec, registry, make_current=make_current,
                                 **training)
    return PhotoTraining(outcome, features)
