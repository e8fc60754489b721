"""``deeper demo``: the whole streaming pipeline on the bundled example photos, start to finish.

1. a broker: the one ``KAFKA_BOOTSTRAP_SERVERS`` names, or a local Tansu started (and stopped)
   here on a free loopback port;
2. train a classifier on ``examples/train`` (labels = folder names) into the registry, and keep
   those training features in the feature table the stream writes to (an Apache Iceberg table in
   the embedded catalog under the data dir; ``DEEPER_SINK=parquet``: Parquet next to the
   stream's parts), so retraining needs no network run;
3. start the featurizer and the scorer as separate processes, as they run in production;
4. produce the held-out ``examples/test`` photos to the images topic;
5. print each label as it arrives on the labels topic (what a downstream system sees);
6. review: the review queue's first labels (unknown, then least confident) get corrections, here from the known answers
   (``examples/test_labels.csv``), written to the corrections CSV ``deeper ui`` keeps;
7. retrain from the table's current snapshot plus those corrections, exactly as ``deeper ui``'s
   Retrain button does, which registers a new current version (and tags the snapshot);
8. produce one reviewed photo again: the running scorer labels it with the new version,
   without a restart;
9. stop everything cleanly, leaving the feature table, the registry and an HTML report on disk,
   and print how to read the table with pyiceberg or DuckDB.

``--batch`` runs the same train/predict/report without Kafka (and without the review round).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.config import EXAMPLES_VARIABLE, Settings, examples_dir
from pipeline.errors import DeeperError

STEPS = 9
#: How many labels from the head of the review queue the review round corrects.
REVIEWED = 3
#: Where the demo keeps the training photos' features with the Parquet sink, under the stream's root.
TRAINING_FEATURES = "examples-train.parquet"


def _say(message: str) -> None:
    print(message, flush=True)


def _step(n: int, message: str) -> None:
    _say(f"[{n}/{STEPS}] {message}")


@contextmanager
def _broker(settings: Settings, data_dir: Path) -> Iterator[Settings]:
    """Use the configured broker, or run a local one for the demo's duration."""
    if "KAFKA_BOOTSTRAP_SERVERS" in os.environ:
        _step(1, f"using the broker at {settings.bootstrap_servers}")
        yield settings
        return
    from pipeline.app.broker import local as broker

    state = data_dir / "broker"
    info = broker.start(state, port=broker.free_port())
    _step(1, f"started a local broker (Tansu, in memory) at {info.bootstrap_servers}, pid {info.pid}")
    try:
        yield Settings.from_env(bootstrap_servers=info.bootstrap_servers, data_dir=settings.data_dir,
                                registry_dir=settings.registry_dir, cache_dir=settings.cache_dir)
    finally:
        broker.stop(state)
        _say("stopped the local broker")


def _train(settings: Settings, examples: Path, model: str, keep_features: bool = False):
    """Train on ``examples/train`` (:func:`pipeline.learning.train_photos.train_from_photos`); with
    ``keep_features`` the training rows are also stored where the stream stores its rows."""
    from pipeline.model.featurize import default_cache
    from pipeline.model.nets.factory import load_backbone
    from pipeline.learning.registry import Registry
    from pipeline.learning.train_photos import train_from_photos
    from pipeline.learning.training import DEFAULT_SPEC

    backbone = load_backbone(model, cache_dir=settings.cache_dir, announce=_say, precision=settings.precision)
    trained = train_from_photos(examples / "train", backbone, Registry(settings.registry_dir),
                                cache=default_cache(settings.cache_dir), on_failures=_report_failures,
                                unknown_label=settings.unknown_label)
    outcome = trained.outcome
    _say(f"trained {DEFAULT_SPEC.describe()} on {outcome.n_images} photos ({', '.join(outcome.classes)}): "
         f"cross-validated accuracy {outcome.cv.accuracy:.0%} ({outcome.cv.method}), "
         f"'unknown' below {outcome.unknown_threshold:.0%} confidence or beyond distance "
         f"{outcome.novelty_threshold:.2f} from every training photo; model {outcome.version}")
    if keep_features:
        _say(f"      their features: {_keep(settings, trained.features.rows, trained.features.meta)}")
    return backbone, outcome.version


def _keep(settings: Settings, rows, meta) -> str:
    """Store the training rows with the stream's (one ``featurize`` snapshot of the table)."""
    if settings.sink_kind == "table":
        from pipeline.storage import table as tables

        table, snapshot = tables.append_rows(settings, meta, rows, writer="featurize")
        return f"table {'.'.join(table.name())}, snapshot {snapshot.snapshot_id}"
    from pipeline.storage import join
    from pipeline.storage.parquet_writer import write_features

    return str(write_features(rows, meta, join(settings.features_location(), TRAINING_FEATURES)))


def _report_failures(failures) -> None:
    for f in failures:
        _say(f"      skipped {f.record.source}: {f.reason}")


def _spawn(name: str, args: list[str], settings: Settings, logs: Path) -> subprocess.Popen:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "DEEPER_DATA_DIR": settings.data_dir,
           "DEEPER_REGISTRY": settings.registry_dir, "DEEPER_CACHE_DIR": settings.cache_dir,
           "PYTHONUNBUFFERED": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", name, *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen, name: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _say(f"stopped the {name} (exit {process.returncode})")


def _expected(examples: Path) -> dict[str, str]:
    """The true class of each test photo, by file name (``examples/test_labels.csv``)."""
    path = examples / "test_labels.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        return {row["file"]: row["label"] for row in csv.DictReader(fh)}


@dataclass
class _Stream:
    """What the streaming demo has running: settings with the real broker, photos by image id."""

    settings: Settings
    sources: dict[str, Path]  # image id -> photo
    truth: dict[str, str]  # file name -> true class
    timeout: float
    logs: Path

    def name(self, image_id: str) -> str:
        return self.sources[image_id].name

    def line(self, record, lead: str = "") -> str:
        """One label as the demo prints it: photo, label, confidence, scores, right or wrong."""
        expected = self.truth.get(self.name(record.image_id))
        mark = "" if expected is None else ("  ✓" if expected == record.label else f"  ✗ (expected {expected})")
        label = record.label + ("" if record.confidence is None else f" {record.confidence:.0%}")
        label += f" ({record.unknown_reason})" if record.unknown_reason else ""
        return f"      {lead + self.name(record.image_id):<16} -> {label:<16} {_scores(record.scores)}{mark}"


def run_demo(examples: Path, settings: Settings, model: str, timeout: float) -> int:
    from pipeline.kafka.kafka_io import ensure_topics
    from pipeline.app.ui import Corrections

    data_dir = Path(settings.data_dir)
    with ExitStack() as stack:
        settings = stack.enter_context(_broker(settings, data_dir))
        _step(2, f"training on {examples / 'train'}")
        backbone, version = _train(settings, examples, model, keep_features=True)
        ensure_topics(settings, {settings.images_topic: 4, settings.features_topic: 4, settings.labels_topic: 4,
                                 settings.dead_letter_topic: 1})
        logs = data_dir / "logs"
        featurizer = _spawn("featurizer", ["--model", backbone.name, "--roll-seconds", "2"], settings, logs)
        stack.callback(_stop, featurizer, "featurizer")
        scorer = _spawn("scorer", [], settings, logs)
        stack.callback(_stop, scorer, "scorer")
        _step(3, f"featurizer (pid {featurizer.pid}) and scorer (pid {scorer.pid}) running; logs in {logs}")
        stream = _Stream(settings, _produce(settings, examples), _expected(examples), timeout, logs)
        labels = _labels(stream, version, featurizer, scorer)
        corrections = Corrections(data_dir / "corrections.csv")  # the file `deeper ui` keeps
        reviewed = _review(stream, labels, corrections)
        if reviewed:
            _switched(stream, reviewed[0], labels[reviewed[0]], _retrain(stream, reviewed, corrections))
    _write_report(settings, version, [(str(stream.sources[i]), i, r) for i, r in labels.items()])
    _summarize(settings)
    return 0


def _produce(settings: Settings, examples: Path) -> dict[str, Path]:
    """Send the held-out photos; their image ids (what the labels will carry) -> paths."""
    from pipeline.model.photos import find_photos
    from producers.produce import ImageProducer, produce_paths

    photos = find_photos([examples / "test"])
    producer = ImageProducer(settings)
    try:
        summary = produce_paths(producer, ((p.path, None) for p in photos), progress=False)
    finally:
        producer.close()
    _step(4, summary.line())
    if summary.failed:
        raise DeeperError(f"could not produce: {summary.failed}")
    return {_id(p.path): p.path for p in photos}


def _labels(stream: _Stream, version: str, *processes: subprocess.Popen) -> dict:
    """Print each label of ``version`` as it arrives; all of them, or a clear error."""
    from consumers.labels import follow_labels

    _step(5, f"labels arriving on topic {stream.settings.labels_topic} (label, confidence, SVM scores):")
    labels = follow_labels(stream.settings, stream.sources.keys(), stream.timeout,
                           lambda record: _say(stream.line(record)), version=version)
    _check_processes(*processes)
    if stream.truth:
        right = sum(stream.truth.get(stream.name(i)) == r.label for i, r in labels.items())
        _say(f"      {right}/{len(labels)} match examples/test_labels.csv")
    missing = len(stream.sources) - len(labels)
    if missing:
        raise DeeperError(f"{missing} photos got no label within {stream.timeout:.0f} s; see {stream.logs}")
    return labels


def _review(stream: _Stream, labels: dict, corrections) -> list[str]:
    """Correct the head of ``deeper ui``'s review queue (unknown, then least confident) from the known answers."""
    from pipeline.app.ui import confidence_of, review_order

    queue = sorted(labels, key=lambda i: review_order(labels[i]))
    reviewed = [i for i in queue if stream.name(i) in stream.truth][:REVIEWED]
    if not reviewed:
        _step(6, "review skipped: no known answers to correct with (the examples folder has no "
                 "test_labels.csv naming its test photos)")
        return []
    _step(6, f"review: the first {len(reviewed)} labels of the review queue (unknown, then least confident), "
             f"corrected from examples/test_labels.csv (as a reviewer would in `deeper ui`):")
    for image_id in reviewed:
        record, truth = labels[image_id], stream.truth[stream.name(image_id)]
        corrections.set(image_id, truth)
        verdict = "confirmed" if truth == record.label else "corrected"
        _say(f"      {stream.name(image_id):<16} {record.label} {confidence_of(record):.0%} -> {truth} ({verdict})")
    _say(f"      corrections: {corrections.path}")
    return reviewed


def _retrain(stream: _Stream, reviewed: list[str], corrections) -> str:
    """What ``deeper ui``'s Retrain runs: stored features + the corrections -> a new current version."""
    from pipeline.app.ui import Retrainer

    _wait_for_rows(stream.settings, reviewed, stream.timeout)
    retrainer = Retrainer(stream.settings, corrections)
    retrainer.start()
    status = retrainer.status()
    while status["state"] == "running":
        time.sleep(0.2)
        status = retrainer.status()
    if status["state"] != "done":
        raise DeeperError(f"retraining failed: {status['error']}")
    _step(7, f"retrained from {_where(stream.settings, status['version'])} plus {len(corrections.table())} "
             f"corrections: {status['n_train']} labelled photos, cross-validated accuracy "
             f"{status['cv_accuracy']:.0%}; model {status['version']} is now current")
    return status["version"]


def _where(settings: Settings, version: str) -> str:
    """What a version was trained from, in words (its recorded provenance)."""
    from pipeline.learning.registry import Registry

    data = Registry(settings.registry_dir).load(version).metadata.get("data") or {}
    if data.get("source") == "table":
        return f"the feature table {data['table']} (snapshot {data['snapshot_id']}, tagged model-{version})"
    return f"the Parquet features under {settings.features_location()}"


def _wait_for_rows(settings: Settings, image_ids: list[str], timeout: float) -> None:
    """The featurizer stores rows every few seconds: wait until they hold these photos."""
    wanted, deadline = set(image_ids), time.monotonic() + timeout
    while True:
        found = set(_stored_ids(settings)[0])
        if wanted <= found:
            return
        if time.monotonic() > deadline:
            raise DeeperError(f"the featurizer stored no rows for {len(wanted - found)} reviewed photos "
                              f"within {timeout:.0f} s")
        time.sleep(0.5)


def _switched(stream: _Stream, image_id: str, before, version: str) -> None:
    """Produce one reviewed photo again; the running scorer labels it with ``version``."""
    from consumers.labels import follow_labels
    from producers.produce import ImageProducer

    producer = ImageProducer(stream.settings)
    try:
        producer.send_file(stream.sources[image_id])
        summary = producer.flush()
    finally:
        producer.close()
    if summary.failed:
        raise DeeperError(f"could not produce: {summary.failed}")
    after = follow_labels(stream.settings, [image_id], stream.timeout, version=version).get(image_id)
    if after is None:
        raise DeeperError(f"the scorer did not label {stream.name(image_id)} with {version} within "
                          f"{stream.timeout:.0f} s; see {stream.logs}")
    _step(8, f"the running scorer switched to {version} by itself: {stream.name(image_id)} (now a training "
             f"photo, with its reviewed label) sent again")
    _say(stream.line(before, f"{before.classifier_version}: "))
    _say(stream.line(after, f"{after.classifier_version}: "))


def _write_report(settings: Settings, version: str, rows: list[tuple[str, str, object]]) -> Path:
    """The HTML report of the demo's predictions (thumbnails, labels, confidence, scores, CV matrix).

    ``rows``: (source, image id, label record or :class:`pipeline.learning.scoring.Scored`); both carry
    label, scores, probabilities, confidence and unknown.
    """
    from pipeline.learning.registry import Registry
    from pipeline.app.report import Prediction, render

    model = Registry(settings.registry_dir).load(version)
    path = Path(settings.data_dir) / "report.html"
    predictions = [Prediction(source, image_id, r.label, r.scores, None, r.probabilities, r.confidence, r.unknown,
                              r.novelty, r.unknown_reason)
                   for source, image_id, r in sorted(rows, key=lambda row: row[:2])]
    path.write_text(render(predictions, model.metadata, f"go-deeper demo (labels by {version})"), encoding="utf-8")
    _say(f"      report: {path}")
    return path


def run_batch_demo(examples: Path, settings: Settings, model: str) -> int:
    """The batch flavour: train, predict the held-out photos, write the report; no broker."""
    import numpy as np

    from pipeline.model.featurize import default_cache, featurize_photos
    from pipeline.model.photos import find_photos
    from pipeline.learning.registry import Registry
    from pipeline.learning.scoring import score

    backbone, version = _train(settings, examples, model)
    trained = Registry(settings.registry_dir).load(version)
    result = featurize_photos(find_photos([examples / "test"]), backbone, trained.feature_meta.layer,
                              cache=default_cache(settings.cache_dir), progress=False)
    _report_failures(result.failures)
    truth = _expected(examples)
    rows, right = [], 0
    vectors = np.stack([r.vector for r in result.rows])
    for row, scored in zip(result.rows, score(trained.classifier, vectors, settings.unknown_label)):
        right += truth.get(Path(row.source).name) == scored.label
        rows.append((row.source, row.image_id, scored))
        confidence = "" if scored.confidence is None else f" {scored.confidence:.0%}"
        _say(f"      {Path(row.source).name:<16} -> {scored.label + confidence:<16} {_scores(scored.scores)}")
    if truth:
        _say(f"      {right}/{len(rows)} match examples/test_labels.csv")
    _write_report(settings, version, rows)
    return 0


def _id(path: Path) -> str:
    from schemas.messages import image_id

    return image_id(path.read_bytes())


def _scores(scores: dict[str, float]) -> str:
    return " ".join(f"{c}={v:+.2f}" for c, v in scores.items())


def _check_processes(*processes: subprocess.Popen) -> None:
    for p in processes:
        if p.poll() is not None and p.returncode != 0:
            raise DeeperError(f"{' '.join(map(str, p.args[3:4]))} exited with status {p.returncode}")


def _stored_ids(settings: Settings) -> tuple[list[str], int]:
    """The image id of every stored row (the table's current snapshot, or every Parquet file
    under the features root), and how many data files hold them."""
    import pyarrow.parquet as pq

    from pipeline.storage.parquet_reader import feature_files
    from pipeline.storage import open_input

    if settings.sink_kind == "table":
        return _table_ids(settings)
    ids: list[str] = []
    files = feature_files([settings.features_location()])
    for f in files:
        with open_input(f) as source:
            ids.extend(pq.read_table(source, columns=["image_id"]).column("image_id").to_pylist())
    return ids, len(files)


def _table_ids(settings: Settings) -> tuple[list[str], int]:
    from pipeline.storage import table as tables

    name = tables.newest_table(settings)
    if name is None:
        return [], 0
    table = tables.load_named(settings, name)
    snapshot = table.current_snapshot()
    ids = tables.scan(table, snapshot, ["image_id"]).column("image_id").to_pylist()
    return ids, len(list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files()))


def _summarize(settings: Settings) -> None:
    ids, files = _stored_ids(settings)
    again = len(ids) - len(set(ids))
    sent_again = f" (+{again} for the photo sent again; readers keep one per photo)" if again else ""
    if settings.sink_kind != "table":
        _step(STEPS, f"done. Parquet: {len(set(ids))} photos' feature rows{sent_again} in {files} file(s) under "
                     f"{settings.features_location()}; registry: {settings.registry_dir}")
        return
    from pipeline.storage import table as tables

    name = tables.newest_table(settings)
    _step(STEPS, f"done. Table {name}: {len(set(ids))} photos' feature rows{sent_again} in {files} data file(s), "
                 f"{tables.describe_catalog(settings)}; registry: {settings.registry_dir}")
    hints = tables.reading_hints(settings, name)
    _say(f"      read it with pyiceberg:\n        {hints['pyiceberg']}")
    _say(f"      or with DuckDB:\n        {hints['duckdb']}")


def cmd_demo(args: argparse.Namespace) -> int:
    if args.examples is None and examples_dir() is None:
        raise DeeperError("the example photos are not part of the installed package: pass --examples DIR "
                          f"(train/<class>/ and test/ folders) or set {EXAMPLES_VARIABLE} to a checkout's examples/")
    examples = Path(args.examples) if args.examples is not None else examples_dir()
    if not (examples / "train").is_dir() or not (examples / "test").is_dir():
        raise DeeperError(f"{examples} needs train/<class>/ and test/ folders of photos")
    settings = Settings.from_env(data_dir=args.data_dir, registry_dir=args.registry)
    if not getattr(args, "verbose", False):  # the demo narrates its steps; the library's info events are noise here
        logging.getLogger("pipeline").setLevel(logging.WARNING)
    started = time.monotonic()
    if args.batch:
        status = run_batch_demo(examples, settings, args.model or settings.model)
    else:
        status = run_demo(examples, settings, args.model or settings.model, args.timeout)
    _say(f"demo finished in {time.monotonic() - started:.0f} s")
    return status


def add_parser(sub) -> None:
    from pipeline.cli_help import from_setting
    from pipeline.model.nets.factory import MODEL_CHOICES

    p = sub.add_parser("demo", help="run the streaming pipeline end to end on the bundled example photos")
    p.add_argument("--examples", default=None,
                   help=f"folder with train/<class>/ and test/ photos (default: ${EXAMPLES_VARIABLE}, else the "
                        "checkout's examples/; they are not part of the installed package)")
    p.add_argument("--data-dir", default=None,
                   help="where the feature table, the registry, logs and the report go " + from_setting("data_dir"))
    p.add_argument("--registry", default=None, metavar="DIR",
                   help="model registry directory (default: $DEEPER_REGISTRY or DATA_DIR/registry)")
    p.add_argument("--model", choices=MODEL_CHOICES, default=None,
                   help="backbone: auto = inception_v1 if its weights can be had, else efficientnet_lite0 "
                        + from_setting("model"))
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for all labels")
    p.add_argument("--batch", action="store_true",
                   help="the batch flavour: train, predict the held-out photos, write the report (no Kafka)")
    p.set_defaults(func=cmd_demo)
