"""Vectors + a classifier -> what a user sees for each photo: the one home of that rule.

Every consumer of a model (``deeper predict``/``report``, the demo, the scorer consumer) calls
:func:`score`, so the label, the per-class scores, the calibrated probabilities, the confidence
and the "unknown" decision are the same everywhere.

"unknown": a photo gets :data:`UNKNOWN_LABEL` instead of its top class when it is

* ``novel``: its vector is further from every training photo than the model's novelty threshold
  (:mod:`pipeline.learning.novelty`: the photo is like nothing the model was trained on), or
* ``unconfident``: its top calibrated probability is below the model's confidence threshold
  (:func:`pipeline.learning.classifier.choose_unknown_threshold`: it is between known classes).

Both thresholds are chosen on the training photos at training time. ``unknown_reason`` says which
(novel wins when both hold: it is the stronger statement); scores and probabilities still say
which class came closest. A model saved before calibration existed has no probabilities and is
never unknown; one saved before novelty existed has no novelty and is never novel.
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
    #: cosine distance to the training photos (see :mod:`pipeline.learning.novelty`); None for a
    #: model that keeps no summary of them
    novelty: float | None = None
    #: why the photo is unknown: :data:`NOVEL` or :data:`UNCONFIDENT`; None when it is not
    unknown_reason: str | None = None


#: The values of :attr:`Scored.unknown_reason`.
NOVEL = "novel"
UNCONFIDENT = "unconfident"
UNKNOWN_REASONS = (NOVEL, UNCONFIDENT)


def unknown_reason(novelty: float | None, novelty_threshold: float | None, confidence: float | None,
                   confidence_threshold: float | None) -> str | None:
    """The rule, in one place: novel above a positive novelty threshold, else unconfident below a
    positive confidence threshold, else not unknown."""
    if novelty is not None and novelty_threshold and novelty > novelty_threshold:
        return NOVEL
    if confidence is not None and confidence_threshold and confidence < confidence_threshold:
        return UNCONFIDENT
    return None


def score(classifier: Classifier, vectors: np.ndarray, unknown_label: str = UNKNOWN_LABEL) -> list[Scored]:
    """Score ``vectors`` [N, dim]; one :class:`Scored` per row, in order."""
    vectors = np.asarray(vectors)
    if len(vectors) == 0:
        return []
    raw = classifier.decision(vectors)
    probabilities = classifier.probabilities(vectors, scores=raw)
    confidences = None if probabilities is None else top_probability(raw, probabilities)
    novelties = classifier.novelty(vectors, scores=raw)
    threshold, novelty_threshold = classifier.unknown_threshold, classifier.novelty_threshold
    classes = classifier.classes
    out = []
    for i, row in enumerate(raw):
        top = classes[int(np.argmax(row))]
        scores = {c: float(v) for c, v in zip(classes, row)}
        novelty = None if novelties is None else float(novelties[i])
        if probabilities is None:
            out.append(Scored(top, top, scores, None, None, False, novelty))
            continue
        confidence = float(confidences[i])
        reason = unknown_reason(novelty, novelty_threshold, confidence, threshold)
        out.append(Scored(unknown_label if reason else top, top, scores,
                          {c: float(p) for c, p in zip(classes, probabilities[i])}, confidence, reason is not None,
                          novelty, reason))
    return out
