"""pipeline.model.weights: download with progress, size + sha256 check, safe unpack, cache, offline."""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.model import weights
from pipeline.errors import WeightsUnavailable
from tests.checkpoint_factory import (  # noqa: F401  (official_like is a fixture)
    ARCHIVE_NAME,
    CHECKPOINT_NAME,
    OfficialLike,
    evil_archive,
    official_like,
    serve,
)


#: slim builds legacy layers through ``layer.apply``; pytest resets the filter slim_compat sets.
pytestmark = pytest.mark.filterwarnings("ignore:`layer.apply` is deprecated:UserWarning")

def _spec(official: OfficialLike, url: str, **changes) -> weights.WeightsSpec:
    """A spec like inception_v1's, but for the fake archive served from ``url``."""
    data = official.archive.read_bytes()
    spec = weights.WeightsSpec(
        name="inception_v1",
        url=url,
        archive_name=ARCHIVE_NAME,
        checkpoint_name=CHECKPOINT_NAME,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    return replace(spec, **changes)


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert weights.sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_download_verifies_unpacks_caches_and_then_needs_no_network(
    official_like: OfficialLike, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    with serve({ARCHIVE_NAME: official_like.archive.read_bytes()}) as server:
        spec = _spec(official_like, server.url(ARCHIVE_NAME))
        assert not weights.available(spec, cache_dir=cache)
        first = weights.resolve(spec, cache_dir=cache, progress=True)
        assert server.requests == ["/" + ARCHIVE_NAME]
    assert ARCHIVE_NAME in capsys.readouterr().err  # the tqdm bar ran
    assert first.origin == "download"
    assert first.checkpoint == cache / "inception_v1" / "inception_v1_2016_08_28" / CHECKPOINT_NAME
    assert weights.cached_archive_path(spec, cache).read_bytes() == official_like.archive.read_bytes()
    assert first.digest == weights.sha256_file(official_like.checkpoint)
    assert not [p for p in cache.rglob("*") if storage.is_temp_name(p.name)]  # no temporary file or directory

    # The server is gone: a second resolve must come from the cache alone.
    again = weights.resolve(spec, cache_dir=cache)
    assert (again.origin, again.checkpoint, again.digest) == ("cache", first.checkpoint, first.digest)
    assert weights.available(spec, cache_dir=cache)


def test_explicit_archive_directory_and_checkpoint(official_like: OfficialLike, tmp_path: Path) -> None:
    spec = _spec(official_like, "http://127.0.0.1:1/unused.tar.gz")
    digest = weights.sha256_file(official_like.checkpoint)
    for explicit in (official_like.archive, official_like.checkpoint, official_like.checkpoint.parent):
        assert weights.available(spec, weights=explicit, cache_dir=tmp_path)
        resolved = weights.resolve(spec, weights=explicit, cache_dir=tmp_path)
        assert (resolved.origin, resolved.digest) == ("explicit", digest)
        assert resolved.checkpoint.name == CHECKPOINT_NAME


def test_explicit_path_that_does_not_exist(official_like: OfficialLike, tmp_path: Path) -> None:
    spec = _spec(official_like, "http://127.0.0.1:1/unused.tar.gz")
    assert not weights.available(spec, weights=tmp_path / "nope.ckpt", cache_dir=tmp_path)
    with pytest.raises(WeightsUnavailable, match="--weights"):
        weights.resolve(spec, weights=tmp_path / "nope.ckpt", cache_dir=tmp_path)


def test_hand_placed_archive_in_cache_is_used_offline(official_like: OfficialLike, tmp_path: Path) -> None:
    spec = _spec(official_like, "http://127.0.0.1:1/" + ARCHIVE_NAME)
    target = weights.cached_archive_path(spec, tmp_path)
    target.parent.mkdir(parents=True)
    shutil.copyfile(official_like.archive, target)
    assert weights.available(spec, cache_dir=tmp_path)
    assert weights.resolve(spec, cache_dir=tmp_path).origin == "cache"


def test_tampered_hand_placed_archive_is_refused(official_like: OfficialLike, tmp_path: Path) -> None:
    spec = _spec(official_like, "http://127.0.0.1:1/" + ARCHIVE_NAME, size=None)
    target = weights.cached_archive_path(spec, tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the archive")
    with pytest.raises(WeightsUnavailable, match="sha256"):
        weights.resolve(spec, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [({"sha256": "0" * 64}, "sha256 mismatch"), ({"size": 12345}, "wrong size")],
)
def test_bad_download_is_refused_and_leaves_nothing(
    official_like: OfficialLike, tmp_path: Path, change: dict, expected: str
) -> None:
    with serve({ARCHIVE_NAME: official_like.archive.read_bytes()}) as server:
        spec = _spec(official_like, server.url(ARCHIVE_NAME), **change)
        with pytest.raises(WeightsUnavailable, match=expected):
            weights.resolve(spec, cache_dir=tmp_path, progress=False)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("honest_length", [False, True])
def test_truncated_download_is_refused(official_like: OfficialLike, tmp_path: Path, honest_length: bool) -> None:
    data = official_like.archive.read_bytes()
    half = len(data) // 2
    # Either the server announces the full length and hangs up early, or it announces and
    # sends a short file: the first is caught by the length check, the second by the size.
    served = data[:half] if honest_length else data
    with serve({ARCHIVE_NAME: served}, cut_after={ARCHIVE_NAME: half}) as server:
        spec = _spec(official_like, server.url(ARCHIVE_NAME))
        expected = "wrong size: got" if honest_length else "truncated download: got"
        with pytest.raises(WeightsUnavailable, match=expected):
            weights.resolve(spec, cache_dir=tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_http_error_is_reported(official_like: OfficialLike, tmp_path: Path) -> None:
    with serve({}) as server:
        spec = _spec(official_like, server.url(ARCHIVE_NAME))
        with pytest.raises(WeightsUnavailable, match="404"):
            weights.resolve(spec, cache_dir=tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_offline_fails_fast_and_says_how_to_supply_the_file(official_like: OfficialLike, tmp_path: Path) -> None:
    spec = _spec(official_like, "http://127.0.0.1:1/" + ARCHIVE_NAME)
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as caught:
        weights.resolve(spec, cache_dir=tmp_path, progress=False)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert spec.url in message
    assert str(weights.cached_archive_path(spec, tmp_path)) in message
    assert "--weights PATH" in message and "DEEPER_CACHE_DIR" in message
    assert spec.sha256 in message


def test_hanging_dns_lookup_is_cut_short(
    official_like: OfficialLike, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: time.sleep(3))
    monkeypatch.setattr(weights.urllib.request, "getproxies", dict)  # as if no proxy is set
    spec = _spec(official_like, "http://weights.example.invalid/" + ARCHIVE_NAME)
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="DNS lookup of weights.example.invalid timed out"):
        weights.resolve(spec, cache_dir=tmp_path, progress=False, connect_timeout=0.3)
    assert time.monotonic() - started < 2


def test_offline_env_var_skips_the_network(
    official_like: OfficialLike, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    with serve({ARCHIVE_NAME: official_like.archive.read_bytes()}) as server:
        spec = _spec(official_like, server.url(ARCHIVE_NAME))
        with pytest.raises(WeightsUnavailable, match=weights.OFFLINE_ENV):
            weights.resolve(spec, cache_dir=tmp_path)
        assert server.requests == []


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_unsafe_archive_is_refused(official_like: OfficialLike, tmp_path: Path, kind: str) -> None:
    archive = evil_archive(tmp_path / ARCHIVE_NAME, kind)
    cache = tmp_path / "cache"
    spec = _spec(official_like, "http://127.0.0.1:1/unused.tar.gz")
    with pytest.raises(WeightsUnavailable, match="cannot unpack"):
        weights.resolve(spec, weights=archive, cache_dir=cache)
    assert not (tmp_path / "evil").exists() and not (cache / "evil").exists()
    assert _files(cache) == []


def test_unsafe_download_is_refused(official_like: OfficialLike, tmp_path: Path) -> None:
    data = evil_archive(tmp_path / "evil.tar.gz", "dotdot").read_bytes()
    cache = tmp_path / "cache"
    with serve({ARCHIVE_NAME: data}) as server:
        spec = _spec(official_like, server.url(ARCHIVE_NAME), sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        with pytest.raises(WeightsUnavailable, match="escapes"):
            weights.resolve(spec, cache_dir=cache, progress=False)
    assert not (cache / "inception_v1" / "evil").exists() and not (cache / "evil").exists()
    assert not (cache / "inception_v1" / "inception_v1_2016_08_28").exists()


def test_v2_checkpoint_digest_ignores_the_prefix(tmp_path: Path) -> None:
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.Variable([1.0, 2.0], name="v")
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            first = Path(saver.save(session, str(tmp_path / "a" / "model.ckpt"), write_meta_graph=False))
            second = Path(saver.save(session, str(tmp_path / "b" / "other.ckpt"), write_meta_graph=False))
    assert [f.name for f in weights.checkpoint_files(first)][0] == "model.ckpt.index"
    assert weights.checkpoint_digest(first) == weights.checkpoint_digest(second)
    spec = weights.WeightsSpec("m", "http://127.0.0.1:1/x.tar.gz", "x.tar.gz", "model.ckpt")
    assert weights.resolve(spec, weights=first, cache_dir=tmp_path).checkpoint == first
    assert weights.resolve(spec, weights=first.parent, cache_dir=tmp_path).checkpoint == first
