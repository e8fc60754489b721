"""Where bytes land: one atomic write, one file hash, and local paths and S3 URIs alike.

Everything that must never be seen half-written (Parquet parts, registry files, downloaded
weights, converted-model caches) goes through :func:`atomic_file` / :func:`write_bytes_atomic`
(local disk) or :func:`write_parquet` (local disk or object storage):

* local disk: write a temporary name in the *same* directory (a rename never crosses file
  systems), fsync the file, ``os.replace`` it onto the final name, fsync the directory so the
  rename itself survives a power cut. Readers (and :func:`list_parquet`) skip temporary names.
* S3 (``s3://bucket/prefix/...``): an object becomes visible only when its single PUT (or its
  multipart upload) completes, so there is no temporary name and no rename. The table is
  serialised in memory first, so a failure while encoding uploads nothing.

S3 settings come from the usual AWS variables, read here explicitly so every supported pyarrow
behaves the same: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (``http://host:port`` for a
local server; path-style addressing), ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
(+ ``AWS_SESSION_TOKEN``), ``AWS_REGION`` or ``AWS_DEFAULT_REGION``. Whatever is unset is left to
the AWS SDK's own chain (profiles, instance roles).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import urllib.parse
import uuid
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Union

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import DeeperError

#: A local path or an ``s3://bucket/key`` URI.
Location = Union[str, os.PathLike]

S3_SCHEME = "s3://"
#: Temporary files start with this (readers skip them; the featurizer sweeps stale ones).
TEMP_PREFIX = ".tmp-"
#: ...and end with this, so ``**/*.parquet`` globs of DuckDB/polars/Spark never match one.
TEMP_SUFFIX = ".partial"
PARQUET_SUFFIX = ".parquet"
PARQUET_COMPRESSION = "zstd"
_CHUNK = 1 << 20


class StorageError(DeeperError):
    """A location cannot be reached, listed or read."""


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Location) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks so large files don't fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- local atomic writes


def _temp_name(path: Path) -> Path:
    return path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}{TEMP_SUFFIX}"


def fsync_dir(directory: Location) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Location) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path`` for writing; on a clean exit fsync it, rename it
    onto ``path`` and fsync the directory. On an exception the temporary file is removed and
    ``path`` is untouched (so a caller can verify the content inside the ``with`` and raise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Location, data: bytes) -> Path:
    """Write ``data`` to the local file ``path`` all or nothing (see :func:`atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


# --------------------------------------------------------------------------- locations


def is_uri(location: Location) -> bool:
    """Whether ``location`` names object storage (``s3://...``) rather than a local path."""
    return isinstance(location, str) and location.startswith(S3_SCHEME)


def join(location: Location, *parts: str) -> Location:
    """``location`` / parts: a ``Path`` for a local path, an ``s3://`` string for a URI."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(location).joinpath(*parts)


def _s3_key(location: str) -> str:
    """``s3://bucket/a/b`` -> ``bucket/a/b`` (pyarrow's S3 path form)."""
    path = location[len(S3_SCHEME):].strip("/")
    if not path:
        raise StorageError(f"{location}: an S3 location needs a bucket (s3://bucket/prefix)")
    return path


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def s3_options() -> dict[str, object]:
    """``S3FileSystem`` keyword arguments from the AWS environment variables (see module doc)."""
    # look before writing a "directory" marker (after a delete): prefixes that still hold
    # objects then need no write at all
    options: dict[str, object] = {"check_directory_existence_before_creation": True}
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint:
        parts = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parts.netloc
        options["scheme"] = parts.scheme or "https"
    region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options["access_key"], options["secret_key"] = key, secret
        token = _env("AWS_SESSION_TOKEN")
        if token:
            options["session_token"] = token
    return options


@functools.lru_cache(maxsize=8)
def _s3_filesystem(frozen_options: tuple[tuple[str, object], ...]) -> pafs.FileSystem:
    return pafs.S3FileSystem(**dict(frozen_options))


def resolve(location: Location) -> tuple[pafs.FileSystem, str]:
    """``location`` -> (pyarrow filesystem, path within it). S3 clients are reused while the
    AWS variables stay the same."""
    if is_uri(location):
        return _s3_filesystem(tuple(sorted(s3_options().items()))), _s3_key(str(location))
    return pafs.LocalFileSystem(), str(Path(location).absolute())


def _describe(location: Location) -> str:
    if is_uri(location):
        endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        return f"{location} (endpoint {endpoint or 'AWS default'})"
    return str(location)


# --------------------------------------------------------------------------- Parquet, files


def write_parquet(table: pa.Table, location: Location, compression: str = PARQUET_COMPRESSION) -> Location:
    """Write ``table`` to ``location`` all or nothing; return ``location`` (a ``Path`` if local).

    Local: temporary name + fsync + rename + directory fsync. S3: the file is encoded in memory,
    then sent as one object, which no reader sees until it is complete.
    """
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(path)
        try:
            pq.write_table(table, tmp, compression=compression)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return path
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    buffer = sink.getvalue()
    fs, key = resolve(location)
    try:
        with fs.open_output_stream(key) as out:
            out.write(buffer)
    except OSError as exc:
        raise StorageError(f"cannot write {_describe(location)}: {exc}") from exc
    return location


def move(source: Location, target: Location) -> None:
    """Give a finished file its final name: a rename on local disk (atomic; the directory is
    fsynced), a server-side copy then a delete on S3 (the target appears whole). Raises
    ``FileNotFoundError`` when ``source`` is gone."""
    if not is_uri(source):
        os.replace(source, target)
        fsync_dir(Path(target).parent)
        return
    fs, src = resolve(source)
    _, dst = resolve(target)
    if fs.get_file_info(src).type == pafs.FileType.NotFound:
        raise FileNotFoundError(str(source))
    try:
        fs.copy_file(src, dst)
    except OSError as exc:
        raise StorageError(f"cannot copy {_describe(source)} to {target}: {exc}") from exc
    delete([source])  # tolerates the directory marker some servers refuse (see delete)


def exists(location: Location) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) or name.endswith(TEMP_SUFFIX)


def list_parquet(location: Location) -> list[Location]:
    """The finished Parquet files at ``location``, sorted: the file itself, or every
    ``*.parquet`` below a directory/prefix (recursive), temporary names skipped. Entries are
    ``Path``s for a local location and ``s3://`` URIs for an S3 one."""
    fs, path = resolve(location)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [Path(location) if not is_uri(location) else location]
        if info.type != pafs.FileType.Directory:
            raise StorageError(f"no such feature file or directory: {_describe(location)}")
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise StorageError(f"cannot list {_describe(location)}: {exc}") from exc
    keys = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(PARQUET_SUFFIX)
                  and not is_temp_name(f.base_name))
    if is_uri(location):
        return [S3_SCHEME + k for k in keys]
    return [Path(location) / Path(k).relative_to(path) for k in keys]  # in the form the caller gave


def open_input(location: Location) -> pa.NativeFile:
    """A random-access reader (what ``pq.ParquetFile`` wants) for a local file or an S3 object."""
    fs, path = resolve(location)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise StorageError(f"no such file: {_describe(location)}") from None
    except OSError as exc:
        raise StorageError(f"cannot read {_describe(location)}: {exc}") from exc


def delete(locations: Iterable[Location]) -> None:
    """Delete files (local or S3); ones already gone are not an error.

    After deleting an object, pyarrow writes an empty ``prefix/`` marker object when it cannot
    see the prefix any more; servers that refuse such keys (localbucket) fail that second step
    although the object is gone, so a failure counts only if the object is still there.
    """
    for location in locations:
        fs, path = resolve(location)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                continue
            raise StorageError(f"cannot delete {_describe(location)}: {exc}") from exc
