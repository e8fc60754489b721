"""Finding photos on disk: files, directories, and labels from sub-folder names.

``cars/classic/a.jpg`` under ``deeper train cars`` is labelled ``classic``: the label is the
first directory below the root the user named, the convention of the reference recipe and of
Keras' ``image_dataset_from_directory``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.errors import DeeperError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class Photo:
    path: Path
    label: str | None = None


def find_photos(inputs: Sequence[str | Path], labels_from_folders: bool = False) -> list[Photo]:
    """Expand files and directories (recursively) into photos, sorted for reproducibility.

    Files named explicitly are taken whatever their suffix (a bad one fails decode with a
    reason); inside directories only image suffixes are taken and hidden files are skipped.
    """
    photos: list[Photo] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            photos.extend(_walk(path, labels_from_folders))
        elif path.is_file():
            photos.append(Photo(path, path.parent.name if labels_from_folders else None))
        else:
            raise DeeperError(f"no such file or directory: {path}")
    return photos


def _walk(root: Path, labels_from_folders: bool) -> Iterable[Photo]:
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        label = relative.parts[0] if labels_from_folders and len(relative.parts) > 1 else None
        yield Photo(path, label)
