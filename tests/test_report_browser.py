"""The HTML report rendered by a real headless Chromium: it must show the photos and the labels.

``test_cli_batch`` checks the HTML text; this checks what a person opening the file sees. It
needs ``/usr/bin/chromium`` (``apt-get install chromium``) and skips with that reason otherwise.
The browser runs with networking components off: the page is self-contained, so nothing should
need fetching anyway.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.app.cli import main

CHROMIUM = os.environ.get("DEEPER_TEST_CHROMIUM", "/usr/bin/chromium")
MODEL = "efficientnet_lite0"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


@pytest.fixture(scope="module")
def chromium() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"headless Chromium not installed at {CHROMIUM} (apt-get install -y chromium)")
    return CHROMIUM


def _deeper(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def report(chromium, cars, cache_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Train on cars/train, report on cars/test plus a truncated photo; return (html, predictions)."""
    base = tmp_path_factory.mktemp("report")
    photos = base / "photos"
    photos.mkdir()
    for p in sorted((cars / "test").glob("*.jpg")):
        shutil.copy(p, photos / p.name)
    data = sorted((cars / "test").glob("*.jpg"))[0].read_bytes()
    (photos / "broken.jpg").write_bytes(data[: len(data) // 3])
    out = base / "report.html"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPER_OFFLINE", "1")
        mp.setenv("DEEPER_CACHE_DIR", str(cache_dir))
        mp.setenv("DEEPER_REGISTRY", str(base / "registry"))
        rc, _, err = _deeper("train", cars / "train", "--model", MODEL, "-q")
        assert rc == 0, err
        rc, _, err = _deeper("report", photos, "--out", out, "-q")
        assert rc == 1, err  # 1: the broken photo is reported, the others are in the report
        rc, stdout, err = _deeper("predict", photos, "--format", "json", "-q")
        assert rc == 1, err
    return out, [json.loads(line) for line in stdout.splitlines()]


def _chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


class _Text(HTMLParser):
    """Text content of elements by class, e.g. every <div class='label'>."""

    def __init__(self, wanted: str):
        super().__init__()
        self.wanted, self.depth, self.found = wanted, 0, []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += 1
        elif dict(attrs).get("class", "").split()[:1] == [self.wanted]:
            self.depth = 1
            self.found.append("")

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.found[-1] += data


def test_report_screenshot_is_not_blank(chromium, report, tmp_path):
    page, _ = report
    png = tmp_path / "report.png"
    done = _chromium(chromium, tmp_path, f"--screenshot={png}", "--window-size=1200,1600", page.as_uri())
    assert png.is_file() and png.stat().st_size > 0, done.stderr[-2000:]
    keep = os.environ.get("DEEPER_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(png, keep)
    with Image.open(png) as im:
        assert im.size == (1200, 1600)
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20, "screenshot is (nearly) one colour"
    # thumbnails are photos: many distinct colours, not just text on white
    assert len(np.unique(pixels.reshape(-1, 3).astype(np.uint8), axis=0)) > 5000
    # the top of the page (title, confusion matrix) and the card grid both drew something
    assert pixels[:400].std() > 10 and pixels[400:1200].std() > 20


def test_rendered_dom_has_labels_and_confusion(chromium, report, tmp_path):
    page, predictions = report
    done = _chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "<h1>go-deeper report</h1>" in dom

    labels = _Text("label")
    labels.feed(dom)
    by_order = [p["label"] or "error" for p in predictions]
    assert labels.found == by_order and by_order.count("error") == 1
    assert {"classic", "modern"} <= set(by_order)

    names = _Text("name")
    names.feed(dom)
    assert names.found == [Path(p["source"]).name for p in predictions]

    thumbs = [img for img in dom.split("<img ")[1:]]
    assert len(thumbs) == 7 and all('src="data:image/jpeg;base64,' in t for t in thumbs)
    assert "Cross-validation" in dom and "leave-one-out" in dom and "no preview" in dom
