"""The fault suite: ``bash scripts/fault-suite.sh`` (or ``python -m tests.faults.long_suite``).

    --broker kafka|tansu|kafka-cluster  --guarantee exactly-once|at-least-once  [--sink table|parquet]
    [--images N] [--summary PATH]

``kafka``/``tansu``: one private broker of that kind (Apache Kafka keeps its data on disk; Tansu
runs durable), then per scenario ``--images`` photos: 10 featurizer SIGKILLs, 10 scorer SIGKILLs,
and 4 broker kill-and-restart cycles (SIGKILL, then a start on the same data), stored through
``--sink`` (default: the feature table); then the table's own scenarios
(tests/faults/table_scenarios.py): 10 self-inflicted SIGKILLs between the table commit and
the Kafka commit or while writing a data file, the catalog locked for 30 s, and two
featurizers racing on one table (one SIGKILLed 4 times).
``kafka-cluster``: three Apache Kafka nodes, every broker and worker on a test host of its own
(root), Toxiproxy for the scorer's links; leader kills, the active controller killed, a
featurizer's host cut off, a zombie featurizer, the scorer's links slow and reset
(tests/faults/cluster_scenarios.py). Prints the summary, writes it as JSON and exits 0 only when
it is clean (see tests/faults/scenarios.py; on Apache Kafka with exactly-once that includes zero
duplicates).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from pipeline.config import GUARANTEES
from devrig import RigBroker, broker_unavailable
from tests.faults import cluster_scenarios, table_scenarios
from tests.faults.scenarios import SCENARIOS as STREAM_SCENARIOS
from tests.faults.scenarios import Plan
from tests.faults.summary import format_summary, summarize

SCENARIOS = {**STREAM_SCENARIOS, **table_scenarios.SCENARIOS}

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/fault-suite.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", choices=("kafka", "tansu", CLUSTER), default="kafka")
    p.add_argument("--guarantee", choices=GUARANTEES, default="exactly-once")
    p.add_argument("--sink", choices=("table", "parquet"), default="table",
                   help="where the first three scenarios store rows (the table scenarios always use the table)")
    p.add_argument("--images", type=int, default=400, help="photos per scenario")
    p.add_argument("--featurizer-kills", type=int, default=10)
    p.add_argument("--scorer-kills", type=int, default=10)
    p.add_argument("--broker-restarts", type=int, default=4)
    p.add_argument("--table-kills", type=int, default=10, help="table_kills: self-inflicted SIGKILLs")
    p.add_argument("--catalog-lock-seconds", type=float, default=30.0, help="catalog_unavailable: how long")
    p.add_argument("--racing-kills", type=int, default=4, help="featurizers_racing: SIGKILLs of one of the two")
    p.add_argument("--crash-every", type=int, default=1,
                   help="every Nth broker restart is a crash (SIGKILL); 0: clean restarts only")
    p.add_argument("--leader-kills", type=int, default=4, help="kafka-cluster: partition leaders SIGKILLed")
    p.add_argument("--controller-kills", type=int, default=2, help="kafka-cluster: active controllers SIGKILLed")
    p.add_argument("--cut-seconds", type=float, default=30.0, help="kafka-cluster: how long a featurizer's host is cut off")
    p.add_argument("--links-seconds", type=float, default=60.0, help="kafka-cluster: how long the scorer's links are bad")
    p.add_argument("--only", default=None, help="comma-separated scenarios to run (default: all of the broker's)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cache-dir", default=os.environ.get("DEEPER_CACHE_DIR"),
                   help="weights cache shared by all workers (default $DEEPER_CACHE_DIR, else a fresh one)")
    p.add_argument("--workdir", default=None, help="where the broker, Parquet and logs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, Parquet, broker data)")
    p.add_argument("--raw-localbucket", action="store_true",
                   help="Tansu only: serve S3 with localbucket as shipped (no If-Match): reproduces the loss")
    p.add_argument("--summary", default=None,
                   help="JSON summary path (default docs/faults-<broker>-<guarantee>.json; '' to skip)")
    return p.parse_args(argv)


CLUSTER = "kafka-cluster"


def _kwargs(args: argparse.Namespace) -> dict[str, dict]:
    return {"featurizer_crashes": {"kills": args.featurizer_kills},
            "scorer_crashes": {"kills": args.scorer_kills},
            "broker_restarts": {"restarts": args.broker_restarts, "crash_every": args.crash_every},
            "table_kills": {"kills": args.table_kills},
            "catalog_unavailable": {"seconds": args.catalog_lock_seconds},
            "featurizers_racing": {"kills": args.racing_kills},
            "leader_kills": {"kills": args.leader_kills},
            "controller_kill": {"kills": args.controller_kills},
            "featurizer_cut": {"cut_s": args.cut_seconds},
            "zombie": {},
            "scorer_links": {"seconds": args.links_seconds}}


class _SingleBroker:
    """One private broker and the single-broker scenarios (what --broker kafka|tansu runs)."""

    scenarios = SCENARIOS

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.broker = RigBroker(workdir / "broker", args.broker, conditional_s3=not args.raw_localbucket).start()
        self.hosts: dict = {}

    def close(self) -> None:
        self.broker.stop()


class _Cluster:
    """The cluster rig (test hosts, Toxiproxy, three nodes) and the cluster scenarios."""

    scenarios = cluster_scenarios.CLUSTER_SCENARIOS

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.rig = cluster_scenarios.ClusterRig(workdir)
        self.broker, self.hosts = self.rig.cluster, self.rig.hosts

    def close(self) -> None:
        self.rig.close()


def _unavailable(broker: str) -> str | None:
    return cluster_scenarios.rig_unavailable() if broker == CLUSTER else broker_unavailable(broker)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    known = cluster_scenarios.CLUSTER_SCENARIOS if args.broker == CLUSTER else SCENARIOS
    chosen = [name.strip() for name in (args.only or ",".join(known)).split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        print(f"unknown scenarios for --broker {args.broker}: {unknown}; choose from {sorted(known)}", file=sys.stderr)
        return 2
    reason = _unavailable(args.broker)
    if reason:
        print(f"cannot run the fault suite on {args.broker}: {reason}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="deeper-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else workdir / "cache"
    out = REPO / "docs" / f"faults-{args.broker}-{args.guarantee}.json" if args.summary is None else args.summary
    print(f"fault suite on {args.broker} ({args.guarantee}) in {workdir}; weights cache {cache_dir}", flush=True)
    setup = (_Cluster if args.broker == CLUSTER else _SingleBroker)(args, workdir)
    broker = setup.broker
    plan = Plan(broker, workdir, cache_dir, args.guarantee, args.images, args.seed,
                rate=5.0 if args.broker == CLUSTER else Plan.rate, log=lambda line: print(line, flush=True),
                hosts=setup.hosts, sink=args.sink)
    started = time.monotonic()
    results, errors = [], {}
    try:
        for name in chosen:
            print(f"[{name}] {args.images} photos, {_kwargs(args)[name]}", flush=True)
            try:
                result = setup.scenarios[name](plan, **_kwargs(args)[name])
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the others' numbers
                traceback.print_exc()
                errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            print(f"[{name}] {'clean' if result.clean else 'NOT CLEAN'} in {result.wall_s:.0f} s", flush=True)
            results.append(result)
    finally:
        setup.close()
        summary = summarize(results, time.monotonic() - started, broker.findings())
        summary["errors"] = errors
        summary["clean"] = summary["clean"] and not errors
        summary["arguments"] = {k: v for k, v in vars(args).items() if k not in ("workdir", "summary", "cache_dir")}
        summary["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(format_summary(summary), flush=True)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(summary, indent=2, default=str) + "\n")
            print(f"summary written to {out}")
        if args.keep or not summary["clean"]:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary["clean"] and len(results) == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
