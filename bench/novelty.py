"""Does "unknown" know what it has never seen? A model of cars against photos of other things.

The goal (issue 22): the cars model (``deeper train cars/train``, the default recipe) marks at
least 70 % of photos of other things unknown, and at most 1 of the 7 cars test photos. Measured
here for every candidate backbone, for the examples model too (buildings, fish, tools), with the
held-out in-class photos' rates next to it, and for variants of the novelty rule (k-th
neighbour, per class) and "confidence only" (what "unknown" was before novelty) for comparison.
Photos of other things: ``bench/photos/other_things.json`` (45 photos from Debian's
scikit-image, OpenCV and Palapeli packages, fetched at run time).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.learning.novelty import CONFORMAL, TRAINING_SHARE, NoveltySpec
from pipeline.learning.scoring import score
from pipeline.learning.training import DEFAULT_LAYER, DEFAULT_SPEC, train
from pipeline.model.photos import PhotoFile, find_photos

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
#: rule name -> (distance, how its threshold is read off the held-out training distances)
RULES = {"nearest (default)": (NoveltySpec(1, False), CONFORMAL),
         "nearest, 5% of training photos": (NoveltySpec(1, False), TRAINING_SHARE),
         "3rd nearest": (NoveltySpec(3, False), CONFORMAL),
         "nearest of the predicted class": (NoveltySpec(1, True), CONFORMAL)}

Vectors = Callable[[list[PhotoFile], str, str], tuple[np.ndarray, list[str]]]


def train_test(root: Path) -> tuple[list[PhotoFile], list[PhotoFile]] | None:
    if not (root / "train").is_dir():
        return None
    with open(root / "test_labels.csv", newline="") as fh:
        truth = {row["file"]: row["label"] for row in csv.DictReader(fh)}
    return (find_photos([root / "train"], labels_from_folders=True),
            [PhotoFile(p.path, truth[p.path.name]) for p in find_photos([root / "test"])])


def _rates(results) -> dict:
    return {"n": len(results), "unknown": int(sum(r.unknown for r in results)),
            "novel": int(sum(r.unknown_reason == "novel" for r in results)),
            "unconfident": int(sum(r.unknown_reason == "unconfident" for r in results)),
            "unknown_share": float(np.mean([r.unknown for r in results])) if results else None}


def model_goal(vectors: Vectors, backbone: str, train_photos: list[PhotoFile], test_photos: list[PhotoFile],
               others: list[PhotoFile], layer: str = DEFAULT_LAYER) -> dict:
    """Train as ``deeper train`` does; the unknown rates of held-out in-class photos and other things."""
    x, y = vectors(train_photos, backbone, layer)
    xt, yt = vectors(test_photos, backbone, layer)
    xo, _ = vectors(others, backbone, layer)
    out: dict = {"backbone": backbone, "layer": layer, "n_train": len(y)}
    for name, (rule, threshold_rule) in RULES.items():
        trained = train(x, y, DEFAULT_SPEC, novelty_spec=rule, novelty_rule=threshold_rule)
        test, other = score(trained.classifier, xt), score(trained.classifier, xo)
        out[name] = {"novelty_threshold": trained.novelty.threshold,
                     "confidence_threshold": trained.classifier.unknown_threshold,
                     "cv_cost": trained.cost.to_dict(), "test": _rates(test),
                     "test_right_top_class": int(sum(r.top_class == t for r, t in zip(test, yt))),
                     "other_things": _rates(other),
                     "other_things_novel_list": sorted(Path(p.path).name for p, r in zip(others, other)
                                                       if r.unknown_reason == "novel"),
                     "test_unknown_list": sorted(f"{Path(p.path).name}:{r.unknown_reason}"
                                                 for p, r in zip(test_photos, test) if r.unknown)}
    confidence_only = train(x, y, DEFAULT_SPEC, novelty_threshold=0)
    out["confidence only (before novelty)"] = {"test": _rates(score(confidence_only.classifier, xt)),
                                               "other_things": _rates(score(confidence_only.classifier, xo))}
    return out


def run(vectors: Vectors, others: list[PhotoFile], backbones: Sequence[str]) -> dict:
    from bench.photo_sources import subjects

    models = {"cars": train_test(SHARED / "cars"), "examples": train_test(REPO / "examples")}
    subject = subjects("other_things")
    results: dict = {"other_things": len(others), "other_things_used": {}, "models": {}}
    for name, sets in models.items():
        if sets is None:
            print(f"skipping the {name} model: photos not found")
            continue
        classes = {p.label for p in sets[0]}
        foreign = [p for p in others if subject.get(Path(p.path).name, "other") not in classes]
        results["other_things_used"][name] = len(foreign)
        for backbone in backbones:
            goal = model_goal(vectors, backbone, *sets, foreign)
            results["models"][f"{name}/{backbone}"] = goal
            for rule in (*RULES, "confidence only (before novelty)"):
                r = goal[rule]
                print(f"  {name:<9}{backbone:<20}{rule:<34} other things unknown "
                      f"{r['other_things']['unknown']}/{r['other_things']['n']} "
                      f"({r['other_things']['unknown_share']:.0%}); test photos unknown "
                      f"{r['test']['unknown']}/{r['test']['n']}")
    return results
