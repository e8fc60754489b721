"""Vectors + a classifier -> what a user sees for each photo: the one home of that rule.

Every consumer of a model (``deeper predict``/``report``, the demo, the scorer consumer) calls
:func:`score`, so the label, the per-class scores, the calibrated probabilities, the confidence
and the "unknown" decision are the same everywhere.

"unknown": a photo whose top calibrated probability is below the model's threshold (chosen by
cross-validation at training time, see :func:`pipeline.learning.classifier.choose_unknown_threshold`)
gets :data:`UNKNOWN_LABEL` instead of its top class; its scores and probabilities still say
which class came closest. A model saved before calibration existed has no probabilities: its
photos get ``probabilities``/``confidence`` None and are never unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from pipeline.learning.classifier import Classifier, top_probability

#: The label of a photo that fits no class well enough. Becomes the ``DEEPER_UNKNOWN_LABEL``
#: setting once pipeline/config.py has it; callers may pass their own.
UNKNOWN_LABEL = "unknown"


@dataclass(frozen=True)
class Scored:
    """One photo's outcome."""

    label: str  # the top class, or the unknown label
    top_class: str  # the top class even when ``label`` is unknown
    scores: dict[str, float]  # raw classifier scores (SVM margins): higher is more that class
    probabilities: dict[str, float] | None  # calibrated, sum to 1; None for an uncalibrated model
    #: the probability of the top-scoring class (the top probability, unless the sigmoids reorder
    #: two near-tied classes); None for an uncalibrated model
    confidence: float | None
    unknown: bool


def score(classifier: Classifier, vectors: np.ndarray, unknown_label: str = UNKNOWN_LABEL) -> list[Scored]:
    """Score ``vectors`` [N, dim]; one :class:`Scored` per row, in order."""
    vectors = np.asarray(vectors)
    if len(vectors) == 0:
        return []
    raw = classifier.decision(vectors)
    probabilities = classifier.probabilities(vectors, scores=raw)
    confidences = None if probabilities is None else top_probability(raw, probabilities)
    threshold = classifier.unknown_threshold
    classes = classifier.classes
    out = []
    for i, row in enumerate(raw):
        top = classes[int(np.argmax(row))]
        scores = {c: float(v) for c, v in zip(classes, row)}
        if probabilities is None:
            out.append(Scored(top, top, scores, None, None, False))
            continue
        confidence = float(confidences[i])
        unknown = threshold is not None and confidence < threshold
        out.append(Scored(unknown_label if unknown else top, top, scores,
                          {c: float(p) for c, p in zip(classes, probabilities[i])}, confidence, unknown))
    return out
