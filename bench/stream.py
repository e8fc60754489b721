"""Stream figures: end-to-end throughput and the cost of exactly-once (more in :mod:`bench.stream_more`).

The setup is the demo's: a local Tansu broker in memory mode (``pipeline.app.broker.local``), and the
featurizer and the scorer as separate processes (``python -m pipeline.app.cli featurizer|scorer``,
JSON logs to files), so each has its own interpreter and GIL as in production. The bench
process trains the classifier (EfficientNet-Lite0 prelogits, linear SVM, on the cars train
photos) into a scratch registry, produces with :class:`producers.produce.ImageProducer` and
reads the labels topic with its own consumer (receive times are what "arrived downstream"
means here).

Timing points, all wall-clock on this machine:
- first consume: the first featurizer ``batch`` log event of the measured photos, minus its
  ``seconds`` (the event is logged when the batch is done);
- last label: when the bench's labels consumer received the last measured photo's label;
- latency: label receive time minus the image message's ``produced-at`` header.
A warm-up (16 photos, waited for) precedes every measurement, so model tracing and group joins
are not counted. Every photo is a distinct copy (other bytes, same pixels).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.batch import model_rate
from devrig import LabelCollector, Photo, WorkerProcess, photo_from_bytes, send_photos, worker_env
from bench.common import (CARS, Context, camera_jpeg, car_photos, cpu_seconds, distinct_copy, fit_camera_jpeg,
                          iso_to_epoch, load, preprocessed, rate_summary, say, tile, timed_runs)

MODEL = "efficientnet_lite0"
LAYER = "prelogits"
BATCH_SIZE = 32  # the featurizer's default
PARTITIONS = 4
WARMUP = 16


# --------------------------------------------------------------------------- the rig


class Rig:
    """A broker, a trained registry and photos; :meth:`pipeline` starts a featurizer + scorer.

    Brokers, worker processes, producing and the labels reader are :mod:`devrig`'s.
    """

    def __init__(self, ctx: Context, kind: str = "tansu"):
        from pipeline.config import Settings
        from devrig import RigBroker

        self.ctx = ctx
        self.kind = kind
        shared = ctx.work / "stream"  # registries: trained once, used by every broker's rig
        self.root = shared / kind
        self.root.mkdir(parents=True, exist_ok=True)
        # Tansu in memory (fastest); Apache Kafka always keeps its log on disk
        self.broker = RigBroker(self.root / "broker", kind, durable=False).start()
        ctx.closers.append(self.broker.stop)
        self.base = Settings.from_env(bootstrap_servers=self.broker.bootstrap_servers, data_dir=str(self.root / "data"),
                                      registry_dir=str(shared / "registry"), cache_dir=str(ctx.cache_dir))
        self.paths, self.source = car_photos(ctx)
        self._datas = [p.read_bytes() for p in self.paths]
        self._camera: list[bytes] | None = None
        self._next = 0
        self._registries: dict[str, str] = ctx.shared.setdefault("stream registries", {})
        if "trained" not in ctx.shared:
            ctx.shared["trained"] = self._train("fp32", self.base.registry_dir)
        self.meta, self.vectors = ctx.shared["trained"]

    def registry(self, precision: str) -> str:
        """A registry whose classifier was trained on ``precision`` vectors (the scorer refuses others)."""
        if precision == "fp32":
            return self.base.registry_dir
        if precision not in self._registries:
            path = str(self.root.parent / f"registry-{precision}")
            self._train(precision, path)
            self._registries[precision] = path
        return self._registries[precision]

    def _train(self, precision: str, registry_dir: str):
        from pipeline.model.photos import PhotoFile
        from pipeline.learning.registry import Registry
        from pipeline.learning.train_photos import train_from_photos

        train = [p for p in self.paths if "/train/" in str(p)] or self.paths
        photos = [PhotoFile(p, p.parent.name if CARS in p.parents else ("a" if i % 2 else "b"))
                  for i, p in enumerate(train)]
        trained = train_from_photos(photos, load(self.ctx, MODEL, precision), Registry(registry_dir), LAYER)
        rows = trained.features.rows
        return trained.features.meta, np.stack([r.vector for r in rows])

    def photos(self, count: int, kind: str = "640px") -> list[Photo]:
        """``count`` photos never sent before (distinct bytes): the cars photos (``640px``) or
        12-MP camera versions of them (``12mp``, see :meth:`camera_datas`)."""
        datas = self.camera_datas() if kind == "12mp" else self._datas
        out = []
        for _ in range(count):
            i = self._next
            self._next += 1
            out.append(photo_from_bytes(distinct_copy(datas[i % len(datas)], i),
                                        f"bench/{i:06d}-{kind}-{self.paths[i % len(self.paths)].name}"))
        return out

    def camera_datas(self) -> list[bytes]:
        """12-MP camera JPEGs of the cars photos as ``deeper produce`` sends them by default:
        re-encoded (``producers.produce.reencode``) until they fit the 1 MiB message limit.

        Done once here, not in the measured window: the producer's re-encoding is the
        producer's cost (about a second per photo on one core), not the stream's.
        """
        if self._camera is None:
            self._camera = [fit_camera_jpeg(camera_jpeg(data, seed=i), self.base) for i, data in enumerate(self._datas)]
        return self._camera

    def settings(self, name: str, precision: str = "fp32"):
        from devrig import fresh_settings

        settings = fresh_settings(self.base, self.root, prefix=f"b-{name}", partitions=PARTITIONS)
        return dataclasses.replace(settings, registry_dir=self.registry(precision))  # data dir: root/data, shared

    def worker(self, role: str, settings, args: list[str], name: str, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(role, worker_env(settings, **(env or {})), self.root / "logs", args,
                               name=f"{name}-{role}")
        worker.start()
        self.ctx.closers.append(worker.stop)
        return worker

    def pipeline(self, name: str, variant: "Variant | None" = None) -> "Pipeline":
        return Pipeline(self, name, variant or Variant())


def rig(ctx: Context, kind: str | None = None) -> Rig:
    """One rig per broker kind per bench run, shared by the stream figures (``kind``: the
    figure's default, overridden by ``--broker``)."""
    kind = ctx.broker or kind or "tansu"
    key = f"rig-{kind}"
    if key not in ctx.shared:
        say(f"  starting a local broker ({kind}){'' if 'trained' in ctx.shared else ' and training the classifier'}")
        ctx.shared[key] = Rig(ctx, kind)
    return ctx.shared[key]


def source_tree(path: str | os.PathLike) -> dict[str, str]:
    """Environment that runs a worker from another source tree (e.g. a copy from before a
    change): its packages first on the path, and not the repository the process starts in."""
    return {"PYTHONPATH": str(Path(path).resolve()), "PYTHONSAFEPATH": "1"}


class Pipeline:
    """Fresh topics, a featurizer and a scorer process, a labels reader and a producer; warmed up."""

    def __init__(self, rig: Rig, name: str, variant: "Variant"):
        from producers.produce import ImageProducer

        self.rig = rig
        self.settings = dataclasses.replace(rig.settings(name, variant.precision), guarantee=variant.guarantee)
        self.featurizer = rig.worker("featurizer", self.settings,
                                     ["--model", MODEL, "--precision", variant.precision, "--layer", LAYER,
                                      "--batch-size", str(BATCH_SIZE), *variant.args], name, dict(variant.env))
        self.scorer = rig.worker("scorer", self.settings, [], name)
        self.labels = LabelCollector(self.settings)
        self.producer = ImageProducer(self.settings)
        for worker in (self.featurizer, self.scorer):
            worker.wait_for("partitions assigned")
        warm = self.produce(rig.photos(WARMUP, variant.photos))
        self.labels.wait([i for i, _ in warm], timeout=180, check=self.check)
        self.warm_until = time.time()

    @property
    def procs(self) -> list[WorkerProcess]:
        return [self.featurizer, self.scorer]

    def check(self) -> None:
        for worker in self.procs:
            worker.check()

    def produce(self, photos: list[Photo], rate: float | None = None) -> list[tuple[str, float]]:
        """Send ``photos`` (at ``rate`` per second, else as fast as possible); (image id, produced-at epoch)."""
        return [(image_id, iso_to_epoch(at)) for image_id, at in send_photos(self.producer, photos, rate)]

    def featurizer_summary(self, since: float) -> dict[str, Any]:
        batches = self.featurizer.current.batches(since)
        consumed = [b["consumed"] for b in batches]
        return {
            "batches": len(batches),
            "mean_batch": round(float(np.mean(consumed)), 2) if consumed else 0.0,
            "full_batches": sum(1 for c in consumed if c >= BATCH_SIZE),
            "model_batches": sum(b.get("model_batches", 0) for b in batches),
            "mean_model_batch": round(sum(b.get("model_rows", 0) for b in batches)
                                      / max(1, sum(b.get("model_batches", 0) for b in batches)), 2),
            "mean_poll_seconds": round(float(np.mean([b["seconds"] for b in batches])), 3) if batches else None,
            "sum_model_s": round(sum(b["model_s"] for b in batches), 3),
            "sum_decode_wait_s": round(sum(b["decode_wait_s"] for b in batches), 3),
            "first_consume": (batches[0]["_t"] - batches[0]["seconds"]) if batches else None,
            "last_batch_done": batches[-1]["_t"] if batches else None,
        }

    def close(self) -> None:
        self.labels.stop()
        self.producer.close()
        for worker in self.procs:
            worker.stop()


class CpuMeter:
    """CPU seconds each named process uses from construction to :meth:`used` (produce -> last label)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.start = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def used(self) -> dict[str, float | None]:
        out = {}
        for name, pid in self.pids.items():
            now, then = cpu_seconds(pid), self.start[name]
            out[name] = round(now - then, 2) if now is not None and then is not None else None
        return out


# --------------------------------------------------------------------------- figures


def _model_alone(ctx: Context, precision: str = "fp32") -> float:
    """Images/s of the model alone at the stream's batch size: from the ``model``/``precision``
    figures of this run where they ran, else measured here."""
    rate = model_rate(ctx, MODEL, BATCH_SIZE) if precision == "fp32" else None
    for row in ctx.results.get("precision", {}).get("speed", []):
        if (row["backbone"], row["precision"], row["batch_size"]) == (MODEL, precision, BATCH_SIZE):
            rate = rate or row["per_s"]
    if rate is not None:
        return rate
    backbone = load(ctx, MODEL, precision)
    batch = tile(preprocessed(backbone, car_photos(ctx)[0]), BATCH_SIZE)
    return rate_summary(BATCH_SIZE, timed_runs(lambda: backbone.run(batch, [LAYER]), ctx.scale(5, 3), 2))["per_s"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One stream configuration: precision, featurizer options, guarantee, photos, environment."""

    precision: str = "fp32"
    args: tuple[str, ...] = ()
    guarantee: str = "exactly-once"  # DEEPER_GUARANTEE of both workers (the product's default)
    photos: str = "640px"  # or "12mp": camera photos re-encoded to fit the message limit
    env: tuple[tuple[str, str], ...] = ()  # extra worker environment (e.g. source_tree())


#: Stream variants: what the featurizer's options, the guarantee and the photos change.
VARIANTS: dict[str, Variant] = {
    "12-MP photos": Variant(photos="12mp"),
    "at-least-once": Variant(guarantee="at-least-once"),
    "fp32, one model thread": Variant(args=("--model-threads", "1")),
    "fp32, two batches side by side": Variant(args=("--model-threads", "2")),
    "bf16": Variant(precision="bf16"),
    "bf16, two batches side by side": Variant(precision="bf16", args=("--model-threads", "2")),
    "fp32-lite": Variant(precision="fp32-lite"),
}
QUICK_VARIANTS = ("12-MP photos",)

Hook = Callable[["Pipeline"], None]


def _one_stream(ctx: Context, the_rig: Rig, n: int, name: str, variant: Variant = Variant(),
                on_start: Hook | None = None, on_done: Hook | None = None) -> dict[str, Any]:
    """One measured stream of ``n`` photos on fresh topics; ``on_start``/``on_done`` run right
    before the first produce and right after the last label (e.g. a profiler)."""
    pipe = the_rig.pipeline(name, variant)
    try:
        photos = the_rig.photos(n, variant.photos)
        if on_start:
            on_start(pipe)
        cpu = CpuMeter({"broker": the_rig.broker.pid, "featurizer": pipe.featurizer.pid, "scorer": pipe.scorer.pid,
                        "bench (producer + labels reader)": os.getpid()})
        produce_started = time.time()
        sent = pipe.produce(photos)
        produced = time.time()
        ids = [i for i, _ in sent]
        pipe.labels.wait(ids, timeout=max(300.0, n / 2), check=pipe.check)
        last_label = max(pipe.labels.received[i] for i in ids)
        used = cpu.used()
        if on_done:
            on_done(pipe)
        time.sleep(0.5)  # let the last batch events reach the log
        feat = pipe.featurizer_summary(produce_started)
        scorer_batches = pipe.scorer.current.batches(produce_started)
        plan = pipe.featurizer.current.log.named("thread plan")
    finally:
        pipe.close()
    start = feat["first_consume"] or produce_started
    featurized = feat["last_batch_done"] or last_label
    return {
        "images": n, "per_s": round(n / (last_label - start), 2),
        "featurizer_per_s": round(n / max(1e-3, featurized - start), 2),
        "labels_after_last_batch_s": round(last_label - featurized, 2),
        "produce_to_last_label_per_s": round(n / (last_label - produce_started), 2),
        "produce_seconds": round(produced - produce_started, 2),
        "seconds_first_consume_to_last_label": round(last_label - start, 2),
        "mean_message_bytes": int(np.mean([len(p.data) for p in photos])),
        "featurizer": feat,
        "thread_plan": {k: v for k, v in plan[-1].items() if not k.startswith("_")} if plan else None,
        "scorer": {"batches": len(scorer_batches), "sum_s": round(sum(b["seconds"] for b in scorer_batches), 3)},
        "cpu_seconds": used,
        "cpu_ms_per_image": {k: round(1000 * v / n, 2) for k, v in used.items() if v is not None},
        "cpu_seconds_available": round((last_label - produce_started) * (os.cpu_count() or 1), 2),
    }


def _interleaved_streams(ctx: Context, the_rig: Rig, configs: dict[str, Variant], n: int, runs: int,
                         figure: str) -> dict[str, list[dict[str, Any]]]:
    """Every config ``runs`` times, round by round (a burst of load from elsewhere then hits all alike)."""
    done: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for round_ in range(runs):
        for name, variant in configs.items():
            tag = f"{figure}-" + "".join(c if c.isalnum() else "-" for c in name) + f"-{round_}"
            done[name].append(_one_stream(ctx, the_rig, n, tag, variant))
            say(f"  {figure} [{name}] run {round_ + 1}/{runs}: {done[name][-1]['per_s']} img/s")
    return done


def _what(the_rig: Rig) -> str:
    broker = "a local Tansu broker (memory)" if the_rig.kind == "tansu" else "a local Apache Kafka broker (disk)"
    return ("photos produced at once to a fresh images topic; rate = N / (first featurizer consume -> last label "
            "received by a downstream consumer); featurizer and scorer are separate `python -m pipeline.app.cli` "
            f"processes on {broker} on the same machine as the producer and the labels reader, so all of them "
            "share its cores; cpu_seconds = what each process used from the first produce to the last label; the "
            "median of `runs_per_s`, the configurations interleaved round by round")


def stream_throughput(ctx: Context) -> dict[str, Any]:
    """Images/s from the first consume of N photos (produced at once) to the last label.

    The default configuration and every variant (``ctx.shared["stream variants"]`` picks some)
    run ``runs`` times, interleaved round by round; each reports its median run.
    """
    n = ctx.scale(500, 120)
    runs = ctx.scale(3, 1)
    model = _model_alone(ctx)
    reference = ctx.results.get("reference", {}).get("per_s")
    the_rig = rig(ctx)
    wanted = ctx.shared.get("stream variants", QUICK_VARIANTS if ctx.quick else tuple(VARIANTS))
    configs = {"default": Variant(), **{name: VARIANTS[name] for name in wanted}}
    done = _interleaved_streams(ctx, the_rig, configs, n, runs, "stream")
    shipped = _median_run(done.pop("default"))
    result = {
        "what": _what(the_rig), "broker": the_rig.kind,
        "backbone": MODEL, "layer": LAYER, "batch_size": BATCH_SIZE, "partitions": PARTITIONS,
        "photos": the_rig.source, **shipped,
        "model_alone_same_batch_per_s": model,
        "ratio_to_model_alone": round(shipped["per_s"] / model, 3) if model else None,
        "reference_loop_per_s": reference,
        "ratio_to_reference_loop": round(shipped["per_s"] / reference, 3) if reference else None,
        "variants": {},
    }
    result["cpu_budget"] = _cpu_budget(shipped, model)
    say(f"  stream: {shipped['per_s']} img/s (x{result['ratio_to_model_alone']} of model alone {model}); "
        f"mean model batch {shipped['featurizer']['mean_model_batch']}")
    for name, variant_runs in done.items():
        variant, run = configs[name], _median_run(variant_runs)
        same = _model_alone(ctx, variant.precision)
        run.update({"precision": variant.precision, "featurizer_args": list(variant.args),
                    "guarantee": variant.guarantee, "photo_kind": variant.photos,
                    "ratio_to_default_same_run": round(run["per_s"] / shipped["per_s"], 3),
                    "ratio_to_model_alone_fp32": round(run["per_s"] / model, 3) if model else None,
                    "model_alone_same_precision_per_s": same,
                    "ratio_to_model_alone_same_precision": round(run["per_s"] / same, 3) if same else None,
                    "ratio_to_reference_loop": round(run["per_s"] / reference, 3) if reference else None})
        result["variants"][name] = run
        say(f"  stream [{name}]: {run['per_s']} img/s (x{run['ratio_to_default_same_run']} of the default); "
            f"mean model batch {run['featurizer']['mean_model_batch']}")
    return result


#: What exactly-once may cost against at-least-once for it to stay the default.
GUARANTEE_MAX_COST = 0.15


def guarantee_cost(ctx: Context) -> dict[str, Any]:
    """The stream with ``DEEPER_GUARANTEE=exactly-once`` vs ``at-least-once``, on Apache Kafka.

    Apache Kafka (what users run; ``--broker tansu`` overrides it) is started by the rig. The
    configurations alternate run by run, so their ratios are of one run's conditions. Two
    rates each: end to end (to the last label a ``read_committed`` reader gets: with
    exactly-once, outputs become visible only when the checkpoint commits, which waits for the
    Parquet part to roll, ``--roll-seconds`` 30 by default) and the featurizer's own (first
    consume to last batch done: its capacity). ``exactly-once, roll 5 s`` shows the first
    is the commit cadence, not the work.
    """
    n = ctx.scale(500, 120)
    runs = ctx.scale(3, 1)
    the_rig = rig(ctx, "kafka")
    configs = {"exactly-once": Variant(), "at-least-once": Variant(guarantee="at-least-once"),
               "exactly-once, roll 5 s": Variant(args=("--roll-seconds", "5"))}
    done = _interleaved_streams(ctx, the_rig, configs, n, runs, "guarantee")
    medians = {name: _median_run(runs_) for name, runs_ in done.items()}
    alos = medians["at-least-once"]
    rows = {}
    for name, run in medians.items():
        rows[name] = {"per_s": run["per_s"], "featurizer_per_s": run["featurizer_per_s"],
                      "runs_per_s": run["runs_per_s"],
                      "featurizer_runs_per_s": [r["featurizer_per_s"] for r in done[name]],
                      "labels_after_last_batch_s": [r["labels_after_last_batch_s"] for r in done[name]],
                      "featurizer_cpu_ms_per_image": [r["cpu_ms_per_image"].get("featurizer") for r in done[name]],
                      "ratio_to_at_least_once": round(run["per_s"] / alos["per_s"], 3),
                      "featurizer_ratio_to_at_least_once": round(
                          statistics.median(r["featurizer_per_s"] for r in done[name])
                          / statistics.median(r["featurizer_per_s"] for r in done["at-least-once"]), 3)}
        say(f"  guarantee [{name}] on {the_rig.kind}: {run['per_s']} img/s end to end "
            f"(x{rows[name]['ratio_to_at_least_once']}), featurizer {run['featurizer_per_s']} img/s "
            f"(x{rows[name]['featurizer_ratio_to_at_least_once']})")
    eos = rows["exactly-once"]
    return {"what": _what(the_rig) + "; featurizer_per_s = N / (first consume -> last featurizer batch done)",
            "broker": the_rig.kind, "backbone": MODEL, "batch_size": BATCH_SIZE, "images": n, "configs": rows,
            "runs": {name: runs_ for name, runs_ in done.items()},
            "exactly_once_per_s": eos["per_s"], "at_least_once_per_s": alos["per_s"],
            "ratio_exactly_once_to_at_least_once": eos["ratio_to_at_least_once"],
            "featurizer_ratio_exactly_once_to_at_least_once": eos["featurizer_ratio_to_at_least_once"],
            "max_cost": GUARANTEE_MAX_COST,
            "within_budget_end_to_end": bool(1 - eos["ratio_to_at_least_once"] <= GUARANTEE_MAX_COST),
            "within_budget_featurizer": bool(1 - eos["featurizer_ratio_to_at_least_once"] <= GUARANTEE_MAX_COST)}


def _cpu_budget(run: dict[str, Any], model_per_s: float) -> dict[str, Any]:
    """The best stream/model ratio this machine allows at the CPU cost per image measured.

    The model alone keeps every core busy, so it costs ``cores / model_per_s`` core-seconds per
    image; whatever else each image costs on the same cores (decode, Kafka clients, broker,
    scorer, the bench's own producer and reader) comes on top, and the stream can reach at most
    ``1 / (1 + other * model_per_s / cores)`` of the model alone.
    """
    cores = os.cpu_count() or 1
    total = sum(run["cpu_ms_per_image"].values())
    model_ms = 1000 * cores / model_per_s
    other_ms = max(0.0, total - model_ms)
    return {"what": "estimate: model core-ms per image from the model alone (all cores busy); other = the stream's "
                    "measured CPU per image (all processes) minus that",
            "cores": cores, "model_cpu_ms_per_image": round(model_ms, 2), "other_cpu_ms_per_image": round(other_ms, 2),
            "max_ratio_to_model_alone": round(1 / (1 + other_ms * model_per_s / (1000 * cores)), 3),
            "other_cpu_ms_per_image_allowed_for_0.9": round(1000 * cores / model_per_s * (1 / 0.9 - 1), 2)}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (its details kept), with every run's rate alongside."""
    ordered = sorted(runs, key=lambda r: r["per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_per_s": [r["per_s"] for r in runs]}
