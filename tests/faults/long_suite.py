"""The long form of the fault suite: ``python -m tests.faults.long_suite`` (or scripts/fault-suite.sh).

Defaults are the issue's: 1000 photos with 10 featurizer SIGKILLs, 1000 photos with 10 scorer
SIGKILLs, and 1000 photos through producer + featurizer + scorer while the durable broker
restarts 4 times (every second one a crash). Prints the summary, writes it as JSON
(``docs/faults-long-summary.json`` by default) and exits 0 only when it is clean (nothing
missing, one row per image id through the reader, every final worker run exiting 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.faults import harness as h

DEFAULT_OUT = h.REPO / "docs" / "faults-long-summary.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.faults.long_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000, help="photos per scenario")
    p.add_argument("--featurizer-kills", type=int, default=10)
    p.add_argument("--scorer-kills", type=int, default=10)
    p.add_argument("--broker-restarts", type=int, default=4)
    p.add_argument("--crash-every", type=int, default=2,
                   help="every Nth broker restart is a crash (SIGKILL); 0: clean restarts only")
    p.add_argument("--only", default="featurizer_crashes,scorer_crashes,broker_restarts",
                   help="comma-separated scenarios to run")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cache-dir", default=os.environ.get("DEEPER_CACHE_DIR"),
                   help="weights cache shared by all workers (default $DEEPER_CACHE_DIR, else a fresh one)")
    p.add_argument("--workdir", default=None, help="where brokers, Parquet and logs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, Parquet, broker data)")
    p.add_argument("--raw-localbucket", action="store_true",
                   help="serve the broker's S3 with localbucket as shipped (no If-Match): reproduces the loss")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON summary path ('' to skip)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = h.durable_broker_available()
    if reason:
        print(f"cannot run the fault suite: {reason}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="deeper-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else workdir / "cache"
    plan = {
        "featurizer_crashes": {"n_images": args.images, "kills": args.featurizer_kills, "seed": args.seed},
        "scorer_crashes": {"n_images": args.images, "kills": args.scorer_kills, "seed": args.seed + 1},
        "broker_restarts": {"n_images": args.images, "restarts": args.broker_restarts, "seed": args.seed + 2,
                            "crash_every": args.crash_every},
    }
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(plan))
    if unknown:
        print(f"unknown scenarios: {unknown}; choose from {sorted(plan)}", file=sys.stderr)
        return 2
    print(f"fault suite (long form) in {workdir}; weights cache {cache_dir}", flush=True)
    started = time.monotonic()
    results = []
    try:
        for name in chosen:
            print(f"[{name}] {plan[name]}", flush=True)
            result = h.run_scenario(name, workdir / name, cache_dir, conditional_s3=not args.raw_localbucket,
                                    log=lambda line: print(line, flush=True), **plan[name])
            print(f"[{name}] {'clean' if result.clean else 'NOT CLEAN'} in {result.wall_s:.0f} s", flush=True)
            results.append(result)
    finally:
        summary = h.summarize(results, time.monotonic() - started)
        summary["arguments"] = {k: v for k, v in vars(args).items() if k not in ("workdir", "out", "cache_dir")}
        summary["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(h.format_summary(summary), flush=True)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            print(f"summary written to {out}")
        if args.keep or not summary.get("clean"):
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary["clean"] and len(results) == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
