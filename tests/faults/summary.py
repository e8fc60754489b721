"""The fault suite's summary: totals over scenarios, each scenario's details, and a table."""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any, Sequence

from tests.faults.scenarios import ScenarioResult

#: Per scenario, the numbers the suite is about (devrig.outcomes says what each means).
HEADLINE = ("missing", "duplicate_rows_in_table", "duplicate_rows_on_disk", "duplicate_labels_read_committed")
TOTALS = ("images_in", "rows_raw", "rows_unique", "missing", "duplicate_rows_in_table", "duplicate_offsets_in_table",
          "duplicate_rows_on_disk", "duplicate_offsets_on_disk",
          "duplicate_features_read_committed", "labels_raw", "labels_unique", "labels_missing",
          "duplicate_labels_read_committed", "images_topic_duplicates", "dead_letters")


def summarize(results: Sequence[ScenarioResult], wall_s: float, broker: dict[str, Any]) -> dict[str, Any]:
    """Totals over scenarios plus each scenario's details (the JSON the suite writes)."""
    faults: dict[str, int] = {}
    for r in results:
        for kind, n in r.faults.items():
            faults[kind] = faults.get(kind, 0) + n
    recoveries: dict[str, list[float]] = {}
    for r in results:
        for row in r.recovery:
            for key, value in row.items():
                if key.endswith("_s") and key != "killed_after_s" and isinstance(value, (int, float)):
                    recoveries.setdefault(f"{r.name}.{key}", []).append(float(value))
    return {
        "clean": bool(results) and all(r.clean for r in results),
        "broker": broker,
        "guarantee": results[0].guarantee if results else None,
        "faults": faults,
        "headline": {r.name: {k: r.counts[k] for k in HEADLINE if k in r.counts} for r in results},
        **{key: sum(int(r.counts.get(key) or 0) for r in results) for key in TOTALS},
        "producer_failed_sends": sum(r.producer["failed_sends"] for r in results),
        "recovery_s": {k: {"min": round(min(v), 2), "median": round(statistics.median(v), 2),
                           "max": round(max(v), 2), "n": len(v)} for k, v in sorted(recoveries.items())},
        "wall_s": round(wall_s, 1),
        "scenarios": [r.to_dict() for r in results],
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def format_summary(summary: dict[str, Any]) -> str:
    broker = summary["broker"]
    lines = [f"fault suite on {broker.get('kind')} ({summary['guarantee']}): "
             f"{'CLEAN' if summary['clean'] else 'NOT CLEAN'} in {summary['wall_s']} s",
             "faults injected: " + ", ".join(f"{k}={v}" for k, v in summary["faults"].items())]
    row = "{:<20}{:>7}{:>6}{:>9}{:>8}{:>9}{:>10}{:>10}{:>9}{:>8}".format
    lines.append(row("scenario", "faults", "in", "missing", "rows", "dup rows", "dup feats", "dup labels",
                     "img dups", "wall s"))
    for s in summary["scenarios"]:
        lines.append(row(s["name"], sum(s["faults"].values()), s["images_in"], s["missing"], s["rows_raw"],
                         s.get("duplicate_rows_in_table", s.get("duplicate_rows_on_disk")),
                         s["duplicate_features_read_committed"],
                         s.get("duplicate_labels_read_committed", "-"), s["images_topic_duplicates"], s["wall_s"]))
    for key, stats in summary["recovery_s"].items():
        lines.append(f"recovery {key}: median {stats['median']} s (min {stats['min']}, max {stats['max']}, "
                     f"n={stats['n']})")
    for s in summary["scenarios"]:
        for problem in s["problems"]:
            lines.append(f"PROBLEM {s['name']}: {problem}")
    return "\n".join(lines)
