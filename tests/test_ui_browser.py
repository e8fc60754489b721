"""``deeper ui`` end to end: real broker, featurizer and scorer, the page in headless Chromium.

Photos go in through the producer; the page (rendered by Chromium, its JavaScript included,
driven over the DevTools protocol) must show them with thumbnails fetched back from the images
topic. The test then clicks the right class under each photo in the review queue and clicks
"Retrain"; a new model must become current and the running scorer must label the next photo
with it. Needs ``/usr/bin/chromium`` (skips with that reason otherwise).
``DEEPER_KEEP_SCREENSHOT=DIR`` keeps the screenshots for a person to look at."""

from __future__ import annotations

import base64
import csv
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consumers.featurizer import Featurizer
from consumers.scorer import Scorer
from pipeline.model.featurize import default_cache
from pipeline.learning.registry import Registry
from pipeline.learning.training import labels_from_csv
from pipeline.app.ui import UiApp, serve_in_thread
from producers.produce import ImageProducer
from tests.stream_helpers import WorkerThread, train_model, unique_settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHROMIUM = os.environ.get("DEEPER_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--remote-debugging-pipe"]
WINDOW = (1280, 1700)


@pytest.fixture(scope="module")
def chromium() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"headless Chromium not installed at {CHROMIUM} (apt-get install -y chromium)")
    return CHROMIUM


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (stdlib only, no websocket).

    With ``--remote-debugging-pipe`` Chromium reads NUL-terminated JSON commands on fd 3 and
    answers on fd 4; the test clicks the page's buttons and reads its DOM like a person would.
    """

    def __init__(self, chromium: str, profile: Path):
        to_browser, self._send_fd = os.pipe()
        self._recv_fd, from_browser = os.pipe()

        def child_fds() -> None:  # via high numbers, so dup2 onto 3 and 4 never collides
            high_in = fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10)
            high_out = fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=child_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id = b"", 0
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.page("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    assert "error" not in reply, f"{method}: {reply['error']}"
                    return reply["result"]
            left = deadline - time.monotonic()
            assert left > 0, f"Chromium did not answer {method}"
            if select.select([self._recv_fd], [], [], left)[0]:
                chunk = os.read(self._recv_fd, 1 << 20)
                assert chunk, "Chromium exited"
                self._buffer += chunk

    def page(self, method: str, **params) -> dict:
        return self.call(method, session=self.session, **params)

    def js(self, expression: str):
        result = self.page("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_js(self, expression: str, timeout: float = 120, what: str = ""):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"page never showed {what or expression}"
            time.sleep(0.3)
        return value

    def dom(self) -> str:
        return self.js("document.documentElement.outerHTML")

    def screenshot(self, path: Path) -> np.ndarray:
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))
        keep = os.environ.get("DEEPER_KEEP_SCREENSHOT")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(keep) / path.name)
        with Image.open(path) as im:
            assert im.size == WINDOW
            return np.asarray(im.convert("RGB"))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        finally:
            os.close(self._send_fd)
            os.close(self._recv_fd)
            self.proc.wait(30)


@pytest.fixture
def browser(chromium, tmp_path):
    b = Browser(chromium, tmp_path / "profile")
    yield b
    b.close()


def _get(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def _wait(url: str, ready, timeout: float = 180, what: str = "") -> dict:
    deadline = time.monotonic() + timeout
    while True:
        _, state = _get(url)
        if ready(state):
            return state
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {json.dumps(state)[:2000]}"
        time.sleep(0.5)


def _section(dom: str, element_id: str) -> str:
    """The HTML inside ``<div ... id=element_id>`` up to the next section (good enough for asserts)."""
    start = dom.index(f'id="{element_id}"')
    end = dom.find("</section>", start)
    return dom[start:end]


def _thumbnail_ready(base: str, image_id: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}api/thumb/{image_id}.jpg", timeout=30) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False  # its Parquet part is not written yet


def _produce(settings, paths) -> dict[str, Path]:
    producer = ImageProducer(settings)
    sent = {producer.send_file(p).image_id: p for p in paths}
    assert producer.flush().sent == len(paths)
    producer.close()
    return sent


@pytest.fixture
def running(kafka_settings, tmp_path, effnet, cache_dir):
    """A model v0001 on examples/train, a featurizer, a scorer and the ui server, all live."""
    settings = unique_settings(kafka_settings, tmp_path)
    assert train_model(settings, effnet, EXAMPLES / "train", default_cache(cache_dir)) == "v0001"
    featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1))
    scorer = WorkerThread(Scorer(settings))
    app = UiApp(settings)
    server = serve_in_thread(app)
    try:
        yield settings, server.url, scorer
    finally:
        server.shutdown()
        app.close()
        featurizer.stop()
        scorer.stop()


def test_review_and_retrain_in_the_browser(browser, running, tmp_path):
    settings, base, scorer = running
    photos = sorted((EXAMPLES / "test").glob("*.jpg"))
    truth = {row["file"]: row["label"] for row in csv.DictReader(open(EXAMPLES / "test_labels.csv"))}
    sent = _produce(settings, photos)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos[0].read_bytes()[:5000])  # cut short: the featurizer dead-letters it
    _produce(settings, [broken])

    state = _wait(base + "api/state", lambda s: len(s["latest"]) == len(photos) and s["dead_letters"]["total"],
                  what="9 labels and a dead letter")
    assert {p["image_id"] for p in state["latest"]} == set(sent)
    assert sum(state["class_counts"].values()) == len(photos) and state["model"]["version"] == "v0001"
    assert state["dead_letters"]["by_reason"] == {"truncated": 1}
    assert state["dead_letters"]["recent"][0]["stage"] == "featurizer"
    deadline = time.monotonic() + 60
    while not all(_thumbnail_ready(base, i) for i in sent):
        assert time.monotonic() < deadline, "thumbnails never became available"
        time.sleep(1)

    # What a person sees: the page's JavaScript rendered the stream, every thumbnail loaded.
    browser.page("Page.navigate", url=base)
    browser.wait_js(f"document.querySelectorAll('#latest img[data-loaded=\"1\"]').length === {len(photos)}",
                    what="9 loaded thumbnails")
    dom = browser.dom()
    assert re.search(r'id="model-version">v0001<', dom)
    assert re.search(r'id="dead-total">1<', dom) and "<td>truncated</td>" in dom
    latest = _section(dom, "latest")
    for image_id, path in sent.items():
        assert f'data-image-id="{image_id}"' in latest and path.name in latest
    review = _section(dom, "review")
    assert review.count('class="photo"') == len(photos)  # nothing corrected yet: all in the queue
    assert review.count("data-fix=") == len(photos) * 3  # one button per class
    assert _section(dom, "class-counts").count('class="class-count"') == len(state["class_counts"])
    pixels = browser.screenshot(tmp_path / "ui-review.png")
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 5000  # photos, not just text

    # The reviewer clicks the right class under each photo, then Retrain.
    for image_id, path in sent.items():
        button = f"#review [data-fix=\"{image_id}\"][data-label=\"{truth[path.name]}\"]"
        browser.wait_js(f"!!document.querySelector('{button}')", what=f"the {truth[path.name]} button")
        browser.js(f"document.querySelector('{button}').click()")
    browser.wait_js(f"document.getElementById('corrections-count').textContent === '{len(photos)}'",
                    what="9 corrections")
    stored = labels_from_csv(Path(settings.data_dir) / "corrections.csv")
    assert stored == {image_id: truth[path.name] for image_id, path in sent.items()}
    browser.js("document.getElementById('retrain').click()")
    status = browser.wait_js("['done', 'failed'].includes(document.getElementById('retrain-status').dataset.state)"
                             " && document.getElementById('retrain-status').textContent", what="retraining end")
    assert status.startswith("done: v0002 is current"), status
    registry = Registry(settings.registry_dir)
    assert registry.current_version() == "v0002"
    assert registry.load("v0002").metadata["n_train"] == len(photos)

    # The running scorer switches by itself: the next photo is labelled by v0002.
    new = _produce(settings, [sorted((EXAMPLES / "train" / "fish").glob("*.jpg"))[0]])
    state = _wait(base + "api/state", lambda s: any(p["image_id"] in new and p["version"] == "v0002"
                                                    for p in s["latest"]), what="a label from v0002")
    assert scorer.worker.model.version == "v0002"
    assert state["model"]["version"] == "v0002" and state["corrections"]["count"] == len(photos)
    assert [p["image_id"] for p in state["review"]] == list(new)  # only the uncorrected photo is left
    browser.wait_js(f"!!document.querySelector('#latest [data-image-id=\"{next(iter(new))}\"] img[data-loaded]')"
                    " && document.getElementById('model-version').textContent === 'v0002'",
                    what="the new photo and model v0002")
    browser.screenshot(tmp_path / "ui-after-retrain.png")
