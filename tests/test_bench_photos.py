"""The bench's photo sets are described well enough to fetch, check and cite, and its splits are paired.

No download here: the manifests are read as committed (``bench/photo_sources.py`` fetches the
photos at bench time and checks every sha256 against them).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from bench.fewshot import paired, split
from bench.photo_sources import manifest

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check(name: str) -> list[dict]:
    spec = manifest(name)
    for package, source in spec["packages"].items():
        assert source["version"] and SHA256.match(source["sha256"]), package
    photos = spec["photos"]
    assert len({p["name"] for p in photos}) == len(photos)  # one cache file per photo
    for p in photos:
        assert p["package"] in spec["packages"] and p["file"].startswith("/") and SHA256.match(p["sha256"]), p
        assert p["licence"] and p["source"] and p["label"], p
    return photos


def test_other_things_are_at_least_30_photos_from_packages_never_used_before():
    photos = _check("other_things")
    assert len(photos) >= 30
    assert {p["package"] for p in photos} == {"python3-skimage", "opencv-doc", "palapeli-data"}
    assert not any("chelsea" in p["name"] or "licenseplate" in p["name"] for p in photos)  # ../shared, a car


def test_the_evaluation_set_has_150_photos_in_5_classes_of_10_shots_and_more():
    photos = _check("stellarium_dso")
    counts = Counter(p["label"] for p in photos)
    assert len(photos) >= 150 and len(counts) >= 5 and min(counts.values()) > 10 + 20, counts


def test_splits_are_the_same_for_every_recipe_and_hold_out_the_rest():
    labels = ["a"] * 14 + ["b"] * 13
    first, again = split(labels, 7), split(labels, 7)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    train, test = first
    assert Counter(labels[i] for i in train) == {"a": 10, "b": 10}
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(27))
    assert not np.array_equal(split(labels, 8)[0], train)


def test_paired_differences_weigh_each_set_equally():
    base = {"big": [{"m": 0.5}] * 20, "small": [{"m": 0.5}] * 20}
    other = {"big": [{"m": 0.6}] * 20, "small": [{"m": 0.4}] * 20}
    found = paired(base, other, "m")
    assert abs(found["mean"]) < 1e-9 and found["per_set"] == pytest.approx({"big": 0.1, "small": -0.1})
    assert found["ci95"][0] <= found["mean"] <= found["ci95"][1]
