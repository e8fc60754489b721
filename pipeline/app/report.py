"""A self-contained HTML report: thumbnails, predicted labels and scores, the CV confusion matrix.

Everything (thumbnails included, as data: URIs) is inside one file, so it can be mailed,
attached to a CI run or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from pipeline.model.decode import decode_image
from pipeline.errors import DecodeError
from pipeline.model.photos import path_from_display
from pipeline.learning.scoring import Scored


@dataclass
class Prediction:
    source: str
    image_id: str
    label: str | None
    scores: dict[str, float]
    error: str | None = None
    probabilities: dict[str, float] | None = None  # None: the model is uncalibrated
    confidence: float | None = None  # None: the model is uncalibrated
    unknown: bool = False
    novelty: float | None = None  # None: the model keeps no summary of its training photos
    unknown_reason: str | None = None  # "novel" or "unconfident" when unknown

    @classmethod
    def scored(cls, source: str, image_id: str, result: Scored) -> "Prediction":
        return cls(source, image_id, result.label, result.scores, None, result.probabilities, result.confidence,
                   result.unknown, result.novelty, result.unknown_reason)


def thumbnail_data_uri(path: str, size: int = 160) -> str:
    """The photo at ``path`` (display text, see :func:`pipeline.model.photos.display_path`) as a small
    JPEG data: URI; empty when it cannot be read or decoded (the card then says "no preview")."""
    try:
        image = Image.fromarray(decode_image(path_from_display(path).read_bytes()).pixels)
    except (OSError, DecodeError):
        return ""
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def render(predictions: Sequence[Prediction], model: dict, title: str = "go-deeper report") -> str:
    """The report page as a string."""
    e = html.escape
    features = model.get("features", {})
    cv = model.get("cv", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<p class='meta'>",
        f"model <b>{e(model.get('version', '?'))}</b> · {e(model.get('classifier', {}).get('kind', '?'))} on "
        f"<b>{e(features.get('backbone', '?'))}</b>/{e(features.get('layer', '?'))} "
        f"(dim {e(str(features.get('dim', '?')))}) · trained on {e(str(model.get('n_train', '?')))} images "
        f"· created {e(model.get('created_at', '?'))} · {e(_calibration_text(model))}</p>",
        _confusion_html(cv),
        _cost_html(model.get("unknown_cost")),
        f"<h2>Predictions ({len(predictions)})</h2><div class='grid'>",
    ]
    parts.extend(_card(p) for p in predictions)
    parts.append("</div></body></html>")
    return "\n".join(parts)


def _calibration_text(model: dict) -> str:
    calibration = model.get("calibration")
    if not calibration:
        return "uncalibrated model (trained before calibration): no confidence, never unknown"
    text = (f"unknown below {calibration['unknown_threshold']:.0%} confidence "
            f"({calibration.get('threshold_rule', '?')})")
    novelty = model.get("novelty")
    if not novelty:
        return text + "; never novel (trained before novelty existed)"
    if not novelty.get("threshold"):
        return text + "; novelty off"
    return text + (f" or novel: {novelty.get('method', 'distance to the training photos')} above "
                   f"{novelty['threshold']:.3f} ({novelty.get('threshold_rule', '?')})")


def _cost_html(cost: dict | None) -> str:
    """What "unknown" costs, from the training photos under cross-validation (model.json)."""
    if not cost:
        return ""
    answered = cost.get("answered_accuracy")
    rows = [("photos answered (coverage)", f"{cost['coverage']:.1%}"),
            ("unknown as novel", f"{cost['novel']:.1%}"), ("unknown as unconfident", f"{cost['unconfident']:.1%}"),
            ("accuracy of the answered photos", "-" if answered is None else f"{answered:.1%}"),
            ("plain accuracy (every photo answered with its top class)", f"{cost['accuracy']:.1%}")]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return (f"<h2>What unknown costs</h2><p class='meta'>On the {cost['n']} training photos, each scored by a "
            f"model that never saw it.</p><table class='cost'>{body}</table>")


def _card(p: Prediction) -> str:
    e = html.escape
    uri = thumbnail_data_uri(p.source)
    image = f"<img src='{uri}' alt='{e(Path(p.source).name)}'>" if uri else "<div class='noimg'>no preview</div>"
    if p.error:
        body = f"<div class='label error'>error</div><div class='scores'>{e(p.error)}</div>"
    else:
        probs = p.probabilities or {}
        rows = "".join(f"<tr><td>{e(c)}</td><td>{s:+.3f}</td>"
                       + (f"<td>{probs[c]:.0%}</td>" if c in probs else "") + "</tr>"
                       for c, s in sorted(p.scores.items(), key=lambda kv: -kv[1]))
        confidence = "" if p.confidence is None else f"<div class='confidence'>{p.confidence:.0%} confident</div>"
        novelty = "" if p.novelty is None else f"<div class='confidence'>novelty {p.novelty:.3f}</div>"
        reason = f"<div class='reason'>{e(p.unknown_reason)}</div>" if p.unknown_reason else ""
        body = (f"<div class='label{' unknown' if p.unknown else ''}'>{e(p.label or '')}</div>{reason}{confidence}"
                f"{novelty}<table class='scores'>{rows}</table>")
    return f"<div class='card'>{image}<div class='name'>{e(Path(p.source).name)}</div>{body}</div>"


def _confusion_html(cv: dict) -> str:
    if not cv:
        return "<p>No cross-validation results recorded for this model.</p>"
    e = html.escape
    classes = cv["classes"]
    head = "".join(f"<th>{e(c)}</th>" for c in classes)
    rows = "".join(
        f"<tr><th>{e(c)}</th>" + "".join(f"<td class='{'hit' if i == j else ''}'>{n}</td>" for j, n in enumerate(row))
        + "</tr>" for i, (c, row) in enumerate(zip(classes, cv["confusion"])))
    brier = f", Brier score {cv['brier']:.3f}" if "brier" in cv else ""
    return (f"<h2>Cross-validation: {cv['accuracy']:.1%} ({e(cv['method'])}{brier})</h2>"
            f"<table class='confusion'><tr><th>true \\ predicted</th>{head}</tr>{rows}</table>")


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
.meta{color:#555}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:180px}
.card img{max-width:160px;max-height:160px;display:block;margin:auto}
.name{font-size:11px;color:#666;word-break:break-all;margin-top:4px}
.label{font-size:18px;font-weight:bold;margin:4px 0}
.label.error{color:#b00}
.label.unknown{color:#a60;font-style:italic}
.confidence{font-size:12px;color:#555}
.reason{font-size:12px;color:#a60}
.cost th{text-align:left;font-weight:normal;padding:2px 12px 2px 0}
.cost td{font-weight:bold}
.scores{font-size:12px}
.confusion td,.confusion th{border:1px solid #ccc;padding:4px 10px;text-align:center}
.confusion{border-collapse:collapse}
.confusion td.hit{background:#dfd}
.noimg{height:120px;background:#eee;text-align:center;line-height:120px;color:#999}
"""
