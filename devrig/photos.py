"""Photos for rig runs: distinct synthetic JPEGs drawn in code, and wrappers for real bytes."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from schemas.messages import image_id


@dataclass(frozen=True)
class Photo:
    """What the rig sends: the image id is the sha256 of ``data`` (the producer's message key)."""

    image_id: str
    source: str
    label: str | None
    data: bytes


def photo_from_bytes(data: bytes, source: str, label: str | None = None) -> Photo:
    return Photo(image_id(data), source, label, data)


def synthetic_photo(seed: int, index: int, size: int = 96) -> tuple[bytes, str]:
    """One JPEG: random background, 2-5 random ellipses ("round") or boxes ("boxy"), noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    label = "round" if index % 2 == 0 else "boxy"
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, size - 16, 2))
        w, h = (int(v) for v in rng.integers(12, size // 2, 2))
        box = [x0, y0, min(size - 1, x0 + w), min(size - 1, y0 + h)]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if label == "round" else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(image, np.float32) + rng.normal(0.0, 10.0, (size, size, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=85)
    return out.getvalue(), label


def synthetic_photos(n: int, seed: int = 0, size: int = 96, prefix: str = "synthetic") -> list[Photo]:
    """``n`` distinct photos (distinct bytes, so distinct sha256 ids), reproducible from ``seed``.

    Distinct ids matter: the rig counts duplicates per image id, so two equal photos would
    look like a duplicate the stream made.
    """
    photos, seen = [], set()
    for i in range(n):
        data, label = synthetic_photo(seed, i, size)
        photo = photo_from_bytes(data, f"{prefix}/{seed}/{i:05d}-{label}.jpg", label)
        if photo.image_id in seen:  # would need two identical noise fields: never seen, but checked
            raise AssertionError(f"synthetic photo {i} (seed {seed}) repeats an earlier one")
        seen.add(photo.image_id)
        photos.append(photo)
    return photos
