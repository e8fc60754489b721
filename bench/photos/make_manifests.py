"""Make the bench photo manifests (``other_things.json``, ``stellarium_dso.json``) from Debian packages.

Run once by hand (it downloads the packages with ``apt-get download`` into a temporary folder);
the manifests it writes are committed, the photos never are (``bench/photo_sources.py`` fetches
them at run time and checks every sha256).

``other_things``: real photos of things that are not cars (five show buildings, one of the
examples' classes: their ``subject`` says so), chosen by looking at them: scikit-image's bundled
data (each licence as its ``skimage.data`` docstring states), OpenCV's sample data (the
package's licence; the photos' own origins are not recorded upstream) and KDE Palapeli's
puzzle photos (licence and author from each ``.desktop`` file). Left out: drawings, renders,
synthetic images, Chelsea the cat (also in ../shared), and a licence plate (a car).

``stellarium_dso``: every texture of Stellarium's default deep-sky set whose file name names a
Messier, NGC or IC object, labelled by that object's type in Stellarium's own DSO catalogue
(``nebulae/default/catalog.dat``, a gzipped Qt data stream, format 3.16), keeping the five
classes with over 50 photos. Credits come from ``textures.json``; the licences are Stellarium's
(its README section 4: per-credit permissions such as "use the image freely", CC BY-SA,
public domain).

    python bench/photos/make_manifests.py
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import struct
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

SKIMAGE = {  # file -> licence, from skimage.data's docstrings (0.19)
    "astronaut.png": "public domain (NASA)", "brick.png": "CC0 (CC0Textures)", "camera.png": "CC0 (Lav Varshney)",
    "cell.png": "BSD-3-Clause (scikit-image data)", "clock_motion.png": "BSD-3-Clause (scikit-image data)",
    "coffee.png": "CC0 (Rachel Michetti)", "coins.png": "no known copyright restrictions (Brooklyn Museum)",
    "grass.png": "CC0 (DeviantArt linolafett)", "gravel.png": "CC0 (CC0Textures)",
    "hubble_deep_field.jpg": "public domain (NASA)", "ihc.png": "BSD-3-Clause (scikit-image data)",
    "moon.png": "BSD-3-Clause (scikit-image data)", "motorcycle_left.png": "Middlebury stereo data (research use)",
    "page.png": "BSD-3-Clause (scikit-image data)", "retina.jpg": "CC0 (Wikimedia Commons)",
    "rocket.jpg": "public domain (SpaceX)",
}
OPENCV = ["aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png", "board.jpg", "box.png",
          "box_in_scene.png", "building.jpg", "butterfly.jpg", "chicky_512.png", "fruits.jpg", "graf1.png", "home.jpg",
          "left01.jpg", "leuvenA.jpg", "messi5.jpg", "orange.jpg", "pca_test1.jpg", "rubberwhale1.png",
          "squirrel_cls.jpg", "stuff.jpg", "sudoku.png", "ela_original.jpg"]
PALAPELI = ["castle-maintenon", "cincinnati-bridge", "citrus-fruits", "european-honey-bee", "panther-chameleon-female"]
#: Photos whose subject is one of the examples' classes (buildings): other things for the cars
#: model, in-class for the examples model (bench/novelty.py leaves them out there).
SUBJECTS = {"opencv-building.jpg": "buildings", "opencv-home.jpg": "buildings", "opencv-leuvenA.jpg": "buildings",
            "palapeli-castle-maintenon.jpg": "buildings", "palapeli-cincinnati-bridge.jpg": "buildings"}

#: Stellarium 0.22's NebulaType values -> the evaluation classes (others are left out).
DSO_CLASSES = {0: "galaxy", 1: "galaxy", 2: "galaxy", 3: "galaxy", 5: "open_cluster", 6: "open_cluster",
               7: "globular_cluster", 11: "planetary_nebula", 10: "bright_nebula", 15: "bright_nebula",
               16: "bright_nebula", 17: "bright_nebula"}
DSO_NAME = [(r"^m(\d+)", "M"), (r"^n(\d+)", "NGC"), (r"^ic(\d+)", "IC")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(package: str, into: Path) -> tuple[dict, Path]:
    """Download and unpack a package; its name, version and .deb sha256, and the unpacked root."""
    subprocess.run(["apt-get", "download", package], cwd=into, check=True, capture_output=True)
    (deb,) = into.glob(f"{package}_*.deb")
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    root = into / package
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return {"version": version, "sha256": sha256(deb)}, root


def entry(root: Path, file: str, package: str, label: str, name: str, **extra: str) -> dict:
    return {"package": package, "file": "/" + file, "sha256": sha256(root / file), "label": label, "name": name,
            **extra}


def other_things(tmp: Path) -> dict:
    packages, photos = {}, []
    packages["python3-skimage"], root = fetch("python3-skimage", tmp)
    for name, licence in SKIMAGE.items():
        photos.append(entry(root, f"usr/lib/python3/dist-packages/skimage/data/{name}", "python3-skimage", "other",
                            f"skimage-{name}", licence=licence, source="scikit-image data"))
    packages["opencv-doc"], root = fetch("opencv-doc", tmp)
    for name in OPENCV:
        photos.append(entry(root, f"usr/share/doc/opencv-doc/examples/data/{name}", "opencv-doc", "other",
                            f"opencv-{name}", licence="Apache-2.0 AND BSD-3-Clause (Debian's opencv copyright)",
                            source="OpenCV samples/data"))
    packages["palapeli-data"], root = fetch("palapeli-data", tmp)
    for name in PALAPELI:
        desktop = (root / f"usr/share/palapeli/collection/{name}.desktop").read_text()
        field = lambda key: re.search(rf"^{key}=(.*)$", desktop, re.M).group(1)  # noqa: E731
        photos.append(entry(root, f"usr/share/palapeli/collection/{name}.jpg", "palapeli-data", "other",
                            f"palapeli-{name}.jpg", licence=field("X-KDE-PluginInfo-License"),
                            source=f"KDE Palapeli; author {field('X-KDE-PluginInfo-Author')}"))
    for photo in photos:
        photo["subject"] = SUBJECTS.get(photo["name"], "other")
    return {"description": "photos of other things than cars; 'subject' names the few that show one of the "
                           "examples' classes", "packages": packages, "photos": photos}


def dso_catalogue(path: Path) -> dict[tuple[str, int], int]:
    """(catalogue, number) -> Stellarium object type, from catalog.dat (format 3.16)."""
    data, pos = gzip.open(path).read(), 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def text():
        nonlocal pos
        n = take(">I")
        if n == 0xFFFFFFFF:
            return None
        pos += n
        return data[pos - n:pos].decode("utf-16-be")

    assert (text(), text()) == ("3.16", "standard"), "not the catalogue format this parser knows"
    found: dict[tuple[str, int], int] = {}
    while pos < len(data):
        take(">I")
        [take(">d") for _ in range(4)]  # ra, dec, bMag, vMag
        kind = take(">I")
        text()  # morphological type
        take(">d"), take(">d"), take(">I")  # axes, orientation
        [take(">d") for _ in range(6)]  # redshift, parallax, distance (+ errors)
        numbers = dict(zip(("NGC", "IC", "M"), [take(">I") for _ in range(3)]))
        [take(">I") for _ in range(11)]  # C .. UGC
        text(), take(">I"), take(">I")  # Ced, Arp, VV
        [text() for _ in range(7)]  # PK .. VdBH
        [take(">I") for _ in range(5)]  # DWB .. VdBHa
        for catalogue, number in numbers.items():
            if number:
                found.setdefault((catalogue, number), kind)
    return found


def stellarium(tmp: Path) -> dict:
    source, root = fetch("stellarium-data", tmp)
    folder = "usr/share/stellarium/nebulae/default"
    types = dso_catalogue(root / folder / "catalog.dat")
    text = (root / folder / "textures.json").read_text()
    tiles = json.loads(re.sub(r"([\[,:\s])(-?)\.(\d)", r"\g<1>\g<2>0.\3", text))["subTiles"]  # ".5" numbers
    photos = []
    for tile in tiles:
        name = tile["imageUrl"]
        for pattern, catalogue in DSO_NAME:
            match = re.match(pattern, name.lower())
            if match:
                label = DSO_CLASSES.get(types.get((catalogue, int(match.group(1))), -1))
                if label:
                    credit = tile.get("imageCredits", {})
                    photos.append(entry(root, f"{folder}/{name}", "stellarium-data", label, name,
                                        source=f"{catalogue} {int(match.group(1))}; credit "
                                               f"{credit.get('short') or credit.get('Short') or '?'}"
                                               + (f" ({credit['infoUrl']})" if credit.get("infoUrl") else ""),
                                        licence="per credit, Stellarium README section 4 (GPL-2+ package)"))
                break
    return {"description": "telescope photos of deep-sky objects, labelled by Stellarium's catalogue type",
            "packages": {"stellarium-data": source}, "photos": photos}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="deeper-manifests-") as tmp:
        for name, make in (("other_things", other_things), ("stellarium_dso", stellarium)):
            spec = make(Path(tmp))
            (HERE / f"{name}.json").write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
            counts: dict[str, int] = {}
            for p in spec["photos"]:
                counts[p["label"]] = counts.get(p["label"], 0) + 1
            print(f"{name}: {len(spec['photos'])} photos {counts}")


if __name__ == "__main__":
    main()
