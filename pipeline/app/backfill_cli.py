"""``deeper backfill SRC``: the command line of the Spark backfill (:mod:`pipeline.spark.backfill`)."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli_help import EXIT_STATUS, from_setting

DESCRIPTION = ("Featurize a lake of photos on Spark (local[*] or a cluster) into the feature table the stream "
               "writes, with the same network and decode path as `deeper featurize`: photos already in the table "
               "are skipped, unreadable or undecodable ones go to TABLE_rejects, and a run killed half way keeps "
               "every committed chunk. See docs/backfill.md.")


def add_parser(sub) -> None:
    from pipeline.model.nets.factory import MODEL_CHOICES, PRECISION_CHOICES

    p = sub.add_parser("backfill", help="featurize a folder, glob, s3:// prefix or Parquet list of photos on "
                                        "Spark into the feature table", description=DESCRIPTION, epilog=EXIT_STATUS)
    p.add_argument("src", metavar="SRC", help="a folder, a glob ('photos/**/*.jpg'), an s3://bucket/prefix, or a "
                                              "Parquet file whose 'path' column lists photos (local or s3://)")
    p.add_argument("--table", metavar="NAMESPACE.NAME",
                   help="the Iceberg table to fill (default: the stream's table for this network, $DEEPER_TABLE)")
    p.add_argument("--master", metavar="URL",
                   help="Spark master: local[N], spark://host:7077, yarn, k8s://... (default: local[*], or the "
                        "session spark-submit made)")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                   help="a Spark setting, as spark-submit's --conf (repeatable), e.g. spark.executor.memory=4g")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="photos per table commit (what a kill can lose) (default: 512 per Spark task slot)")
    p.add_argument("--labels-from-folders", action="store_true",
                   help="label photos by their first sub-folder below SRC, as `deeper featurize` does")
    p.add_argument("--layer", default=None, help="end point to store (default: prelogits, as training)")
    p.add_argument("--model", choices=MODEL_CHOICES, default=None, help="backbone " + from_setting("model"))
    p.add_argument("--weights", metavar="FILE", help="explicit weights file; on a cluster every executor must see "
                                                     "this path")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                   help="compute precision " + from_setting("precision"))
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="photos per model run")
    p.add_argument("--cache-dir", metavar="DIR", help="weights and jars cache " + from_setting("cache_dir"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_backfill)


def cmd_backfill(args: argparse.Namespace) -> int:
    from pipeline.config import Settings
    from pipeline.errors import DeeperError
    from pipeline.learning.training import DEFAULT_LAYER
    from pipeline.spark.backfill import BackfillOptions, run_backfill
    from pipeline.spark.session import parse_conf

    if args.chunk_size is not None and args.chunk_size < 1:
        raise DeeperError("--chunk-size must be at least 1")
    settings = Settings.from_env(cache_dir=args.cache_dir, model=args.model)
    options = BackfillOptions(args.src, args.table, args.master, parse_conf(args.conf), args.chunk_size,
                              args.batch_size, settings.model, args.weights, args.precision,
                              args.layer or DEFAULT_LAYER, args.labels_from_folders, not args.quiet)
    summary = run_backfill(settings, options, _say)
    print(summary.line(), flush=True)
    return 1 if summary.rejected else 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
