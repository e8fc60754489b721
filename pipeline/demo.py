"""``deeper demo``: the whole streaming pipeline on the bundled example photos, start to finish.

1. a broker: the one ``KAFKA_BOOTSTRAP_SERVERS`` names, or a local Tansu started (and stopped)
   here on a free loopback port;
2. train a classifier on ``examples/train`` (labels = folder names) into the registry;
3. start the featurizer and the scorer as separate processes, as they run in production;
4. produce the held-out ``examples/test`` photos to the images topic;
5. print each label as it arrives on the labels topic (what a downstream system sees);
6. stop everything cleanly, leaving Parquet features, the registry and an HTML report on disk.

``--batch`` runs the same train/predict/report without Kafka.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.config import Settings
from pipeline.errors import DeeperError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def _broker(settings: Settings, data_dir: Path) -> Iterator[Settings]:
    """Use the configured broker, or run a local one for the demo's duration."""
    if "KAFKA_BOOTSTRAP_SERVERS" in os.environ:
        _say(f"[1/6] using the broker at {settings.bootstrap_servers}")
        yield settings
        return
    from pipeline import broker

    state = data_dir / "broker"
    info = broker.start(state, port=broker.free_port())
    _say(f"[1/6] started a local broker (Tansu, in memory) at {info.bootstrap_servers}, pid {info.pid}")
    try:
        yield Settings.from_env(bootstrap_servers=info.bootstrap_servers, data_dir=settings.data_dir,
                                registry_dir=settings.registry_dir, cache_dir=settings.cache_dir)
    finally:
        broker.stop(state)
        _say("stopped the local broker")


def _train(settings: Settings, examples: Path, model: str, step: str = "[2/6] ") -> tuple[str, str]:
    from pipeline.featurize import default_cache, featurize_photos
    from pipeline.nets.factory import load_backbone
    from pipeline.photos import find_photos
    from pipeline.registry import Registry
    from pipeline.training import DEFAULT_LAYER, DEFAULT_SPEC, train_and_register

    import numpy as np

    backbone = load_backbone(model, cache_dir=settings.cache_dir, announce=_say)
    result = featurize_photos(find_photos([examples / "train"], labels_from_folders=True), backbone,
                              DEFAULT_LAYER, cache=default_cache(settings.cache_dir))
    rows = result.rows
    outcome = train_and_register([r.image_id for r in rows], [r.label for r in rows],
                                 np.stack([r.vector for r in rows]), result.meta, DEFAULT_SPEC,
                                 Registry(settings.registry_dir))
    _say(f"{step}trained {DEFAULT_SPEC.describe()} on {outcome.n_images} photos ({', '.join(outcome.classes)}): "
         f"cross-validated accuracy {outcome.cv.accuracy:.0%} ({outcome.cv.method}); model {outcome.version}")
    return backbone.name, outcome.version


def _spawn(name: str, args: list[str], settings: Settings, logs: Path) -> subprocess.Popen:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "DEEPER_DATA_DIR": settings.data_dir,
           "DEEPER_REGISTRY": settings.registry_dir, "DEEPER_CACHE_DIR": settings.cache_dir,
           "PYTHONUNBUFFERED": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", name, *args], env=env, stdout=log,
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
    path = examples / "test_labels.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        return {row["file"]: row["label"] for row in csv.DictReader(fh)}


def run_demo(examples: Path, settings: Settings, model: str, timeout: float) -> int:
    from consumers.labels import follow_labels
    from producers.produce import ImageProducer, produce_paths
    from pipeline.kafka_io import ensure_topics
    from pipeline.photos import find_photos

    data_dir = Path(settings.data_dir)
    with ExitStack() as stack:
        settings = stack.enter_context(_broker(settings, data_dir))
        backbone, version = _train(settings, examples, model)
        ensure_topics(settings, {settings.images_topic: 4, settings.features_topic: 4, settings.labels_topic: 4,
                                 settings.dead_letter_topic: 1})
        logs = data_dir / "logs"
        featurizer = _spawn("featurizer", ["--model", backbone, "--roll-seconds", "5"], settings, logs)
        stack.callback(_stop, featurizer, "featurizer")
        scorer = _spawn("scorer", [], settings, logs)
        stack.callback(_stop, scorer, "scorer")
        _say(f"[3/6] featurizer (pid {featurizer.pid}) and scorer (pid {scorer.pid}) running; logs in {logs}")
        photos = find_photos([examples / "test"])
        producer = ImageProducer(settings)
        summary = produce_paths(producer, ((p.path, None) for p in photos), progress=False)
        producer.close()
        sources = {m: p for m, p in ((_id(p.path), p.path) for p in photos)}
        _say(f"[4/6] {summary.line()}")
        if summary.failed:
            raise DeeperError(f"could not produce: {summary.failed}")
        _say(f"[5/6] labels arriving on topic {settings.labels_topic}:")
        truth = _expected(examples)
        right = 0

        def show(record) -> None:
            nonlocal right
            name = Path(sources[record.image_id]).name
            expected = truth.get(name)
            right += expected == record.label
            mark = "" if expected is None else ("  ✓" if expected == record.label else f"  ✗ (expected {expected})")
            _say(f"      {name:<28} -> {record.label:<10} {_scores(record.scores)}{mark}")

        labels = follow_labels(settings, sources.keys(), timeout, show, version=version)
        _check_processes(featurizer, scorer)
        missing = len(sources) - len(labels)
        if truth:
            _say(f"      {right}/{len(labels)} match examples/test_labels.csv")
        if missing:
            raise DeeperError(f"{missing} photos got no label within {timeout:.0f} s; see {logs}")
    _write_report(settings, version, [(str(sources[i]), i, r.label, r.scores) for i, r in labels.items()])
    _summarize(settings)
    return 0


def _write_report(settings: Settings, version: str, rows: list[tuple[str, str, str | None, dict]]) -> Path:
    """The HTML report of the demo's predictions (thumbnails, labels, scores, CV matrix)."""
    from pipeline.registry import Registry
    from pipeline.report import Prediction, render

    model = Registry(settings.registry_dir).load(version)
    path = Path(settings.data_dir) / "report.html"
    predictions = [Prediction(source, image_id, label, scores) for source, image_id, label, scores in sorted(rows)]
    path.write_text(render(predictions, model.metadata, "go-deeper demo"), encoding="utf-8")
    _say(f"      report: {path}")
    return path


def run_batch_demo(examples: Path, settings: Settings, model: str) -> int:
    """The batch flavour: train, predict the held-out photos, write the report; no broker."""
    import numpy as np

    from pipeline.featurize import default_cache, featurize_photos
    from pipeline.photos import find_photos
    from pipeline.registry import Registry

    backbone_name, version = _train(settings, examples, model, step="")
    trained = Registry(settings.registry_dir).load(version)
    from pipeline.nets.factory import load_backbone

    backbone = load_backbone(backbone_name, cache_dir=settings.cache_dir)
    result = featurize_photos(find_photos([examples / "test"]), backbone, trained.feature_meta.layer,
                              cache=default_cache(settings.cache_dir), progress=False)
    scores = trained.classifier.decision(np.stack([r.vector for r in result.rows]))
    classes = trained.classifier.classes
    truth = _expected(examples)
    rows, right = [], 0
    for row, s in zip(result.rows, scores):
        label = classes[int(np.argmax(s))]
        right += truth.get(Path(row.source).name) == label
        rows.append((row.source, row.image_id, label, {c: float(v) for c, v in zip(classes, s)}))
        _say(f"      {Path(row.source).name:<28} -> {label:<10} {_scores(rows[-1][3])}")
    if truth:
        _say(f"      {right}/{len(rows)} match examples/test_labels.csv")
    _write_report(settings, version, rows)
    return 0


def _id(path: Path) -> str:
    from pipeline.decode import image_id

    return image_id(path.read_bytes())


def _scores(scores: dict[str, float]) -> str:
    return " ".join(f"{c}={v:+.2f}" for c, v in scores.items())


def _check_processes(*processes: subprocess.Popen) -> None:
    for p in processes:
        if p.poll() is not None and p.returncode != 0:
            raise DeeperError(f"{' '.join(map(str, p.args[3:4]))} exited with status {p.returncode}")


def _summarize(settings: Settings) -> None:
    from pipeline.parquet_reader import feature_files, read_features

    root = Path(settings.data_dir) / "features"
    files = feature_files([root]) if root.exists() else []
    rows = len(read_features([root])) if files else 0
    _say(f"[6/6] done. Parquet: {rows} feature rows in {len(files)} file(s) under {root}; "
         f"registry: {settings.registry_dir}")


def cmd_demo(args: argparse.Namespace) -> int:
    examples = Path(args.examples)
    if not (examples / "train").is_dir() or not (examples / "test").is_dir():
        raise DeeperError(f"{examples} needs train/<class>/ and test/ folders of photos")
    settings = Settings.from_env(data_dir=args.data_dir, registry_dir=args.registry)
    started = time.monotonic()
    if args.batch:
        status = run_batch_demo(examples, settings, args.model or settings.model)
    else:
        status = run_demo(examples, settings, args.model or settings.model, args.timeout)
    _say(f"demo finished in {time.monotonic() - started:.0f} s")
    return status


def add_parser(sub) -> None:
    from pipeline.nets.factory import MODEL_CHOICES

    p = sub.add_parser("demo", help="run the streaming pipeline end to end on the bundled example photos")
    p.add_argument("--examples", default=str(EXAMPLES), help="folder with train/<class>/ and test/ photos")
    p.add_argument("--data-dir", default=None, help="where Parquet, the registry and logs go (default $DEEPER_DATA_DIR)")
    p.add_argument("--registry", default=None)
    p.add_argument("--model", choices=MODEL_CHOICES, default=None)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for all labels")
    p.add_argument("--batch", action="store_true",
                   help="the batch flavour: train, predict the held-out photos, write the report (no Kafka)")
    p.set_defaults(func=cmd_demo)
