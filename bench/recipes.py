"""Which recipe wins, and how honest are its probabilities? Measured on real photos.

Three questions, each under cross-validation:

1. *recipes*: layer x normalisation x classifier (cars and examples: leave-one-out on the
   training photos, on all photos pooled, and accuracy on the held-out test photos);
2. *levels*: single end points against multi-level specs (``prelogits+block_14+block_15``...)
   with the default classifier, leave-one-out on every set, and a paired (exact McNemar) test
   of each spec against ``prelogits`` over all sets together;
3. *calibration*: Brier score of the out-of-fold probabilities, the share of in-class photos
   marked unknown (under CV and on the held-out test photos), and the share of out-of-class
   photos marked unknown (ImageNet samples and other photo sets, against each classifier).

Photo sets: the reference cars (../shared/data/cars), the bundled examples (examples/), and
Tux Paint's stamps (Debian package ``tuxpaint-stamps-default``: photographs of animals, fruit,
flowers... in one folder per class; ``apt-get install tuxpaint-stamps-default``), of
which :data:`STAMP_CLASSES` are used (sub-folders included, cartoons left out), at most
:data:`STAMPS_PER_CLASS` photos each (sorted by path).
A set that is absent is skipped with a line saying so.

4. *choice* (``bench/fewshot.py``): the default backbone and layer on evidence: every candidate
   (EfficientNet-Lite0/1/2 x ``prelogits``, ``prelogits+stage_6+stage_7``) 10-shot over 20
   random splits on every set (cars, examples, Stellarium's deep-sky photos), closed-set accuracy
   and accuracy with unknown, paired differences against the default, and the speed of each
   backbone alone (interleaved);
5. *novelty* (``bench/novelty.py``): the cars and examples models against photos of other things.

Sections 4 and 5 write ``bench/results/recipe-choice.json``; 1-3 ``--out``.

    python -m bench.recipes [--model efficientnet_lite0] [--out bench/results/recipes.json]
    python -m bench.recipes --only choice novelty
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from pipeline.learning.classifier import (KINDS, NORMALIZATIONS, ClassifierSpec, calibrate, cross_validate, fit,
                                 top_probability)
from pipeline.model.featurize import default_cache, featurize_photos
from pipeline.model.nets.factory import load_backbone
from pipeline.model.photos import PhotoFile, find_photos
from pipeline.learning.scoring import score
from pipeline.learning.training import DEFAULT_SPEC

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
STAMPS = Path("/usr/share/tuxpaint/stamps")
STAMP_CLASSES = ("animals/birds", "animals/fish", "animals/insects", "animals/mammals", "food/fruit",
                 "food/vegetables", "plants/flowers")
STAMPS_PER_CLASS = 20
#: stamp classes that are not out-of-class for the examples (buildings, fish, tools)
EXAMPLES_OVERLAP = {"fish"}

#: The specs compared, per backbone (single end points first).
LEVEL_SPECS = {
    "efficientnet_lite0": ["logits", "prelogits", "prelogits+block_15", "prelogits+block_14+block_15",
                           "prelogits+block_10+block_14+block_15", "prelogits+block_7+block_10+block_14+block_15"],
    "inception_v1": ["logits", "prelogits", "prelogits+Mixed_5c", "prelogits+Mixed_5b+Mixed_5c",
                     "prelogits+Mixed_4f+Mixed_5c", "prelogits+Mixed_4e+Mixed_4f+Mixed_5b+Mixed_5c"],
}


# -- photo sets ---------------------------------------------------------------------------------
def _truth(root: Path) -> dict[str, str]:
    with open(root / "test_labels.csv", newline="") as fh:
        return {row["file"]: row["label"] for row in csv.DictReader(fh)}


def _train_test_set(root: Path) -> dict | None:
    if not (root / "train").is_dir():
        return None
    truth = _truth(root)
    test = [PhotoFile(p.path, truth[p.path.name]) for p in find_photos([root / "test"])]
    return {"train": find_photos([root / "train"], labels_from_folders=True), "test": test}


def _stamps() -> dict | None:
    if not STAMPS.is_dir():
        return None
    photos = []
    for folder in STAMP_CLASSES:
        files = sorted(p for p in (STAMPS / folder).rglob("*.png")
                       if not p.stem.endswith("_back") and "cartoon" not in p.relative_to(STAMPS).parts)
        photos += [PhotoFile(p, Path(folder).name) for p in files[:STAMPS_PER_CLASS]]
    return {"train": photos, "test": []}


def photo_sets() -> dict[str, dict]:
    found = {"cars": _train_test_set(SHARED / "cars"), "examples": _train_test_set(REPO / "examples"),
             "tuxpaint-stamps": _stamps()}
    for name, value in found.items():
        if value is None:
            print(f"skipping {name}: not found")
    return {k: v for k, v in found.items() if v is not None}


def out_of_class(sets: dict[str, dict], against: str) -> list[PhotoFile]:
    """Photos of none of ``against``'s classes: the ImageNet samples and the other sets' photos."""
    photos = find_photos([SHARED / "imagenet-samples"]) if (SHARED / "imagenet-samples").is_dir() else []
    classes = {p.label for p in sets[against]["train"]}
    for name, s in sets.items():
        if name == against:
            continue
        skip = EXAMPLES_OVERLAP if against == "examples" and name == "tuxpaint-stamps" else set()
        photos += [p for p in s["train"] + s["test"] if p.label not in classes | skip]
    return photos


class Vectors:
    """Feature vectors through the product path (featurize_photos + the feature cache)."""

    def __init__(self, backbone, cache):
        self.backbone, self.cache = backbone, cache

    def __call__(self, photos: list[PhotoFile], layer: str) -> tuple[np.ndarray, list[str]]:
        layer = self.backbone.info.resolve_layer(layer)
        if not photos:
            return np.zeros((0, self.backbone.info.end_points[layer]), np.float32), []
        result = featurize_photos(photos, self.backbone, layer, cache=self.cache, progress=False)
        if result.failures:
            print(f"  {len(result.failures)} photos failed: {result.failures[0].reason}")
        by_source = {r.source: r for r in result.rows}
        rows = [by_source[str(p.path)] for p in photos if str(p.path) in by_source]
        labels = [p.label for p in photos if str(p.path) in by_source]
        return np.stack([r.vector for r in rows]), labels


# -- 1. recipes -------------------------------------------------------------------------------
def recipes(vectors: Vectors, s: dict, layer: str) -> list[dict]:
    x_train, y_train = vectors(s["train"], layer)
    x_test, y_test = vectors(s["test"], layer)
    x_all, y_all = np.vstack([x_train, x_test]), y_train + y_test
    rows = []
    for kind in KINDS:
        for norm in NORMALIZATIONS:
            spec = ClassifierSpec(kind, norm, 1.0)
            predicted = fit(x_train, y_train, spec).predict(x_test)
            rows.append({"layer": layer, "classifier": kind, "normalize": norm,
                         "cv_train": cross_validate(x_train, y_train, spec).accuracy,
                         "cv_pooled": cross_validate(x_all, y_all, spec).accuracy,
                         "test_right": sum(p == t for p, t in zip(predicted, y_test)), "test_total": len(y_test),
                         "n_train": len(y_train), "n_pooled": len(y_all)})
    return rows


# -- 2. levels ----------------------------------------------------------------------------------
def levels(vectors: Vectors, sets: dict[str, dict], specs: list[str]) -> dict:
    """Leave-one-out accuracy of each spec on each set (all its photos), and per-photo hits."""
    table: dict[str, dict] = {}
    hits: dict[str, list[bool]] = {spec: [] for spec in specs}
    for name, s in sets.items():
        photos = s["train"] + s["test"]
        table[name] = {}
        for spec in specs:
            x, y = vectors(photos, spec)
            cv = cross_validate(x, y, DEFAULT_SPEC, leave_one_out=True)
            right = [p == t for p, t in zip(cv.predictions, y)]
            hits[spec] += right
            table[name][spec] = {"loo_accuracy": cv.accuracy, "right": sum(right), "n": len(y), "dim": x.shape[1],
                                 "brier": cv.brier}
    baseline = hits[specs[1]] if specs[1] == "prelogits" else hits[specs[0]]
    paired = {spec: mcnemar(baseline, hits[spec]) for spec in specs}
    return {"per_set": table, "vs_prelogits_all_sets": paired}


def mcnemar(base: list[bool], other: list[bool]) -> dict:
    """Exact two-sided McNemar test: photos only ``other`` gets right vs only ``base`` does."""
    gained = sum(o and not b for b, o in zip(base, other))
    lost = sum(b and not o for b, o in zip(base, other))
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(0, min(gained, lost) + 1)) / 2**n if n else 1.0
    return {"gained": gained, "lost": lost, "p_value": min(1.0, 2 * tail)}


# -- 3. calibration -----------------------------------------------------------------------------
def calibration(vectors: Vectors, sets: dict[str, dict], name: str, layer: str) -> dict:
    """Train on the set's training photos (as ``deeper train`` does), then measure unknowns."""
    s = sets[name]
    x, y = vectors(s["train"], layer)
    cv = cross_validate(x, y, DEFAULT_SPEC)
    model = calibrate(fit(x, y, DEFAULT_SPEC), cv)
    threshold = model.unknown_threshold
    cv_top = top_probability(cv.scores, cv.probabilities)
    out = {"layer": layer, "cv_method": cv.method, "cv_accuracy": cv.accuracy, "cv_brier": cv.brier,
           "cv_brier_hard_labels": 2 * (1 - cv.accuracy), "brier_uniform": 1 - 1 / len(model.classes),
           "unknown_threshold": threshold,
           "cv_false_unknown": float((cv_top < threshold).mean()), "n_train": len(y)}
    if s["test"]:
        xt, yt = vectors(s["test"], layer)
        results = score(model, xt)
        onehot = (np.asarray(yt)[:, None] == np.asarray(model.classes)[None, :]).astype(float)
        probs = np.array([[r.probabilities[c] for c in model.classes] for r in results])
        out.update(test_n=len(yt), test_brier=float(((probs - onehot) ** 2).sum(1).mean()),
                   test_right=sum(r.top_class == t for r, t in zip(results, yt)),
                   test_false_unknown=float(np.mean([r.unknown for r in results])))
    foreign = out_of_class(sets, name)
    if foreign:
        xo, _ = vectors(foreign, layer)
        results = score(model, xo)
        out.update(out_of_class_n=len(results), out_of_class_unknown=float(np.mean([r.unknown for r in results])),
                   out_of_class_mean_confidence=float(np.mean([r.confidence for r in results])))
        samples = [r for p, r in zip(foreign, results) if "imagenet-samples" in str(p.path)]
        if samples:
            out.update(imagenet_samples_n=len(samples),
                       imagenet_samples_unknown=float(np.mean([r.unknown for r in samples])))
    return out


SECTIONS = ("recipes", "levels", "calibration", "choice", "novelty")


def choice_and_novelty(cache_dir: str, sections: list[str], out: Path) -> None:
    """Sections 4 and 5: every candidate backbone, through the product's featurizer and cache."""
    from bench import fewshot, novelty

    cache = default_cache(cache_dir)

    def vectors(photos: list[PhotoFile], backbone: str, layer: str) -> tuple[np.ndarray, list[str]]:
        return Vectors(load_backbone(backbone, cache_dir=cache_dir, progress=False), cache)(photos, layer)

    sets, others = fewshot.photo_sets()
    results = {"machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
               "candidates": {"backbones": fewshot.CANDIDATE_BACKBONES, "layers": fewshot.CANDIDATE_LAYERS},
               "not_evaluated": "inception_v1: its real weights can't be downloaded here"}
    if "novelty" in sections:
        print("\nnovelty: the default recipe's models against photos of other things")
        results["novelty"] = novelty.run(vectors, others, fewshot.CANDIDATE_BACKBONES)
    if "choice" in sections:
        print(f"\nchoice: {fewshot.SHOTS}-shot, {fewshot.SPLITS} splits per set")
        results["choice"] = fewshot.run(vectors, sets, others)
        results["speed"] = fewshot.speed(lambda name: load_backbone(name, cache_dir=cache_dir, progress=False))
        print(f"speed (model alone, batch 32, interleaved): {results['speed']}")
        _print_choice(results["choice"], results["speed"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


def _print_choice(choice: dict, speed: dict) -> None:
    print(f"\n{'recipe':<48}" + "".join(f"{n:>16}" for n in choice["sets"]) + f"{'vs default (CI)':>26}"
          f"{'with unknown vs default':>28}{'img/s':>8}")
    for recipe, s in choice["summary"].items():
        cells = "".join(f"{s['per_set'][n]['closed_accuracy']:>16.3f}" for n in choice["sets"])
        vs = s["vs_baseline"] or {}
        closed, unknown = vs.get("closed_accuracy"), vs.get("accuracy_with_unknown")
        text = (lambda d: "" if not d else f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f},{d['ci95'][1]:+.3f}]")
        print(f"{recipe:<48}{cells}{text(closed):>26}{text(unknown):>28}"
              f"{speed['img_per_s'].get(recipe.split('/')[0], float('nan')):>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "go-deeper"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "recipes.json"))
    parser.add_argument("--choice-out", default=str(REPO / "bench" / "results" / "recipe-choice.json"))
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"sections to run ({', '.join(SECTIONS)}; default: all)")
    parser.add_argument("--skip-recipes", action="store_true", help="only the levels and calibration sections")
    args = parser.parse_args()
    if {"choice", "novelty"} & set(args.only):
        choice_and_novelty(args.cache_dir, args.only, Path(args.choice_out))
    if not {"recipes", "levels", "calibration"} & set(args.only):
        return
    backbone = load_backbone(args.model, cache_dir=args.cache_dir, progress=False)
    vectors = Vectors(backbone, default_cache(args.cache_dir))
    sets = photo_sets()
    specs = LEVEL_SPECS[backbone.name]
    results = {"model": backbone.name, "weights_digest": backbone.weights_digest, "machine": platform.platform(),
               "date": time.strftime("%Y-%m-%d"), "classifier": DEFAULT_SPEC.describe(),
               "sets": {k: {"n": len(v["train"]) + len(v["test"]),
                            "classes": sorted({p.label for p in v["train"]})} for k, v in sets.items()}}
    if not args.skip_recipes and "recipes" in args.only:
        results["datasets"] = {name: [r for layer in ("logits", "prelogits") for r in recipes(vectors, s, layer)]
                               for name, s in sets.items() if s["test"]}
        for name, rows in results["datasets"].items():
            print(f"\n{name}: {rows[0]['n_train']} train, {rows[0]['test_total']} test, {rows[0]['n_pooled']} pooled")
            print(f"{'layer':<10}{'classifier':<12}{'norm':<10}{'cv(train)':>10}{'cv(pooled)':>11}{'test':>7}")
            for r in rows:
                print(f"{r['layer']:<10}{r['classifier']:<12}{r['normalize']:<10}{r['cv_train']:>10.3f}"
                      f"{r['cv_pooled']:>11.3f}{r['test_right']:>4}/{r['test_total']}")
    results["levels"] = levels(vectors, sets, specs)
    print("\nleave-one-out accuracy (all photos of each set), linear SVM")
    print(f"{'spec':<48}" + "".join(f"{n:>18}" for n in sets) + f"{'vs prelogits':>22}")
    for spec in specs:
        cells = "".join(f"{results['levels']['per_set'][n][spec]['loo_accuracy']:>18.3f}" for n in sets)
        m = results["levels"]["vs_prelogits_all_sets"][spec]
        print(f"{spec:<48}{cells}   +{m['gained']}/-{m['lost']} p={m['p_value']:.3f}")
    results["calibration"] = {f"{name}/{layer}": calibration(vectors, sets, name, layer)
                              for name in sets for layer in dict.fromkeys(["prelogits", specs[3]])}
    print("\ncalibration (trained on the training photos, as `deeper train`)")
    for key, c in results["calibration"].items():
        print(f"{key:<45} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in c.items() if k != "layer"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
