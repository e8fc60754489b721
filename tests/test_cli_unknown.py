"""``deeper train --unknown-threshold`` and what ``deeper predict`` then says about "unknown".

Real backbone (EfficientNet-Lite0, offline), the bundled example photos, a real registry. The
test photos' confidences spread from about 70% to 95% under the default recipe, so a fixed
threshold of 0.9 must mark some of them unknown and keep others.
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
    assert "unknown below 90% confidence" in out and "Brier score" in out, out
    calibration = _calibration(tmp_path)
    assert calibration["unknown_threshold"] == 0.9 and calibration["threshold_rule"] == "fixed"

    items = _predict(capsys)
    assert len(items) == 9
    unknown = [i for i in items if i["unknown"]]
    assert unknown and len(unknown) < len(items), [(i["label"], i["confidence"]) for i in items]
    for item in items:
        assert item["unknown_threshold"] == 0.9
        assert item["unknown"] == (item["confidence"] < 0.9)
        assert item["label"] == ("unknown" if item["unknown"] else max(item["scores"], key=item["scores"].get))


def test_zero_turns_unknown_off(train_dir, tmp_path, capsys):
    rc, out, err = deeper(capsys, "train", train_dir, "--unknown-threshold", "0")
    assert rc == 0, err
    assert "unknown: off" in out, out
    assert _calibration(tmp_path)["unknown_threshold"] == 0
    items = _predict(capsys)
    assert not any(i["unknown"] for i in items) and {i["label"] for i in items} <= CLASSES


def test_by_default_cross_validation_chooses_it(train_dir, tmp_path, capsys):
    rc, out, err = deeper(capsys, "train", train_dir)
    assert rc == 0, err
    calibration = _calibration(tmp_path)
    assert calibration["threshold_rule"].startswith("highest")
    assert f"unknown below {calibration['unknown_threshold']:.0%} confidence" in out, out
    assert f"{calibration['cv_false_unknown']:.1%} of the training photos" in out, out


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
