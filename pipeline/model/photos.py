r"""Finding photos on disk: files, directories, and labels from sub-folder names.

``cars/classic/a.jpg`` under ``deeper train cars`` is labelled ``classic``: the label is the
first directory below the root the user named, the convention of the reference recipe and of
Keras' ``image_dataset_from_directory``.

File names are bytes on Linux; Python shows bytes that aren't UTF-8 as lone surrogates
(``b'caf\xe9.jpg'`` -> ``'caf\udce9.jpg'``), which no UTF-8 writer (Parquet, JSON, HTML, a
terminal) accepts. Every path or folder label that leaves this module as text goes through
:func:`display_path`: UTF-8 names are unchanged, other bytes become ``\xNN`` escapes
(``'caf\xe9.jpg'`` with a real backslash), the same text everywhere. :func:`path_from_display`
turns it back into the real path for code that must open the file again (a report's thumbnails).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.errors import DeeperError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class PhotoFile:
    """A photo on disk, by path (the rig's ``Photo`` is bytes in memory: another thing)."""

    path: Path  # the real path (may hold surrogates): open this one
    label: str | None = None  # already display text

    @property
    def source(self) -> str:
        """The path as text safe to write anywhere (see :func:`display_path`)."""
        return display_path(self.path)


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as valid UTF-8 text: undecodable bytes of the file name become ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def path_from_display(text: str) -> Path:
    """The real path behind :func:`display_path`'s text: the text itself if it names a file,
    else its ``\\xNN`` escapes turned back into bytes."""
    if os.path.lexists(text):
        return Path(text)
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    return Path(os.fsdecode(raw))


def find_photos(inputs: Sequence[str | Path], labels_from_folders: bool = False) -> list[PhotoFile]:
    """Expand files and directories (recursively) into photos, sorted for reproducibility.

    Files named explicitly are taken whatever their suffix (a bad one fails decode with a
    reason); inside directories only image suffixes are taken and hidden files are skipped.
    """
    photos: list[PhotoFile] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            photos.extend(_walk(path, labels_from_folders))
        elif path.is_file():
            photos.append(PhotoFile(path, display_path(path.parent.name) if labels_from_folders else None))
        else:
            raise DeeperError(f"no such file or directory: {display_path(path)}")
    return photos


def _walk(root: Path, labels_from_folders: bool) -> Iterable[PhotoFile]:
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        label = display_path(relative.parts[0]) if labels_from_folders and len(relative.parts) > 1 else None
        yield PhotoFile(path, label)
