"""Shared fixtures: the real backbone, the reference photos, a real broker.

Nothing here is a mock: backbones load real weights, the broker fixture starts a real
Kafka-protocol broker (or uses ``KAFKA_BOOTSTRAP_SERVERS``), and files are real Parquet.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.model import tf_startup

tf_startup.quiet()  # before anything imports TensorFlow: its level, without its start-up lines

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "examples"

from tests.broker_fixture import *  # noqa: E402,F401,F403  (kafka_settings and friends)


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with a clear reason when it isn't there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data {path} is not available on this machine")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One weights/feature cache for the whole session (converting weights once saves minutes)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def effnet(cache_dir):
    """The real EfficientNet-Lite0 backbone with its ImageNet weights."""
    from pipeline.model.nets.factory import load_backbone

    return load_backbone("efficientnet_lite0", cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="session")
def cars() -> Path:
    return shared_path("cars")


@pytest.fixture(scope="session")
def imagenet_samples() -> Path:
    return shared_path("imagenet-samples")


@pytest.fixture(autouse=True)
def committed_work_is_accounted_for(request):
    """After every stream test: below each committed offset, every record of the images and the
    features topic ended in exactly one outcome (a row and a record, or a dead letter)."""
    from tests import stream_helpers
    from tests.invariant import assert_committed_work_accounted

    stream_helpers.STREAMS.clear()
    yield
    streams, stream_helpers.STREAMS[:] = list(stream_helpers.STREAMS), []
    if request.node.get_closest_marker("no_stream_invariant"):
        return
    for settings in streams:
        assert_committed_work_accounted(settings)
