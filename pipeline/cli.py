"""The ``deeper`` command line.

Batch commands (imagenet, featurize, train, predict, report) are implemented here on top of
the library; streaming commands (broker, produce, featurizer, scorer, labels, demo) hand over
to ``producers/`` and ``consumers/``. Any :class:`DeeperError` becomes one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import os

# Before TensorFlow is imported anywhere: keep its C++ start-up chatter off the user's terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.config import Settings
from pipeline.errors import DeeperError, IncompatibleFeatures

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
    from pipeline.nets.factory import load_backbone

    settings = _settings(args)
    precision = None if name else (getattr(args, "precision", None) or settings.precision)
    return load_backbone(name or settings.model, weights=getattr(args, "weights", None),
                         cache_dir=settings.cache_dir, progress=not args.quiet, announce=_say, precision=precision)


def _cache(args: argparse.Namespace):
    from pipeline.featurize import default_cache

    return None if getattr(args, "no_cache", False) else default_cache(_settings(args).cache_dir)


def _registry(args: argparse.Namespace):
    from pipeline.registry import Registry

    return Registry(_settings(args).registry_dir)


def _report_failures(failures) -> None:
    for f in failures:
        _say(f"skipped {f.record.source}: {f.reason}{': ' + f.detail if f.detail else ''}")


# -- imagenet ---------------------------------------------------------------------------------
def cmd_imagenet(args: argparse.Namespace) -> int:
    """Top-k ImageNet classes: the 'is the network working at all' check."""
    from pipeline.featurize import featurize_photos
    from pipeline.photos import find_photos

    backbone = _backbone(args)
    result = featurize_photos(find_photos(args.photos), backbone, "logits", progress=False)
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
    return 1 if result.failures and not result.rows else 0


# -- featurize --------------------------------------------------------------------------------
def cmd_featurize(args: argparse.Namespace) -> int:
    from pipeline.featurize import featurize_photos
    from pipeline.parquet_writer import write_features
    from pipeline.photos import find_photos

    photos = find_photos(args.photos, labels_from_folders=True)
    backbone = _backbone(args)
    result = featurize_photos(photos, backbone, args.layer, args.batch_size, _cache(args), not args.quiet)
    _report_failures(result.failures)
    if not result.rows:
        raise DeeperError("no image could be featurized; nothing written")
    write_features(result.rows, result.meta, Path(args.out))
    rate = result.computed / result.seconds if result.seconds and result.computed else 0.0
    _say(f"wrote {len(result.rows)} rows ({result.meta.describe()}) to {args.out}: "
         f"{result.computed} computed ({rate:.1f} img/s), {result.cached} from cache, {len(result.failures)} failed")
    return 0


# -- train ------------------------------------------------------------------------------------
def _spec(args: argparse.Namespace):
    from pipeline.classifier import ClassifierSpec
    from pipeline.training import REFERENCE_SPEC

    if args.reference:
        return REFERENCE_SPEC
    return ClassifierSpec(args.classifier, args.normalize, args.C)


def _layer(args: argparse.Namespace) -> str:
    from pipeline.training import REFERENCE_LAYER

    return REFERENCE_LAYER if args.reference else args.layer


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.training import apply_labels, labels_from_csv, train_and_register

    if bool(args.features) == bool(args.dir):
        raise DeeperError("give either a photo directory (deeper train DIR) or --features PARQUET...")
    if args.features:
        ids, sources, labels, vectors, meta = _features_from_parquet(args.features)
    else:
        ids, sources, labels, vectors, meta = _features_from_dir(args)
    if args.labels:
        labels = apply_labels(ids, sources, labels, labels_from_csv(args.labels))
    spec = _spec(args)
    outcome = train_and_register(ids, labels, vectors, meta, spec, _registry(args))
    _print_training(outcome, spec, meta)
    return 0


def _features_from_parquet(paths: Sequence[str]):
    from pipeline.parquet_reader import read_features

    fs = read_features(paths)
    _say(f"read {len(fs)} vectors ({fs.meta.describe()}) from Parquet"
         + (f", {fs.duplicates_dropped} duplicate rows dropped" if fs.duplicates_dropped else ""))
    return fs.image_ids, fs.sources, fs.labels, fs.vectors, fs.meta


def _features_from_dir(args: argparse.Namespace):
    from pipeline.featurize import featurize_photos
    from pipeline.photos import find_photos

    photos = find_photos([args.dir], labels_from_folders=True)
    backbone = _backbone(args)
    result = featurize_photos(photos, backbone, _layer(args), args.batch_size, _cache(args), not args.quiet)
    _report_failures(result.failures)
    rows = result.rows
    vectors = np.stack([r.vector for r in rows]) if rows else np.zeros((0, result.meta.dim), np.float32)
    return [r.image_id for r in rows], [r.source for r in rows], [r.label for r in rows], vectors, result.meta


def _print_training(outcome, spec, meta) -> None:
    cv = outcome.cv
    print(f"trained {spec.describe()} on {outcome.n_images} images of {len(outcome.classes)} classes "
          f"({meta.describe()})")
    print(f"cross-validated accuracy: {cv.accuracy:.1%} ({cv.method})")
    width = max(len(c) for c in cv.classes) + 2
    print("confusion matrix (rows: true, columns: predicted)")
    print(" " * width + "".join(f"{c:>{width}}" for c in cv.classes))
    for c, row in zip(cv.classes, cv.confusion):
        print(f"{c:<{width}}" + "".join(f"{n:>{width}}" for n in row))
    print(f"saved model {outcome.version} (now current)")


# -- predict / report -------------------------------------------------------------------------
def _predict(args: argparse.Namespace):
    """Featurize photos with the current model's backbone and layer, then score them."""
    from pipeline.featurize import featurize_photos
    from pipeline.photos import find_photos
    from pipeline.report import Prediction

    registry = _registry(args)
    model = registry.load(args.version) if args.version else registry.load_current()
    backbone = _backbone(args, name=model.feature_meta.backbone)
    if backbone.weights_digest != model.feature_meta.weights_digest:
        raise IncompatibleFeatures(
            f"model {model.version} was trained on {model.feature_meta.describe()}, but the loaded "
            f"{backbone.name} weights have digest {backbone.weights_digest[:12]}; retrain or pass --weights")
    result = featurize_photos(find_photos(args.photos), backbone, model.feature_meta.layer, args.batch_size,
                              _cache(args), not args.quiet)
    predictions = []
    if result.rows:
        vectors = np.stack([r.vector for r in result.rows])
        scores = model.classifier.decision(vectors)
        for row, s in zip(result.rows, scores):
            best = int(np.argmax(s))
            predictions.append(Prediction(row.source, row.image_id, model.classifier.classes[best],
                                          {c: float(v) for c, v in zip(model.classifier.classes, s)}))
    for f in result.failures:
        predictions.append(Prediction(f.record.source, f.record.image_id, None, {}, f"{f.reason}: {f.detail}"))
    return model, predictions


def cmd_predict(args: argparse.Namespace) -> int:
    model, predictions = _predict(args)
    classes = model.classifier.classes
    if args.format == "json":
        for p in predictions:
            item = {"source": p.source, "image_id": p.image_id, "label": p.label, "scores": p.scores,
                    "model_version": model.version, "backbone": model.feature_meta.backbone,
                    "layer": model.feature_meta.layer, "weights_digest": model.feature_meta.weights_digest}
            if p.error:
                item["error"] = p.error
            print(json.dumps(item))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["source", "image_id", "label", *[f"score_{c}" for c in classes], "error"])
        for p in predictions:
            writer.writerow([p.source, p.image_id, p.label or "", *[f"{p.scores.get(c, float('nan')):.6f}" for c in classes],
                             p.error or ""])
    else:
        width = max([len(Path(p.source).name) for p in predictions] + [6]) + 2
        print(f"{'photo':<{width}}{'label':<14}" + "".join(f"{c:>12}" for c in classes))
        for p in predictions:
            scores = "".join(f"{p.scores[c]:>+12.3f}" for c in classes) if p.scores else f"  ERROR {p.error}"
            print(f"{Path(p.source).name:<{width}}{(p.label or '-'):<14}{scores}")
    return 1 if predictions and all(p.error for p in predictions) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import render

    model, predictions = _predict(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(predictions, model.metadata), encoding="utf-8")
    _say(f"wrote {out} ({len(predictions)} photos, model {model.version})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    registry = _registry(args)
    current = registry.current_version()
    for version in registry.versions():
        try:
            m = registry.load(version).metadata
            cv = m.get("cv", {})
            print(f"{'*' if version == current else ' '} {version}  {m['created_at']}  {m['features']['backbone']}/"
                  f"{m['features']['layer']}  {m['classifier']['kind']}  classes={','.join(m['classes'])}  "
                  f"cv={cv.get('accuracy', float('nan')):.3f}")
        except DeeperError as exc:
            print(f"  {version}  BROKEN: {exc}")
    return 0


# -- parser -----------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    from pipeline.nets.factory import MODEL_CHOICES, PRECISION_CHOICES

    if model:
        p.add_argument("--model", choices=MODEL_CHOICES, default=None,
                       help="backbone (default: $DEEPER_MODEL or auto = inception_v1 if its weights "
                            "can be had, else efficientnet_lite0)")
        p.add_argument("--weights", help="explicit weights file (e.g. inception_v1_2016_08_28.tar.gz)")
        p.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                       help="compute precision (default $DEEPER_PRECISION or fp32; bf16 is ~1.7x faster "
                            "on AVX512_BF16 CPUs, see the README)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--no-cache", action="store_true", help="don't read or write the feature cache")
    p.add_argument("--cache-dir", help="weights and feature cache (default $DEEPER_CACHE_DIR or ~/.cache/go-deeper)")
    p.add_argument("--registry", help="model registry directory (default $DEEPER_REGISTRY)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.classifier import KINDS, NORMALIZATIONS

    parser = argparse.ArgumentParser(prog="deeper", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("imagenet", help="top-k ImageNet classes of photos")
    p.add_argument("photos", nargs="+")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--format", choices=("table", "json"), default="table")
    _common(p)
    p.set_defaults(func=cmd_imagenet)

    p = sub.add_parser("featurize", help="photos -> Parquet feature vectors")
    p.add_argument("photos", nargs="+", help="photo files or directories (sub-folder name = label)")
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument("--layer", default=None,
                   help="logits, prelogits, or any end point name (default: training's default, prelogits)")
    _common(p)
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("train", help="train a classifier (labels = sub-folder names) and register it")
    p.add_argument("dir", nargs="?", help="photo directory with one sub-folder per class")
    p.add_argument("--features", nargs="+", help="train from Parquet feature files/directories instead")
    p.add_argument("--labels", help="CSV of (image id or source, label) overriding stored labels")
    p.add_argument("--layer", default=None, help="end point to train on (default: see README)")
    p.add_argument("--classifier", choices=KINDS, default=None)
    p.add_argument("--normalize", choices=NORMALIZATIONS, default=None)
    p.add_argument("--C", type=float, default=None, help="inverse regularisation strength (default 1.0)")
    p.add_argument("--reference", action="store_true",
                   help="the reference recipe exactly: linear SVM on the logits, no normalisation")
    _common(p)
    p.set_defaults(func=cmd_train)

    for name, helptext in (("predict", "label photos with the current model"),
                           ("report", "HTML report of predictions, thumbnails and the CV confusion matrix")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("photos", nargs="+")
        p.add_argument("--version", help="registry version (default: current)")
        if name == "predict":
            p.add_argument("--format", choices=("table", "json", "csv"), default="table")
            p.set_defaults(func=cmd_predict)
        else:
            p.add_argument("--out", default="deeper-report.html")
            p.set_defaults(func=cmd_report)
        _common(p)

    p = sub.add_parser("models", help="list the registry's versions")
    _common(p, model=False)
    p.set_defaults(func=cmd_models)

    _add_streaming(sub)
    return parser


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
    "pipeline.broker_cli",
    "producers.produce",
    "consumers.featurizer",
    "consumers.scorer",
    "consumers.labels",
    "pipeline.demo",
)


def _apply_defaults(args: argparse.Namespace) -> None:
    """Layer/classifier defaults live in one place (pipeline.training)."""
    from pipeline.training import DEFAULT_LAYER, DEFAULT_SPEC

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
