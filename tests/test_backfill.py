"""``deeper backfill`` on real Spark (local[2]) into real Iceberg tables: the same vectors as
``deeper featurize``, nothing twice on a re-run, rejects instead of silent drops, training from
the backfilled rows. (A real kill half way: tests/test_backfill_kill.py.)"""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.app.cli import main
from pipeline.storage import table
from pipeline.identity import FeatureId
from tests.bad_images import by_name
from tests.spark_helpers import MODEL, SparkEnv, _environment, examples_copy, lake

TABLE = "deeper.bf_examples"


def deeper(*argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of an in-process ``deeper ARGV --model efficientnet_lite0 -q``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*(str(a) for a in argv), "--model", MODEL, "-q"])
    return rc, out.getvalue(), err.getvalue()


def rows_of(settings, name: str) -> pa.Table:
    return table.load_catalog(settings).load_table(name).scan().to_arrow()


def backfill_snapshots(settings, name: str) -> list[dict]:
    snapshots = table.load_catalog(settings).load_table(name).metadata.snapshots
    return [s.summary.additional_properties for s in snapshots]


@pytest.fixture(scope="module")
def backfilled(_spark_session: SparkEnv, tmp_path_factory):
    """The bundled example photos backfilled once into TABLE: (env, photo folder, stdout, stderr)."""
    photos = examples_copy(tmp_path_factory.mktemp("examples") / "examples")
    with pytest.MonkeyPatch.context() as env:
        _environment(env, _spark_session.data_dir, _spark_session.cache_dir)
        rc, out, err = deeper("backfill", photos, "--table", TABLE)
    assert rc == 0, err
    return _spark_session, photos, out, err


def test_backfill_vectors_equal_deeper_featurize(backfilled, spark_env, tmp_path):
    _, photos, out, _ = backfilled
    rc, _, err = deeper("featurize", photos, "--out", tmp_path / "featurize.parquet", "--no-cache")
    assert rc == 0, err
    featurized = pq.read_table(tmp_path / "featurize.parquet")
    backfill = rows_of(spark_env.settings(), TABLE)
    assert backfill.num_rows == featurized.num_rows == 33
    assert sorted(backfill.column("image_id").to_pylist()) == sorted(featurized.column("image_id").to_pylist())
    ours = {i: np.asarray(v, np.float32) for i, v in zip(backfill.column("image_id").to_pylist(),
                                                         backfill.column("vector").to_pylist())}
    cosines, identical = [], 0
    for image_id, vector in zip(featurized.column("image_id").to_pylist(), featurized.column("vector").to_pylist()):
        a, b = np.asarray(vector, np.float32), ours[image_id]
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        identical += int(np.array_equal(a, b))
    print(f"backfill vs featurize, 33 photos: min cosine {min(cosines):.7f}, bit-identical {identical}/33")
    assert min(cosines) >= 0.9999
    # same identity, the network's; sources are absolute paths; the commit says who wrote it
    props = table.load_catalog(spark_env.settings()).load_table(TABLE).properties
    meta = FeatureId.from_parquet_metadata({k.encode(): v.encode() for k, v in props.items()})
    assert meta == FeatureId.from_parquet_metadata(featurized.schema.metadata)
    assert all(Path(s).is_absolute() and Path(s).is_file() for s in backfill.column("source").to_pylist())
    summaries = backfill_snapshots(spark_env.settings(), TABLE)
    assert [s[table.WRITER] for s in summaries] == ["backfill"]
    assert "featurized 33, skipped 0 already present" in out


def test_rerun_adds_nothing_and_skips_before_the_model(backfilled, spark_env):
    _, photos, _, _ = backfilled
    before = len(backfill_snapshots(spark_env.settings(), TABLE))
    rc, out, err = deeper("backfill", photos, "--table", TABLE)
    assert rc == 0, err
    assert "featurized 0, skipped 33 already present" in out
    assert rows_of(spark_env.settings(), TABLE).num_rows == 33
    assert len(backfill_snapshots(spark_env.settings(), TABLE)) == before  # no empty commit either


def test_train_from_backfilled_rows_labels_by_path_or_image_id(backfilled, spark_env, tmp_path):
    """`deeper train --features TABLE --labels CSV` trains on backfilled rows exactly as on the
    same rows in a feature file; the CSV names photos by relative path (a backfill stores absolute
    ones) or by image id."""
    from pipeline.learning.registry import Registry
    from pipeline.storage.parquet_writer import FeatureRow, write_features

    _, photos, _, _ = backfilled
    settings = spark_env.settings()
    rows = rows_of(settings, TABLE)
    by_source = dict(zip(rows.column("source").to_pylist(), rows.column("image_id").to_pylist()))
    labels = tmp_path / "labels.csv"
    lines = ["key,label"]
    for i, path in enumerate(sorted((photos / "train").rglob("*.jpg"))):
        key = by_source[str(path)] if i % 2 else str(path.relative_to(photos.parent))  # examples/train/fish/x.jpg
        lines.append(f"{key},{path.parent.name}")
    labels.write_text("\n".join(lines) + "\n")
    rc, out, err = deeper("train", "--features", TABLE, "--labels", labels)
    assert rc == 0, err
    assert "on 24 images of 3 classes" in out

    meta = FeatureId.from_parquet_metadata({k.encode(): v.encode() for k, v in
                                            table.load_catalog(settings).load_table(TABLE).properties.items()})
    write_features([FeatureRow(r["image_id"], r["source"], r["label"], r["width"], r["height"],
                               np.asarray(r["vector"], np.float32)) for r in rows.to_pylist()],
                   meta, tmp_path / "same-rows.parquet")
    rc, _, err = deeper("train", "--features", tmp_path / "same-rows.parquet", "--labels", labels)
    assert rc == 0, err
    registry = Registry(settings.registry_dir)
    *_, from_table, from_file = registry.versions()
    a, b = registry.load(from_table), registry.load(from_file)
    assert a.metadata["training_set_sha256"] == b.metadata["training_set_sha256"]
    assert np.allclose(a.classifier.arrays["coef"], b.classifier.arrays["coef"], rtol=0, atol=1e-6)


def test_rejects_duplicates_and_a_parquet_list_of_paths(spark_env, tmp_path):
    """A Parquet list naming good photos, a copy of one, two undecodable files and a missing one:
    every photo ends as a row or a reject with its reason, once; a re-run adds no row of either."""
    examples = sorted(Path(__file__).resolve().parent.parent.joinpath("examples", "test").glob("*.jpg"))
    folder = lake(tmp_path / "lake", {"a.jpg": examples[0].read_bytes(), "b.jpg": examples[1].read_bytes(),
                                      "copy-of-a.jpg": examples[0].read_bytes(),
                                      "truncated.jpg": by_name("jpeg_truncated_half").data,
                                      "notes.jpg": by_name("html_text").data})
    listed = [str(folder / n) for n in ("a.jpg", "b.jpg", "copy-of-a.jpg", "truncated.jpg", "notes.jpg")]
    listed.append(str(folder / "gone.jpg"))
    pq.write_table(pa.table({"path": listed}), tmp_path / "paths.parquet")
    name = "deeper.bf_rejects"

    rc, out, err = deeper("backfill", tmp_path / "paths.parquet", "--table", name)
    assert rc == 1, err  # some photos rejected, the others written
    assert "featurized 2, skipped 0 already present + 0 rejected before + 1 duplicate, rejected 3" in out
    assert "truncated 1" in out and "unreadable 1" in out and "unsupported_format 1" in out
    settings = spark_env.settings()
    assert sorted(rows_of(settings, name).column("source").to_pylist()) == [listed[0], listed[1]]
    rejects = rows_of(settings, name + "_rejects").to_pylist()
    assert sorted((r["source"], r["reason"]) for r in rejects) == sorted(
        [(listed[3], "truncated"), (listed[4], "unsupported_format"), (listed[5], "unreadable")])
    assert all(r["detail"] and r["rejected_at"] for r in rejects)
    assert [r["image_id"] is None for r in rejects if r["reason"] == "unreadable"] == [True]

    rc, out, err = deeper("backfill", tmp_path / "paths.parquet", "--table", name)
    assert rc == 1, err  # the missing photo is tried again, and still missing
    assert "featurized 0, skipped 3 already present + 2 rejected before + 0 duplicate, rejected 1" in out
    assert rows_of(settings, name).num_rows == 2
    assert len(rows_of(settings, name + "_rejects")) == 3


def test_a_table_of_another_identity_is_refused_in_one_line(spark_env, tmp_path):
    other = FeatureId("efficientnet_lite0", "ab" * 32, "prelogits", 16, "")
    table.open_table(replace(spark_env.settings(), table="deeper.bf_other"), other)
    photos = lake(tmp_path / "p", {"x.jpg": b"not read: the identity is checked first"})
    rc, out, err = deeper("backfill", photos, "--table", "deeper.bf_other")
    assert rc == 2
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "deeper.bf_other" in lines[0] and "DEEPER_TABLE" in lines[0], err


def test_a_worker_that_cannot_load_the_network_says_why_in_one_line(spark_env, tmp_path):
    photos = lake(tmp_path / "p", {"x.jpg": b"never read"})
    rc, out, err = deeper("backfill", photos, "--table", "deeper.bf_layer", "--layer", "no_such_layer")
    assert rc == 2
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "no_such_layer" in lines[0] and "Traceback" not in err, err


def test_summary_line_counts_by_reason():
    from collections import Counter

    from pipeline.spark.backfill import BackfillSummary

    line = BackfillSummary(featurized=10, skipped_present=3, rejected=Counter(corrupt=2, unreadable=1),
                           spark_startup_s=6.0, elapsed_s=5.0, table="deeper.t").line()
    assert line == ("backfill deeper.t: featurized 10, skipped 3 already present + 0 rejected before + 0 duplicate, "
                    "rejected 3 (corrupt 2, unreadable 1); 5.0 s, 2.0 photos/s, Spark start-up 6.0 s")
