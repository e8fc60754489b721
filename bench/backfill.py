"""`deeper backfill` on Spark local[2] against `deeper featurize` on the same photos, same run.

Both commands run as a user runs them, in a fresh process each time, alternating run by run.
The photos are the bundled examples made into 216 files at three sizes (640 px, 1600 px, and
12-MP camera versions), so decode cost is that of a mixed lake, not of thumbnails, then copied
with distinct bytes (a JPEG comment naming the copy: another sha256, the same pixels) to
``PHOTOS`` files: a backfill is thousands of photos, over which Spark's fixed costs amortise.
``BENCH_BACKFILL_BASELINE=<git rev>`` adds that revision's backfill (its tree from ``git
archive``, run from there) to the same rounds: a before/after ratio from one run.
Every backfill run writes a fresh catalog and table (nothing to skip). Spark's start-up (the
JVM and the session, reported by the command) is given apart; the goal compares the backfill
without it to `deeper featurize` (both include Python, TensorFlow and the model's load).
"""

from __future__ import annotations

import io
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import CAMERA_SIZE, REPO, Context, camera_jpeg, distinct_copy, say

PHOTOS = 864
#: Distinct renderings (the rest are byte-distinct copies of these; rendering a 12-MP photo is slow).
RENDERED = 216
MODEL = "efficientnet_lite0"
#: long side of the three kinds of photos; None: a 12-MP camera photo (bench.common.camera_jpeg)
SIZES = (640, 1600, None)
GOAL = 0.8


def backfill_vs_featurize(ctx: Context) -> dict[str, Any]:
    folder = _photos(ctx, ctx.scale(PHOTOS, 64))
    count = len(list(folder.iterdir()))
    runs = ctx.scale(2, 1)
    configs: dict[str, Any] = {"featurize": None, "backfill local[2]": []}
    baseline = os.environ.get("BENCH_BACKFILL_BASELINE")
    if baseline:
        configs[f"backfill local[2] at {baseline}"] = _tree(ctx, baseline)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "DEEPER_OFFLINE": "1", "DEEPER_CACHE_DIR": str(ctx.cache_dir)}
    for round_ in range(runs + 1):  # the first round warms caches (page cache, Maven, converted weights)
        for name, extra in configs.items():
            measured = (_featurize(ctx, folder, env) if extra is None
                        else _backfill(ctx, folder, env, extra, round_, name))
            if round_ > 0:
                results[name].append(measured)
            say(f"  {name}: {measured}")
    rows = {name: _summary(count, values) for name, values in results.items()}
    base = rows["featurize"]["wall_per_s"]
    for name, row in rows.items():
        if name != "featurize":
            row["ratio_to_featurize_excl_spark_startup"] = round(row["wall_excl_startup_per_s"] / base, 3)
            row["ratio_to_featurize_incl_spark_startup"] = round(row["wall_per_s"] / base, 3)
            row["ratio_per_round_excl_startup"] = [
                round((count / (b["wall_s"] - b["spark_startup_s"])) / (count / f["wall_s"]), 3)
                for b, f in zip(results[name], results["featurize"])]
    return {"what": "`deeper featurize DIR --no-cache` vs `deeper backfill DIR --master local[2]` (fresh table), "
                    "each in a fresh process, alternating run by run; wall_per_s includes Python, TensorFlow and "
                    "model load (and for the backfill Spark's start-up, also given apart); goal: backfill without "
                    f"Spark's start-up >= {GOAL}x featurize",
            "photos": f"{count} distinct files made from examples/ at long side 640 px, 1600 px and "
                      f"{CAMERA_SIZE[0]}x{CAMERA_SIZE[1]} (a third each; {RENDERED} rendered, the rest "
                      "byte-distinct copies of those)",
            "model": MODEL, "rows": rows}


def _photos(ctx: Context, count: int) -> Path:
    from PIL import Image

    folder = ctx.work / "backfill-photos"
    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    sources = sorted((REPO / "examples").rglob("*.jpg"))
    for i in range(count):
        if i >= RENDERED:
            base = sorted(folder.iterdir())[i % RENDERED]
            (folder / f"{i:05d}-{base.name[6:]}").write_bytes(distinct_copy(base.read_bytes(), i))
            continue
        data, size = sources[i % len(sources)].read_bytes(), SIZES[i % len(SIZES)]
        if size is None:
            data = camera_jpeg(data, seed=i)
        else:
            with Image.open(io.BytesIO(data)) as image:
                scale = size / max(image.size)
                out = io.BytesIO()
                image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                            Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
                data = out.getvalue()
        (folder / f"{i:05d}-{size or 'camera'}.jpg").write_bytes(distinct_copy(data, i))
    return folder


def _tree(ctx: Context, rev: str) -> Path:
    """The repository at ``rev`` (``git archive``), for the baseline variant to run from."""
    tree = ctx.work / f"tree-{rev}"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _run(command: list[str], env: dict[str, str], cwd: Path = REPO) -> tuple[float, str, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:4])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, done.stdout, done.stderr


def _featurize(ctx: Context, folder: Path, env: dict[str, str]) -> dict[str, float]:
    command = [sys.executable, "-m", "pipeline.app.cli", "featurize", str(folder), "--out",
               str(ctx.work / "backfill-bench-featurize.parquet"), "--no-cache", "-q", "--model", MODEL]
    wall, _, err = _run(command, env)
    found = re.search(r"(\d+) computed \(([\d.]+) img/s\)", err)
    return {"wall_s": round(wall, 2), "own_rate_per_s": float(found.group(2)) if found else float("nan")}


def _backfill(ctx: Context, folder: Path, env: dict[str, str], tree: list[str] | Path, round_: int,
              name: str) -> dict[str, float]:
    """One backfill into a fresh catalog; ``tree``: [] for this checkout, or another revision's tree
    (run from there: its ``pipeline`` package is imported before the installed one)."""
    data = ctx.work / f"backfill-data-{round_}-{re.sub(r'[^A-Za-z0-9]+', '-', name)}"
    command = [sys.executable, "-m", "pipeline.app.cli", "backfill", str(folder), "--master", "local[2]", "-q",
               "--model", MODEL]
    cwd = tree if isinstance(tree, Path) else REPO
    extra = {"PYTHONPATH": str(tree)} if isinstance(tree, Path) else {}
    wall, out, err = _run(command, {**env, **extra, "DEEPER_DATA_DIR": str(data)}, cwd)
    startup = re.search(r"Spark [\d.]+ started in ([\d.]+) s", err)
    job = re.search(r"featurized (\d+),.*; ([\d.]+) s, ([\d.]+) photos/s", out)
    stage = re.search(r"featurized \d+ photos in \d+ commit\(s\), ([\d.]+) s", err)
    return {"wall_s": round(wall, 2), "spark_startup_s": float(startup.group(1)) if startup else float("nan"),
            "job_s": float(job.group(2)) if job else float("nan"),
            "featurize_stage_s": float(stage.group(1)) if stage else float("nan"),
            "featurized": int(job.group(1)) if job else 0}


def _summary(count: int, values: list[dict[str, float]]) -> dict[str, Any]:
    walls = [v["wall_s"] for v in values]
    row: dict[str, Any] = {"runs": values, "wall_per_s": round(count / statistics.median(walls), 2)}
    if "spark_startup_s" in values[0]:
        row["spark_startup_s"] = round(statistics.median(v["spark_startup_s"] for v in values), 2)
        row["wall_excl_startup_per_s"] = round(
            count / statistics.median(v["wall_s"] - v["spark_startup_s"] for v in values), 2)
        row["job_per_s"] = round(count / statistics.median(v["job_s"] for v in values), 2)
        # the featurize stage alone (chunks: read, decode, model, commit) on 2 task slots
        row["featurize_stage_per_s"] = round(count / statistics.median(v["featurize_stage_s"] for v in values), 2)
        row["featurize_stage_per_slot_per_s"] = round(row["featurize_stage_per_s"] / 2, 2)
    else:
        row["own_rate_per_s"] = round(float(np.median([v["own_rate_per_s"] for v in values])), 2)
    return row
