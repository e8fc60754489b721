"""The ``deeper`` command line.

Batch commands (imagenet, featurize, train, predict, report) are implemented here on top of
the library; streaming commands (broker, produce, featurizer, scorer, labels, ui, demo) hand
over to ``producers/``, ``consumers/`` and their ``pipeline`` modules. Any :class:`DeeperError`
becomes one line on stderr and exit status 2, never a traceback; a photo that fails is named
with its reason and the others go on, with exit status 1 (``pipeline.cli_help.EXIT_STATUS``).
Help text is rendered by ``pipeline.cli_help`` so every subcommand shows its defaults the same way.
"""

from __future__ import annotations

from pipeline.model import tf_startup

# Before TensorFlow is imported anywhere: keep its C++ start-up chatter off the user's terminal.
tf_startup.quiet()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.cli_help import EXIT_STATUS, Parser, from_setting, plain
from pipeline.config import Settings
from pipeline.errors import DeeperError, IncompatibleFeatures
from pipeline.model.photos import display_path

log = logging.getLogger("deeper")


# -- shared helpers ---------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        cache_dir=getattr(args, "cache_dir", None),
        registry_dir=getattr(args, "registry", None),
        model=getattr(args, "model", None),
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _backbone(args: argparse.Namespace, name: str | None = None):
    from pipeline.model.nets.factory import load_backbone

    settings = _settings(args)
    precision = None if name else (getattr(args, "precision", None) or settings.precision)
    return load_backbone(name or settings.model, weights=getattr(args, "weights", None),
                         cache_dir=settings.cache_dir, progress=not args.quiet, announce=_say, precision=precision)


def _cache(args: argparse.Namespace):
    from pipeline.model.featurize import default_cache

    return None if getattr(args, "no_cache", False) else default_cache(_settings(args).cache_dir)


def _registry(args: argparse.Namespace):
    from pipeline.learning.registry import Registry

    return Registry(_settings(args).registry_dir)


def _training_options(args: argparse.Namespace) -> dict:
    """What ``deeper train``'s flags say about "unknown", for ``train_and_register``."""
    return {"unknown_threshold": args.unknown_threshold, "novelty_threshold": args.novelty_threshold,
            "unknown_label": _settings(args).unknown_label}


def _report_failures(failures) -> None:
    for f in failures:
        _say(f"skipped {f.record.source}: {f.reason}{': ' + f.detail if f.detail else ''}")


def _photo_status(failures) -> int:
    """Exit status of a command that went through: 1 if any photo failed (see EXIT_STATUS)."""
    return 1 if failures else 0


# -- imagenet ---------------------------------------------------------------------------------
def cmd_imagenet(args: argparse.Namespace) -> int:
    """Top-k ImageNet classes: the 'is the network working at all' check."""
    from pipeline.model.featurize import featurize_photos
    from pipeline.model.photos import find_photos

    photos = find_photos(args.photos)  # a wrong path is found before the model loads
    backbone = _backbone(args)
    result = featurize_photos(photos, backbone, "logits", progress=False)
    _report_failures(result.failures)
    out = []
    for row in result.rows:
        logits = row.vector.astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[: args.top]
        out.append({"source": row.source, "backbone": backbone.name, "weights_digest": backbone.weights_digest,
                    "top": [{"class": backbone.class_names[i], "index": int(i), "probability": round(float(probs[i]), 5)}
                            for i in top]})
    for item in out:
        if args.format == "json":
            print(json.dumps(item))
        else:
            print(item["source"])
            for rank, t in enumerate(item["top"], 1):
                print(f"  {rank}. {t['class']:<30} {t['probability']:.4f}")
    return _photo_status(result.failures)


# -- featurize --------------------------------------------------------------------------------
def cmd_featurize(args: argparse.Namespace) -> int:
    from pipeline.model.featurize import featurize_photos
    from pipeline.model.photos import find_photos

    if args.out and args.table:
        raise DeeperError("give --out FILE (a Parquet file) or --table (the feature table), not both")
    photos = find_photos(args.photos, labels_from_folders=True)
    backbone = _backbone(args)
    result = featurize_photos(photos, backbone, args.layer, args.batch_size, _cache(args), not args.quiet)
    _report_failures(result.failures)
    if not result.rows:
        raise DeeperError("no image could be featurized; nothing written")
    where = _write_featurized(args, result)
    rate = result.computed / result.seconds if result.seconds and result.computed else 0.0
    _say(f"wrote {len(result.rows)} rows ({result.meta.describe()}) to {where}: "
         f"{result.computed} computed ({rate:.1f} img/s), {result.cached} from cache, {len(result.failures)} failed")
    return _photo_status(result.failures)


def _write_featurized(args: argparse.Namespace, result) -> str:
    """A Parquet file (``--out``) or one snapshot appended to the feature table; where, in words."""
    if args.out:
        from pipeline.storage.parquet_writer import write_features

        write_features(result.rows, result.meta, Path(args.out))
        return display_path(args.out)
    from pipeline.storage import table as tables

    settings = _settings(args)
    table, snapshot = tables.append_rows(settings, result.meta, result.rows, writer="featurize")
    return f"table {'.'.join(table.name())} (snapshot {snapshot.snapshot_id}, {tables.describe_catalog(settings)})"


# -- train ------------------------------------------------------------------------------------
def _spec(args: argparse.Namespace):
    from pipeline.learning.classifier import ClassifierSpec
    from pipeline.learning.training import REFERENCE_SPEC

    if args.reference:
        return REFERENCE_SPEC
    return ClassifierSpec(args.classifier, args.normalize, args.C)


def _layer(args: argparse.Namespace) -> str:
    from pipeline.learning.training import REFERENCE_LAYER

    return REFERENCE_LAYER if args.reference else args.layer


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.learning.training import apply_labels, labels_from_csv, train_and_register

    if args.reproduce:
        return _reproduce(args)
    if bool(args.features) == bool(args.dir):
        raise DeeperError("give either a photo directory (deeper train DIR), --features PARQUET.../TABLE "
                          "or --reproduce VERSION")
    table = labels_from_csv(args.labels) if args.labels else None  # a bad CSV is found before any model work
    spec = _spec(args)
    if args.dir:
        return _train_from_dir(args, spec, table)
    if _names_a_table(args.features):
        return _train_from_table(args, spec, table)
    if args.snapshot is not None or args.as_of is not None:
        raise DeeperError("--snapshot and --as-of read a table: give --features NAMESPACE.TABLE")
    ids, sources, labels, vectors, meta = _features_from_parquet(args.features)
    if table:
        labels = apply_labels(ids, sources, labels, table)
    provenance = {"source": "parquet", "paths": [str(p) for p in args.features], "rows": len(ids)}
    outcome = train_and_register(ids, labels, vectors, meta, spec, _registry(args), provenance=provenance,
                                 **_training_options(args))
    _print_training(outcome, spec, meta)
    return 0


def _names_a_table(features: Sequence[str]) -> bool:
    """``--features deeper.features_x``: one argument that is no path, no URI and no file name."""
    from pipeline import storage

    if len(features) != 1:
        return False
    name = features[0]
    return ("." in name and "/" not in name and os.sep not in name and not storage.is_uri(name)
            and not name.endswith(".parquet") and not Path(name).exists())


def _train_from_table(args: argparse.Namespace, spec, labels: dict[str, str] | None) -> int:
    from pipeline.learning.from_table import train_from_table

    settings = _settings(args)
    outcome, read = train_from_table(settings, _registry(args), args.features[0], args.snapshot, args.as_of,
                                     labels, spec, args.unknown_threshold, args.novelty_threshold)
    fs = read.features
    _say(f"read {len(fs)} vectors ({fs.meta.describe()}) from table {read.table} snapshot {read.snapshot_id} "
         f"({read.snapshot_at})" + (f", {fs.duplicates_dropped} repeated image ids dropped"
                                    if fs.duplicates_dropped else ""))
    _print_training(outcome, spec, fs.meta)
    print(f"tagged snapshot {read.snapshot_id} of {read.table} as model-{outcome.version}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from pipeline.learning.from_table import reproduce

    if args.features or args.dir or args.labels:
        raise DeeperError("--reproduce VERSION takes its rows, labels and options from the version; "
                          "give no photos, --features or --labels")
    result = reproduce(_settings(args), _registry(args), args.reproduce)
    same = "the same" if result.same_training_set else "a DIFFERENT"
    print(f"retrained {args.reproduce} from its snapshot: {result.outcome.n_images} images, {same} training set; "
          f"largest difference of any coefficient {result.max_difference:.3g}; saved as {result.outcome.version} "
          "(not made current)")
    return 0 if result.same_training_set and result.max_difference <= REPRODUCE_TOLERANCE else 1


#: ``deeper train --reproduce``: arrays equal within this count as the same model.
REPRODUCE_TOLERANCE = 1e-6


def _train_from_dir(args: argparse.Namespace, spec, table: dict[str, str] | None) -> int:
    from pipeline.model.photos import find_photos
    from pipeline.learning.train_photos import train_from_photos

    photos = find_photos([args.dir], labels_from_folders=True)  # before the model loads
    trained = train_from_photos(photos, _backbone(args), _registry(args), _layer(args), spec, labels=table,
                                cache=_cache(args), batch_size=args.batch_size, progress=not args.quiet,
                                on_failures=_report_failures, **_training_options(args),
                                provenance={"source": "photos", "path": display_path(args.dir)})
    _print_training(trained.outcome, spec, trained.features.meta)
    return _photo_status(trained.features.failures)


def _features_from_parquet(paths: Sequence[str]):
    from pipeline.storage.parquet_reader import read_features

    fs = read_features(paths)
    _say(f"read {len(fs)} vectors ({fs.meta.describe()}) from Parquet"
         + (f", {fs.duplicates_dropped} duplicate rows dropped" if fs.duplicates_dropped else ""))
    return fs.image_ids, fs.sources, fs.labels, fs.vectors, fs.meta


def _print_training(outcome, spec, meta) -> None:
    cv = outcome.cv
    print(f"trained {spec.describe()} on {outcome.n_images} images of {len(outcome.classes)} classes "
          f"({meta.describe()})")
    brier = "" if cv.brier is None else f", Brier score {cv.brier:.3f} (0 is perfect)"
    print(f"cross-validated accuracy: {cv.accuracy:.1%} ({cv.method}){brier}")
    if outcome.unknown_threshold:
        print(f"unknown below {outcome.unknown_threshold:.0%} confidence (unconfident): "
              f"{outcome.cv_false_unknown:.1%} of the training photos would be under cross-validation")
    else:
        print("unconfident: off (no photo is unknown for its confidence)")
    if outcome.novelty_threshold:
        print(f"unknown beyond cosine distance {outcome.novelty_threshold:.3f} from the nearest training photo (novel): "
              f"{outcome.cv_novel:.1%} of the training photos would be, each left out")
    else:
        print("novel: off (no photo is unknown for being unlike the training photos)")
    _print_cost(outcome.cost)
    width = max(len(c) for c in cv.classes) + 2
    print("confusion matrix (rows: true, columns: predicted)")
    print(" " * width + "".join(f"{c:>{width}}" for c in cv.classes))
    for c, row in zip(cv.classes, cv.confusion):
        print(f"{c:<{width}}" + "".join(f"{n:>{width}}" for n in row))
    print(f"saved model {outcome.version} (now current)")


def _print_cost(cost) -> None:
    """What "unknown" costs, next to plain accuracy: the answer to "should I turn it off?"."""
    if cost is None:
        return
    answered = "-" if cost.answered_accuracy is None else f"{cost.answered_accuracy:.1%}"
    print(f"what unknown costs (training photos under cross-validation): answers {cost.coverage:.1%} of them "
          f"(novel {cost.novel:.1%}, unconfident {cost.unconfident:.1%}); accuracy of the answered {answered}, "
          f"plain accuracy (answering all) {cost.accuracy:.1%}")


# -- predict / report -------------------------------------------------------------------------
def _predict(args: argparse.Namespace):
    """Featurize photos with the current model's backbone and layer, then score them."""
    from pipeline.model.featurize import featurize_photos
    from pipeline.model.photos import find_photos
    from pipeline.app.report import Prediction
    from pipeline.learning.scoring import score

    photos = find_photos(args.photos)  # a wrong path is found before the registry and the model load
    registry = _registry(args)
    model = registry.load(args.version) if args.version else registry.load_current()
    backbone = _backbone(args, name=model.feature_meta.qualified_name)  # the precision it was trained in
    result = featurize_photos(photos, backbone, model.feature_meta.layer, args.batch_size, _cache(args),
                              not args.quiet)
    try:
        result.meta.check_compatible(model.feature_meta, what=f"these photos' vectors vs model {model.version}")
    except IncompatibleFeatures as exc:
        raise IncompatibleFeatures(f"{exc}; retrain, or pass the --weights/--precision it was trained with") from None
    vectors = np.stack([r.vector for r in result.rows]) if result.rows else np.zeros((0, model.feature_meta.dim))
    predictions = [Prediction.scored(row.source, row.image_id, scored)
                   for row, scored in zip(result.rows, score(model.classifier, vectors,
                                                             _settings(args).unknown_label))]
    if not model.classifier.calibrated and not args.quiet:
        _say(f"model {model.version} predates calibration: no confidence and no 'unknown'; retrain to get them")
    for f in result.failures:
        predictions.append(Prediction(f.record.source, f.record.image_id, None, {}, f"{f.reason}: {f.detail}"))
    return model, predictions


def cmd_predict(args: argparse.Namespace) -> int:
    model, predictions = _predict(args)
    classes = model.classifier.classes
    threshold, novelty_threshold = model.classifier.unknown_threshold, model.classifier.novelty_threshold

    def _number(value: float | None) -> str:  # CSV: empty when absent (failed photo, uncalibrated model)
        return "" if value is None else f"{value:.6f}"

    if args.format == "json":
        for p in predictions:
            item = {"source": p.source, "image_id": p.image_id, "label": p.label, "scores": p.scores,
                    "probabilities": p.probabilities, "confidence": p.confidence, "unknown": p.unknown,
                    "unknown_reason": p.unknown_reason, "novelty": p.novelty,
                    "unknown_threshold": threshold, "novelty_threshold": novelty_threshold,
                    "model_version": model.version,
                    "backbone": model.feature_meta.backbone, "layer": model.feature_meta.layer,
                    "weights_digest": model.feature_meta.weights_digest}
            if p.error:
                item["error"] = p.error
            print(json.dumps(item))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["source", "image_id", "label", "confidence", "unknown", "unknown_reason", "novelty",
                         *[f"score_{c}" for c in classes], *[f"probability_{c}" for c in classes], "error"])
        for p in predictions:
            probs = p.probabilities or {}
            writer.writerow([p.source, p.image_id, p.label or "", _number(p.confidence), int(p.unknown),
                             p.unknown_reason or "", _number(p.novelty),
                             *[_number(p.scores.get(c)) for c in classes], *[_number(probs.get(c)) for c in classes],
                             p.error or ""])
    else:
        width = max([len(Path(p.source).name) for p in predictions] + [6]) + 2
        print(f"{'photo':<{width}}{'label':<14}{'why':<13}{'confidence':>11}{'novelty':>9}"
              + "".join(f"{c:>12}" for c in classes))
        for p in predictions:
            scores = "".join(f"{p.scores[c]:>+12.3f}" for c in classes) if p.scores else f"  ERROR {p.error}"
            confidence = "-" if p.confidence is None else f"{p.confidence:.0%}"
            novelty = "-" if p.novelty is None else f"{p.novelty:.3f}"
            print(f"{Path(p.source).name:<{width}}{(p.label or '-'):<14}{(p.unknown_reason or ''):<13}"
                  f"{confidence:>11}{novelty:>9}{scores}")
        rules = []
        if threshold:
            rules.append(f"confidence below {threshold:.0%} (unconfident)")
        if novelty_threshold:
            rules.append(f"novelty above {novelty_threshold:.3f} (novel)")
        if rules:
            print(f"(unknown: {' or '.join(rules)}; scores are SVM margins)")
    return _photo_status([p for p in predictions if p.error])


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.app.report import render

    model, predictions = _predict(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(predictions, model.metadata), encoding="utf-8")
    _say(f"wrote {out} ({len(predictions)} photos, model {model.version})")
    return _photo_status([p for p in predictions if p.error])


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.learning.from_table import describe

    registry = _registry(args)
    current = registry.current_version()
    for version in registry.versions():
        try:
            m = registry.load(version).metadata
            cv = m.get("cv", {})
            print(f"{'*' if version == current else ' '} {version}  {m['created_at']}  {m['features']['backbone']}/"
                  f"{m['features']['layer']}  {m['classifier']['kind']}  classes={','.join(m['classes'])}  "
                  f"cv={cv.get('accuracy', float('nan')):.3f}")
            print(f"    {describe(m.get('data'))}")
        except DeeperError as exc:
            print(f"  {version}  BROKEN: {exc}")
    _say_if_stream_lags_behind(registry, _settings(args))
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from pipeline.storage import table as tables
    from pipeline.storage import table_maintenance as maintenance

    settings = _settings(args)
    names = args.table or tables.feature_tables(settings)
    if not names:
        _say(f"no feature tables in {tables.describe_catalog(settings)}")
        return 0
    max_age_ms = None if args.keep_hours is None else int(args.keep_hours * 3600 * 1000)
    for name in names:
        table = tables.load_named(settings, name)
        done = maintenance.compact(table, int(args.target_mb * 1024 * 1024))
        table = table.refresh()
        before = len(table.metadata.snapshots)
        table = maintenance.expire_snapshots(table, max_age_ms)
        removed = maintenance.remove_unreferenced_files(table, args.orphan_hours * 3600)
        print(f"{name}: data files {done.files_before} -> {done.files_after} ({done.rewritten} rewritten into "
              f"{done.written}); snapshots {before} -> {len(table.metadata.snapshots)}; unreferenced files "
              f"removed: {'not listable here' if removed is None else len(removed)}"
              + "".join(f"\n  skipped: {s}" for s in done.skipped))
    return 0


def _newest_table_identity(settings: Settings):
    """The identity of the feature table the newest commit went to (None: no table yet)."""
    from pipeline.storage import table as tables

    name = tables.newest_table(settings)
    return tables.identity(tables.load_named(settings, name)) if name else None


def _say_if_stream_lags_behind(registry, settings: Settings) -> None:
    """Say when the newest streamed vectors don't fit the current model, and what happens then."""
    from pipeline import storage
    from pipeline.storage.parquet_reader import read_meta

    try:
        current = registry.load_current()
        if settings.sink_kind == "table":
            made = _newest_table_identity(settings)
        else:
            newest = max(storage.list_parquet(settings.features_location()), default=None,
                         key=lambda loc: (0.0 if storage.is_uri(loc) else Path(loc).stat().st_mtime, str(loc)))
            made = read_meta(newest) if newest is not None else None
    except (DeeperError, OSError):
        return
    if made is None or not made.differences(current.feature_meta):
        return
    print(f"\nThe stream's newest vectors ({made.describe()}) don't fit the current model {current.version} "
          f"({current.feature_meta.describe()}).\nThe scorer labels them with the newest model that fits them "
          "(logged as an ERROR, metric deeper_fallback_scored_total); a featurizer started without --layer "
          "switches layers by itself, another backbone or precision needs a featurizer restart.")


# -- parser -----------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    from pipeline.model.nets.factory import MODEL_CHOICES, PRECISION_CHOICES

    if model:
        p.add_argument("--model", choices=MODEL_CHOICES, default=None,
                       help="backbone: auto = inception_v1 if its weights can be had, else efficientnet_lite0 "
                            + from_setting("model"))
        p.add_argument("--weights", metavar="FILE",
                       help="explicit weights file (e.g. inception_v1_2016_08_28.tar.gz) instead of the cache "
                            "or a download")
        p.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                       help="compute precision; bf16 is ~1.7x faster on AVX512_BF16 CPUs, see the README "
                            + from_setting("precision"))
        p.add_argument("--batch-size", type=int, default=32, metavar="N", help="photos per model run")
        p.add_argument("--no-cache", action="store_true", help="don't read or write the feature cache")
    p.add_argument("--cache-dir", metavar="DIR", help="weights and feature cache " + from_setting("cache_dir"))
    p.add_argument("--registry", metavar="DIR",
                   help="model registry directory (default: $DEEPER_REGISTRY or $DEEPER_DATA_DIR/registry)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("go-deeper")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


DESCRIPTION = ("Label photos with a frozen ImageNet network and a small classifier trained on a few "
               "labelled photos: in batch (imagenet, featurize, train, predict, report, models) or as a "
               "Kafka stream (broker, produce, featurizer, scorer, labels, ui, demo).")
#: Subcommands that take photos: their --help documents the exit status.
PHOTO_COMMANDS = ("imagenet", "featurize", "train", "predict", "report", "backfill")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability between 0 and 1")
    return value


def _distance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a cosine distance between 0 and 2")
    return value


def _timestamp(text: str):
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time (e.g. 2026-12-01T09:00Z)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.learning.classifier import KINDS, MAX_FALSE_UNKNOWN, NORMALIZATIONS

    parser = Parser(prog="deeper", description=textwrap.fill(DESCRIPTION, 78),
                    epilog=EXIT_STATUS + "\n\nSettings come from the environment (KAFKA_BOOTSTRAP_SERVERS, "
                           "DEEPER_*): see the README.\nRun 'deeper COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}",
                        help="print the installed go-deeper version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (Kafka clients included)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("imagenet", help="top-k ImageNet classes of photos (is the network working?)")
    p.add_argument("photos", nargs="+", help="photo files or directories")
    p.add_argument("--top", type=int, default=5, metavar="K", help="classes to show per photo")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    _common(p)
    p.set_defaults(func=cmd_imagenet)

    p = sub.add_parser("featurize", help="photos -> feature vectors in the feature table (or a Parquet file)")
    p.add_argument("photos", nargs="+", help="photo files or directories (sub-folder name = label)")
    p.add_argument("--out", metavar="FILE", help="write a Parquet file instead of appending to the table")
    p.add_argument("--table", action="store_true",
                   help="append to the feature table (the default without --out): $DEEPER_TABLE in $DEEPER_CATALOG")
    p.add_argument("--layer", default=None,
                   help="logits, prelogits, or any end point name (default: training's default, prelogits)")
    _common(p)
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("train", help="train a classifier (labels = sub-folder names) and register it")
    p.add_argument("dir", nargs="?", help="photo directory with one sub-folder per class")
    p.add_argument("--features", nargs="+", metavar="PARQUET|TABLE",
                   help="train from Parquet feature files/directories, or from a feature table "
                        "(NAMESPACE.TABLE, e.g. deeper.features_efficientnet_lite0_fp32_prelogits), instead (no "
                        "network run)")
    p.add_argument("--snapshot", type=int, default=None, metavar="ID", help="with a table: read this snapshot")
    p.add_argument("--as-of", type=_timestamp, default=None, metavar="TIME",
                   help="with a table: read the snapshot current at TIME (ISO 8601, e.g. 2026-12-01T09:00Z)")
    p.add_argument("--reproduce", metavar="VERSION",
                   help="train VERSION again from exactly its table snapshot, labels and options; prints "
                        "how far the new coefficients are from the original (exit 1 over 1e-6)")
    p.add_argument("--labels", metavar="CSV",
                   help="CSV of (image id, source path or file name; label) overriding stored labels")
    p.add_argument("--layer", default=None,
                   help="end point to train on, or several joined by + whose features are concatenated "
                        "(e.g. prelogits+block_14+block_15) (default: prelogits, see the README)")
    p.add_argument("--classifier", choices=KINDS, default=None, help="classifier kind (default: linear-svm)")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default=None,
                   help="vector normalisation before the classifier (default: none)")
    p.add_argument("--C", type=float, default=None, help="inverse regularisation strength (default: 1.0)")
    p.add_argument("--reference", action="store_true",
                   help="the reference recipe exactly: linear SVM on the logits, no normalisation")
    p.add_argument("--unknown-threshold", type=_probability, default=None, metavar="P",
                   help="label a photo with $DEEPER_UNKNOWN_LABEL (default: unknown) when its top calibrated "
                        "probability is below P; 0 turns it off (default: chosen by cross-validation, the "
                        f"highest that marks at most {MAX_FALSE_UNKNOWN:.0%}% of the training photos unknown)")
    p.add_argument("--novelty-threshold", type=_distance, default=None, metavar="D",
                   help="label a photo unknown (novel) when the cosine distance from its vector to the nearest "
                        "training photo's is above D (0..2; 0 turns it off) (default: chosen on the training "
                        "photos, each left out, so that at most "
                        f"{MAX_FALSE_UNKNOWN:.0%}% of new photos of the known classes are novel)")
    _common(p)
    p.set_defaults(func=cmd_train)

    for name, helptext in (("predict", "label photos with the current model"),
                           ("report", "HTML report of predictions, thumbnails and the CV confusion matrix")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("photos", nargs="+", help="photo files or directories")
        # dest stays "version" (read by _predict); --model-version because `--version` is the program's
        p.add_argument("--model-version", dest="version", metavar="VERSION",
                       help="registry version to use, e.g. v0003 (default: the current one)")
        if name == "predict":
            p.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
            p.set_defaults(func=cmd_predict)
        else:
            p.add_argument("--out", default="deeper-report.html", metavar="FILE", help="HTML file to write")
            p.set_defaults(func=cmd_report)
        _common(p)

    p = sub.add_parser("models", help="list the registry's versions and the data each was trained on")
    _common(p, model=False)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("compact", help="feature tables: rewrite small data files, expire old snapshots, "
                                       "remove unreferenced files")
    p.add_argument("--table", action="append", metavar="NAME",
                   help="a table to compact (repeatable; default: every feature table of $DEEPER_CATALOG)")
    p.add_argument("--target-mb", type=float, default=128.0, metavar="MB",
                   help="size of the files small ones are rewritten into")
    p.add_argument("--keep-hours", type=float, default=None, metavar="H",
                   help="expire snapshots older than this (default: the table's history.expire.max-snapshot-age-ms"
                        ", 1 h for tables made here); tagged snapshots (model-vNNNN) are always kept")
    p.add_argument("--orphan-hours", type=float, default=72.0, metavar="H",
                   help="remove files no kept snapshot names only when older than this (Iceberg's default: "
                        "commits in flight, and a featurizer waiting for its catalog, are never touched)")
    _common(p, model=False)
    p.set_defaults(func=cmd_compact)

    _add_streaming(sub)
    _describe_subcommands(sub)
    return parser


def _describe_subcommands(sub, top: bool = True) -> None:
    """Each (sub)command's --help opens with its one-line summary; photo commands list exit statuses."""
    for action in sub._choices_actions:  # argparse keeps the summaries only here
        p = sub.choices[action.dest]
        p.description = plain(p.description or action.help or "")
        if top and action.dest in PHOTO_COMMANDS:
            p.epilog = EXIT_STATUS
        for inner in p._actions:
            if isinstance(inner, argparse._SubParsersAction):
                _describe_subcommands(inner, top=False)


def _add_streaming(sub) -> None:
    """Streaming subcommands register themselves from their own modules."""
    from importlib import import_module

    for module in STREAMING_MODULES:
        try:
            import_module(module).add_parser(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


STREAMING_MODULES: tuple[str, ...] = (
    "pipeline.app.broker.cli",
    "producers.produce",
    "consumers.featurizer",
    "consumers.scorer",
    "consumers.labels",
    "pipeline.app.ui",
    "pipeline.app.demo",
    "pipeline.app.backfill_cli",
)


def _apply_defaults(args: argparse.Namespace) -> None:
    """Layer/classifier defaults live in one place (pipeline.learning.training)."""
    from pipeline.learning.training import DEFAULT_LAYER, DEFAULT_SPEC

    if args.command in ("train", "featurize"):
        args.layer = args.layer or DEFAULT_LAYER
    if args.command == "train":
        args.classifier = args.classifier or DEFAULT_SPEC.kind
        args.normalize = args.normalize or DEFAULT_SPEC.normalize
        args.C = DEFAULT_SPEC.C if args.C is None else args.C


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    logging.getLogger("kafka").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    _apply_defaults(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DeeperError as exc:
        _say(f"deeper {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
