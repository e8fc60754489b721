"""Reduced precision on CPU: speed of each precision against fp32, and how faithful it stays.

Speed: ``backbone.run`` on preprocessed photos, the precisions interleaved run by run (so
load from other processes hits all alike and the ratios hold). EfficientNet-Lite0 also gets
``fp32 (tf.pad)``, the port as it was before SAME padding, to show that fp32 change alone.

Fidelity, against the fp32 backbone, on the evaluation photos (cars train + test and the
ImageNet samples; int8 is calibrated on the bundled examples/train, which are not among them):
cosine similarity of the feature vectors (min and mean over photos), top-1 agreement of the
logits, and the SVM labels on cars/test: an SVM trained on cars/train with each precision's own
vectors, and the fp32-trained SVM applied to this precision's vectors (what a stream scorer does
when only the featurizer changes precision).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.common import (BACKBONES, CARS, IMAGENET_SAMPLES, LAYERS, Context, car_photos, inception_weights,
                          interleaved_runs, load, photo_paths, preprocessed, rate_summary, say, tile)

PRECISIONS = ("fp32", "bf16", "fp32-lite", "int8")
LEGACY = "fp32 (tf.pad)"


def precision_figure(ctx: Context) -> dict[str, Any]:
    from pipeline.model import precision as precision_lib

    batch_sizes = (1, 32)
    runs = ctx.scale(7, 3)
    paths, _ = car_photos(ctx)
    speed, fidelity, loads = [], [], []
    for name in BACKBONES:
        backbones = {}
        for p in PRECISIONS:
            started = time.perf_counter()
            backbones[p] = load(ctx, name, p)
            loads.append({"backbone": name, "precision": p, "load_s": round(time.perf_counter() - started, 2)})
        features, logits = LAYERS[name]["features"], LAYERS[name]["logits"]
        images = preprocessed(backbones["fp32"], paths)
        runners: dict[str, Callable[[np.ndarray], Any]] = {
            p: (lambda x, b=b: b.run(x, [features])) for p, b in backbones.items()}
        if name == "efficientnet_lite0":
            runners[LEGACY] = _legacy_effnet(backbones["fp32"])
        for bs in batch_sizes:
            batch = tile(images, bs)
            calls = max(1, 32 // bs)
            fns = {p: (lambda r=r: [r(batch) for _ in range(calls)]) for p, r in runners.items()}
            times = interleaved_runs(fns, runs, warmup=2)
            base = np.median(times["fp32"])
            for p, seconds in times.items():
                summary = rate_summary(bs * calls, seconds)
                speed.append({"backbone": name, "precision": p, "batch_size": bs,
                              "speedup_vs_fp32": round(float(base / np.median(seconds)), 3), **summary})
                say(f"  {name} {p} bs={bs}: {summary['per_s']} img/s (x{base / np.median(seconds):.2f})")
        fidelity.extend(_fidelity(ctx, name, backbones, features, logits))
        for b in backbones.values():
            if hasattr(b, "close"):
                b.close()
    return {
        "what": "backbone.run on preprocessed photos, precisions interleaved; fidelity against fp32",
        "cpu_native_bf16": precision_lib.native_bf16(),
        "inception_v1_weights": inception_weights(ctx)[1],
        "int8_calibration": "examples/train (24 bundled photos; not among the evaluation photos)",
        "evaluation_photos": "cars train + test (27) and ImageNet samples (6) where present",
        "goal": {"speedup_vs_fp32": 1.8, "cosine": 0.999},
        "speed": speed, "fidelity": fidelity, "load": loads,
    }


# --------------------------------------------------------------------------- fidelity


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def _truth(root: Path) -> dict[str, str]:
    import csv

    with open(root / "test_labels.csv", newline="") as fh:
        return {row["file"]: row["label"] for row in csv.DictReader(fh)}


def _fidelity(ctx: Context, name: str, backbones: dict, features: str, logits: str) -> list[dict[str, Any]]:
    from pipeline.learning.classifier import fit
    from pipeline.learning.training import DEFAULT_SPEC

    eval_paths, _ = car_photos(ctx)
    samples = photo_paths(IMAGENET_SAMPLES) if IMAGENET_SAMPLES.is_dir() else []
    eval_paths = list(eval_paths) + samples
    images = preprocessed(backbones["fp32"], eval_paths)
    outputs = {p: b.run(images, [features, logits]) for p, b in backbones.items()}
    ref = outputs["fp32"]
    is_sample = np.array([p in samples for p in eval_paths])
    has_cars = (CARS / "train").is_dir() and (CARS / "test_labels.csv").is_file()
    if has_cars:
        train_idx = [i for i, p in enumerate(eval_paths) if "/train/" in str(p)]
        test_idx = [i for i, p in enumerate(eval_paths) if "/test/" in str(p)]
        y_train = [Path(eval_paths[i]).parent.name for i in train_idx]
        truth = _truth(CARS)
        y_test = [truth.get(Path(eval_paths[i]).name) for i in test_idx]
        fp32_svm = fit(ref[features][train_idx], y_train, DEFAULT_SPEC)
        fp32_labels = fp32_svm.predict(ref[features][test_idx])
    rows = []
    for p, out in outputs.items():
        if p == "fp32":
            continue
        cos = _cosines(ref[features], out[features])
        agree = ref[logits].argmax(1) == out[logits].argmax(1)
        row: dict[str, Any] = {
            "backbone": name, "precision": p, "photos": len(eval_paths), "layer": features,
            "cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6),
            "max_abs_diff": float(np.abs(ref[features] - out[features]).max()),
            "top1_agreement": round(float(agree.mean()), 4),
            "top1_agreement_imagenet_samples": round(float(agree[is_sample].mean()), 4) if is_sample.any() else None,
            "svm_same_labels": None, "fp32_svm_same_labels": None,
        }
        if has_cars:
            own = fit(out[features][train_idx], y_train, DEFAULT_SPEC).predict(out[features][test_idx])
            crossed = fp32_svm.predict(out[features][test_idx])
            row["svm_same_labels"] = f"{sum(a == b for a, b in zip(own, fp32_labels))}/{len(test_idx)}"
            row["fp32_svm_same_labels"] = f"{sum(a == b for a, b in zip(crossed, fp32_labels))}/{len(test_idx)}"
            row["svm_correct"] = f"{sum(a == t for a, t in zip(own, y_test))}/{len(test_idx)}"
            row["fp32_svm_correct"] = f"{sum(a == t for a, t in zip(fp32_labels, y_test))}/{len(test_idx)}"
        all_same = not has_cars or (row["svm_same_labels"] == row["fp32_svm_same_labels"] == f"{len(test_idx)}/{len(test_idx)}")
        row["meets_fidelity_goal"] = row["cosine_min"] >= 0.999 and all_same
        rows.append(row)
        say(f"  fidelity {name} {p}: cos min {row['cosine_min']:.5f} mean {row['cosine_mean']:.5f}, "
            f"top-1 {row['top1_agreement']:.3f}, SVM {row['svm_same_labels']}, fp32 SVM {row['fp32_svm_same_labels']}")
    return rows


# --------------------------------------------------------------------------- the port before SAME padding


def _legacy_effnet(backbone) -> Callable[[np.ndarray], Any]:
    """EfficientNet-Lite0 fp32 as the port computed it before: explicit ``tf.pad`` + VALID conv
    and ``+ b`` (same numbers as now; kept here only to measure the change)."""
    import tensorflow as tf

    from pipeline.model.nets.efficientnet_lite import LITE0

    weights = backbone._weights

    def pad(x, kernel, stride):
        size = int(x.shape[1])
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        if total == 0:
            return x
        return tf.pad(x, [[0, 0], [total // 2, total - total // 2], [total // 2, total - total // 2], [0, 0]])

    def conv(x, w, b, stride=1, relu=True):
        x = tf.nn.conv2d(pad(x, int(w.shape[0]), stride), w, strides=stride, padding="VALID") + b
        return tf.nn.relu6(x) if relu else x

    def depthwise(x, w, b, stride):
        x = tf.nn.depthwise_conv2d(pad(x, int(w.shape[0]), stride), w, strides=[1, stride, stride, 1],
                                   padding="VALID") + b
        return tf.nn.relu6(x)

    @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)])
    def prelogits(images):
        x = conv(images, weights["stem/w"], weights["stem/b"], stride=2)
        for spec in LITE0.blocks:
            n = f"block_{spec.index}"
            h = x
            if spec.expand != 1:
                h = conv(h, weights[f"{n}/expand/w"], weights[f"{n}/expand/b"])
            h = depthwise(h, weights[f"{n}/depthwise/w"], weights[f"{n}/depthwise/b"], spec.stride)
            h = conv(h, weights[f"{n}/project/w"], weights[f"{n}/project/b"], relu=False)
            x = h + x if spec.residual else h
        x = conv(x, weights["head/w"], weights["head/b"])
        return tf.reduce_mean(x, axis=[1, 2])

    return lambda batch: prelogits(tf.constant(batch)).numpy()
