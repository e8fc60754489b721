"""Where the stream featurizer's CPU goes, per stage, in core-ms per photo.

    python -m bench.profile                      # 300 photos, Tansu (memory), py-spy at 200 Hz
    python -m bench.profile --photos 12mp --broker kafka --before /tmp/before-tree

A featurizer + scorer pipeline of :mod:`bench.stream` runs; over the measured photos this
reads every featurizer thread's CPU time from ``/proc/PID/task`` and samples its Python stacks
with py-spy (``pip install py-spy``; ``--nonblocking``, so the process is never paused).
Each thread's CPU is split over stages by where its samples were; CPU a thread spent with no
Python frame on its stack (TensorFlow's own pools: the model's ops, tf.data's preprocessing)
goes to that thread's kind (:func:`_native_stage`).

``--before DIR`` runs the same stream, interleaved round by round, with a featurizer started
from another source tree (``PYTHONPATH=DIR``, ``PYTHONSAFEPATH=1``), to show a change's
effect in one run: see :func:`bench.stream.source_tree`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import RESULTS, Context, say  # noqa: E402

#: TensorFlow ops in the tf.data threads: the JPEG decode of plain JPEGs, crop, resize, batching.
IN_GRAPH = "in-graph JPEG decode + preprocess (TensorFlow ops, tf.data threads)"
#: (stage, substrings of a frame): the first stage with a frame on the stack wins, leaf first.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode (Pillow, tf.data threads)", ("_decode (", "_decode_bytes (", "_inspect (", "graph_plan (")),
    ("model (Python side)", ("Inference._run (", "_model (")),
    ("record parsing (ours)", ("_valid_records (", "_image_record (", "parse_image_message (")),
    ("Parquet", ("parquet", "Parquet", "sink.py")),
    ("producing feature records", ("encode_features (", "_feature_record (", "StreamWorker.send (",
                                   "Checkpoint.send (", "kafka/producer/", "_write (")),
    ("checkpoint / commit", ("checkpoint (", "Checkpoint.commit", "_commit")),
    ("logging / metrics", ("_log_batch (", "logs.py", "prometheus")),
    ("Kafka fetch (client: fetch, decompress, record parsing)", ("kafka/consumer/", "kafka/client_async",
                                                                 "kafka/conn", "kafka/protocol", "kafka/record",
                                                                 "_poll_once (")),
    ("feeding tf.data", ("_feeder (", "Inference.submit (", "_put (")),
    ("tf.data Python glue (py_func calls, conversions)", ("script_ops.py", "numpy_compat", "nest_util")),
    ("model thread bookkeeping", ("_model_loop (", "_hand_out (")),
)


#: Innermost frames that wait rather than work (py-spy's --nonblocking mode can count them).
WAITING = ("Condition.wait (", "Event.wait (", "EpollSelector.select (", "select (selectors.py", "Queue.get (",
           "iterator_get_next (", "_wait_for_tstate_lock (", "sleep (")
IDLE = "waiting (not counted)"


def classify(stack: str) -> str:
    frames = stack.split(";")
    if any(w in frames[-1] for w in WAITING):
        return IDLE
    thread = frames[0]
    if len(frames) == 1:  # a thread py-spy knows, running no Python now: a tf.data thread's map ops
        return IN_GRAPH
    if "producer" in thread:  # kafka-python's producer network thread: sending outputs
        return "producing feature records"
    if "kafka-io" in thread:  # the consumer's network thread: fetch responses, heartbeats
        return "Kafka fetch (client: fetch, decompress, record parsing)"
    for frame in reversed(frames):  # leaf first: the innermost known frame says what it was doing
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return "other Python"


#: CPU of threads that never had a Python frame: TensorFlow's own pools (most keep the
#: process's name, so they can't be told apart): the model's ops, tf.data's preprocessing and batching.
NATIVE = "TensorFlow native threads (model ops + preprocess + batching)"


#: What a tf.data thread does with a Python frame on its stack.
TF_DATA_STAGES = ("decode (Pillow, tf.data threads)", "tf.data Python glue (py_func calls, conversions)", IN_GRAPH)


def _native_stage(seen: dict[str, int]) -> str:
    """Where a thread's CPU that its samples don't explain goes: a tf.data thread's (mostly
    sampled in decode or tf.data glue) is its TensorFlow ops, the in-graph JPEG decode among
    them; other threads' is C code called from Python (Pillow, TF calls from the model thread,
    the Kafka clients' sockets); a thread py-spy never saw is one of TensorFlow's pools."""
    if not seen:
        return NATIVE
    return IN_GRAPH if max(seen, key=seen.__getitem__) in TF_DATA_STAGES else "C code under Python frames (not sampled)"


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (OS thread name, user+system CPU seconds) for every thread of ``pid``."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (comm, (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, ValueError, IndexError):
            continue
    return out


def parse_raw(text: str) -> dict[int, dict[str, int]]:
    """py-spy ``--format raw --threads`` -> tid -> stage -> samples."""
    out: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for tid, stack, count in _lines(text):
        stage = classify(stack)
        if stage != IDLE:
            out[tid][stage] += count
    return out


def top_frames(text: str, leaf_frames: int = 2, top: int = 6) -> dict[str, list[tuple[str, int]]]:
    """Per stage, the innermost frames that took the most samples (what to look at first)."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for _, stack, count in _lines(text):
        frames = [f for f in stack.split(";")[1:] if " (" in f]
        out[classify(stack)][" < ".join(reversed(frames[-leaf_frames:]))] += count
    return {stage: sorted(c.items(), key=lambda kv: -kv[1])[:top] for stage, c in out.items()}


def _lines(text: str):
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack.startswith("thread (") and count.isdigit():
            yield int(stack[len("thread ("):stack.index(")")]), stack, int(count)


def breakdown(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
              samples: dict[int, dict[str, int]], rate: float, images: int, model_cpu_ms: float) -> dict[str, Any]:
    """Core-ms per image per stage: each thread's CPU split by its samples; TensorFlow's own
    threads' CPU split into the model (``model_cpu_ms`` per image) and the rest."""
    stages: dict[str, float] = defaultdict(float)
    threads = []
    for tid, (comm, cpu_after) in after.items():
        cpu = cpu_after - before.get(tid, (comm, 0.0))[1]
        if cpu <= 0:
            continue
        seen = samples.get(tid, {})
        sampled = sum(seen.values()) / rate
        scale = min(1.0, cpu / sampled) if sampled else 0.0
        for stage, n in seen.items():
            stages[stage] += n / rate * scale
        stages[_native_stage(seen)] += max(0.0, cpu - sampled * scale)
        threads.append({"tid": tid, "comm": comm, "cpu_s": round(cpu, 3), "python_samples_s": round(sampled, 3),
                        "top": sorted(seen.items(), key=lambda kv: -kv[1])[:3]})
    native = stages.pop(NATIVE, 0.0)
    model = min(native, model_cpu_ms * images / 1000)
    stages[MODEL_OPS] = model
    stages["preprocess + batching (TensorFlow native, the rest)"] = native - model
    per_image = {k: round(1000 * v / images, 2) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}
    return {"core_ms_per_image": per_image, "total_core_ms_per_image": round(sum(per_image.values()), 2),
            "outside_model_core_ms_per_image": round(sum(v for k, v in per_image.items()
                                                         if not k.startswith("model")), 2),
            "model_alone_core_ms_per_image": round(model_cpu_ms, 2),
            "threads": sorted(threads, key=lambda t: -t["cpu_s"])}


MODEL_OPS = "model ops (TensorFlow native; the model alone's CPU per image)"


def model_cpu_ms(ctx: Context, runs: int = 5) -> float:
    """CPU core-ms per image of the model alone at the stream's batch size, in this process:
    what the featurizer's TensorFlow threads spend on the model (the rest is preprocessing)."""
    from bench.common import car_photos, load, preprocessed, tile
    from bench.stream import BATCH_SIZE, LAYER, MODEL

    if "profile model" not in ctx.shared:
        backbone = load(ctx, MODEL)
        ctx.shared["profile model"] = backbone, tile(preprocessed(backbone, car_photos(ctx)[0]), BATCH_SIZE)
    backbone, batch = ctx.shared["profile model"]
    backbone.run(batch, [LAYER])
    started = time.process_time()
    for _ in range(runs):
        backbone.run(batch, [LAYER])
    return 1000 * (time.process_time() - started) / (runs * BATCH_SIZE)


def profiled_stream(ctx: Context, the_rig, n: int, name: str, variant, rate: float,
                    model_ms: float) -> dict[str, Any]:
    """One stream of ``n`` photos with py-spy on the featurizer; its rate and per-stage CPU."""
    from bench.stream import _one_stream

    spy: dict[str, Any] = {}

    def start(pipe) -> None:
        spy["raw"] = ctx.work / f"{name}.raw"
        spy["before"] = thread_cpu(pipe.featurizer.pid)
        spy["proc"] = subprocess.Popen(["py-spy", "record", "--pid", str(pipe.featurizer.pid), "--rate", str(int(rate)),
                                        "--format", "raw", "--threads", "--nonblocking", "-o", str(spy["raw"])],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # py-spy attaches

    def stop(pipe) -> None:
        spy["after"] = thread_cpu(pipe.featurizer.pid)
        spy["proc"].send_signal(signal.SIGINT)
        spy["proc"].wait(60)

    run = _one_stream(ctx, the_rig, n, name, variant, on_start=start, on_done=stop)
    text = spy["raw"].read_text() if spy["raw"].exists() else ""
    run["profile"] = breakdown(spy["before"], spy["after"], parse_raw(text), rate, n, model_ms)
    run["profile"]["top_frames"] = top_frames(text)
    return run


def main(argv: list[str] | None = None) -> int:
    from bench.stream import Variant, rig, source_tree

    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--runs", type=int, default=1, help="rounds (each variant once per round)")
    parser.add_argument("--photos", choices=("640px", "12mp"), default="640px")
    parser.add_argument("--broker", choices=("tansu", "kafka"), default="tansu")
    parser.add_argument("--guarantee", choices=("exactly-once", "at-least-once"), default="at-least-once",
                        help="DEEPER_GUARANTEE (at-least-once by default: exactly-once holds the labels until "
                             "the Parquet part rolls, which says nothing about CPU)")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--before", metavar="DIR", help="also profile a featurizer from this source tree")
    parser.add_argument("--cache-dir", default=os.environ.get("DEEPER_CACHE_DIR",
                                                              str(Path.home() / ".cache" / "go-deeper")))
    parser.add_argument("--out", default=str(RESULTS / "profile.json"))
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        parser.error("py-spy is not installed (pip install py-spy)")
    work = Path(tempfile.mkdtemp(prefix="deeper-profile-"))
    ctx = Context(quick=False, work=work, cache_dir=Path(args.cache_dir).expanduser(), broker=args.broker)
    variants = {"now": Variant(photos=args.photos, guarantee=args.guarantee)}
    if args.before:
        variants = {"before": Variant(photos=args.photos, guarantee=args.guarantee,
                                      env=tuple(source_tree(args.before).items())), **variants}
    done: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    try:
        the_rig = rig(ctx, args.broker)
        for round_ in range(args.runs):
            for name, variant in variants.items():
                model_ms = model_cpu_ms(ctx)
                run = profiled_stream(ctx, the_rig, args.images, f"profile-{name}-{round_}", variant, args.rate,
                                      model_ms)
                done[name].append(run)
                say(f"  [{name}] {run['per_s']} img/s; featurizer {run['cpu_ms_per_image'].get('featurizer')} "
                    f"core-ms/img; outside the model {run['profile']['outside_model_core_ms_per_image']}")
                for stage, ms in run["profile"]["core_ms_per_image"].items():
                    say(f"      {stage:<58} {ms:>7.2f}")
    finally:
        ctx.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = {name: {"per_s_runs": [r["per_s"] for r in runs],
                      "featurizer_core_ms_runs": [r["cpu_ms_per_image"].get("featurizer") for r in runs],
                      "median_per_s": statistics.median(r["per_s"] for r in runs),
                      "stages_median": _median_stages([r["profile"]["core_ms_per_image"] for r in runs])}
               for name, runs in done.items()}
    Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary, "runs": done}, indent=2,
                                         default=str) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def _median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in runs for k in r}
    return {k: round(statistics.median(r.get(k, 0.0) for r in runs), 2) for k in sorted(keys)}


if __name__ == "__main__":
    sys.exit(main())
