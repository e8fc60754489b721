"""Which recipe wins? Layer x normalisation x classifier under cross-validation, on real photos.

Datasets: the reference cars (../shared/data/cars: 20 train under leave-one-out, plus accuracy
on the 7 held-out photos) and the bundled examples (examples/: 24 train + 9 test). Also all
photos of each set pooled under leave-one-out, for a less noisy estimate.

    python -m bench.recipes [--model efficientnet_lite0] [--out bench/results/recipes.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np

from pipeline.classifier import KINDS, NORMALIZATIONS, ClassifierSpec, cross_validate, fit
from pipeline.featurize import default_cache, featurize_photos
from pipeline.nets.factory import load_backbone
from pipeline.photos import find_photos

REPO = Path(__file__).resolve().parent.parent
DATASETS = {
    "cars": REPO.parent / "shared" / "data" / "cars",
    "examples": REPO / "examples",
}


def _vectors(backbone, photos, layer, cache):
    result = featurize_photos(photos, backbone, layer, cache=cache, progress=False)
    return np.stack([r.vector for r in result.rows]), [r.label for r in result.rows], [Path(r.source).name for r in result.rows]


def _truth(root: Path) -> dict[str, str]:
    with open(root / "test_labels.csv", newline="") as fh:
        return {row["file"]: row["label"] for row in csv.DictReader(fh)}


def evaluate(backbone, root: Path, layer: str, cache) -> list[dict]:
    x_train, y_train, _ = _vectors(backbone, find_photos([root / "train"], labels_from_folders=True), layer, cache)
    x_test, _, names = _vectors(backbone, find_photos([root / "test"]), layer, cache)
    truth = _truth(root)
    y_test = [truth[n] for n in names]
    x_all, y_all = np.vstack([x_train, x_test]), y_train + y_test
    rows = []
    for kind in KINDS:
        for norm in NORMALIZATIONS:
            spec = ClassifierSpec(kind, norm, 1.0)
            cv = cross_validate(x_train, y_train, spec)
            pooled = cross_validate(x_all, y_all, spec)
            predicted = fit(x_train, y_train, spec).predict(x_test)
            right = sum(p == t for p, t in zip(predicted, y_test))
            rows.append({"layer": layer, "classifier": kind, "normalize": norm, "cv_train": cv.accuracy,
                         "cv_pooled": pooled.accuracy, "test_right": right, "test_total": len(y_test),
                         "n_train": len(y_train), "n_pooled": len(y_all)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "go-deeper"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "recipes.json"))
    args = parser.parse_args()
    backbone = load_backbone(args.model, cache_dir=args.cache_dir, progress=False)
    cache = default_cache(args.cache_dir)
    results = {"model": backbone.name, "weights_digest": backbone.weights_digest, "machine": platform.platform(),
               "date": time.strftime("%Y-%m-%d"), "datasets": {}}
    for name, root in DATASETS.items():
        if not (root / "train").is_dir():
            print(f"skipping {name}: {root} not found")
            continue
        rows = [r for layer in ("logits", "prelogits") for r in evaluate(backbone, root, layer, cache)]
        results["datasets"][name] = rows
        print(f"\n{name}: {rows[0]['n_train']} train, {rows[0]['test_total']} test, {rows[0]['n_pooled']} pooled")
        print(f"{'layer':<10}{'classifier':<12}{'norm':<10}{'cv(train)':>10}{'cv(pooled)':>11}{'test':>7}")
        for r in rows:
            print(f"{r['layer']:<10}{r['classifier']:<12}{r['normalize']:<10}{r['cv_train']:>10.3f}"
                  f"{r['cv_pooled']:>11.3f}{r['test_right']:>4}/{r['test_total']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
