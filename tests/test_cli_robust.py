"""The batch CLI never loses a photo: one that fails is named with its reason, the rest go on.

Real backbone (EfficientNet-Lite0, offline), real files, real Parquet. Two kinds of bad photo:
one Pillow refuses (a ``DecodeError``) and one whose decode raises something unexpected, which
is injected into the real decode path (``pipeline.model.inference.decode_image``) for files that start
with ``BOOM``: the kind of bug that used to end ``deeper predict`` with a traceback.
Also: file and folder names that aren't UTF-8, as Linux allows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.model.photos import display_path, find_photos, path_from_display
from pipeline.learning.registry import Registry
from tests.cli_helpers import deeper, offline_cli  # noqa: F401 - offline_cli: autouse
from tests.conftest import EXAMPLES

BAD_NAME = os.fsdecode(b"caf\xe9-\xff.jpg")  # not UTF-8: Python holds it with surrogates
BAD_LABEL = os.fsdecode(b"poisson-\xe9")


@pytest.fixture
def boom(monkeypatch):
    """Decoding a file that starts with BOOM raises RuntimeError (not a DecodeError)."""
    import pipeline.model.inference as inference

    real = inference.decode_image

    def decode(data, *args, **kwargs):
        if bytes(data).startswith(b"BOOM"):
            raise RuntimeError("decoder bug")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(inference, "decode_image", decode)


def _tree(root: Path, odd_names: bool = False) -> Path:
    """examples/train copied; with ``odd_names`` one class folder and one file aren't UTF-8."""
    for folder in sorted((EXAMPLES / "train").iterdir()):
        name = BAD_LABEL if odd_names and folder.name == "fish" else folder.name
        shutil.copytree(folder, root / name)
    if odd_names:
        first = sorted((root / "buildings").iterdir())[0]
        first.rename(first.with_name(BAD_NAME))
    return root


def _good(n: int) -> list[Path]:
    return sorted((EXAMPLES / "test").glob("*.jpg"))[:n]


# -- per-photo failures -------------------------------------------------------------------------
def test_featurize_reports_each_bad_photo_and_writes_the_rest(boom, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in _good(3):
        shutil.copy(p, photos / p.name)
    (photos / "a-boom.jpg").write_bytes(b"BOOM, not a photo")
    (photos / "b-text.jpg").write_text("just text")
    out_file = tmp_path / "f.parquet"
    rc, out, err = deeper(capsys, "featurize", photos, "--out", out_file, "--batch-size", "2", "--no-cache")
    assert rc == 1, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert f"skipped {photos / 'a-boom.jpg'}: internal_error: RuntimeError: decoder bug" in lines
    assert any(line.startswith(f"skipped {photos / 'b-text.jpg'}: unsupported_format") for line in lines), err
    names = sorted(Path(s).name for s in pq.read_table(out_file).column("source").to_pylist())
    assert names == sorted(p.name for p in _good(3))


@pytest.fixture
def trained(tmp_path, capsys) -> Path:
    """A model on examples/train (buildings, fish, tools) in this test's registry."""
    rc, _, err = deeper(capsys, "train", _tree(tmp_path / "train"))
    assert rc == 0, err
    return tmp_path / "registry"


def test_predict_labels_the_good_photo_next_to_a_broken_one(trained, boom, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"BOOM")
    good = _good(1)[0]
    rc, out, err = deeper(capsys, "predict", bad, good, "--format", "json")
    assert "Traceback" not in err
    items = {Path(i["source"]).name: i for i in map(json.loads, out.splitlines())}
    assert set(items) == {"bad.jpg", good.name}
    assert items[good.name]["label"] in {"buildings", "fish", "tools"} and "error" not in items[good.name]
    assert items["bad.jpg"]["label"] is None
    assert items["bad.jpg"]["error"] == "internal_error: RuntimeError: decoder bug"
    assert rc in (0, 1), err  # the status itself: test_predict_exit_status_says_a_photo_failed


def test_predict_exit_status_says_a_photo_failed(trained, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a photo")
    rc, out, err = deeper(capsys, "predict", bad, _good(1)[0], "--format", "json")
    assert rc == 1, (out, err)
    rc, out, err = deeper(capsys, "predict", _good(2)[0], _good(2)[1], "--format", "json")
    assert rc == 0, err


def test_train_skips_a_bad_photo_and_says_so(boom, tmp_path, capsys):
    root = _tree(tmp_path / "train")
    (root / "tools" / "zz-boom.jpg").write_bytes(b"BOOM")
    rc, out, err = deeper(capsys, "train", root)
    assert rc == 1, err
    assert f"skipped {root / 'tools' / 'zz-boom.jpg'}: internal_error: RuntimeError: decoder bug" in err.splitlines()
    assert "saved model v0001" in out
    n_photos = sum(1 for p in (EXAMPLES / "train").rglob("*.jpg"))
    assert Registry(tmp_path / "registry").load_current().metadata["n_train"] == n_photos


def test_a_missing_path_stops_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import pipeline.model.nets.factory as factory

    monkeypatch.setattr(factory, "load_backbone", lambda *a, **k: pytest.fail("loaded a backbone"))
    # predict/report: the path is checked before the registry too (there is none here, so an error
    # about the model would mean the photos were looked for too late)
    for argv in (["imagenet"], ["featurize", "--out", tmp_path / "x.parquet"], ["train"], ["predict"],
                 ["report", "--out", tmp_path / "r.html"]):
        rc, _, err = deeper(capsys, argv[0], tmp_path / "nope", *argv[1:])
        assert rc == 2 and "no such file or directory" in err, err


# -- names that aren't UTF-8 ----------------------------------------------------------------------
def test_display_path_round_trip(tmp_path):
    real = tmp_path / BAD_NAME
    real.write_bytes(b"x")
    text = display_path(real)
    assert text.encode("utf-8") and text.endswith("caf\\xe9-\\xff.jpg")
    assert path_from_display(text) == real
    assert display_path(tmp_path / "plain-é.jpg") == str(tmp_path / "plain-é.jpg")  # UTF-8 is left alone
    (photo,) = find_photos([real])
    assert photo.path == real and photo.source == text


def test_non_utf8_names_in_every_batch_command(tmp_path, capsys):
    root = _tree(tmp_path / "train", odd_names=True)
    shown_label = display_path(BAD_LABEL)
    shown_file = display_path(root / "buildings" / BAD_NAME)

    rc, out, err = deeper(capsys, "train", root)
    assert rc == 0, err
    assert shown_label in out  # the confusion matrix
    assert sorted(Registry(tmp_path / "registry").load_current().classifier.classes) == sorted(
        ["buildings", shown_label, "tools"])

    out_file = tmp_path / "f.parquet"
    rc, _, err = deeper(capsys, "featurize", root, "--out", out_file)
    assert rc == 0, err
    table = pq.read_table(out_file).to_pylist()
    assert shown_file in {r["source"] for r in table}
    assert shown_label in {r["label"] for r in table}

    odd = root / "buildings" / BAD_NAME
    for fmt in ("csv", "table"):
        rc, out, err = deeper(capsys, "predict", odd, _good(1)[0], "--format", fmt)
        assert rc == 0, err
        assert Path(shown_file).name in out, out
    rc, out, _ = deeper(capsys, "predict", odd, "--format", "json")
    (item,) = map(json.loads, out.splitlines())
    assert item["source"] == shown_file and item["label"] == "buildings"

    page = tmp_path / "report.html"
    rc, _, err = deeper(capsys, "report", odd, "--out", page)
    assert rc == 0, err
    html = page.read_text("utf-8")
    assert Path(shown_file).name in html
    assert "data:image/jpeg;base64," in html and "no preview" not in html  # the real file was found again

    rc, out, err = deeper(capsys, "imagenet", odd)
    assert rc == 0, err
    assert out.splitlines()[0] == shown_file
