"""The in-graph JPEG decode changes nothing but speed: every photo gets the same outcome either way.

Each photo runs through :class:`Inference` twice, with the graph decode (the default) and with
Pillow only (``graph_jpeg=False``), and must get the same result: the same reason and detail
for a failure, the same width and height and *exactly* the same network input for a success.
The network input is compared through a backbone that returns sums of its input's rows,
columns and channels: one pixel one level off changes them. The photos: real and generated
JPEGs in every EXIF orientation, grey, 4:4:4, 4:2:0 and progressive; the whole bad-image
catalogue; and derandomized byte mutations of the JPEG fuzz seeds (the fuzz test's mutator).
"""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.model.decode import graph_plan
from schemas.messages import image_id
from pipeline.model.inference import Failed, Featurized, ImageRecord, Inference
from tests import bad_images
from tests.test_decode_fuzz import mutate, seeds

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
MUTANTS = 400
MUTATIONS = ["flip", "set", "truncate", "delete", "duplicate", "splice"]


class InputSums:
    """The real backbone's preprocessing, and in place of the network: sums of its input along
    each axis, so two runs can be compared pixel for pixel at little cost."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, batch, layers):
        batch = np.asarray(batch, np.float64)
        sums = [batch.sum(axis=(2, 3)), batch.sum(axis=(1, 3)), batch.sum(axis=(1, 2))]
        return {layers[0]: np.concatenate(sums, axis=1)}


def _photos() -> list[np.ndarray]:
    files = sorted((SHARED / "cars" / "train").glob("*/*.jpg"))[:3]
    if files:
        return [np.asarray(Image.open(path).convert("RGB")) for path in files]
    return [bad_images.photo(320 + 16 * i, 240, seed=i) for i in range(3)]


def _jpeg_variants() -> list[bytes]:
    out = []
    for pixels in _photos():
        image = Image.fromarray(pixels)
        for orientation in range(1, 9):
            exif = Image.Exif()
            exif[0x0112] = orientation
            out.append(bad_images.encode(image, "JPEG", quality=90, exif=exif.tobytes()))  # 4:2:0
        out.append(bad_images.encode(image, "JPEG", quality=90, subsampling=0))  # 4:4:4
        out.append(bad_images.encode(image, "JPEG", quality=80, progressive=True))
        out.append(bad_images.encode(image.convert("L"), "JPEG", quality=90))
    return out


def _mutants(count: int) -> list[bytes]:
    jpegs = [seed for seed in seeds() if seed.startswith(b"\xff\xd8\xff")]
    rng = random.Random(20261126)
    out = []
    for _ in range(count):
        mutations = [(rng.choice(MUTATIONS), rng.random(), rng.randrange(256), rng.randrange(1, 65))
                     for _ in range(rng.randrange(1, 5))]
        out.append(mutate(rng.choice(jpegs), mutations, rng.choice(jpegs)))
    return out


def _run(backbone, records: list[ImageRecord], graph_jpeg: bool) -> list:
    inference = Inference(InputSums(backbone), "prelogits", batch_size=16, graph_jpeg=graph_jpeg)
    assert inference.graph_jpeg == graph_jpeg  # the backbone can take a cropped image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data" and friends
        return list(inference.run(records))


def _outcome(result) -> tuple:
    if isinstance(result, Failed):
        return ("failed", result.reason, result.detail)
    assert isinstance(result, Featurized)
    return ("ok", result.width, result.height)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return _jpeg_variants() + [case.data for case in bad_images.cases()] + _mutants(MUTANTS)


def test_graph_decode_and_pillow_give_the_same_outcome_and_input_for_every_photo(effnet, photos):
    records = [ImageRecord(image_id(data), data, f"photo-{i}") for i, data in enumerate(photos)]
    graph, pillow = _run(effnet, records, True), _run(effnet, records, False)
    assert [r.record for r in graph] == records
    for by_graph, by_pillow in zip(graph, pillow):
        where = f"{by_graph.record.source} ({len(by_graph.record.data)} bytes)"
        assert _outcome(by_graph) == _outcome(by_pillow), where
        if isinstance(by_graph, Featurized):
            np.testing.assert_array_equal(by_graph.vector, by_pillow.vector, err_msg=where)
    # the comparison means something only if both kinds of outcome went through the graph
    taken = [r for r, data in zip(graph, photos) if graph_plan(data, min_side=256) is not None]
    assert sum(isinstance(r, Featurized) for r in taken) >= 40
    assert sum(isinstance(r, Failed) for r in taken) >= 20


def test_the_graph_takes_plain_jpegs_and_leaves_the_rest_to_pillow():
    plain = bad_images.jpeg(320, 240)
    assert graph_plan(plain, min_side=256) is not None
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = graph_plan(bad_images.encode(bad_images.photo(), "JPEG", exif=exif.tobytes()), min_side=256)
    assert turned is not None and (turned.width, turned.height, turned.orientation) == (320, 240, 6)
    assert graph_plan(bad_images.jpeg(1200, 800), min_side=256) is None  # DCT-scaled by Pillow
    assert graph_plan(bad_images.jpeg(1200, 800), min_side=None) is not None
    assert graph_plan(bad_images.encode(bad_images.photo(), "PNG"), min_side=256) is None
    assert graph_plan(bad_images.cmyk_jpeg(), min_side=256) is None
    assert graph_plan(plain[:-2], min_side=256) is None  # no EOI: Pillow says "truncated"
    assert graph_plan(plain + b"trailer", min_side=256) is None


def test_a_jpeg_cut_and_closed_with_eoi_is_refused_as_truncated(effnet):
    """libjpeg fills it with grey without an error; the graph hands it to Pillow, which refuses it."""
    case = bad_images.by_name("jpeg_truncated_eoi_appended")
    assert graph_plan(case.data, min_side=256) is not None  # it does go to the graph first
    (result,) = _run(effnet, [ImageRecord(image_id(case.data), case.data, case.name)], True)
    assert isinstance(result, Failed) and result.reason == "truncated"
