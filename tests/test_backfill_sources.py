"""What a backfill reads (``pipeline/spark/sources.py``): folders, globs, Parquet lists of paths and
``s3://`` prefixes on a real local S3 server, and the workers' hashing of what they name (the
Spark job around it is tests/test_backfill.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import DeeperError
from pipeline.spark import sources, tasks
from tests.local_s3_server import local_s3

BUCKET = "lake"


def _tree(root: Path) -> Path:
    for name, data in {"cats/a.jpg": b"a", "cats/.hidden.jpg": b"h", "dogs/b.PNG": b"b", "notes.txt": b"n",
                       "c.jpeg": b"c"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_a_folder_lists_photos_by_absolute_path_labels_only_when_asked(tmp_path):
    root = _tree(tmp_path / "photos")
    listing = sources.list_photos(str(root))
    assert listing.what == "folder"
    assert listing.photos.column("source").to_pylist() == [str(root / "c.jpeg"), str(root / "cats/a.jpg"),
                                                           str(root / "dogs/b.PNG")]
    assert listing.photos.column("label").to_pylist() == [None, None, None]
    labelled = sources.list_photos(str(root), labels_from_folders=True)
    assert labelled.photos.column("label").to_pylist() == [None, "cats", "dogs"]


def test_a_glob_takes_what_it_matches(tmp_path, monkeypatch):
    root = _tree(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    listing = sources.list_photos("photos/**/*.jpg")
    assert listing.what == "glob"
    assert listing.photos.column("source").to_pylist() == [str(root / "cats/a.jpg")]
    with pytest.raises(DeeperError, match="no files match"):
        sources.list_photos("photos/**/*.gif")


def test_a_parquet_list_names_photos_by_path_with_labels(tmp_path):
    pq.write_table(pa.table({"path": ["rel/x.jpg", "/abs/y.jpg", "s3://b/z.jpg", None],
                             "label": ["cat", None, "dog", "eel"]}), tmp_path / "list.parquet")
    listing = sources.list_photos(str(tmp_path / "list.parquet"))
    assert listing.photos.column("source").to_pylist() == [str(Path("rel/x.jpg").absolute()), "/abs/y.jpg",
                                                           "s3://b/z.jpg"]
    assert listing.photos.column("label").to_pylist() == ["cat", None, "dog"]
    pq.write_table(pa.table({"file": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DeeperError, match="column named path or source or location"):
        sources.list_photos(str(tmp_path / "bad.parquet"))


def test_a_missing_source_fails_before_spark(tmp_path):
    with pytest.raises(DeeperError, match="no such file or directory"):
        sources.list_photos(str(tmp_path / "nowhere"))


@pytest.fixture
def s3_lake(tmp_path, monkeypatch):
    pytest.importorskip("localbucket")
    root = tmp_path / "s3"
    _tree(root / BUCKET / "photos")
    with local_s3(root, tmp_path / "local_s3.log") as endpoint:
        for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
        monkeypatch.setenv("AWS_REGION", "eu-west-1")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield f"s3://{BUCKET}/photos"


def test_an_s3_prefix_is_listed_and_its_photos_hashed_by_the_workers_code(s3_lake):
    listing = sources.list_photos(s3_lake, labels_from_folders=True)
    assert listing.what == "s3 prefix"
    names = listing.photos.column("source").to_pylist()
    assert names == [f"{s3_lake}/c.jpeg", f"{s3_lake}/cats/a.jpg", f"{s3_lake}/dogs/b.PNG"]
    assert listing.photos.column("label").to_pylist() == [None, "cats", "dogs"]
    batch = pa.RecordBatch.from_pydict({"source": names + [f"{s3_lake}/gone.jpg"], "label": [None] * 4})
    rows = list(tasks.read_photos(iter([batch])))
    assert [r[3] for r in rows[:3]] == [hashlib.sha256(d).hexdigest() for d in (b"c", b"a", b"b")]
    assert [r[2] for r in rows[:3]] == [b"c", b"a", b"b"]  # the bytes the model gets: read once
    assert rows[3][3] is None and rows[3][4][0] == "unreadable" and rows[3][4][1]
    with pytest.raises(DeeperError, match="no photos under"):
        sources.list_photos(f"s3://{BUCKET}/empty")


def test_known_digests_skip_a_photo_by_its_bytes_before_the_model():
    """The featurize pass looks each photo's sha256 up in sorted digests (a binary search); ids
    that are no sha256 (other writers' keys) are left out, never matched."""
    ids = [hashlib.sha256(d).hexdigest() for d in (b"a", b"b", b"c")]
    present = tasks.digests([ids[2], ids[0], ids[0], "not-a-sha256", None])
    known = tasks.Known(present, tasks.digests([ids[1]]), tasks.digests([]))
    assert len(present) == 2
    assert [known.skipped(bytes.fromhex(i)) for i in ids] == [tasks.PRESENT, tasks.REJECTED_BEFORE, tasks.PRESENT]
    assert known.skipped(hashlib.sha256(b"d").digest()) is None
    assert tasks.Known(*(tasks.digests([]),) * 3).skipped(hashlib.sha256(b"a").digest()) is None
