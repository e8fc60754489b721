"""What every benchmark figure shares: timing, the machine, photos, backbones, process memory.

Timing rule for every figure: a warm-up (not counted), then several timed runs, and the figure
is the median run; the individual runs are kept in the JSON so the spread is visible.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CARS = SHARED / "cars"
IMAGENET_SAMPLES = SHARED / "imagenet-samples"
RESULTS = REPO / "bench" / "results"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")

#: per backbone: the end point the classifier uses (features) and the ImageNet logits.
LAYERS = {
    "efficientnet_lite0": {"features": "prelogits", "logits": "logits"},
    "inception_v1": {"features": "AvgPool_0a_7x7", "logits": "Logits"},
}
BACKBONES = tuple(LAYERS)
#: The model-alone figure also times the bigger Lite variants (the speed side of the recipe choice,
#: bench/recipes.py); the other figures keep to the two backbones above.
MODEL_BACKBONES = (*BACKBONES, "efficientnet_lite1", "efficientnet_lite2")


@dataclass
class Context:
    """Options and shared state of one ``bench.run`` invocation."""

    quick: bool
    work: Path  # scratch directory, removed at the end
    cache_dir: Path  # weights, converted models, the random Inception checkpoint
    broker: str | None = None  # the stream figures' broker kind (None: each figure's default)
    results: dict[str, Any] = field(default_factory=dict)  # figures done so far (later ones reuse them)
    notes: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # e.g. the stream rig, reused by later figures
    closers: list[Callable[[], None]] = field(default_factory=list)  # run at the very end

    def close(self) -> None:
        while self.closers:
            try:
                self.closers.pop()()
            except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                say(f"cleanup failed: {exc!r}")

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full


# --------------------------------------------------------------------------- timing


def timed_runs(fn: Callable[[], Any], runs: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``runs`` calls of ``fn`` after ``warmup`` uncounted calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def interleaved_runs(fns: dict[str, Callable[[], Any]], runs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Like :func:`timed_runs` for several variants, alternating them run by run, so a burst of
    load from other processes hits all of them alike and their *ratios* stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - started)
    return out


def rate_summary(items_per_run: int, seconds: Sequence[float]) -> dict[str, Any]:
    """Items/s of the median run, plus the spread (min/max rate) and the raw run times."""
    median = statistics.median(seconds)
    return {
        "per_s": round(items_per_run / median, 2),
        "min_per_s": round(items_per_run / max(seconds), 2),
        "max_per_s": round(items_per_run / min(seconds), 2),
        "items_per_run": items_per_run,
        "runs_s": [round(s, 4) for s in seconds],
    }


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


# --------------------------------------------------------------------------- the machine


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _meminfo_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    """The machine the numbers were taken on, and how busy it was when they started."""
    import PIL
    import tensorflow as tf

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    wanted = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile"]
    mem_kb = _meminfo_kb("MemTotal")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    dirty = _git("status", "--porcelain")
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_family_model": f"{cpu.get('cpu family', '?')}/{cpu.get('model', '?')}",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_flags": {f: f in flags for f in wanted},
        "memory_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
    }


# --------------------------------------------------------------------------- photos


def photo_paths(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)


def synthetic_jpegs(directory: Path, count: int = 27, size: tuple[int, int] = (640, 427)) -> list[Path]:
    """Photo-like JPEGs (smooth gradients + texture + noise) when the cars photos are missing."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    paths = []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        base = np.stack([np.sin(xx / (20 + 7 * i) + c) * np.cos(yy / (15 + 3 * c + i)) for c in range(3)], -1)
        pixels = (127 + 90 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        path = directory / f"synthetic-{i:02d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def car_photos(ctx: Context) -> tuple[list[Path], str]:
    """The cars photos (640 px JPEGs), or synthetic 640x427 JPEGs where they are missing."""
    if CARS.is_dir():
        paths = [p for p in photo_paths(CARS) if p.suffix.lower() in (".jpg", ".jpeg")]
        if paths:
            return paths, str(CARS)
    synthetic = ctx.work / "synthetic-cars"
    paths = photo_paths(synthetic) if synthetic.is_dir() else synthetic_jpegs(synthetic)
    return paths, "synthetic 640x427 JPEGs (../shared/data/cars missing)"


#: What a phone or camera saves today: 12 megapixels.
CAMERA_SIZE = (4000, 3000)


def camera_jpeg(data: bytes, seed: int = 0, size: tuple[int, int] = CAMERA_SIZE) -> bytes:
    """A camera-sized JPEG from a small photo: upscaled, mild sensor noise (sd 3), quality 90.

    Upscaling alone gives smooth blocks that entropy-decode faster than a real photo; the
    noise brings the size and the decode cost to a real 12-MP photo's (~1.6 MB).
    """
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        big = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0, 3, big.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(big + noise + 0.5, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


#: Room a fitted photo keeps for the producer's key and headers and :func:`distinct_copy`'s tag.
_FIT_MARGIN = 2048


def fit_camera_jpeg(data: bytes, settings: Any) -> bytes:
    """``data`` as ``deeper produce`` sends it by default when it is over the message limit:
    re-encoded (``producers.produce.reencode``: smaller, quality 90) until it fits
    ``DEEPER_MAX_MESSAGE_BYTES``, less a margin for the key, the headers and a copy tag."""
    from producers.produce import reencode

    budget = settings.message_limit - _FIT_MARGIN
    return data if len(data) <= budget else reencode(data, None, budget).data


def distinct_copy(data: bytes, index: int) -> bytes:
    """The same JPEG with a COM segment after SOI holding ``index``: other bytes (other sha256,
    so no cache or key collides), the same pixels. Non-JPEG data gets trailing bytes instead."""
    tag = f"go-deeper bench copy {index}".encode()
    if data[:2] == b"\xff\xd8":
        return data[:2] + b"\xff\xfe" + (len(tag) + 2).to_bytes(2, "big") + tag + data[2:]
    return data + tag


def distinct_photos(sources: Sequence[Path], count: int) -> list[tuple[str, bytes]]:
    """``count`` (name, bytes) pairs cycling through ``sources``, every one with distinct bytes."""
    datas = [(p.name, p.read_bytes()) for p in sources]
    return [(f"{i:05d}-{datas[i % len(datas)][0]}", distinct_copy(datas[i % len(datas)][1], i)) for i in range(count)]


# --------------------------------------------------------------------------- backbones


def inception_weights(ctx: Context) -> tuple[str | None, str]:
    """(weights argument, description): the official checkpoint if it can be had offline, else
    a checkpoint with the official variable names and seeded random values (speed does not
    depend on the values; fidelity numbers then describe that network, not the real one)."""
    from pipeline.model import weights as weights_lib
    from pipeline.model.nets import inception_v1

    if weights_lib.available(inception_v1.WEIGHTS, None, ctx.cache_dir):
        return None, "official inception_v1_2016_08_28 checkpoint"
    path = ctx.cache_dir / "bench" / "inception_v1-random" / "inception_v1.ckpt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        from devrig.checkpoints import make_checkpoint

        make_checkpoint(path)
    return str(path), "random checkpoint with the official variable names (devrig/checkpoints.py)"


def load(ctx: Context, name: str, precision: str = "fp32", **kwargs: Any):
    """The named backbone in ``precision``, fresh (not the factory's per-process cache)."""
    from pipeline.model.nets.factory import network

    module = network(name)
    if name == "inception_v1":
        weights, _ = inception_weights(ctx)
        return module.load(weights=weights, cache_dir=ctx.cache_dir, progress=False, precision=precision, **kwargs)
    return module.load(cache_dir=ctx.cache_dir, progress=False, precision=precision, **kwargs)


def preprocessed(backbone, paths: Sequence[Path]) -> np.ndarray:
    """float32 ``[N, S, S, 3]``: each photo decoded by the pipeline's decoder and preprocessed."""
    from pipeline.model.decode import decode_image

    return np.stack([np.asarray(backbone.preprocess(decode_image(Path(p).read_bytes()).pixels)) for p in paths])


def tile(images: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.resize(images, (n, *images.shape[1:])))


# --------------------------------------------------------------------------- processes


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (None when it is gone or there is no procfs)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far (None when it is gone or there is no procfs).

    Summed per process over a measured window, it shows where a shared machine's cores went
    (model, decode, broker, scorer, the bench itself) when a rate falls short.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def iso_to_epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
