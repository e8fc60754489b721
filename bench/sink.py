"""The feature table's cost: the stream with ``DEEPER_SINK=table`` vs ``DEEPER_SINK=parquet``.

Same rig as :mod:`bench.stream` (a local broker, featurizer and scorer processes, the bench's
producer and labels reader), the default roll (5 s, exactly-once), the two sinks alternating run
by run so a burst of load from elsewhere hits both alike. Goal (issue 20): the table costs at
most 5 % of stream throughput. Three ratios, table / Parquet: end to end (first consume to last
label), the featurizer's own rate (first consume to last batch done) and its CPU per photo; and,
from the featurizer's ``table commit`` log lines, the time its loop spent writing data files and
committing, as a share of the run (the work a checkpoint holds the loop for; less noisy than
rates on a shared machine). The table is first given ``PREFILL`` snapshots, so commits pay what
they pay in a long-running stream (the featurizer keeps at most 100).
"""

from __future__ import annotations

import statistics
from typing import Any

import json
from pathlib import Path

from bench.common import Context, say
from bench.stream import MODEL, Variant, _interleaved_streams, _median_run, _what, rig

#: The most throughput the table may cost, as a share of the Parquet stream's.
MAX_COST = 0.05
CONFIGS = {"table": Variant(env=(("DEEPER_SINK", "table"),)), "parquet": Variant(env=(("DEEPER_SINK", "parquet"),))}
#: Snapshots the table holds before the measured runs (the featurizer's steady state).
PREFILL = 100


def _prefill(the_rig, snapshots: int) -> int:
    """Give the rig's table ``snapshots`` one-row commits on a topic of their own; its snapshot count."""
    import numpy as np
    from kafka import TopicPartition

    from pipeline.storage.parquet_writer import FeatureRow
    from pipeline.storage.sink import Span
    from pipeline.storage.table_sink import TableSink

    sink, tp = TableSink(the_rig.base, the_rig.meta), TopicPartition("bench.prefill", 0)
    start = sink.assigned({tp: 0}).get(tp, 0)
    for offset in range(start, start + snapshots):
        sink.add([FeatureRow(f"{offset:064x}", f"prefill-{offset}", None, 1, 1,
                             np.zeros(the_rig.meta.dim, np.float32), tp.topic, 0, offset)])
        sink.flush({tp: Span(offset, offset + 1)})
    return len(sink.table().metadata.snapshots)


def _commit_times(log_dir: Path, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The featurizer's ``table commit`` lines of the table runs: time in the table per run."""
    per_run = []
    for path in sorted(log_dir.glob("sink-table-*-featurizer-*.log")):
        events = [json.loads(line) for line in path.open() if '"event": "table commit"' in line]
        per_run.append({"commits": len(events), "write_s": round(sum(e["write_s"] for e in events), 3),
                        "commit_s": round(sum(e["commit_s"] for e in events), 3),
                        "snapshots": [e["snapshots"] for e in events]})
    for row, run in zip(per_run, runs):
        wall = run["images"] / run["featurizer_per_s"]
        row["share_of_featurizer_time"] = round((row["write_s"] + row["commit_s"]) / wall, 4)
    shares = [r["share_of_featurizer_time"] for r in per_run if "share_of_featurizer_time" in r]
    return {"runs": per_run, "median_share": _median(shares),
            "median_commit_s": _median([r["commit_s"] / r["commits"] for r in per_run if r["commits"]]),
            "median_write_s": _median([r["write_s"] / r["commits"] for r in per_run if r["commits"]])}


def _median(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return round(statistics.median(found), 3) if found else None


def _row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    median = _median_run(runs)
    return {"per_s": median["per_s"], "runs_per_s": median["runs_per_s"],
            "featurizer_per_s": _median([r["featurizer_per_s"] for r in runs]),
            "featurizer_runs_per_s": [r["featurizer_per_s"] for r in runs],
            "featurizer_cpu_ms_per_image": _median([r["cpu_ms_per_image"].get("featurizer") for r in runs]),
            "featurizer_cpu_ms_runs": [r["cpu_ms_per_image"].get("featurizer") for r in runs],
            "labels_after_last_batch_s": [r["labels_after_last_batch_s"] for r in runs]}


def sink_cost(ctx: Context) -> dict[str, Any]:
    """The stream into the Iceberg table vs into Parquet part files, interleaved (module doc)."""
    n = ctx.scale(500, 120)
    runs = ctx.scale(3, 1)
    the_rig = rig(ctx)
    snapshots = _prefill(the_rig, ctx.scale(PREFILL, 20))
    done = _interleaved_streams(ctx, the_rig, CONFIGS, n, runs, "sink")
    in_table = _commit_times(the_rig.root / "logs", done["table"])
    table, parquet = _row(done["table"]), _row(done["parquet"])
    ratios = {"end_to_end": round(table["per_s"] / parquet["per_s"], 3),
              "featurizer": round(table["featurizer_per_s"] / parquet["featurizer_per_s"], 3),
              "featurizer_cpu_per_image": round(table["featurizer_cpu_ms_per_image"]
                                                / parquet["featurizer_cpu_ms_per_image"], 3)}
    say(f"  sink: table {table['per_s']} vs Parquet {parquet['per_s']} img/s end to end (x{ratios['end_to_end']}); "
        f"featurizer x{ratios['featurizer']}, its CPU per photo x{ratios['featurizer_cpu_per_image']}; "
        f"{in_table['median_share']:.1%} of the featurizer's time in table writes and commits")
    return {"what": _what(the_rig) + "; DEEPER_SINK=table vs parquet, default roll (5 s), exactly-once",
            "broker": the_rig.kind, "backbone": MODEL, "images": n, "table_snapshots_before": snapshots,
            "configs": {"table": table, "parquet": parquet}, "runs": done, "ratio_table_to_parquet": ratios,
            "time_in_table": in_table, "max_cost": MAX_COST,
            "within_budget_end_to_end": bool(1 - ratios["end_to_end"] <= MAX_COST),
            "within_budget_featurizer": bool(1 - ratios["featurizer"] <= MAX_COST),
            "within_budget_time_in_table": bool((in_table["median_share"] or 0) <= MAX_COST)}
