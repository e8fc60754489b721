r"""What a backfill reads: ``SRC`` -> a list of photos, and one photo's bytes on any node.

``SRC`` is one of (checked in this order):

* a Parquet file of paths (``*.parquet``, local or ``s3://``): its ``path`` column (or
  ``source``/``location``) names the photos, local paths or ``s3://`` URIs; an optional
  ``label`` column gives their labels;
* an ``s3://bucket/prefix``: every object below it with an image suffix (hidden names skipped);
* a glob (``photos/**/*.jpg``): every file it matches, whatever its suffix (as for files named
  on the command line);
* a local folder (every photo below it, as ``deeper featurize`` finds them) or a single file.

Listing runs on the driver, before Spark starts, so a wrong ``SRC`` fails in a second. Local
photos are named by absolute path (executors must see the same path: a shared mount on a
cluster), S3 photos by URI; the names are display text (:func:`pipeline.model.photos.display_path`)
and :func:`read_photo` turns them back into what to open. Labels come from sub-folder names only
with ``labels_from_folders`` (``deeper featurize``'s convention; a lake's folders are rarely
classes).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import DeeperError
from pipeline.model.photos import IMAGE_SUFFIXES, display_path, find_photos, path_from_display

#: Columns of a Parquet list of photos that may name them, in order of preference.
PATH_COLUMNS = ("path", "source", "location")
LISTING = pa.schema([pa.field("source", pa.string(), nullable=False), pa.field("label", pa.string())])


@dataclass(frozen=True)
class Listing:
    photos: pa.Table  # LISTING: source (what to open, as display text), label
    what: str  # "folder", "glob", "s3 prefix", "parquet list", "file"


def list_photos(src: str, labels_from_folders: bool = False) -> Listing:
    """The photos ``src`` names (see the module doc), sorted by name."""
    if src.endswith(".parquet"):
        return Listing(_from_parquet(src), "parquet list")
    if storage.is_uri(src):
        return Listing(_from_s3(src, labels_from_folders), "s3 prefix")
    if glob.has_magic(src) and not Path(src).exists():
        found = sorted(p for p in glob.glob(src, recursive=True) if Path(p).is_file())
        if not found:
            raise DeeperError(f"no files match {display_path(src)}")
        return Listing(_table([display_path(Path(p).absolute()) for p in found], None), "glob")
    photos = find_photos([src], labels_from_folders=labels_from_folders)  # DeeperError if missing
    what = "folder" if Path(src).is_dir() else "file"
    return Listing(_table([display_path(p.path.absolute()) for p in photos], [p.label for p in photos]), what)


def _table(sources: list[str], labels: list[str | None] | None) -> pa.Table:
    return pa.table({"source": sources, "label": labels or [None] * len(sources)}, schema=LISTING)


def _from_s3(prefix: str, labels_from_folders: bool) -> pa.Table:
    fs, root = storage.resolve(prefix)
    try:
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise DeeperError(f"cannot list {prefix}: {exc}") from exc
    sources, labels = [], []
    for info in sorted(found, key=lambda i: i.path):
        relative = info.path[len(root):].lstrip("/").split("/")
        if info.type != pafs.FileType.File or any(part.startswith(".") for part in relative):
            continue
        if Path(info.path).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        sources.append(storage.S3_SCHEME + info.path)
        labels.append(relative[0] if labels_from_folders and len(relative) > 1 else None)
    if not sources:
        raise DeeperError(f"no photos under {prefix}")
    return _table(sources, labels)


def _from_parquet(location: str) -> pa.Table:
    import pyarrow.parquet as pq

    with storage.open_input(location) as source:  # StorageError (a DeeperError) if missing
        try:
            table = pq.read_table(source)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DeeperError(f"{location} is not a readable Parquet file: {exc}") from None
    column = next((c for c in PATH_COLUMNS if c in table.column_names), None)
    if column is None:
        raise DeeperError(f"{location}: a list of photos needs a column named {' or '.join(PATH_COLUMNS)} "
                          f"(it has {', '.join(table.column_names)})")
    paths = table.column(column).cast(pa.string()).to_pylist()
    labels = table.column("label").cast(pa.string()).to_pylist() if "label" in table.column_names else None
    keep = [i for i, p in enumerate(paths) if p]
    if not keep:
        raise DeeperError(f"{location}: column {column} names no photos")
    absolute = [paths[i] if storage.is_uri(paths[i]) else display_path(Path(paths[i]).absolute()) for i in keep]
    return _table(absolute, [labels[i] for i in keep] if labels else None)


def read_photo(source: str) -> bytes:
    """The bytes of a listed photo (a local path in display form, or an ``s3://`` URI).
    Raises ``OSError`` (local) or ``DeeperError`` (S3) when it cannot be read."""
    if storage.is_uri(source):
        fs, key = storage.resolve(source)
        try:
            with fs.open_input_stream(key) as stream:
                return stream.read()
        except OSError as exc:
            raise DeeperError(str(exc).splitlines()[0]) from None
    return path_from_display(source).read_bytes()
