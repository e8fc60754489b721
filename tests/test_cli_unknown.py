"""``deeper train --unknown-threshold/--novelty-threshold`` and what ``deeper predict`` then says.

Real backbone (EfficientNet-Lite0, offline), the bundled example photos, a real registry. The
test photos' confidences spread from about 70% to 95% under the default recipe, so a fixed
threshold of 0.9 must mark some of them unconfident and keep others. Photos of other things
(the ImageNet samples: cats, a dog, an owl, coffee) must come out novel for a model of cars.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.learning.registry import Registry
from tests.cli_helpers import deeper, offline_cli  # noqa: F401 - offline_cli: autouse
from tests.conftest import EXAMPLES

CLASSES = {"buildings", "fish", "tools"}


@pytest.fixture
def train_dir(tmp_path) -> Path:
    return Path(shutil.copytree(EXAMPLES / "train", tmp_path / "train"))


def _predict(capsys) -> list[dict]:
    rc, out, err = deeper(capsys, "predict", EXAMPLES / "test", "--format", "json")
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


def _calibration(tmp_path: Path) -> dict:
    return Registry(tmp_path / "registry").load_current().metadata["calibration"]


def test_a_fixed_threshold_is_saved_and_decides_unknown(train_dir, tmp_path, capsys):
    rc, out, err = deeper(capsys, "train", train_dir, "--unknown-threshold", "0.9")
    assert rc == 0, err
    assert "unknown below 90% confidence (unconfident)" in out and "Brier score" in out, out
    calibration = _calibration(tmp_path)
    assert calibration["unknown_threshold"] == 0.9 and calibration["threshold_rule"] == "fixed"

    items = _predict(capsys)
    assert len(items) == 9
    unknown = [i for i in items if i["unknown"]]
    assert unknown and len(unknown) < len(items), [(i["label"], i["confidence"]) for i in items]
    for item in items:
        assert item["unknown_threshold"] == 0.9
        novel = item["novelty"] > item["novelty_threshold"]
        assert item["unknown"] == (item["confidence"] < 0.9 or novel)
        assert item["unknown_reason"] == ("novel" if novel else "unconfident" if item["unknown"] else None)
        assert item["label"] == ("unknown" if item["unknown"] else max(item["scores"], key=item["scores"].get))


def test_zero_turns_unknown_off(train_dir, tmp_path, capsys):
    rc, out, err = deeper(capsys, "train", train_dir, "--unknown-threshold", "0", "--novelty-threshold", "0")
    assert rc == 0, err
    assert "unconfident: off" in out and "novel: off" in out, out
    assert _calibration(tmp_path)["unknown_threshold"] == 0
    assert Registry(tmp_path / "registry").load_current().metadata["novelty"]["threshold"] == 0
    items = _predict(capsys)
    assert not any(i["unknown"] for i in items) and {i["label"] for i in items} <= CLASSES
    assert all(i["novelty"] is not None and i["unknown_reason"] is None for i in items)


def test_by_default_cross_validation_chooses_it(train_dir, tmp_path, capsys):
    rc, out, err = deeper(capsys, "train", train_dir)
    assert rc == 0, err
    calibration = _calibration(tmp_path)
    assert calibration["threshold_rule"].startswith("highest")
    assert f"unknown below {calibration['unknown_threshold']:.0%} confidence" in out, out
    assert f"{calibration['cv_false_unknown']:.1%} of the training photos" in out, out
    novelty = Registry(tmp_path / "registry").load_current().metadata["novelty"]
    assert novelty["threshold_rule"].startswith("conformal") and 0 < novelty["threshold"] < 1
    assert novelty["cv_novel"] <= 0.05 and novelty["summary_size"] == 24
    assert f"unknown beyond cosine distance {novelty['threshold']:.3f}" in out, out
    cost = Registry(tmp_path / "registry").load_current().metadata["unknown_cost"]
    assert f"answers {cost['coverage']:.1%} of them" in out and "plain accuracy (answering all) " in out, out
    assert 0.85 <= cost["coverage"] <= 1.0 and cost["n"] == 24


def test_photos_of_other_things_are_novel_for_a_model_of_cars(cars, imagenet_samples, capsys):
    rc, out, err = deeper(capsys, "train", cars / "train")
    assert rc == 0, err
    rc, out, err = deeper(capsys, "predict", imagenet_samples, "--format", "json")
    assert rc == 0, err
    items = [json.loads(line) for line in out.splitlines()]
    assert len(items) == 6 and all(i["label"] == "unknown" and i["unknown_reason"] == "novel" for i in items), \
        [(i["source"], i["novelty"], i["novelty_threshold"]) for i in items]
    rc, out, err = deeper(capsys, "predict", imagenet_samples, "--format", "csv")
    header, *rows = out.splitlines()
    assert "unknown_reason,novelty" in header and all(",novel," in row for row in rows)
    rc, out, err = deeper(capsys, "predict", imagenet_samples)
    assert "novel" in out and "novelty above" in out, out


def test_a_fixed_novelty_threshold_is_saved_and_used(train_dir, tmp_path, capsys):
    rc, out, err = deeper(capsys, "train", train_dir, "--novelty-threshold", "0.01", "--unknown-threshold", "0")
    assert rc == 0, err
    novelty = Registry(tmp_path / "registry").load_current().metadata["novelty"]
    assert novelty["threshold"] == 0.01 and novelty["threshold_rule"] == "fixed"
    items = _predict(capsys)  # nothing is that close to a training photo
    assert all(i["unknown_reason"] == "novel" and i["novelty_threshold"] == 0.01 for i in items)


@pytest.mark.parametrize("value", ["2.5", "-0.1", "far"])
def test_a_novelty_threshold_that_is_not_a_distance_is_refused(value, train_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        deeper(capsys, "train", train_dir, "--novelty-threshold", value)
    assert exit_.value.code == 2
    assert "not a cosine distance" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1.5", "-0.1", "half"])
def test_a_threshold_that_is_not_a_probability_is_refused(value, train_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        deeper(capsys, "train", train_dir, "--unknown-threshold", value)
    assert exit_.value.code == 2
    assert "not a probability" in capsys.readouterr().err


def test_the_unknown_label_comes_from_the_setting(train_dir, monkeypatch, capsys):
    monkeypatch.setenv("DEEPER_UNKNOWN_LABEL", "none-of-these")
    rc, _, err = deeper(capsys, "train", train_dir, "--unknown-threshold", "0.9")
    assert rc == 0, err
    items = _predict(capsys)
    assert any(i["unknown"] for i in items)
    for item in items:
        assert (item["label"] == "none-of-these") == item["unknown"]
