"""``deeper demo`` shows one review round: the review queue's head corrected, retrained, served.

The demo runs as a user runs it (``python -m pipeline.app.cli demo``, its featurizer and scorer as
separate processes) against the session's broker with fresh topics. What it says is checked
against what it left behind: the corrections CSV, the registry's new version and the exact
training set it saw, the labels topic, and the HTML report.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest

from consumers.labels import follow_labels
from schemas.messages import image_id
from pipeline.model.photos import find_photos
from pipeline.learning.registry import Registry
from pipeline.learning.training import training_set_hash
from tests.conftest import EXAMPLES, REPO
from tests.stream_helpers import unique_settings


def _truth() -> dict[str, str]:
    """Test photo image id -> its true class (examples/test_labels.csv)."""
    with open(EXAMPLES / "test_labels.csv", newline="") as fh:
        by_name = {row["file"]: row["label"] for row in csv.DictReader(fh)}
    return {image_id(p.read_bytes()): by_name[p.name] for p in (EXAMPLES / "test").glob("*.jpg")}


def _env(settings, cache_dir) -> dict[str, str]:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "DEEPER_CACHE_DIR": str(cache_dir),
           "DEEPER_IMAGES_TOPIC": settings.images_topic, "DEEPER_FEATURES_TOPIC": settings.features_topic,
           "DEEPER_LABELS_TOPIC": settings.labels_topic, "DEEPER_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
           "DEEPER_FEATURIZER_GROUP": settings.featurizer_group, "DEEPER_SCORER_GROUP": settings.scorer_group,
           "DEEPER_MODEL": "efficientnet_lite0", "DEEPER_OFFLINE": "1"}
    for name in ("DEEPER_REGISTRY", "DEEPER_FEATURES_URI", "DEEPER_UNKNOWN_LABEL"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def demo(kafka_settings, tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("demo")
    settings = unique_settings(kafka_settings, tmp)
    data = tmp / "demo"
    done = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "demo", "--data-dir", str(data)],
                          env=_env(settings, cache_dir), capture_output=True, text=True, timeout=400, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, data, settings


def test_the_head_of_the_review_queue_is_corrected_from_the_known_answers(demo):
    out, data, _ = demo
    truth = _truth()
    # step 5: each label's confidence, and why it is unknown where it is
    shown = re.findall(r"^\s+(photo_\d+\.jpg)\s+-> \S+ (\d+)%(?: \((novel|unconfident)\))?", out, re.M)
    assert len(shown) == 9, out
    rank = {name: ({"novel": 0, "unconfident": 1}.get(reason, 2), int(percent)) for name, percent, reason in shown}
    reviewed = re.findall(r"^\s+(photo_\d+\.jpg)\s+\S+ \d+% -> (\S+) \((?:confirmed|corrected)\)", out, re.M)
    assert len(reviewed) == 3, out
    rest = set(rank) - {name for name, _ in reviewed}
    assert max(rank[name][0] for name, _ in reviewed) <= min(rank[name][0] for name in rest), out
    same = [name for name in rest if rank[name][0] == max(rank[n][0] for n, _ in reviewed)]
    assert all(rank[name][1] <= rank[other][1] for name, _ in reviewed for other in same
               if rank[name][0] == rank[other][0] != 0), out  # novel ones go by novelty
    with open(data / "corrections.csv", newline="") as fh:
        rows = {r["image_id"]: r["label"] for r in csv.DictReader(fh)}
    assert len(rows) == 3 and all(truth[i] == label for i, label in rows.items())


def test_retraining_used_the_stored_features_plus_the_corrections(demo):
    out, data, _ = demo
    registry = Registry(data / "registry")
    assert registry.versions() == ["v0001", "v0002"] and registry.current_version() == "v0002"
    with open(data / "corrections.csv", newline="") as fh:
        corrected = {r["image_id"]: r["label"] for r in csv.DictReader(fh)}
    train = find_photos([EXAMPLES / "train"], labels_from_folders=True)
    seen = {image_id(p.path.read_bytes()): p.label for p in train} | corrected
    metadata = registry.load("v0002").metadata
    assert metadata["n_train"] == len(train) + 3
    assert metadata["training_set_sha256"] == training_set_hash(list(seen), list(seen.values()))
    assert "[7/9] retrained from the feature table deeper.features_efficientnet_lite0_fp32_prelogits (snapshot " \
        in out and "tagged model-v0002" in out and "model v0002 is now current" in out
    assert metadata["data"]["source"] == "table" and metadata["data"]["rows"] == 33


def test_the_running_scorer_switched_to_the_new_version(demo):
    out, _, settings = demo
    match = re.search(r"^\[8/9\] the running scorer switched to v0002 by itself: (photo_\d+\.jpg)", out, re.M)
    assert match, out
    photo = EXAMPLES / "test" / match.group(1)
    assert re.search(rf"^\s+v0001: {match.group(1)}\s+-> ", out, re.M) and re.search(
        rf"^\s+v0002: {match.group(1)}\s+-> ", out, re.M), out
    labels = follow_labels(settings, None, timeout=10)
    assert {r.classifier_version for r in labels.values()} == {"v0001", "v0002"}  # latest record per photo
    assert labels[image_id(photo.read_bytes())].classifier_version == "v0002"


def test_the_report_shows_each_photos_confidence(demo):
    out, data, _ = demo
    page = (data / "report.html").read_text("utf-8")
    assert page.count("class='card'") == 9
    assert len(re.findall(r"<div class='confidence'>\d+% confident</div>", page)) == 9
    assert page.count("data:image/jpeg;base64,") == 9
    assert re.search(r"^\[9/9\] done\. Table deeper\.features_efficientnet_lite0_fp32_prelogits: 33 photos' "
                     r"feature rows", out, re.M), out  # 24 training + 9 streamed


def test_the_demo_says_how_to_read_the_table_and_that_works(demo):
    out, data, _ = demo
    lines = out.splitlines()
    pyiceberg = lines[lines.index("      read it with pyiceberg:") + 1].strip()
    assert pyiceberg.startswith("python -c ") and str(data) in pyiceberg
    code = pyiceberg[len("python -c "):].strip('"')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=data)
    assert done.returncode == 0 and done.stdout.strip() == "34 rows", done.stdout + done.stderr  # + the photo sent again
    assert "      or with DuckDB:" in lines
