"""``deeper ui`` in headless Chromium, fed forged records with markup in every field.

Someone with write access to the features, labels or dead-letter topic writes records whose
every text field is markup (closing attributes, ``<img onerror>``, ``<svg onload>``, ``<b>``);
a model is trained with such a class name, and a real scorer labels forged feature records
with it. Records whose ids, versions, backbones or layers are markup must be refused where
they are decoded (the scorer's dead letter, the UI's skipped count); those that are valid text
(a source, a label, a dead letter's detail) must be shown *as text*. The page, rendered by
Chromium with its script running, must hold no injected element, no event-handler attribute,
and no script may have run (a CSP violation would count too: escaping must not rely on it).
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request

import numpy as np
import pytest

from consumers.scorer import Scorer
from pipeline.app.ui import UiApp, serve_in_thread
from pipeline.kafka.kafka_io import close_producer, make_producer
from pipeline.learning.registry import Registry
from pipeline.learning.training import DEFAULT_SPEC, train_and_register
from pipeline.identity import FeatureId
from schemas.messages import FeatureRecord, LabelRecord, dead_letter_headers, encode_features, encode_label
from tests.stream_helpers import WorkerThread, unique_settings
from tests.test_ui_browser import Browser, browser, chromium  # noqa: F401 (fixtures)

pytestmark = pytest.mark.stream

#: Breaks out of an attribute and a text context alike; every injected element has class pwned.
MARKUP = '"><img class=pwned src=x onerror=window.__pwned=1><b class=pwned>B</b><svg class=pwned onload=window.__pwned=2>'
META = FeatureId("synthetic", "0" * 64, "prelogits", 4, "")
WATCH = """
window.__violations = [];
document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(e.violatedDirective));
"""


def _id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _vector(i: int) -> np.ndarray:
    return np.asarray([1.0, 0.0, 0.0, 0.0] if i % 2 else [0.0, 1.0, 0.0, 0.0], np.float32) + np.float32(0.01 * i)


def _forge(settings) -> tuple[int, int, int]:
    """Forged records on all three topics; (labels the UI should show, records it should refuse,
    dead letters). The scorer turns the valid feature records into labels of the markup class."""
    names = [f"m{i}" for i in range(6)]
    train_and_register([_id(n) for n in names], [MARKUP if i % 2 else "blue" for i in range(6)],
                       np.stack([_vector(i) for i in range(6)]), META, DEFAULT_SPEC, Registry(settings.registry_dir))
    kafka = make_producer(settings)

    def features(image_id: str, i: int, backbone: str = META.backbone, layer: str = META.layer) -> None:
        record = FeatureRecord(image_id, _vector(i), backbone, META.weights_digest, layer, f"cam/{MARKUP}", MARKUP,
                               extra={"origin": MARKUP, "kafka_key": MARKUP})
        key, value, headers = encode_features(record)
        kafka.send(settings.features_topic, key=key, value=value, headers=headers + [("source", MARKUP.encode())])

    for i in range(4):  # valid, markup as text: labelled by the scorer
        features(_id(f"f{i}"), i)
    features(MARKUP, 1)  # markup id: dead letter
    features(_id("f-bad-layer"), 1, layer=MARKUP)  # markup layer: dead letter

    def label(key: str, **changes) -> None:
        record = LabelRecord(key, MARKUP, {MARKUP: 0.9, "blue": -0.9}, "v0001", META.backbone, META.layer,
                             f"cam/{MARKUP}", probabilities={MARKUP: 0.2, "blue": 0.8}, confidence=0.2,
                             origin=MARKUP, image_origin=MARKUP, kafka_key=MARKUP)
        value = json.loads(encode_label(record)[1])
        value.update(changes)
        kafka.send(settings.labels_topic, key=key.encode(), value=json.dumps(value).encode())

    for i in range(2):
        label(_id(f"l{i}"))  # valid: shown as text
    refused_labels = 0
    for changes in ({"image_id": MARKUP}, {"image_id": _id("x")[:60] + '" x="'}, {"classifier_version": MARKUP},
                    {"backbone": MARKUP}, {"layer": MARKUP}, {"label": "=" + MARKUP}, {"scores": {MARKUP + "\n": 1}}):
        label(_id(f"bad-{refused_labels}"), **changes)
        refused_labels += 1

    for reason in (MARKUP, "fetch_refused"):
        headers = dead_letter_headers([("source", MARKUP.encode())], reason, MARKUP, MARKUP, MARKUP, 0, 7)
        headers = [(k, MARKUP.encode()) if k == "dlq-source-offset" else (k, v) for k, v in headers]
        kafka.send(settings.dead_letter_topic, key=MARKUP.encode(), value=MARKUP.encode(), headers=headers)
    kafka.flush()
    close_producer(kafka)
    return 4 + 2, refused_labels, 2 + 2  # dead letters: two forged, two from the scorer


def _wait(url: str, ready, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url + "api/state", timeout=30) as response:
            state = json.loads(response.read())
        if ready(state):
            return state
        assert time.monotonic() < deadline, json.dumps(state)[:3000]
        time.sleep(0.5)


@pytest.mark.no_stream_invariant  # the labels topic holds forged records on purpose: no pipeline run to check
def test_forged_records_inject_nothing(browser, kafka_settings, tmp_path):
    settings = unique_settings(kafka_settings, tmp_path, partitions=1)
    shown, refused, dead = _forge(settings)
    scorer = WorkerThread(Scorer(settings))
    app = UiApp(settings)
    server = serve_in_thread(app)
    try:
        _wait(server.url, lambda s: len(s["latest"]) >= shown and s["dead_letters"]["total"] >= 2)  # the page next
        browser.page("Page.enable")
        browser.page("Page.addScriptToEvaluateOnNewDocument", source=WATCH)
        browser.page("Page.navigate", url=server.url)
        browser.wait_js(f"document.querySelectorAll('#latest .photo').length >= {shown}"
                        f" && document.querySelectorAll('#review [data-fix]').length >= {shown * 2}"
                        " && document.getElementById('dead-recent').children.length === 3", what="the forged records")
        time.sleep(1.0)  # let any onerror/onload that could fire, fire
        found = browser.js("""(() => {
            const all = [...document.querySelectorAll('*')];
            return {
              pwned: window.__pwned === undefined ? null : window.__pwned,
              injected: document.querySelectorAll('.pwned, svg, iframe, object, embed, b').length,
              scripts: [...document.scripts].map((s) => s.getAttribute('src')),
              handlers: all.flatMap((e) => [...e.attributes].map((a) => a.name)).filter((n) => n.startsWith('on')),
              images: [...document.images].map((i) => i.getAttribute('src')),
              violations: window.__violations,
              labelsShown: [...document.querySelectorAll('#latest .label')].map((e) => e.textContent),
              buttons: [...document.querySelectorAll('#review [data-fix]')].map((e) => e.dataset.label),
              deadText: document.getElementById('dead-recent').textContent,
              modelText: document.getElementById('model').textContent,
            };
        })()""")
        assert found["pwned"] is None, "a forged record ran script in the page"
        assert found["injected"] == 0 and found["handlers"] == [] and found["violations"] == [], found
        assert found["scripts"] == ["/ui.js"]
        assert all(src.startswith("/api/thumb/") and len(src) == len("/api/thumb/") + 64 + 4 for src in found["images"])
        assert found["labelsShown"].count(MARKUP) == 4  # as text: two forged labels, two the scorer gave the markup class
        assert set(found["buttons"]) == {MARKUP, "blue"}
        assert found["deadText"].count(MARKUP) >= 2 and MARKUP in found["modelText"]
        # what was refused where it was decoded: never shown, counted
        state = _wait(server.url, lambda s: s["dead_letters"]["total"] >= dead)
        assert len(state["latest"]) == shown and state["dead_letters"]["invalid_label_records"] == refused
        assert state["dead_letters"]["by_reason"] == {"(invalid reason)": 1, "fetch_refused": 1, "invalid_features": 2}
        assert state["model"]["classes"] == sorted(["blue", MARKUP])
    finally:
        server.shutdown()
        app.close()
        scorer.stop()
