"""Photo sets for the benchmarks, fetched at run time from Debian packages and cached, never committed.

A set is a committed manifest (``bench/photos/<set>.json``): for each Debian package, its
version and the .deb's sha256, and for each photo the path inside the package, the file's
sha256, its label (a class, or ``other`` for photos of other things), where it came from and its
licence. :func:`load_set` downloads each package once (``apt-get download NAME=VERSION``: Debian's
ordinary client, run as any user; ``apt-get update`` must have been run once), checks the .deb's
sha256, extracts only the manifest's files, checks each one, and returns them as photos.

    python -m bench.photo_sources            # fetch every set into the cache and list them

Sets: ``other_things`` (45 photos of things that are not cars, from scikit-image's, OpenCV's and
Palapeli's Debian packages: used to measure what "novel" catches; :func:`subjects` names the five
that show buildings, one of the examples' classes)
and ``stellarium_dso`` (445 telescope photos of deep-sky objects in 5 classes from
``stellarium-data``, labelled by the type in Stellarium's own catalogue: the evaluation set
behind the default recipe). ``bench/photos/make_manifests.py`` made both manifests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.model.photos import PhotoFile

MANIFESTS = Path(__file__).resolve().parent / "photos"
DEFAULT_CACHE = Path.home() / ".cache" / "go-deeper" / "bench-photos"


class PhotoSetUnavailable(RuntimeError):
    """A set could not be fetched or did not check out; the message says why and what to do."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def _download_deb(package: str, version: str, sha256: str, into: Path) -> Path:
    """``apt-get download`` one exact version into ``into``; refuse a .deb whose sha256 differs."""
    try:
        subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=into, check=True,
                       capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise PhotoSetUnavailable("apt-get is not installed: the bench photo sets come from Debian packages") from None
    except subprocess.CalledProcessError as exc:
        raise PhotoSetUnavailable(f"apt-get download {package}={version} failed ({exc.stderr.strip()[-300:]}); "
                                  "run `apt-get update` once, or the archive no longer has this version") from None
    (deb,) = into.glob(f"{package}_*.deb")
    if _sha256(deb) != sha256:
        raise PhotoSetUnavailable(f"{deb.name}: sha256 {_sha256(deb)} is not the manifest's {sha256}")
    return deb


def _extract(deb: Path, members: list[str], into: Path) -> None:
    """Only the listed files of the .deb's data archive (``dpkg-deb --fsys-tarfile`` | tar)."""
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into), *[f"./{m.lstrip('/')}" for m in members]], stdin=tar.stdout,
                   check=True, timeout=1800)
    tar.stdout.close()
    if tar.wait() != 0:
        raise PhotoSetUnavailable(f"dpkg-deb could not read {deb.name}")


def _cached_path(cache: Path, set_name: str, entry: dict) -> Path:
    return cache / set_name / entry["label"] / entry["name"]


def load_set(name: str, cache: Path = DEFAULT_CACHE) -> list[PhotoFile]:
    """The set's photos (label = class), fetched into ``cache`` the first time."""
    spec = manifest(name)
    photos = spec["photos"]
    missing = [p for p in photos if not _cached_path(cache, name, p).is_file()]
    for package in {p["package"] for p in missing}:
        source = spec["packages"][package]
        wanted = [p for p in missing if p["package"] == package]
        print(f"{name}: fetching {len(wanted)} photos from Debian {package} {source['version']}", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="deeper-bench-") as tmp:
            deb = _download_deb(package, source["version"], source["sha256"], Path(tmp))
            _extract(deb, [p["file"] for p in wanted], Path(tmp))
            for entry in wanted:
                extracted = Path(tmp) / entry["file"].lstrip("/")
                if _sha256(extracted) != entry["sha256"]:
                    raise PhotoSetUnavailable(f"{entry['file']} in {deb.name} is not the manifest's file")
                target = _cached_path(cache, name, entry)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(extracted, target)
    return [PhotoFile(_cached_path(cache, name, p), p["label"]) for p in photos]


def subjects(name: str) -> dict[str, str]:
    """Photo file name -> its ``subject`` in the manifest (``other`` where none is given)."""
    return {p["name"]: p.get("subject", "other") for p in manifest(name)["photos"]}


def available(name: str, cache: Path = DEFAULT_CACHE) -> list[PhotoFile] | None:
    """:func:`load_set`, or None (with a line saying why) where it can't be had."""
    try:
        return load_set(name, cache)
    except PhotoSetUnavailable as exc:
        print(f"skipping photo set {name}: {exc}", file=sys.stderr)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description="fetch the bench photo sets into the cache")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    args = parser.parse_args()
    for path in sorted(MANIFESTS.glob("*.json")):
        photos = load_set(path.stem, Path(args.cache))
        classes = sorted({p.label for p in photos})
        print(f"{path.stem}: {len(photos)} photos, classes {classes}, in {Path(args.cache) / path.stem}")


if __name__ == "__main__":
    main()
