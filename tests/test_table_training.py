"""Training from the feature table: provenance, tags, ``--reproduce``, compaction and expiry.

Everything through ``deeper ...`` (``pipeline.app.cli.main``) on a real SQLite catalog, real
data files and a real registry. The rows are synthetic vectors of three separable classes (the
table does not care how they were made); ``deeper featurize`` into the table runs the real
backbone once at the end.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.app.cli import main
from pipeline.config import Settings
from pipeline.learning.registry import Registry
from pipeline.storage import table as tables
from pipeline.identity import FeatureId
from pipeline.storage.parquet_writer import FeatureRow

META = FeatureId("efficientnet_lite0", "cd" * 32, "prelogits", 64)
TABLE = "deeper.features_efficientnet_lite0_fp32_prelogits"
CLASSES = ("cars", "boats", "bikes")


def deeper(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def photos(seed: int, per_class: int) -> list[FeatureRow]:
    rng = np.random.default_rng(seed)
    out = []
    for k, label in enumerate(CLASSES):
        for i in range(per_class):
            vector = rng.normal(0, 1.0, META.dim).astype(np.float32)
            vector[k] += 1.5  # overlapping classes: the solver's path matters, as with real photos
            out.append(FeatureRow(f"{seed:04x}{k:02x}{i:058x}", f"{label}/{seed}-{i}.jpg", label, 64, 48, vector))
    return out


@pytest.fixture
def env(tmp_path, monkeypatch) -> Settings:
    monkeypatch.setenv("DEEPER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DEEPER_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.setenv("DEEPER_OFFLINE", "1")
    return Settings.from_env()


def test_a_version_trained_from_the_table_is_reproduced_exactly_after_compaction_and_expiry(env, tmp_path):
    tables.append_rows(env, META, photos(1, 6))
    tables.append_rows(env, META, photos(2, 6))
    corrections = tmp_path / "corrections.csv"
    first = photos(1, 6)[0]
    with open(corrections, "w", newline="") as fh:
        csv.writer(fh).writerows([["image_id", "label"], [first.image_id, "boats"]])

    rc, out, err = deeper("train", "--features", TABLE, "--labels", corrections, "-q")
    assert rc == 0, err
    table = tables.load_named(env, TABLE)
    trained_on = table.current_snapshot().snapshot_id
    assert table.metadata.refs["model-v0001"].snapshot_id == trained_on
    data = Registry(env.registry_dir).load("v0001").metadata["data"]
    assert data["table"] == TABLE and data["snapshot_id"] == trained_on and data["rows"] == 36
    assert data["label_overrides"] == {first.image_id: "boats"}

    tables.append_rows(env, META, photos(3, 6))  # the table moves on; v0001's snapshot is no longer current
    rc, out, err = deeper("compact", "--keep-hours", "0", "--orphan-hours", "0")
    assert rc == 0, err
    table = table.refresh()
    assert len(list(table.scan().plan_files())) == 1  # three small files rewritten into one
    assert table.snapshot_by_id(trained_on) is not None  # tagged: kept by the expiry

    rc, out, err = deeper("train", "--reproduce", "v0001", "-q")
    assert rc == 0, out + err
    assert "the same training set; largest difference of any coefficient 0" in out
    original, again = (Registry(env.registry_dir).load(v).classifier.arrays for v in ("v0001", "v0002"))
    for name, values in original.items():
        np.testing.assert_allclose(again[name], values, atol=1e-6, rtol=0)
    assert Registry(env.registry_dir).current_version() == "v0001"  # a reproduction is not made current

    rc, out, _ = deeper("models")
    assert f"data: table {TABLE} snapshot {trained_on}" in out and "36 rows" in out and "reproduces v0001" in out


def test_train_reads_a_snapshot_by_id_or_time_and_says_when_it_is_gone(env):
    _, first = tables.append_rows(env, META, photos(1, 4))
    tables.append_rows(env, META, photos(2, 4))
    rc, out, err = deeper("train", "--features", TABLE, "--snapshot", first.snapshot_id, "-q")
    assert rc == 0, err
    assert json.loads(json.dumps(Registry(env.registry_dir).load("v0001").metadata["data"]))["rows"] == 12
    rc, _, err = deeper("train", "--features", TABLE, "--as-of", "2001-01-01T00:00Z", "-q")
    assert rc == 2 and "no snapshot at or before 2001-01-01" in err and "\n" == err[-1] and err.count("\n") == 1
    rc, _, err = deeper("train", "--features", TABLE, "--snapshot", "12345", "-q")
    assert rc == 2 and "has no snapshot 12345 (expired?)" in err and "model-v0001" in err
    rc, _, err = deeper("train", "--features", "deeper.nothing_here", "-q")
    assert rc == 2 and "no table deeper.nothing_here" in err


def test_reproduce_refuses_a_version_not_trained_from_a_table(env, tmp_path):
    from pipeline.storage.parquet_writer import write_features

    write_features(photos(1, 4), META, tmp_path / "f.parquet")
    assert deeper("train", "--features", tmp_path / "f.parquet", "-q")[0] == 0
    rc, _, err = deeper("train", "--reproduce", "v0001", "-q")
    assert rc == 2 and "was not trained from a table snapshot (its data: parquet)" in err


def test_the_ui_retrain_uses_the_table_of_the_current_model(env, tmp_path):
    from pipeline.app.ui import Corrections, Retrainer

    tables.append_rows(env, META, photos(1, 5))
    assert deeper("train", "--features", TABLE, "-q")[0] == 0
    tables.append_rows(env, META, photos(2, 5))
    corrections = Corrections(tmp_path / "corrections.csv")
    corrections.set(photos(2, 5)[0].image_id, "bikes")
    outcome = Retrainer(env, corrections)._train()
    data = Registry(env.registry_dir).load(outcome.version).metadata["data"]
    table = tables.load_named(env, TABLE)
    assert data["table"] == TABLE and data["snapshot_id"] == table.current_snapshot().snapshot_id
    assert data["rows"] == 30 and data["label_overrides"] == {photos(2, 5)[0].image_id: "bikes"}
    assert f"model-{outcome.version}" in table.metadata.refs


def test_featurize_appends_to_the_table_and_out_still_writes_a_file(env, effnet, cache_dir, tmp_path):
    examples = Path(__file__).resolve().parent.parent / "examples" / "train"
    common = ("--model", "efficientnet_lite0", "--cache-dir", cache_dir, "-q")
    rc, _, err = deeper("featurize", examples / "fish", *common)
    assert rc == 0 and "to table deeper.features_efficientnet_lite0_fp32_prelogits (snapshot" in err, err
    table = tables.load_named(env, TABLE.replace("prelogits", "prelogits"))
    assert table.current_snapshot().summary[tables.WRITER] == "featurize"
    assert tables.identity(table).weights_digest == effnet.weights_digest
    assert len(tables.scan(table, table.current_snapshot(), ["image_id"])) == len(list((examples / "fish").iterdir()))
    rc, _, err = deeper("featurize", examples / "fish", "--out", tmp_path / "fish.parquet", *common)
    assert rc == 0 and (tmp_path / "fish.parquet").is_file(), err
