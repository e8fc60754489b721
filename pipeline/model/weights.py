"""Find, download, verify, unpack and cache a backbone's pretrained checkpoint.

A backbone describes its official weights with a :class:`WeightsSpec` (URL, expected size
and sha256, the archive's name and the checkpoint inside it) and calls :func:`resolve`,
which looks, in this order, at

a. an explicit ``weights`` path given by the user (``--weights PATH``): a ``.tar.gz``, a
   directory holding the checkpoint, or the checkpoint itself (a V1 ``*.ckpt`` file or a V2
   prefix with ``.index``/``.data-*`` files);
b. the cache directory (``DEEPER_CACHE_DIR``, see :class:`pipeline.config.Settings`), laid
   out as ``<cache>/<spec.name>/<archive_name>`` (the verified download, which a user may
   also drop in by hand) and ``<cache>/<spec.name>/<archive stem>/`` (its unpacked copy);
c. a download from ``spec.url``.

Why it is built the way it is:

* A download is written through :func:`pipeline.storage.atomic_file` (a temporary file next to
  its destination, fsync'ed, renamed into place) and the rename happens only after the size and
  sha256 match, so a crash, a truncated transfer or a tampered file never leaves something in
  the cache that looks valid.
* Unpacking refuses absolute paths, ``..`` members, links and device files (a checkpoint
  archive has only regular files), extracts into a temporary directory and renames it into
  place, so a half-unpacked directory is never seen by another process.
* Offline machines must fail fast and say how to get the file: the connect timeout is
  short, ``DEEPER_OFFLINE=1`` skips the network entirely, and :class:`WeightsUnavailable`
  names the URL, the exact cache path and ``--weights PATH``.
* The digest recorded with every feature vector is the sha256 of the *checkpoint* (not of
  the archive), so vectors computed from the tarball and from its extracted checkpoint are
  recognised as coming from the same weights.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import tarfile
import threading
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from pipeline.errors import WeightsUnavailable
from pipeline.storage import TEMP_PREFIX, TEMP_SUFFIX, atomic_file, fsync_dir, sha256_file

#: Seconds to wait for the TCP connection (and the response headers); short so that an
#: offline machine fails in a few seconds instead of hanging.
CONNECT_TIMEOUT_S = 5.0
#: Seconds a single read of the body may stall once the transfer has started.
READ_TIMEOUT_S = 60.0
#: Set to ``1``/``true``/``yes`` to never try the network (air-gapped machines, CI).
OFFLINE_ENV = "DEEPER_OFFLINE"
#: Written inside an unpacked directory: the sha256 of the archive it came from.
SOURCE_MARKER = ".source-sha256"
_CHUNK = 1 << 20
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class WeightsSpec:
    """Where a backbone's official weights come from and how to recognise them.

    ``sha256``/``size`` may be ``None`` when they are not known; the download is then
    accepted unchecked (and the error message says so). Tests pass their own spec to point
    at a local server.
    """

    name: str
    url: str
    archive_name: str
    checkpoint_name: str  # the checkpoint's file name inside the archive
    sha256: str | None = None
    size: int | None = None

    @property
    def archive_stem(self) -> str:
        """The archive's name without its ``.tar.gz``-like suffix."""
        for suffix in _ARCHIVE_SUFFIXES:
            if self.archive_name.endswith(suffix):
                return self.archive_name[: -len(suffix)]
        return self.archive_name


@dataclass(frozen=True)
class ResolvedWeights:
    """A checkpoint ready for ``Saver.restore``."""

    #: the path to pass to ``Saver.restore`` (V1 file or V2 prefix).
    checkpoint: Path
    #: sha256 identifying the checkpoint's content (see :func:`checkpoint_digest`).
    digest: str
    #: ``explicit``, ``cache`` or ``download``: how it was found (for logs).
    origin: str


# --------------------------------------------------------------------------- hashing


def checkpoint_files(prefix: Path) -> list[Path]:
    """The files that make up checkpoint ``prefix``: itself (V1) or ``.index`` + ``.data-*`` (V2)."""
    if prefix.is_file():
        return [prefix]
    index = prefix.with_name(prefix.name + ".index")
    if not index.is_file():
        return []
    data = sorted(prefix.parent.glob(prefix.name + ".data-*"))
    return [index, *data]


def checkpoint_digest(prefix: Path) -> str:
    """sha256 of a checkpoint's content: of the file itself for a one-file (V1) checkpoint,
    else of the ``"<suffix> <sha256>"`` lines of its files, so renaming the prefix keeps it."""
    files = checkpoint_files(prefix)
    if not files:
        raise WeightsUnavailable(f"no checkpoint at {prefix}")
    if len(files) == 1 and files[0] == prefix:
        return sha256_file(prefix)
    lines = [f"{f.name[len(prefix.name):]} {sha256_file(f)}\n" for f in files]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# --------------------------------------------------------------------------- locations


def default_cache_dir() -> Path:
    """The cache directory from the settings (``DEEPER_CACHE_DIR``)."""
    from pipeline.config import Settings

    return Path(Settings.from_env().cache_dir).expanduser()


def _model_dir(spec: WeightsSpec, cache_dir: str | os.PathLike[str] | None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / spec.name


def cached_archive_path(spec: WeightsSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the verified archive lives in the cache (and where a user may put it by hand)."""
    return _model_dir(spec, cache_dir) / spec.archive_name


def _unpacked_dir(spec: WeightsSpec, cache_dir: str | os.PathLike[str] | None) -> Path:
    return _model_dir(spec, cache_dir) / spec.archive_stem


def offline_requested() -> bool:
    """Whether ``DEEPER_OFFLINE`` forbids network access.

    Read here rather than in :mod:`pipeline.config` because it only matters to downloads.
    """
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- messages


def how_to_supply(spec: WeightsSpec, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The part of every error that tells the user how to provide the weights by hand."""
    expected = []
    if spec.size is not None:
        expected.append(f"{spec.size} bytes")
    expected.append(f"sha256 {spec.sha256}" if spec.sha256 else "sha256 not pinned")
    return (
        f"To supply the {spec.name} weights yourself, either\n"
        f"  1. download {spec.url} ({', '.join(expected)}) and save it as\n"
        f"     {cached_archive_path(spec, cache_dir)}\n"
        f"     (the cache directory is set by DEEPER_CACHE_DIR), or\n"
        f"  2. pass --weights PATH, where PATH is that .tar.gz, the directory it unpacks to,\n"
        f"     or the {spec.checkpoint_name} checkpoint inside it."
    )


def _unavailable(spec: WeightsSpec, cache_dir: str | os.PathLike[str] | None, reason: str) -> WeightsUnavailable:
    return WeightsUnavailable(f"{spec.name} weights unavailable: {reason}\n{how_to_supply(spec, cache_dir)}")


# --------------------------------------------------------------------------- download


def _check_dns(url: str, timeout: float) -> None:
    """Fail within ``timeout`` if the host name can't be resolved.

    Socket timeouts don't cover ``getaddrinfo``, which on a machine with an unreachable DNS
    server can block for tens of seconds; so the lookup runs in a daemon thread and we stop
    waiting after ``timeout``. Skipped when a proxy is configured (the proxy resolves).
    """
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or urllib.request.getproxies().get(parts.scheme):
        return
    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=lookup, name="deeper-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"DNS lookup of {parts.hostname} timed out after {timeout:g} s")
    if outcome[0] is not None:
        raise outcome[0]


def _open_url(url: str, connect_timeout: float) -> http.client.HTTPResponse:
    """Open ``url`` with a short timeout, then relax it for the body.

    urllib has a single socket timeout for connecting and reading; we connect with the
    short one (offline machines fail fast) and widen it once bytes flow (best effort: the
    socket is reached through private attributes, and a failure just keeps the short one).
    """
    _check_dns(url, connect_timeout)
    response = urllib.request.urlopen(url, timeout=connect_timeout)  # noqa: S310 (http(s) URL by contract)
    try:
        response.fp.raw._sock.settimeout(max(READ_TIMEOUT_S, connect_timeout))
    except AttributeError:
        pass
    return response


def _chunks(response: BinaryIO) -> Iterator[bytes]:
    while chunk := response.read(_CHUNK):
        yield chunk


def _progress_bar(total: int | None, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)


def _stream_to(response, out: BinaryIO, total: int | None, name: str, progress: bool) -> tuple[int, str]:
    """Copy the body to ``out``; return (bytes written, sha256)."""
    digest = hashlib.sha256()
    written = 0
    with _progress_bar(total, name, progress) as bar:
        for chunk in _chunks(response):
            out.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    return written, digest.hexdigest()


def _check_download(written: int, digest: str, announced: int | None, size: int | None, sha256: str | None) -> None:
    """Refuse a truncated or altered transfer (raises ValueError with the reason)."""
    if announced is not None and written != announced:
        raise ValueError(f"truncated download: got {written} of {announced} bytes")
    if size is not None and written != size:
        raise ValueError(f"wrong size: got {written} bytes, expected {size}")
    if sha256 is not None and digest != sha256.lower():
        raise ValueError(f"sha256 mismatch: got {digest}, expected {sha256.lower()}")


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    size: int | None,
    progress: bool = True,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying size and sha256 first.

    Raises ``ValueError`` (bad content) or ``OSError``/``urllib.error.URLError`` (network);
    :func:`resolve` turns both into :class:`WeightsUnavailable`. Nothing is left at ``dest``
    or next to it unless the file verified.
    """
    with atomic_file(dest) as out:  # renamed onto dest only if nothing below raises
        with _open_url(url, connect_timeout) as response:
            length = response.headers.get("Content-Length")
            announced = int(length) if length and length.isdigit() else None
            written, digest = _stream_to(response, out, announced or size, dest.name, progress)
        _check_download(written, digest, announced, size, sha256)
    return dest


# --------------------------------------------------------------------------- unpacking


def _check_member(member: tarfile.TarInfo) -> None:
    """Refuse anything but plain files and directories inside the destination."""
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or Path(name).is_absolute() or (parts and ":" in parts[0]):
        raise ValueError(f"archive member has an absolute path: {name!r}")
    if ".." in parts or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"archive member escapes the destination: {name!r}")
    if not (member.isfile() or member.isdir()):
        raise ValueError(f"archive member is a link or special file: {name!r}")


def safe_extract(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into the new directory ``dest`` (all or nothing).

    Every member is checked before anything is written; extraction goes to a temporary
    sibling directory (a :mod:`pipeline.storage` temporary name) that is renamed to ``dest`` at
    the end, and the rename is made durable. If another process created
    ``dest`` meanwhile, its copy wins and ours is discarded. Raises ``ValueError`` for an
    unsafe member, ``tarfile.TarError``/``OSError``/``EOFError`` for a broken archive.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f"{TEMP_PREFIX}{dest.name}-", suffix=TEMP_SUFFIX))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            # Our checks above already refuse every unsafe member; the "data" filter (Python
            # >= 3.10.12/3.11.4) is a second line that also drops odd permission bits.
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **extra)
        (tmp / SOURCE_MARKER).write_text(sha256_file(archive) + "\n")
        try:
            os.rename(tmp, dest)
            fsync_dir(dest.parent)
        except OSError:
            if not dest.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _find_checkpoint(directory: Path, checkpoint_name: str) -> Path | None:
    """The checkpoint in ``directory``: ``checkpoint_name`` if present, else the only one."""
    for candidate in (directory / checkpoint_name, *directory.glob(f"*/{checkpoint_name}")):
        if checkpoint_files(candidate):
            return candidate
    found = {p.with_suffix("") for p in directory.rglob("*.index")}
    found |= {p for p in directory.rglob("*.ckpt") if p.is_file()}
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------- resolution


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES)


def _unpack_or_raise(spec: WeightsSpec, cache_dir, archive: Path, dest: Path) -> Path:
    try:
        safe_extract(archive, dest)
    except (ValueError, tarfile.TarError, OSError, EOFError) as exc:
        raise _unavailable(spec, cache_dir, f"cannot unpack {archive}: {exc}") from exc
    return _checkpoint_in(spec, cache_dir, dest)


def _checkpoint_in(spec: WeightsSpec, cache_dir, directory: Path) -> Path:
    checkpoint = _find_checkpoint(directory, spec.checkpoint_name)
    if checkpoint is None:
        raise _unavailable(spec, cache_dir, f"no {spec.checkpoint_name} checkpoint in {directory}")
    return checkpoint


def _resolve_explicit(spec: WeightsSpec, path: Path, cache_dir) -> Path:
    """An explicit archive is trusted as given (it may be a fine-tuned checkpoint): it is
    unpacked once into the cache, keyed by its own sha256, and not compared to ``spec``."""
    if _is_archive(path):
        dest = _model_dir(spec, cache_dir) / f"explicit-{sha256_file(path)[:16]}"
        if dest.is_dir():
            return _checkpoint_in(spec, cache_dir, dest)
        return _unpack_or_raise(spec, cache_dir, path, dest)
    if path.is_dir():
        return _checkpoint_in(spec, cache_dir, path)
    if checkpoint_files(path):
        return path
    raise _unavailable(spec, cache_dir, f"--weights {path} is not an archive, a directory or a checkpoint")


def _unpacked_matches(spec: WeightsSpec, directory: Path) -> bool:
    """An unpacked cache entry counts only if it came from the archive we expect."""
    marker = directory / SOURCE_MARKER
    if not marker.is_file():
        return False
    return spec.sha256 is None or marker.read_text().strip() == spec.sha256.lower()


def _resolve_cached(spec: WeightsSpec, cache_dir) -> Path | None:
    """The cached checkpoint, unpacking a cached (e.g. hand-placed) archive if needed."""
    unpacked = _unpacked_dir(spec, cache_dir)
    if unpacked.is_dir() and _unpacked_matches(spec, unpacked):
        return _checkpoint_in(spec, cache_dir, unpacked)
    archive = cached_archive_path(spec, cache_dir)
    if not archive.is_file():
        return None
    _verify_cached_archive(spec, cache_dir, archive)
    return _unpack_cached_archive(spec, cache_dir, archive)


def _unpack_cached_archive(spec: WeightsSpec, cache_dir, archive: Path) -> Path:
    """Unpack the verified cached archive, first removing an unpacked copy of another one."""
    unpacked = _unpacked_dir(spec, cache_dir)
    if unpacked.is_dir() and not _unpacked_matches(spec, unpacked):
        shutil.rmtree(unpacked, ignore_errors=True)
    return _unpack_or_raise(spec, cache_dir, archive, unpacked)


def _verify_cached_archive(spec: WeightsSpec, cache_dir, archive: Path) -> None:
    """A hand-placed archive must match the pinned size/sha256 like a download would."""
    actual_size = archive.stat().st_size
    if spec.size is not None and actual_size != spec.size:
        raise _unavailable(spec, cache_dir, f"{archive} has {actual_size} bytes, expected {spec.size}")
    if spec.sha256 is not None and sha256_file(archive) != spec.sha256.lower():
        raise _unavailable(spec, cache_dir, f"{archive} does not match the expected sha256")


def _resolve_download(spec: WeightsSpec, cache_dir, progress: bool, connect_timeout: float) -> Path:
    if offline_requested():
        raise _unavailable(spec, cache_dir, f"not in the cache and {OFFLINE_ENV} is set, so it was not downloaded.")
    archive = cached_archive_path(spec, cache_dir)
    try:
        download(spec.url, archive, sha256=spec.sha256, size=spec.size, progress=progress, connect_timeout=connect_timeout)
    except ValueError as exc:
        raise _unavailable(spec, cache_dir, f"download from {spec.url} refused: {exc}") from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, IncompleteRead...
        raise _unavailable(spec, cache_dir, f"cannot download {spec.url}: {_reason(exc)}") from exc
    return _unpack_cached_archive(spec, cache_dir, archive)


def _reason(exc: BaseException) -> str:
    """A short cause: ``HTTP 404 Not Found``, ``[Errno 111] Connection refused``, ..."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    return str(getattr(exc, "reason", None) or exc)


def resolve(
    spec: WeightsSpec,
    weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> ResolvedWeights:
    """Find the checkpoint: explicit path, then cache, then download (see the module doc).

    Raises :class:`WeightsUnavailable` with instructions when none of them works.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        checkpoint, origin = _resolve_explicit(spec, path, cache_dir), "explicit"
    else:
        cached = _resolve_cached(spec, cache_dir)
        if cached is not None:
            checkpoint, origin = cached, "cache"
        else:
            checkpoint, origin = _resolve_download(spec, cache_dir, progress, connect_timeout), "download"
    return ResolvedWeights(checkpoint=checkpoint, digest=checkpoint_digest(checkpoint), origin=origin)


def available(
    spec: WeightsSpec,
    weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> bool:
    """Cheap check (no network, no hashing) that :func:`resolve` should succeed offline."""
    if weights is not None:
        path = Path(weights).expanduser()
        return _is_archive(path) or path.is_dir() or bool(checkpoint_files(path))
    unpacked = _unpacked_dir(spec, cache_dir)
    return (unpacked.is_dir() and _unpacked_matches(spec, unpacked)) or cached_archive_path(spec, cache_dir).is_file()
