"""The default backbone and layer, chosen on evidence: 10-shot accuracy over random splits, and speed.

For every photo set we have (the cars, the bundled examples, Stellarium's deep-sky photos) and
every candidate recipe (backbone x layer spec, the default linear SVM on top, trained exactly as
``deeper train`` does: :func:`pipeline.learning.training.train`), each split draws
:data:`SHOTS` training photos per class at random and tests on the rest of the set:

* closed-set accuracy: the top class of every held-out photo;
* accuracy with unknown: held-out photos given their right class (an unknown one counts as not
  right), plus coverage (share answered) and the accuracy of the answered ones;
* other things unknown: the share of ``other_things`` photos (neither class) the model calls
  unknown.

A split's photos are the same for every recipe (its seed depends on the set and split only), so
recipes are compared by *paired* differences against the current default, pooled over sets with
each set weighted equally, with a 95 % bootstrap interval (splits resampled within each set).
Speed: the model alone at batch 32, all backbones interleaved run by run in one process, so
their ratio holds on a busy machine (bench.run's ``model`` figure times each one after another).

Inception v1 is not a candidate: its real weights can't be downloaded here (no internet but
package registries), and a network with random weights says nothing about accuracy.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bench.photo_sources import available
from pipeline.learning.scoring import score
from pipeline.learning.training import DEFAULT_SPEC, train
from pipeline.model.photos import PhotoFile, find_photos

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CANDIDATE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
#: ``stage_6``/``stage_7`` name each variant's last block of those stages (Lite0: block_14, block_15).
CANDIDATE_LAYERS = ("prelogits", "prelogits+stage_6+stage_7")
BASELINE = ("efficientnet_lite0", "prelogits")
SHOTS = 10
SPLITS = 20
#: Stellarium's galaxies outnumber the other classes 3 to 1; at most this many per class are used.
PER_CLASS = 60
BOOTSTRAP = 2000

Vectors = Callable[[list[PhotoFile], str, str], tuple[np.ndarray, list[str]]]


# -- photo sets ---------------------------------------------------------------------------------
def _labelled(root: Path) -> list[PhotoFile] | None:
    """A train/ + test/ set with test_labels.csv, pooled (the splits decide what is held out)."""
    if not (root / "train").is_dir():
        return None
    with open(root / "test_labels.csv", newline="") as fh:
        truth = {row["file"]: row["label"] for row in csv.DictReader(fh)}
    test = [PhotoFile(p.path, truth[p.path.name]) for p in find_photos([root / "test"])]
    return find_photos([root / "train"], labels_from_folders=True) + test


def _capped(photos: list[PhotoFile], per_class: int) -> list[PhotoFile]:
    out: list[PhotoFile] = []
    for label in sorted({p.label for p in photos}):
        out += sorted((p for p in photos if p.label == label), key=lambda p: str(p.path))[:per_class]
    return out


def photo_sets() -> tuple[dict[str, list[PhotoFile]], list[PhotoFile]]:
    """({set name: photos}, other things); a set that can't be had is left out with a line saying so."""
    sets = {"cars": _labelled(SHARED / "cars"), "examples": _labelled(REPO / "examples")}
    dso = available("stellarium_dso")
    sets["stellarium_dso"] = _capped(dso, PER_CLASS) if dso else None
    for name, photos in sets.items():
        if photos is None:
            print(f"skipping {name}: not found")
    return {k: v for k, v in sets.items() if v}, available("other_things") or []


# -- splits -------------------------------------------------------------------------------------
def split(labels: Sequence[str], seed: int, shots: int = SHOTS) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: ``shots`` photos per class at random, the rest held out."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    train_idx = np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in sorted(set(y))])
    return np.sort(train_idx), np.setdiff1d(np.arange(len(y)), train_idx)


def _set_seed(name: str) -> int:
    return sum(map(ord, name)) * 1000


def evaluate(x: np.ndarray, y: list[str], x_other: np.ndarray | None, set_name: str,
             splits: int = SPLITS, **training) -> list[dict]:
    """One row per split: closed-set accuracy, accuracy with unknown, coverage, other things unknown."""
    rows = []
    for s in range(splits):
        train_idx, test_idx = split(y, _set_seed(set_name) + s)
        trained = train(x[train_idx], [y[i] for i in train_idx], DEFAULT_SPEC, **training)
        results = score(trained.classifier, x[test_idx])
        truth = [y[i] for i in test_idx]
        answered = np.array([not r.unknown for r in results])
        right_top = np.array([r.top_class == t for r, t in zip(results, truth)])
        row = {"split": s, "n_test": len(truth), "closed_accuracy": float(right_top.mean()),
               "accuracy_with_unknown": float((right_top & answered).mean()), "coverage": float(answered.mean()),
               "answered_accuracy": float(right_top[answered].mean()) if answered.any() else None,
               "novel": float(np.mean([r.unknown_reason == "novel" for r in results]))}
        if x_other is not None and len(x_other):
            other = score(trained.classifier, x_other)
            row["other_unknown"] = float(np.mean([r.unknown for r in other]))
            row["other_novel"] = float(np.mean([r.unknown_reason == "novel" for r in other]))
        rows.append(row)
    return rows


def run(vectors: Vectors, sets: dict[str, list[PhotoFile]], others: list[PhotoFile],
        backbones: Sequence[str] = CANDIDATE_BACKBONES, layers: Sequence[str] = CANDIDATE_LAYERS,
        splits: int = SPLITS) -> dict:
    """Every recipe on every set: per-split rows, per-set means, and paired differences vs the baseline."""
    table: dict[str, dict[str, list[dict]]] = {}
    for backbone in backbones:
        for layer in layers:
            recipe = f"{backbone}/{layer}"
            table[recipe] = {}
            for name, photos in sets.items():
                x, y = vectors(photos, backbone, layer)
                xo = vectors(others, backbone, layer)[0] if others else None
                started = time.perf_counter()
                table[recipe][name] = evaluate(x, y, xo, name, splits)
                means = _means(table[recipe][name])
                print(f"  {recipe:<48} {name:<15} closed {means['closed_accuracy']:.3f}  with unknown "
                      f"{means['accuracy_with_unknown']:.3f}  coverage {means['coverage']:.3f}  other unknown "
                      f"{means.get('other_unknown', float('nan')):.3f}  ({time.perf_counter() - started:.0f} s)")
    baseline = "/".join(BASELINE)
    rules = {}
    if BASELINE[0] in backbones and BASELINE[1] in layers:  # the novelty threshold rule, on the default recipe
        from pipeline.learning.novelty import CONFORMAL, TRAINING_SHARE

        rules[CONFORMAL] = {name: _means(rows) for name, rows in table[baseline].items()}
        rules[TRAINING_SHARE] = {}
        for name, photos in sets.items():
            x, y = vectors(photos, *BASELINE)
            xo = vectors(others, *BASELINE)[0] if others else None
            rules[TRAINING_SHARE][name] = _means(evaluate(x, y, xo, name, splits, novelty_rule=TRAINING_SHARE))
            print(f"  {baseline} with the {TRAINING_SHARE} novelty rule on {name}: {rules[TRAINING_SHARE][name]}")
    summary = {recipe: {"per_set": {name: _means(rows) for name, rows in by_set.items()},
                        "vs_baseline": {metric: paired(table[baseline], by_set, metric)
                                        for metric in ("closed_accuracy", "accuracy_with_unknown", "other_unknown")}
                        if baseline in table else None}
               for recipe, by_set in table.items()}
    return {"shots": SHOTS, "splits": splits, "baseline": baseline, "classifier": DEFAULT_SPEC.describe(),
            "sets": {name: {"n": len(p), "classes": sorted({q.label for q in p})} for name, p in sets.items()},
            "other_things": len(others), "summary": summary, "novelty_rule_on_the_default": rules,
            "splits_detail": table}


def _means(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k not in ("split", "n_test")]
    out = {}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        out[k] = float(np.mean(values)) if values else None
    return out


def paired(base: dict[str, list[dict]], other: dict[str, list[dict]], metric: str, seed: int = 0) -> dict | None:
    """Mean paired difference (other - base) over sets weighted equally, with a 95 % bootstrap
    interval that resamples splits within each set."""
    diffs = {name: np.array([o[metric] - b[metric] for b, o in zip(base[name], other[name])
                             if o.get(metric) is not None and b.get(metric) is not None])
             for name in base if name in other}
    diffs = {k: v for k, v in diffs.items() if len(v)}
    if not diffs:
        return None
    rng = np.random.default_rng(seed)
    boot = [np.mean([rng.choice(d, len(d)).mean() for d in diffs.values()]) for _ in range(BOOTSTRAP)]
    return {"mean": float(np.mean([d.mean() for d in diffs.values()])),
            "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "per_set": {k: float(v.mean()) for k, v in diffs.items()}}


# -- speed --------------------------------------------------------------------------------------
def speed(load: Callable[[str], object], backbones: Sequence[str] = CANDIDATE_BACKBONES, batch_size: int = 32,
          rounds: int = 7) -> dict:
    """Images/s of each backbone alone at ``batch_size`` (prelogits), interleaved round by round."""
    nets = {name: load(name) for name in backbones}
    batches = {name: np.random.default_rng(0).uniform(-1, 1, (batch_size, n.info.image_size, n.info.image_size, 3))
               .astype(np.float32) for name, n in nets.items()}
    for name, net in nets.items():  # warm-up
        net.run(batches[name], ["prelogits"])
    seconds: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(rounds):
        for name, net in nets.items():
            started = time.perf_counter()
            net.run(batches[name], ["prelogits"])
            seconds[name].append(time.perf_counter() - started)
    rates = {name: batch_size / statistics.median(s) for name, s in seconds.items()}
    base = rates[backbones[0]]
    return {"batch_size": batch_size, "rounds": rounds, "img_per_s": {k: round(v, 1) for k, v in rates.items()},
            "vs_" + backbones[0]: {k: round(v / base, 3) for k, v in rates.items()}}
