"""Feature files in object storage: write, list, read and train from ``s3://`` locations.

Against a real S3 server: the one the durable broker uses (``pipeline/app/broker/local_s3.py``, localbucket),
started on a free loopback port and reached through the usual AWS variables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.app.cli import main as deeper
from pipeline.errors import DeeperError, IncompatibleFeatures
from pipeline.identity import FeatureId
from pipeline.storage.parquet_reader import feature_files, read_features
from pipeline.storage.parquet_writer import FeatureRow, rows_to_table, write_features
from pipeline.learning.registry import Registry
from tests.local_s3_server import local_s3

pytest.importorskip("localbucket")

BUCKET = "features-bucket"
DIM = 8
META = FeatureId("efficientnet_lite0", "cd" * 32, "prelogits", DIM, "central_crop(0.875)", precision="bf16")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """(endpoint URL, the folder it serves) for a local S3 server running for this module."""
    root = tmp_path_factory.mktemp("s3")
    (root / BUCKET).mkdir()
    with local_s3(root, root.parent / "local_s3.log") as endpoint:
        yield endpoint, root


@pytest.fixture
def s3(s3_server, monkeypatch, request) -> str:
    """A fresh ``s3://`` prefix for one test, with the AWS variables pointing at the server."""
    endpoint, _ = s3_server
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}"


def row(i: int, label: str | None = None) -> FeatureRow:
    rng = np.random.default_rng(i)
    klass = ["cat", "dog", "eel"][i % 3]
    vector = (np.eye(3, DIM)[i % 3] * 5 + rng.normal(0, 0.3, DIM)).astype(np.float32)
    return FeatureRow(f"{i:064x}", f"photos/{i}.jpg", label or klass, 10, 10, vector, "deeper.images", 0, i)


def test_environment_is_read_explicitly(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.1.2.3:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert storage.s3_options() == {"check_directory_existence_before_creation": True, "endpoint_override": "10.1.2.3:9000", "scheme": "http", "region": "ap-south-1",
                                    "access_key": "k", "secret_key": "s"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.net")  # the S3-specific one wins
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    options = storage.s3_options()
    assert (options["endpoint_override"], options["scheme"], options["region"]) == ("s3.example.net", "https",
                                                                                     "eu-north-1")
    fs, path = storage.resolve("s3://bucket/a/b.parquet")
    assert path == "bucket/a/b.parquet" and fs.type_name == "s3"
    assert storage.join("s3://bucket/a/", "backbone=x", "p.parquet") == "s3://bucket/a/backbone=x/p.parquet"
    assert storage.join("/data/features", "backbone=x") == Path("/data/features/backbone=x")
    with pytest.raises(DeeperError, match="needs a bucket"):
        storage.resolve("s3://")


def test_write_list_read_delete(s3, s3_server):
    _, root = s3_server
    first = write_features([row(i) for i in range(0, 6)], META, storage.join(s3, "backbone=x", "a+0+0.parquet"))
    second = write_features([row(i) for i in range(6, 9)], META, storage.join(s3, "backbone=x", "a+0+6.parquet"))
    assert first == f"{s3}/backbone=x/a+0+0.parquet"
    on_disk = root / first[len("s3://"):]
    assert on_disk.is_file() and pq.read_table(on_disk).num_rows == 6  # a real object on the server
    # a temporary name and a non-Parquet object are not features
    fs, prefix = storage.resolve(s3)
    for name in (f"{storage.TEMP_PREFIX}abc-a+0+9.parquet", "b.parquet.partial", "notes.txt"):
        with fs.open_output_stream(f"{prefix}/backbone=x/{name}") as out:
            out.write(b"not parquet")
    assert feature_files([s3]) == [first, second]
    assert feature_files([first]) == [first]
    fs_ = read_features([s3])
    assert len(fs_) == 9 and fs_.meta == META and fs_.files == 2 and fs_.duplicates_dropped == 0
    np.testing.assert_array_equal(fs_.vectors[4], row(4).vector)
    storage.delete([first, first])  # deleting a missing object is not an error
    assert feature_files([s3]) == [second]
    with pytest.raises(DeeperError, match="no such feature file or directory: s3://"):
        read_features([f"s3://{BUCKET}/nothing-here"])


def test_duplicates_across_objects_are_counted(s3, caplog):
    a = write_features([row(0), row(1)], META, storage.join(s3, "a.parquet"))
    b = write_features([row(1), row(2)], META, storage.join(s3, "b.parquet"))
    with caplog.at_level("INFO", logger="pipeline.storage.parquet_reader"):
        fs = read_features([a, b])
    assert len(fs) == 3 and fs.duplicates_dropped == 1
    logged = [r for r in caplog.records if r.getMessage() == "read features"]
    assert logged and logged[-1].fields["duplicates_dropped"] == 1 and logged[-1].levelname == "WARNING"


def test_mixed_ids_across_local_and_s3_are_refused(s3, tmp_path):
    remote = write_features([row(0)], META, storage.join(s3, "bf16.parquet"))
    fp32 = FeatureId(META.backbone, META.weights_digest, META.layer, DIM, META.preprocessing)
    local = write_features([row(1)], fp32, tmp_path / "fp32.parquet")
    with pytest.raises(IncompatibleFeatures, match="precision fp32 vs bf16"):
        read_features([remote, local])


def test_failed_encode_uploads_nothing(s3, monkeypatch):
    target = storage.join(s3, "broken.parquet")

    def crash(table, where, **kwargs):
        where.write(b"PAR1 half")  # a partial encoding exists in memory...
        raise OSError("encoder failed")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="encoder failed"):
        patch.setattr(storage.pq, "write_table", crash)
        storage.write_parquet(rows_to_table([row(0)], META), target)
    fs, key = storage.resolve(target)
    assert fs.get_file_info(key).type.name == "NotFound"  # ...and never reaches the bucket


def test_train_from_s3_features(s3, tmp_path, capsys):
    write_features([row(i) for i in range(12)], META, storage.join(s3, "backbone=x", "p+0+0.parquet"))
    write_features([row(i) for i in range(12, 24)], META, storage.join(s3, "backbone=x", "p+0+12.parquet"))
    registry = tmp_path / "registry"
    assert deeper(["train", "--features", s3, "--registry", str(registry), "-q"]) == 0
    out = capsys.readouterr()
    assert "read 24 vectors (efficientnet_lite0@bf16/prelogits" in out.err
    model = Registry(registry).load_current()
    assert model.feature_meta == META and sorted(model.classifier.classes) == ["cat", "dog", "eel"]
    assert model.metadata["n_train"] == 24


def test_parquet_written_to_s3_is_a_plain_parquet_file(s3):
    """What lands in the bucket is an ordinary Parquet object other tools can read directly."""
    location = write_features([row(0), row(1)], META, storage.join(s3, "plain.parquet"))
    with storage.open_input(location) as source:
        table = pq.read_table(source)
    assert table.num_rows == 2 and table.schema.field("vector").type == pa.list_(pa.float32(), DIM)
    assert FeatureId.from_parquet_metadata(table.schema.metadata) == META
