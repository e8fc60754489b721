"""``deeper ui``'s HTTP API against a real broker, without a browser or a backbone (fast).

The stream's output is made by hand: real photos produced to the images topic, a Parquet part
with their provenance, label records and a dead letter on their topics, a registry model on
small synthetic vectors. The UI then has to find all of it through Kafka and Parquet like it
does behind the real featurizer and scorer (``test_ui_browser.py`` runs those).
"""

from __future__ import annotations

import argparse
import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline.kafka.kafka_io import close_producer, make_producer
from pipeline.identity import FeatureId
from pipeline.storage.parquet_writer import FeatureRow, write_features
from pipeline.learning.registry import Registry
from pipeline.learning.training import DEFAULT_SPEC, labels_from_csv, train_and_register, training_set_hash
from pipeline.app.ui import (DEFAULT_PORT, THUMB_SIZE, Corrections, UiApp, add_parser, confidence_of,
                         serve_in_thread)
from producers.produce import ImageProducer
from schemas.messages import LabelRecord, dead_letter_headers, encode_label
from tests.stream_helpers import read_topic, unique_settings

COLOURS = {"red-1": (220, 30, 30), "red-2": (200, 40, 20), "blue-1": (30, 40, 220), "blue-2": (20, 60, 200)}
META = FeatureId("synthetic", "0" * 64, "prelogits", 4, "")


def _jpeg(rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), rgb).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _vector(name: str) -> np.ndarray:
    base = [1.0, 0.0, 0.0, 0.0] if name.startswith("red") else [0.0, 1.0, 0.0, 0.0]
    return np.asarray(base, np.float32) + np.float32(0.01 * len(name))


def _http(url: str, body: dict | None = None, headers: dict | None = None, content_type="application/json"):
    """(status, headers, bytes) of one request; HTTP errors are answers, not exceptions."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _json(url: str, body: dict | None = None, **kw):
    status, _, data = _http(url, body, **kw)
    return status, json.loads(data)


def _wait(url: str, ready, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, state = _json(url)
        assert status == 200
        if ready(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.3)


@pytest.fixture(scope="module")
def stream(kafka_settings, tmp_path_factory):
    """Photos on the images topic, their Parquet rows, labels, a dead letter and a model v0001."""
    settings = unique_settings(kafka_settings, tmp_path_factory.mktemp("ui"))
    producer = ImageProducer(settings)
    sent = {name: producer.send(_jpeg(rgb), f"/photos/{name}.jpg").image_id for name, rgb in COLOURS.items()}
    assert producer.flush().sent == len(COLOURS)
    producer.close()
    records = read_topic(settings, settings.images_topic, lambda rs: len(rs) >= len(COLOURS))
    where = {r.key.decode(): (r.topic, r.partition, r.offset) for r in records}
    rows = [FeatureRow(sent[n], f"/photos/{n}.jpg", None, 320, 240, _vector(n), *where[sent[n]]) for n in COLOURS]
    write_features(rows, META, Path(settings.data_dir) / "features" / "date=2025-01-01" / "part-0.parquet")
    names = list(COLOURS)
    train_and_register([sent[n] for n in names], [n.split("-")[0] for n in names],
                       np.stack([_vector(n) for n in names]), META, DEFAULT_SPEC, Registry(settings.registry_dir))

    # Labels as the scorer would write them: red-2 is the least sure one.
    margins = {"red-1": 2.0, "red-2": 0.1, "blue-1": -1.5, "blue-2": -0.8}
    kafka = make_producer(settings)
    for name, margin in margins.items():
        label = LabelRecord(sent[name], "red" if margin > 0 else "blue", {"red": margin, "blue": -margin},
                            "v0001", "synthetic", "prelogits", f"/photos/{name}.jpg")
        key, value, headers = encode_label(label)
        kafka.send(settings.labels_topic, key=key, value=value, headers=headers)
    kafka.send(settings.labels_topic, key=b"x", value=b"{not json")
    kafka.send(settings.dead_letter_topic, key=b"y", value=b"<html>",
               headers=dead_letter_headers([], "unsupported_format", "HTML", "featurizer", settings.images_topic, 0, 7))
    close_producer(kafka)
    return settings, sent


@pytest.fixture(scope="module")
def ui(stream):
    settings, sent = stream
    app = UiApp(settings)
    server = serve_in_thread(app)
    yield server.url, settings, sent, app
    server.shutdown()
    app.close()


def test_state_shows_labels_counts_model_and_dead_letters(ui):
    url, settings, sent, _ = ui
    state = _wait(url + "api/state", lambda s: len(s["latest"]) == 4 and s["dead_letters"]["total"] == 1
                  and s["lag"].get("featurizer", {}).get("lag") is not None)
    assert {p["image_id"] for p in state["latest"]} == set(sent.values())
    assert state["class_counts"] == {"red": 2, "blue": 2}
    review = [p["name"] for p in state["review"]]
    assert review[0] == "red-2.jpg" and review[-1] == "red-1.jpg", review  # least confident first
    confidences = [p["confidence"] for p in state["review"]]
    assert confidences == sorted(confidences) and 0.5 < confidences[0] < 0.6
    assert state["throughput_per_s"] == pytest.approx(4 / 60, abs=1e-3)  # produced just now
    assert state["dead_letters"]["by_reason"] == {"unsupported_format": 1}
    assert state["dead_letters"]["recent"][0]["source-offset"] == "7"
    assert state["dead_letters"]["invalid_label_records"] == 1
    model = state["model"]
    assert model["version"] == "v0001" and sorted(model["classes"]) == ["blue", "red"]
    assert model["backbone"] == "synthetic" and model["layer"] == "prelogits" and model["cv_accuracy"] == 1.0
    # nothing consumed the images (no featurizer runs here), nothing is on the features topic
    assert state["lag"]["featurizer"]["lag"] >= 1 and state["lag"]["scorer"]["lag"] == 0
    assert state["lag"]["featurizer"]["group"] == settings.featurizer_group


def test_page_is_self_contained(ui):
    url = ui[0]
    status, headers, body = _http(url)
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    status, headers, script = _http(url + "ui.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    script = script.decode()
    assert "/api/state" in script and "/api/corrections" in script and "/api/retrain" in script
    for text in (page, script, _http(url + "ui.css")[2].decode()):
        assert "http://" not in text and "https://" not in text and "src=\"http" not in text and "@import" not in text


def test_thumbnail_comes_from_the_original_message(ui):
    url, _, sent, app = ui
    status, headers, body = _http(f"{url}api/thumb/{sent['blue-1']}.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    with Image.open(io.BytesIO(body)) as im:
        assert im.format == "JPEG" and max(im.size) == THUMB_SIZE and im.size == (THUMB_SIZE, 120)
        r, g, b = np.asarray(im.convert("RGB"), np.float64).reshape(-1, 3).mean(axis=0)
    assert b > 150 and r < 80  # blue-1's pixels, not another photo's
    assert _http(f"{url}api/thumb/{sent['blue-1']}.jpg")[2] == body  # second time from the LRU
    assert app.thumbnails.cached()[0] == 1

    status, answer = _json(f"{url}api/thumb/{'f' * 64}.jpg")
    assert status == 404 and "no Parquet row" in answer["error"]
    assert _http(f"{url}api/thumb/..%2Fetc%2Fpasswd.jpg")[0] == 400


def test_thumbnail_cache_is_bounded(stream):
    settings, sent = stream
    app = UiApp(settings)
    try:
        app.thumbnails.max_bytes = 1  # keeps only the newest one
        for image_id in sent.values():
            app.thumbnails.get(image_id)
        count, size = app.thumbnails.cached()
        assert count == 1 and size == len(app.thumbnails.get(list(sent.values())[-1]))
    finally:
        app.close()


def test_bad_requests_are_refused(ui):
    url, _, sent, _ = ui
    image_id = sent["red-1"]
    assert _json(url + "api/corrections", {"image_id": "abc", "label": "red"})[0] == 400
    assert _json(url + "api/corrections", {"image_id": image_id, "label": "a,b\nc"})[0] == 400
    assert _json(url + "api/corrections", {"image_id": image_id, "label": "unknown"})[0] == 400
    status, answer = _json(url + "api/corrections", {"image_id": image_id, "label": "red"}, content_type="text/plain")
    assert status == 400 and "application/json" in answer["error"]  # what a cross-site form could send
    status, answer = _json(url + "api/state", headers={"Host": "attacker.example:80"})
    assert status == 403  # DNS rebinding
    assert _json(url + "api/nothing")[0] == 404
    assert not Path(ui[1].data_dir, "corrections.csv").exists()


def test_corrections_then_retrain_registers_a_new_current_model(ui):
    url, settings, sent, _ = ui
    # No photo in Parquet has a label yet: retraining says why it cannot run.
    assert _json(url + "api/retrain", {})[0] == 202
    status = _wait(url + "api/retrain", lambda s: s["state"] != "running")
    assert status["state"] == "failed" and "no labelled images" in status["error"]

    truth = {name: name.split("-")[0] for name in sent}
    truth["blue-2"] = "teal"  # the reviewer knows better: a new class
    truth["red-2"] = "teal"
    for name, label in truth.items():
        status, answer = _json(url + "api/corrections", {"image_id": sent[name], "label": label})
        assert status == 200 and answer["label"] == label
    assert answer["count"] == 4
    csv_path = Path(settings.data_dir) / "corrections.csv"
    assert labels_from_csv(csv_path) == {sent[n]: lab for n, lab in truth.items()}
    assert csv_path.read_text().splitlines()[0] == "image_id,label"
    assert Corrections(csv_path).table() == {sent[n]: lab for n, lab in truth.items()}  # durable
    assert not [p for p in csv_path.parent.iterdir() if p.name.startswith(".tmp")]
    state = _json(url + "api/state")[1]
    assert state["review"] == [] and state["corrections"]["count"] == 4

    # Four photos of three classes: red and blue (one photo each) are left out, and teal alone
    # is no training (two classes of two photos each needed)...
    assert _json(url + "api/retrain", {})[0] == 202
    status = _wait(url + "api/retrain", lambda s: s["state"] != "running")
    assert status["state"] == "failed" and "at least two classes with at least 2 images" in status["error"]
    assert "'red': 1 photo" in status["error"] and "'blue': 1 photo" in status["error"]
    # ... so the reviewer puts blue-2 back into blue and red-2 into red, and trains again.
    _json(url + "api/corrections", {"image_id": sent["blue-2"], "label": "blue"})
    _json(url + "api/corrections", {"image_id": sent["red-2"], "label": "red"})
    truth.update({"blue-2": "blue", "red-2": "red"})
    assert _json(url + "api/retrain", {})[0] == 202
    status = _wait(url + "api/retrain", lambda s: s["state"] != "running")
    assert status["state"] == "done", status
    registry = Registry(settings.registry_dir)
    assert status["version"] == "v0002" == registry.current_version()
    metadata = registry.load_current().metadata
    ids = list(sent.values())
    assert metadata["training_set_sha256"] == training_set_hash(ids, [truth[n] for n in sent])
    state = _wait(url + "api/state", lambda s: s["model"]["version"] == "v0002")
    assert state["model"]["n_train"] == 4 and state["retrain"]["state"] == "done"


def test_confidence_prefers_the_calibrated_value():
    scores_only = SimpleNamespace(scores={"red": 0.1, "blue": -0.1})
    assert confidence_of(scores_only) == pytest.approx(1 / (1 + np.exp(-0.2)))
    assert confidence_of(SimpleNamespace(scores={"red": 5.0, "blue": -5.0}, confidence=0.42)) == 0.42
    assert confidence_of(SimpleNamespace(scores={"red": 5.0, "blue": -5.0}, confidence=float("nan"))) > 0.99
    assert confidence_of(SimpleNamespace(scores={}, confidence=None)) == 0.0


def test_cli_parser_defaults():
    parser = argparse.ArgumentParser(prog="deeper")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui"])
    assert (args.host, args.port, args.recent, args.func.__name__) == ("127.0.0.1", DEFAULT_PORT, 500, "cmd_ui")
    assert parser.parse_args(["ui", "--port", "9000"]).port == 9000
