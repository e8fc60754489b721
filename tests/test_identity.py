"""The feature id: one type, every serialisation, one check, and data written before it existed.

Old-format data is built here the way older go-deeper wrote it (precision as a ``name@bf16``
backbone suffix, no ``precision`` key anywhere, the old cache key) and must still read the same.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from consumers.scorer import Scorer
from pipeline.learning.classifier import ClassifierSpec, fit
from pipeline.errors import IncompatibleFeatures
from pipeline.storage.feature_cache import FeatureCache
from pipeline.identity import FeatureId, split_backbone
from pipeline.storage.parquet_reader import read_features, read_meta
from pipeline.storage.parquet_writer import FeatureRow, rows_to_table, write_features
from pipeline.learning.registry import ModelVersion, Registry
from schemas.messages import FeatureRecord, decode_features, encode_features

DIM = 8
FP32 = FeatureId("efficientnet_lite0", "cd" * 32, "prelogits", DIM, "central_crop(0.875)")
BF16 = FeatureId("efficientnet_lite0", "cd" * 32, "prelogits", DIM, "central_crop(0.875)", precision="bf16")


def row(i: int) -> FeatureRow:
    return FeatureRow(f"{i:064x}", f"photos/{i}.jpg", "cat" if i % 2 else "dog", 10, 10,
                      np.arange(DIM, dtype=np.float32) + i)


def _legacy_parquet(path: Path, rows: list[FeatureRow], backbone: str) -> Path:
    """A feature file as written before ``deeper.precision`` existed."""
    table = rows_to_table(rows, FP32)
    md = {k: v for k, v in table.schema.metadata.items() if k != b"deeper.precision"}
    md[b"deeper.backbone"] = backbone.encode()
    pq.write_table(table.replace_schema_metadata(md), path)
    return path


# -- the type -------------------------------------------------------------------------------------
def test_legacy_combined_name_is_split_into_backbone_and_precision():
    legacy = FeatureId("efficientnet_lite0@bf16", "cd" * 32, "prelogits", DIM, "central_crop(0.875)")
    assert legacy == BF16 and legacy.backbone == "efficientnet_lite0" and legacy.precision == "bf16"
    assert BF16.qualified_name == "efficientnet_lite0@bf16" and FP32.qualified_name == "efficientnet_lite0"
    assert BF16.describe().startswith("efficientnet_lite0@bf16/prelogits (dim 8")
    assert split_backbone("inception_v1") == ("inception_v1", "fp32")
    assert split_backbone("inception_v1@int8", "int8") == ("inception_v1", "int8")
    with pytest.raises(IncompatibleFeatures, match="says precision bf16 but precision int8"):
        FeatureId("efficientnet_lite0@bf16", "cd" * 32, "prelogits", DIM, precision="int8")
    with pytest.raises(IncompatibleFeatures, match="not NAME or NAME@PRECISION"):
        FeatureId("efficientnet_lite0@", "cd" * 32, "prelogits", DIM)


def test_check_names_every_difference_and_ignores_unrecorded_preprocessing():
    other = FeatureId("inception_v1", "ef" * 32, "logits", 1001, "inception", precision="bf16")
    with pytest.raises(IncompatibleFeatures) as caught:
        FP32.check_compatible(other, what="a and b")
    message = str(caught.value)
    assert message.startswith("cannot mix features (a and b): ")
    for part in ("backbone efficientnet_lite0 vs inception_v1", "precision fp32 vs bf16",
                 f"weights {'cd' * 6} vs {'ef' * 6}", "layer prelogits vs logits", "dim 8 vs 1001",
                 "preprocessing central_crop(0.875) vs inception"):
        assert part in message
    FP32.check_compatible(FeatureId("efficientnet_lite0", "cd" * 32, "prelogits", DIM))  # no preprocessing recorded
    assert FP32.differences(BF16) == ["precision fp32 vs bf16"]


# -- Parquet --------------------------------------------------------------------------------------
def test_parquet_metadata_round_trip_records_precision(tmp_path):
    path = write_features([row(0)], BF16, tmp_path / "bf16.parquet")
    md = pq.read_schema(path).metadata
    assert md[b"deeper.backbone"] == b"efficientnet_lite0" and md[b"deeper.precision"] == b"bf16"
    assert read_meta(path) == BF16


def test_old_parquet_files_read_with_their_precision_and_mix_only_with_their_own(tmp_path):
    old_bf16 = _legacy_parquet(tmp_path / "old-bf16.parquet", [row(0), row(1)], "efficientnet_lite0@bf16")
    old_fp32 = _legacy_parquet(tmp_path / "old-fp32.parquet", [row(2)], "efficientnet_lite0")
    assert read_meta(old_bf16) == BF16 and read_meta(old_fp32) == FP32
    new_bf16 = write_features([row(3)], BF16, tmp_path / "new-bf16.parquet")
    fs = read_features([old_bf16, new_bf16])  # old and new bf16 files are the same features
    assert len(fs) == 3 and fs.meta == BF16 and fs.files == 2
    with pytest.raises(IncompatibleFeatures, match="precision fp32 vs bf16"):
        read_features([old_bf16, old_fp32])


# -- registry -------------------------------------------------------------------------------------
def _classifier():
    x = np.concatenate([np.zeros((6, DIM)), np.ones((6, DIM))]).astype(np.float32)
    x += np.random.default_rng(0).normal(0, 0.1, x.shape).astype(np.float32)
    return fit(x, ["a"] * 6 + ["b"] * 6, ClassifierSpec("linear-svm", "none", 1.0))


def test_registry_stores_the_id_and_reads_versions_saved_before_precision(tmp_path):
    reg = Registry(tmp_path / "registry")
    version = reg.save(_classifier(), BF16, {})
    features = json.loads((reg.versions_dir / version / "model.json").read_text())["features"]
    assert features == {"backbone": "efficientnet_lite0", "precision": "bf16", "weights_digest": "cd" * 32,
                        "layer": "prelogits", "dim": DIM, "preprocessing": "central_crop(0.875)"}
    assert reg.load_current().feature_meta == BF16
    # a version as older go-deeper saved it: precision on the name, no precision key
    old = reg.save(_classifier(), FP32, {}, make_current=False)
    model_json = reg.versions_dir / old / "model.json"
    metadata = json.loads(model_json.read_text())
    metadata["features"] = {"backbone": "efficientnet_lite0@bf16", "weights_digest": "cd" * 32,
                            "layer": "prelogits", "dim": DIM, "preprocessing": "central_crop(0.875)"}
    data = json.dumps(metadata, indent=2, sort_keys=True).encode()
    model_json.write_bytes(data)
    (reg.versions_dir / old / "model.json.sha256").write_text(hashlib.sha256(data).hexdigest())
    reg.set_current(old)
    assert reg.load_current().feature_meta == BF16


# -- feature cache --------------------------------------------------------------------------------
def test_cache_entries_written_under_the_old_key_are_still_hits(tmp_path):
    path = tmp_path / "features.sqlite"
    FeatureCache(path).close()  # creates the table
    old_key = f"efficientnet_lite0@bf16|{'cd' * 32}|prelogits|{DIM}"  # how the key was built before
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO vectors VALUES (?, ?, ?, ?, ?)",
                   (row(0).image_id, old_key, 3, 4, row(0).vector.tobytes()))
    cache = FeatureCache(path)
    assert BF16.cache_key() == old_key and FP32.cache_key() == f"efficientnet_lite0|{'cd' * 32}|prelogits|{DIM}"
    vector, width, height = cache.get_many([row(0).image_id], BF16)[row(0).image_id]
    np.testing.assert_array_equal(vector, row(0).vector)
    assert (width, height) == (3, 4)
    assert cache.get_many([row(0).image_id], FP32) == {}  # another precision: a miss
    cache.close()


# -- feature records and the scorer's check ----------------------------------------------------------
def _record(backbone: str, extra: dict | None = None) -> FeatureRecord:
    return FeatureRecord(row(0).image_id, row(0).vector, backbone, "cd" * 32, "prelogits", extra=extra or {})


def test_records_old_and_new_read_as_the_same_id():
    old = decode_features(*encode_features(_record("efficientnet_lite0@bf16")))
    new = decode_features(*encode_features(_record("efficientnet_lite0", {"precision": "bf16"})))
    plain = decode_features(*encode_features(_record("efficientnet_lite0")))
    assert FeatureId.from_record(old) == FeatureId.from_record(new) == FeatureId(
        "efficientnet_lite0", "cd" * 32, "prelogits", DIM, precision="bf16")
    assert FeatureId.from_record(plain).precision == "fp32"
    header = BF16.to_record_header()
    assert header == {"backbone": "efficientnet_lite0", "precision": "bf16", "weights_digest": "cd" * 32,
                      "layer": "prelogits", "dim": DIM}
    assert FeatureId.from_record_header(header) == FeatureId.from_record(new)
    assert FeatureId.from_record_header({**header, "backbone": "efficientnet_lite0@bf16", "precision": None}) \
        == FeatureId.from_record(new)


def test_scorer_refuses_a_vector_of_another_precision_with_the_one_error():
    model = ModelVersion("v0007", _classifier(), BF16, {})
    Scorer._check_matches(_record("efficientnet_lite0@bf16"), model)
    Scorer._check_matches(_record("efficientnet_lite0", {"precision": "bf16"}), model)
    with pytest.raises(IncompatibleFeatures, match=r"\(vector vs classifier v0007\): precision fp32 vs bf16"):
        Scorer._check_matches(_record("efficientnet_lite0"), model)
    with pytest.raises(IncompatibleFeatures, match="layer logits vs prelogits"):
        Scorer._check_matches(FeatureRecord(row(0).image_id, row(0).vector, "efficientnet_lite0@bf16",
                                            "cd" * 32, "logits"), model)
