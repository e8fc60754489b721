"""The UI's review queue order: what most needs a person comes first.

Unknown photos first (novel, the most novel first; then unconfident, least confident first),
then every other photo, least confident first. Label records of every schema version take part:
a version 2 record (no novelty) that is unknown can only be unconfident.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from pipeline.app.ui import LabelView, review_order
from pipeline.errors import SchemaError
from schemas.messages import LabelRecord, encode_label


@dataclass
class _Message:
    """What the UI reads of a consumed record (kafka-python's ConsumerRecord has these fields)."""

    value: bytes
    timestamp: int = 0


def _view(name: str, confidence: float, reason: str | None = None, novelty: float | None = 0.2) -> LabelView:
    record = LabelRecord("ab" * 32, "unknown" if reason else "modern", {"classic": -0.5, "modern": 0.5}, "v0001",
                         "efficientnet_lite0", "prelogits", f"cam/{name}.jpg",
                         probabilities={"classic": 1 - confidence, "modern": confidence}, confidence=confidence,
                         unknown=reason is not None, novelty=novelty, unknown_reason=reason)
    return LabelView.from_message(_Message(encode_label(record)[1]))


def _v2_view(name: str, confidence: float, unknown: bool) -> LabelView:
    record = {"schema_version": "2", "image_id": "cd" * 32, "label": "unknown" if unknown else "modern",
              "scores": {"classic": -0.5, "modern": 0.5}, "classifier_version": "v0001",
              "backbone": "efficientnet_lite0", "layer": "prelogits", "source": f"cam/{name}.jpg",
              "probabilities": {"classic": 1 - confidence, "modern": confidence}, "confidence": confidence,
              "unknown": unknown}
    return LabelView.from_message(_Message(json.dumps(record).encode()))


def test_unknown_first_novel_before_unconfident_then_least_confident():
    views = [
        _view("sure", 0.99),
        _view("unsure", 0.62),
        _view("novel-a", 0.97, "novel", novelty=0.55),
        _view("between", 0.51, "unconfident"),
        _view("novel-b", 0.70, "novel", novelty=0.81),
        _view("between-less", 0.58, "unconfident"),
        _v2_view("old-unknown", 0.55, unknown=True),
        _v2_view("old-known", 0.60, unknown=False),
    ]
    order = [v.name for v in sorted(views, key=review_order)]
    assert order == ["novel-b.jpg", "novel-a.jpg", "between.jpg", "old-unknown.jpg", "between-less.jpg",
                     "old-known.jpg", "unsure.jpg", "sure.jpg"]


def test_the_view_carries_why_and_how_far():
    view = _view("x", 0.9, "novel", novelty=0.7)
    assert view.unknown and view.unknown_reason == "novel" and view.novelty == 0.7
    old = _v2_view("y", 0.5, unknown=True)
    assert old.unknown and old.unknown_reason == "unconfident" and old.novelty is None


def test_a_record_with_odd_unknown_fields_is_refused_where_it_is_decoded():
    """Whatever a forged label record says in these fields, it never reaches the queue: the
    decoder refuses it (schemas.messages.check_label_record), so the queue only sorts valid views."""
    record = json.loads(encode_label(LabelRecord("ab" * 32, "x", {"a": 0.1}, "v1", "b", "l", "s.jpg"))[1])
    odd = [{**record, "unknown": True, "unknown_reason": ["novel"], "novelty": "far"},
           {**record, "unknown": "yes", "unknown_reason": "novel", "novelty": float("nan")},
           {**record, "unknown": True, "unknown_reason": "bored", "novelty": 0.9},
           {**record, "unknown": True, "unknown_reason": "novel", "novelty": float("inf")}]
    for r in odd:
        with pytest.raises(SchemaError):
            LabelView.from_message(_Message(json.dumps(r).encode()))
    fine = [{**record, "unknown": True, "unknown_reason": None, "novelty": None},
            {**record, "unknown": True, "unknown_reason": "novel", "novelty": 0.9}]
    views = [LabelView.from_message(_Message(json.dumps(r).encode())) for r in fine]
    assert [(v.unknown, v.unknown_reason, v.novelty) for v in views] == [(True, "unconfident", None),
                                                                         (True, "novel", 0.9)]
    assert sorted(views, key=review_order)[0].unknown_reason == "novel"

