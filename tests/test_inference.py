"""The tf.data inference pipeline with the real EfficientNet-Lite0: bad images never stop a batch.

Good inputs are real photos (``../shared/data/imagenet-samples``, else cars, else generated
photo-like images); bad ones come from :mod:`tests.bad_images`. A bad record comes back as a
:class:`Failed` in its place, the good ones as :class:`Featurized` with the same vectors they
get when run without the bad ones, and the model never sees a placeholder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from pipeline.model.decode import decode_image
from schemas.messages import image_id
from pipeline.model.inference import Failed, Featurized, ImageRecord, Inference
from tests import bad_images

LAYER = "prelogits"
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
#: bad records mixed into the batch: (case name, the reason it must fail with)
BAD = ["jpeg_truncated_half", "html_text", "png_bomb_30000"]
#: where the 3 bad records go among the 8
LAYOUT = "GBGGBGBG"


class CountingBackbone:
    """The real backbone, counting how many rows each model call gets."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, batch, layers):
        self.calls.append(len(batch))
        return self.inner.run(batch, layers)


def _record(data: bytes, source: str, label: str | None = None) -> ImageRecord:
    return ImageRecord(image_id=image_id(data), data=data, source=source, label=label, context={"source": source})


@pytest.fixture(scope="module")
def good() -> list[ImageRecord]:
    """Five real photos, or generated ones where the reference data is not on this machine."""
    for folder in (SHARED / "imagenet-samples", SHARED / "cars" / "test"):
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(files) >= 5:
            return [_record(p.read_bytes(), str(p)) for p in files[:5]]
    return [_record(bad_images.jpeg(320 + 16 * i, 240, seed=i), f"generated-{i}") for i in range(5)]


@pytest.fixture(scope="module")
def bad() -> list[ImageRecord]:
    return [_record(bad_images.by_name(name).data, name) for name in BAD]


@pytest.fixture(scope="module")
def mixed(good, bad) -> list[ImageRecord]:
    goods, bads = iter(good), iter(bad)
    return [next(goods) if slot == "G" else next(bads) for slot in LAYOUT]


@pytest.fixture(scope="module")
def alone(effnet, good) -> dict[str, np.ndarray]:
    """Each good photo's vector when it runs by itself (batch of one)."""
    inference = Inference(effnet, LAYER, batch_size=1)
    results = list(inference.run(good))
    assert all(isinstance(r, Featurized) for r in results)
    return {r.record.source: r.vector for r in results}


def _check_vectors(results, reference: dict[str, np.ndarray], atol: float):
    for result in results:
        if isinstance(result, Featurized):
            np.testing.assert_allclose(result.vector, reference[result.record.source], atol=atol, rtol=0,
                                       err_msg=result.record.source)


@pytest.mark.parametrize("batch_size", [4, 32])
def test_bad_images_fail_in_place_and_good_ones_match_running_alone(effnet, good, bad, mixed, batch_size):
    good_only = {r.record.source: r.vector for r in Inference(effnet, LAYER, batch_size=batch_size).run(good)}
    backbone = CountingBackbone(effnet)
    inference = Inference(backbone, LAYER, batch_size=batch_size)
    results = list(inference.run(mixed))

    assert [r.record for r in results] == mixed and all(r.record is m for r, m in zip(results, mixed))
    featurized = [r for r in results if isinstance(r, Featurized)]
    failed = [r for r in results if isinstance(r, Failed)]
    assert ["G" if isinstance(r, Featurized) else "B" for r in results] == list(LAYOUT)
    assert len(featurized) == 5 and len(failed) == 3

    expected_reasons = {name: bad_images.by_name(name).reason for name in BAD}
    assert {f.record.source: f.reason for f in failed} == expected_reasons
    assert all(f.detail for f in failed)

    dim = effnet.info.end_points[LAYER]
    for result in featurized:
        assert result.vector.shape == (dim,) and result.vector.dtype == np.float32
        assert np.isfinite(result.vector).all()
        decoded = decode_image(result.record.data)
        assert (result.width, result.height) == (decoded.width, decoded.height)
        assert result.record.context == {"source": result.record.source}  # context rides along untouched
    _check_vectors(featurized, good_only, atol=1e-5)
    assert len({r.vector.tobytes() for r in featurized}) == 5  # five photos, five different vectors

    assert sum(backbone.calls) == 5, f"the model saw {backbone.calls} rows; only the 5 good ones should reach it"
    assert all(rows <= batch_size for rows in backbone.calls)
    assert inference.times.images == 8
    assert inference.times.batches == -(-8 // batch_size)


def test_all_bad_batch_yields_only_failed_and_never_calls_the_model(effnet, bad):
    backbone = CountingBackbone(effnet)
    records = bad + [_record(bad_images.by_name(name).data, name)
                     for name in ("empty", "gif_bomb", "png_1x1", "png_bad_crc_ihdr", "webp_truncated")]
    results = list(Inference(backbone, LAYER, batch_size=4).run(records))
    assert [r.record for r in results] == records
    assert all(isinstance(r, Failed) for r in results)
    assert [r.reason for r in results] == [bad_images.by_name(r.record.source).reason for r in results]
    assert backbone.calls == []


def test_empty_input_yields_nothing(effnet):
    backbone = CountingBackbone(effnet)
    inference = Inference(backbone, LAYER, batch_size=4)
    assert list(inference.run([])) == []
    assert list(inference.run(iter(()))) == []
    assert backbone.calls == [] and inference.times.images == 0


def test_slow_generator_input_still_works(effnet, mixed, alone):
    pulled: list[float] = []

    def slowly() -> Iterator[ImageRecord]:
        for record in mixed:
            time.sleep(0.05)
            pulled.append(time.perf_counter())
            yield record

    results = list(Inference(effnet, LAYER, batch_size=4).run(slowly()))
    assert len(pulled) == len(mixed)
    assert [r.record for r in results] == mixed
    assert ["G" if isinstance(r, Featurized) else "B" for r in results] == list(LAYOUT)
    _check_vectors(results, alone, atol=1e-4)


def test_same_image_same_vector_whatever_the_batch(effnet, good, bad, alone):
    """Batch size, neighbours, position and duplicates do not change an image's vector."""
    rng = np.random.default_rng(11)
    pool = good + bad + good[:2]  # duplicates: the same bytes twice in one batch
    for batch_size in (2, 3, 8):
        order = rng.permutation(len(pool))
        records = [pool[i] for i in order]
        results = list(Inference(effnet, LAYER, batch_size=batch_size).run(records))
        assert [r.record for r in results] == records
        assert sum(isinstance(r, Featurized) for r in results) == 7
        _check_vectors(results, alone, atol=1e-4)


# -- batches cut by size or time, submissions, several model threads ---------------------------


def test_a_partial_batch_goes_out_when_its_time_is_up(effnet, good, alone):
    """3 photos in a batch of 32 on a stream that sends nothing more: the batch must not wait forever."""
    inference = Inference(effnet, LAYER, batch_size=32, batch_timeout=0.05)
    submission = inference.submit(good[:3])
    results = submission.wait(timeout=60)
    assert [r.record for r in results] == good[:3]
    assert inference.times.batches == 1 and inference.times.model_rows == 3
    _check_vectors(results, alone, atol=1e-4)


def test_warm_up_runs_the_model_and_leaves_no_trace(effnet, mixed, alone):
    """The start-up warm-up goes through decode and the model, and then the pipeline's totals and
    the next submission's results are as if it had never run."""
    backbone = CountingBackbone(effnet)
    inference = Inference(backbone, LAYER, batch_size=8, batch_timeout=0.05)
    assert inference.warm_up() > 0
    assert backbone.calls == [1], "the warm-up photo reached the model alone"
    assert vars(inference.times) == vars(type(inference.times)())
    results = inference.submit(mixed).wait(timeout=60)
    assert [r.record for r in results] == mixed
    assert [isinstance(r, Failed) for r in results] == [slot == "B" for slot in LAYOUT]
    assert inference.times.images == len(mixed)
    _check_vectors(results, alone, atol=1e-4)


def test_consecutive_submissions_share_a_batch(effnet, good, alone):
    """Small polls arriving back to back make one full batch, not two half-empty ones."""
    backbone = CountingBackbone(effnet)
    inference = Inference(backbone, LAYER, batch_size=5, batch_timeout=2.0)
    first, second = inference.submit(good[:2]), inference.submit(good[2:5])
    assert [r.record for r in first.wait(timeout=60)] == good[:2]
    assert [r.record for r in second.wait(timeout=60)] == good[2:5]
    assert backbone.calls == [5], backbone.calls
    _check_vectors(first.results + second.results, alone, atol=1e-4)


def test_several_model_threads_hand_results_out_in_order(effnet, mixed, alone):
    """Batches run side by side, yet every submission gets its results in input order."""
    inference = Inference(effnet, LAYER, batch_size=2, model_threads=2, batch_timeout=0.01)
    submissions = [inference.submit(mixed[i:i + 3]) for i in range(0, len(mixed), 3)]
    results = [r for s in submissions for r in s.wait(timeout=60)]
    assert [r.record for r in results] == mixed
    assert ["G" if isinstance(r, Featurized) else "B" for r in results] == list(LAYOUT)
    _check_vectors(results, alone, atol=1e-4)
    assert [r.record for r in inference.run(mixed)] == mixed


class Poisoned(CountingBackbone):
    """The real backbone, except that any batch holding a one-colour image raises (the way a
    model can break on one input: a NaN, an odd shape); ``broken`` makes every call raise."""

    def __init__(self, inner):
        super().__init__(inner)
        self.broken = False

    def run(self, batch, layers):
        self.calls.append(len(batch))
        if self.broken:
            raise MemoryError("simulated: the model ran out of memory")
        pixels = np.asarray(batch).reshape(len(batch), -1, batch.shape[-1])
        if (pixels.std(axis=1) == 0).all(axis=1).any():
            raise FloatingPointError("simulated: the model cannot take a one-colour image")
        return self.inner.run(batch, layers)


@pytest.fixture(scope="module")
def poison() -> ImageRecord:
    return _record(bad_images.encode(np.full((48, 64, 3), (200, 30, 160), np.uint8), "PNG"), "one-colour")


@pytest.mark.parametrize("batch_size", [8, 3])
def test_an_image_that_breaks_the_model_fails_alone(effnet, good, poison, alone, batch_size):
    """The batch is retried, then halved until the culprit is alone: only it fails, with
    ``model_error``, and its batch-mates get the vectors they get in a clean run."""
    backbone = Poisoned(effnet)
    records = good[:2] + [poison] + good[2:]
    inference = Inference(backbone, LAYER, batch_size=batch_size, batch_timeout=0.01)
    results = inference.submit(records).wait(timeout=120)

    assert [r.record for r in results] == records
    (failed,) = [r for r in results if isinstance(r, Failed)]
    assert failed.record is poison and failed.reason == "model_error"
    assert "FloatingPointError" in failed.detail and "one-colour" in failed.detail
    featurized = [r for r in results if isinstance(r, Featurized)]
    assert len(featurized) == 5
    _check_vectors(featurized, alone, atol=1e-4)
    assert len(backbone.calls) > -(-len(records) // batch_size)  # the failing batch was run again, in parts
    assert [r.record for r in inference.run(good)] == good  # and the pipeline goes on


def test_a_model_that_always_fails_fails_every_record_and_the_stream_goes_on(effnet, good, alone):
    backbone = Poisoned(effnet)
    backbone.broken = True
    inference = Inference(backbone, LAYER, batch_size=2, batch_timeout=0.01)
    started = time.monotonic()
    results = inference.submit(good[:3]).wait(timeout=60)
    assert [r.record for r in results] == good[:3]
    assert all(isinstance(r, Failed) and r.reason == "model_error" for r in results), results
    assert all("MemoryError" in r.detail for r in results)
    again = inference.submit(good[3:]).wait(timeout=60)  # a later submission is answered, not refused
    assert [(r.record, r.reason) for r in again] == [(g, "model_error") for g in good[3:]]
    assert time.monotonic() - started < 60

    backbone.broken = False  # the model recovers (memory freed): the same Inference featurizes again
    healed = inference.submit(good).wait(timeout=60)
    assert all(isinstance(r, Featurized) for r in healed) and [r.record for r in healed] == good
    _check_vectors(healed, alone, atol=1e-4)
