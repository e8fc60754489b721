"""The one benchmark runner: every speed figure of go-deeper, as JSON and a table.

    python -m bench.run                 # everything (about 40 minutes on 2 cores)
    python -m bench.run --quick         # everything, scaled down (a few minutes; noisy)
    python -m bench.run --only model precision
    python -m bench.run --list

Writes ``bench/results/bench-<UTC date>.json`` (``-quick`` appended for --quick; the newest is
the latest, so no second copy is written) and prints a table. Each figure is the median of several runs
after a warm-up; the raw runs are in the JSON, and so is the machine (CPU model, cores, flags
such as avx512_bf16/avx512_vnni, memory, TF version, load average at start).

Take real numbers on a quiet machine: other processes on the same cores change them a lot
(the load average at start is recorded to make that visible).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import batch, precision, sink, stream, stream_more  # noqa: E402
from bench.common import RESULTS, Context, machine, say  # noqa: E402

#: name -> (what it measures, function). Order matters: later figures reuse earlier results
#: (the stream's ratio to the model alone; latency's rate from the stream's capacity).
FIGURES: dict[str, tuple[str, Callable[[Context], dict[str, Any]]]] = {
    "model": ("model alone, per backbone and batch size (fp32)", batch.model_alone),
    "reference": ("the reference loop: one photo per sess.run, Pillow/numpy preprocessing", batch.reference_loop),
    "decode": ("decode + preprocess alone through pipeline.model.inference (no model)", batch.decode_preprocess),
    "featurize": ("`deeper featurize DIR --no-cache` on ~200 distinct photos", batch.featurize_cli),
    "precision": ("fp32 vs bf16 / fp32-lite / int8: speed and fidelity", precision.precision_figure),
    "stream": ("the stream end to end (broker + featurizer + scorer processes)", stream.stream_throughput),
    "guarantee": ("the stream, exactly-once vs at-least-once, on Apache Kafka", stream.guarantee_cost),
    "sink": ("the stream into the Iceberg feature table vs into Parquet part files", sink.sink_cost),
    "scorer": ("the scorer alone on pre-made feature records", stream_more.scorer_alone),
    "latency": ("produce -> label latency at half the stream's capacity", stream_more.latency),
    "memory": ("featurizer RSS over a long stream", stream_more.memory),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="scaled-down sizes: a sanity check, not numbers")
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), metavar="NAME",
                        help=f"run only these figures ({', '.join(FIGURES)})")
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    parser.add_argument("--broker", choices=("tansu", "kafka"), default=None,
                        help="broker for every stream figure (default: Tansu in memory, Apache Kafka for `guarantee`)")
    parser.add_argument("--stream-variants", nargs="*", choices=list(stream.VARIANTS), metavar="NAME", default=None,
                        help="the stream figure's variants to run (default: all; --quick: 12-MP photos)")
    parser.add_argument("--cache-dir", default=os.environ.get("DEEPER_CACHE_DIR",
                                                              str(Path.home() / ".cache" / "go-deeper")),
                        help="weights / converted models cache (default $DEEPER_CACHE_DIR or ~/.cache/go-deeper)")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where the JSON goes (default bench/results)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch directory (logs of the stream)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for name, (what, _) in FIGURES.items():
            print(f"{name:<10} {what}")
        return 0
    names = args.only or list(FIGURES)
    work = Path(tempfile.mkdtemp(prefix="deeper-bench-"))
    ctx = Context(quick=args.quick, work=work, cache_dir=Path(args.cache_dir).expanduser(), broker=args.broker)
    if args.stream_variants is not None:
        ctx.shared["stream variants"] = tuple(args.stream_variants)
    report: dict[str, Any] = {"quick": args.quick, "machine": machine(), "figures": ctx.results, "errors": {},
                              "notes": ctx.notes}
    if args.quick:
        ctx.notes.append("--quick: scaled-down sizes, few runs; a sanity check of the runner, not numbers to quote")
    say(f"bench: {', '.join(names)}{' (quick)' if args.quick else ''}; scratch {work}")
    started = time.monotonic()
    try:
        for name in [n for n in FIGURES if n in names]:
            what, figure = FIGURES[name]
            say(f"[{name}] {what}")
            t0 = time.monotonic()
            try:
                ctx.results[name] = figure(ctx)
                ctx.results[name]["seconds"] = round(time.monotonic() - t0, 1)
            except Exception as exc:  # noqa: BLE001 - one failing figure must not lose the others
                traceback.print_exc()
                report["errors"][name] = f"{type(exc).__name__}: {exc}"
    finally:
        ctx.close()
        if args.keep_work:
            say(f"scratch kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    paths = _write(report, Path(args.out_dir), args.quick)
    print(table(report))
    say("wrote " + ", ".join(str(p) for p in paths))
    return 1 if report["errors"] else 0


def _write(report: dict[str, Any], out_dir: Path, quick: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    dated = out_dir / f"bench-{day}{'-quick' if quick else ''}.json"
    dated.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return [dated]


# --------------------------------------------------------------------------- the table


def table(report: dict[str, Any]) -> str:
    """Human-readable summary of ``report`` (everything is also in the JSON)."""
    m = report["machine"]
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on and f.startswith(("avx512_", "amx", "avx_vnni")))
    lines = [f"go-deeper bench {m['date']}{'  (QUICK: noisy, scaled down)' if report['quick'] else ''}",
             f"{m['cpu_model']}, {m['usable_cpus']} CPUs, {m['memory_gib']} GiB, flags: {flags or '-'}; "
             f"TF {m['tensorflow']}; load avg at start {m['load_average_at_start']}", ""]
    f = report["figures"]
    row = "{:<58}{:>14}  {}".format
    lines.append(row("figure", "value", "notes"))
    lines.append("-" * 100)
    if "model" in f:
        for r in f["model"]["rows"]:
            lines.append(row(f"model alone {r['backbone']} bs={r['batch_size']}", f"{r['per_s']:.1f} img/s",
                             f"runs {r['min_per_s']:.0f}..{r['max_per_s']:.0f}"))
    if "reference" in f:
        r = f["reference"]
        lines.append(row("reference loop (inception_v1, 1 photo per sess.run)", f"{r['per_s']:.1f} img/s",
                         f"ours on the same files: {r['ours_batched_same_files']['per_s']:.1f} img/s "
                         f"(x{r['speedup_ours_vs_reference']})"))
    if "decode" in f:
        for r in f["decode"]["rows"]:
            how = "" if r.get("graph_jpeg", True) else " Pillow only"
            lines.append(row(f"decode+preprocess ({r['backbone_preprocess']}) parallel={r['parallel_decode']}{how}",
                             f"{r['per_s']:.1f} img/s", ("default; " if r["default"] else "")
                             + (f"{r['core_ms_per_image']} core-ms/photo" if "core_ms_per_image" in r else "")))
            if "per_call" in r:
                lines.append(row(f"  one Inference.run call ({r['backbone_preprocess']}), 1 / 32 photos",
                                 f"{r['per_call']['1_images_ms']:.1f} ms", f"{r['per_call']['32_images_ms']:.1f} ms"))
        lines.append(row("decode_image alone, one thread", f"{f['decode']['decode_image_one_thread']['per_s']:.1f} img/s", ""))
        cam = f["decode"].get("camera_12mp")
        if cam:
            one = cam["decode_image_one_thread"]
            lines.append(row("decode_image 12 MP, one thread: full / scaled", f"{one['full']['ms_per_image']:.0f} ms",
                             f"scaled {one['scaled']['ms_per_image']:.0f} ms; decode+preprocess 12 MP "
                             f"{cam['decode_preprocess_scaled']['per_s']:.1f} img/s"))
        probe = f["decode"]["draft_probe"]
        lines.append(row("Pillow JPEG load, full / draft 1/2 (DCT scaling)", f"{probe['full']['per_s']:.1f} img/s",
                         f"draft: {probe['draft_half']['per_s']:.1f} img/s"))
    if "featurize" in f:
        for r in f["featurize"]["rows"]:
            lines.append(row(f"deeper featurize {r['backbone']} {r.get('photos', '640px')}",
                             f"{r['featurize_per_s']:.1f} img/s",
                             f"incl. start-up: {r['wall_per_s_incl_startup']:.1f} img/s"))
        if "ratio_12mp_to_640px" in f["featurize"]:
            lines.append(row("  12 MP / 640 px (same run)", f"x{f['featurize']['ratio_12mp_to_640px']:.2f}",
                             f"per round {f['featurize']['ratio_12mp_to_640px_per_round']}"))
    if "precision" in f:
        for r in f["precision"]["speed"]:
            lines.append(row(f"{r['backbone']} {r['precision']} bs={r['batch_size']}", f"{r['per_s']:.1f} img/s",
                             f"x{r['speedup_vs_fp32']:.2f} vs fp32"))
        for r in f["precision"]["fidelity"]:
            lines.append(row(f"fidelity {r['backbone']} {r['precision']}", f"cos {r['cosine_min']:.5f}",
                             f"mean {r['cosine_mean']:.5f}, top-1 agree {r['top1_agreement']:.3f}, "
                             f"SVM labels same {r['svm_same_labels']}, fp32-SVM on these vectors same "
                             f"{r['fp32_svm_same_labels']}"))
    if "stream" in f:
        r = f["stream"]
        ratio = f"x{r['ratio_to_model_alone']:.2f} of model alone bs={r['batch_size']}" if r.get("ratio_to_model_alone") else ""
        if r.get("ratio_to_reference_loop"):
            ratio += f", x{r['ratio_to_reference_loop']:.2f} of the reference loop"
        lines.append(row(f"stream end to end ({r['backbone']}, {r['images']} photos, {r.get('broker', 'tansu')})",
                         f"{r['per_s']:.1f} img/s",
                         f"{ratio}; featurizer {r.get('featurizer_per_s', 0):.1f} img/s; "
                         f"mean model batch {r['featurizer']['mean_model_batch']:.1f}"))
        for name, v in r.get("variants", {}).items():
            same = v.get("ratio_to_model_alone_same_precision")
            lines.append(row(f"  variant: {name}", f"{v['per_s']:.1f} img/s",
                             f"x{v['ratio_to_default_same_run']:.2f} of default, "
                             f"x{v['ratio_to_model_alone_fp32']:.2f} of fp32 model alone"
                             + (f", x{same:.2f} of {v['precision']} model alone" if same else "")
                             + f"; featurizer {v.get('featurizer_per_s', 0):.1f} img/s"
                             + f"; mean model batch {v['featurizer']['mean_model_batch']:.1f}"))
    if "guarantee" in f:
        r = f["guarantee"]
        for name, c in r["configs"].items():
            lines.append(row(f"stream {name} ({r['broker']}, {r['images']} photos)", f"{c['per_s']:.1f} img/s",
                             f"x{c['ratio_to_at_least_once']:.2f} of at-least-once end to end; featurizer "
                             f"{c['featurizer_per_s']:.1f} img/s (x{c['featurizer_ratio_to_at_least_once']:.2f})"))
    if "sink" in f:
        r, ratio = f["sink"], f["sink"]["ratio_table_to_parquet"]
        for name, c in r["configs"].items():
            lines.append(row(f"stream into the {name} ({r['broker']}, {r['images']} photos)", f"{c['per_s']:.1f} img/s",
                             f"featurizer {c['featurizer_per_s']:.1f} img/s, {c['featurizer_cpu_ms_per_image']} "
                             "core-ms/photo"))
        lines.append(row("  table / Parquet (same run)", f"x{ratio['end_to_end']:.3f}",
                         f"featurizer x{ratio['featurizer']:.3f}, its CPU per photo x{ratio['featurizer_cpu_per_image']:.3f}"))
        share = r["time_in_table"]
        lines.append(row("  featurizer time in table writes + commits", f"{share['median_share']:.1%}",
                         f"per commit: write {share['median_write_s']} s, commit {share['median_commit_s']} s "
                         f"({r['table_snapshots_before']} snapshots before)"))
    if "scorer" in f:
        r = f["scorer"]
        lines.append(row(f"scorer alone ({r['records']} feature records)", f"{r['per_s']:.0f} labels/s", ""))
    if "latency" in f:
        r = f["latency"]
        lines.append(row(f"latency produce->label at {r['rate_per_s']:.1f} img/s", f"p50 {r['p50_ms']:.0f} ms",
                         f"p90 {r['p90_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, max {r['max_ms']:.0f} ms"))
    if "memory" in f:
        r = f["memory"]
        marks = ", ".join(f"{k} {v:.0f}" for k, v in r["rss_mb_at"].items())
        lines.append(row(f"featurizer RSS over {r['images']} photos", f"{r['rss_mb_at']['100%']:.0f} MiB",
                         f"at {marks} MiB; max {r['rss_mb_max']:.0f}; flat: {r['flat']}"))
    for name, error in report["errors"].items():
        lines.append(row(f"FAILED {name}", "", error[:120]))
    lines.append(f"\ntotal {report['total_seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
