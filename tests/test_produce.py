"""The producer against a real broker: photos too large for a message, --max-side, non-UTF-8 file
names, claim checks (against the project's local S3 and a real local file root).

Every message read back must be one the featurizer accepts: key == sha256(value), and a value
that decodes upright; a claim check must redeem to bytes whose sha256 is its key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.kafka.claim_check import IMAGE_URI_HEADER, FetchLimits, resolve_value
from pipeline.model.decode import decode_image
from pipeline.errors import DeeperError
from pipeline.kafka.kafka_io import ensure_topics
from producers.produce import MIN_FIT_SIDE, ImageProducer, main, reencode
from schemas.messages import parse_image_message
from tests.broker_fixture import make_unique_topic_name
from tests.claim_check_servers import s3  # noqa: F401 (fixture)
from tests.stream_helpers import header, read_topic

LIMIT = 300_000  # a small message limit keeps the photos small and the tests quick


def _photo(width: int, height: int, fmt: str = "JPEG", orientation: int | None = None, noise: int = 40) -> bytes:
    """A photo with a bright top-left quadrant (to see orientation) and noise (to defeat compression)."""
    rng = np.random.default_rng(width * height)
    pixels = np.full((height, width, 3), 60, np.int16)
    pixels[: height // 2, : width // 2] = 230
    pixels += rng.integers(-noise, noise + 1, pixels.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if fmt == "GIF":
        image = image.convert("P")
    out = io.BytesIO()
    options: dict = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    image.save(out, fmt, **options)
    return out.getvalue()


def _settings(kafka_settings, limit: int = LIMIT):
    settings = dataclasses.replace(kafka_settings, images_topic=make_unique_topic_name("produce"),
                                   max_message_bytes=str(limit))
    ensure_topics(settings, {settings.images_topic: 1})
    return settings


def _produce(settings, send, **options):
    producer = ImageProducer(settings, **options)
    try:
        send(producer)
        return producer.flush(30)
    finally:
        producer.close()


def _records(settings, count: int):
    records = read_topic(settings, settings.images_topic, lambda rs: len(rs) >= count, timeout=30)
    assert len(records) == count
    return {header(r, "source"): r for r in records}


def _bright_corner(data: bytes) -> tuple[int, int]:
    """Which quadrant (row, column) of the featurizer's view is the bright one."""
    pixels = decode_image(data).pixels.mean(axis=2)
    h, w = pixels.shape
    quadrants = {(r, c): pixels[r * h // 2:(r + 1) * h // 2, c * w // 2:(c + 1) * w // 2].mean()
                 for r in (0, 1) for c in (0, 1)}
    return max(quadrants, key=quadrants.get)


# --------------------------------------------------------------------------- re-encoding


@pytest.mark.parametrize("fmt, expected", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"),
                                           ("GIF", "image/png"), ("BMP", "image/png")])
def test_reencode_keeps_the_format_sensible_and_applies_orientation_first(fmt, expected):
    data = _photo(900, 600, fmt, orientation=6 if fmt in ("JPEG", "WEBP", "PNG") else None)
    encoded = reencode(data, max_side=300)
    assert encoded.content_type == expected
    assert max(encoded.width, encoded.height) == 300
    assert encoded.original == (decode_image(data).width, decode_image(data).height)
    assert (encoded.width > encoded.height) == (encoded.original[0] > encoded.original[1])
    assert _bright_corner(encoded.data) == _bright_corner(data)  # what the featurizer sees, turned the same way
    with Image.open(io.BytesIO(encoded.data)) as image:
        assert image.size == (encoded.width, encoded.height)
        assert image.getexif().get(0x0112) in (None, 1), "orientation applied twice"


def test_exif_rotated_photo_comes_out_portrait():
    encoded = reencode(_photo(1200, 800, orientation=6), max_side=600)
    assert (encoded.width, encoded.height) == (400, 600)


def test_reencode_shrinks_until_it_fits_or_gives_up_at_the_smallest_side():
    data = _photo(1600, 1200)
    assert len(data) > LIMIT
    fitted = reencode(data, budget=LIMIT)
    assert len(fitted.data) <= LIMIT and max(fitted.width, fitted.height) >= MIN_FIT_SIDE
    hopeless = reencode(data, budget=1000)
    assert len(hopeless.data) > 1000 and max(hopeless.width, hopeless.height) == MIN_FIT_SIDE


def test_max_side_below_the_smallest_useful_size_is_refused(kafka_settings):
    with pytest.raises(DeeperError, match="at least"):
        ImageProducer(kafka_settings, max_side=100)


# --------------------------------------------------------------------------- through the broker


def test_photo_over_the_limit_is_reencoded_to_fit_and_said_so(kafka_settings, tmp_path):
    settings = _settings(kafka_settings)
    big = tmp_path / "big.jpg"
    big.write_bytes(_photo(1600, 1200, orientation=6))
    summary = _produce(settings, lambda p: p.send_file(big))
    assert summary.sent == 1 and not summary.failed
    [done] = summary.reencoded
    assert done.why == "limit" and done.source == str(big) and done.before == (1200, 1600, big.stat().st_size)
    assert "re-encoded" in done.line() and "over the message limit" in done.line()
    assert "1 re-encoded (1 to fit the message limit)" in summary.line()
    record = _records(settings, 1)[str(big)]
    message = parse_image_message(record.key, record.value, record.headers)  # key == sha256 of what was sent
    assert message.content_type == "image/jpeg" and message.source == str(big)
    assert len(record.value) <= LIMIT
    decoded = decode_image(record.value)
    assert decoded.height > decoded.width and (decoded.width, decoded.height) == done.after[:2]


def test_over_the_limit_is_refused_when_fitting_is_off(kafka_settings):
    settings = _settings(kafka_settings)
    summary = _produce(settings, lambda p: p.send(_photo(1600, 1200), "big.jpg"), fit_to_limit=False)
    assert summary.sent == 0 and "DEEPER_MAX_MESSAGE_BYTES" in summary.failed["big.jpg"]


def test_photos_that_cannot_be_made_to_fit_are_reported_not_dropped(kafka_settings):
    settings = _settings(kafka_settings, limit=60_000)
    noise_png = _photo(800, 800, "PNG", noise=127)
    garbage = b"\xff\xd8\xff" + os.urandom(100_000)

    def send(producer):
        producer.send(noise_png, "noise.png")
        producer.send(garbage, "garbage.jpg")
        producer.send(_photo(300, 200), "small.jpg")

    summary = _produce(settings, send)
    assert set(summary.failed) == {"noise.png", "garbage.jpg"}
    assert f"at {MIN_FIT_SIDE}x{MIN_FIT_SIDE}" in summary.failed["noise.png"]
    assert "can't be re-encoded smaller" in summary.failed["garbage.jpg"]
    assert set(_records(settings, 1)) == {"small.jpg"}


def test_max_side_reencodes_large_photos_and_leaves_small_ones_untouched(kafka_settings):
    settings = _settings(kafka_settings, limit=4_000_000)
    large, small = _photo(1600, 1200, orientation=8), _photo(500, 400)

    def send(producer):
        producer.send(large, "large.jpg", label="cars")
        producer.send(small, "small.jpg")

    summary = _produce(settings, send, max_side=800)
    assert [(r.source, r.why) for r in summary.reencoded] == [("large.jpg", "max_side")]
    records = _records(settings, 2)
    assert records["small.jpg"].value == small
    resized = parse_image_message(records["large.jpg"].key, records["large.jpg"].value, records["large.jpg"].headers)
    assert resized.label == "cars"
    assert (decode_image(resized.data).width, decode_image(resized.data).height) == (600, 800)
    assert resized.image_id == hashlib.sha256(resized.data).hexdigest() != hashlib.sha256(large).hexdigest()


def test_cli_sends_non_utf8_names_and_fits_large_photos(kafka_settings, tmp_path, monkeypatch, capsys):
    settings = _settings(kafka_settings)
    folder = tmp_path / "photos"
    folder.mkdir()
    odd = Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.jpg"))  # Latin-1 name: not UTF-8
    odd.write_bytes(_photo(300, 200))
    (folder / "big.jpg").write_bytes(_photo(1600, 1200))
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", settings.bootstrap_servers)
    monkeypatch.setenv("DEEPER_MAX_MESSAGE_BYTES", str(LIMIT))
    assert main([str(folder), "--topic", settings.images_topic, "-q", "--wait", "10"]) == 0
    err = capsys.readouterr().err
    assert f"re-encoded {folder / 'big.jpg'}: 1600x1200" in err
    assert "produced 2 images" in err and "1 re-encoded (1 to fit the message limit); 0 failed" in err
    records = _records(settings, 2)
    assert set(records) == {f"{folder}/caf\\xe9.jpg", str(folder / "big.jpg")}


def test_cli_reads_non_utf8_paths_from_stdin(kafka_settings, tmp_path, monkeypatch, capsys):
    settings = _settings(kafka_settings)
    odd = os.fsencode(tmp_path) + b"/\xff\xfe.png"
    Path(os.fsdecode(odd)).write_bytes(_photo(300, 200, "PNG"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(odd + b"\n")))
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", settings.bootstrap_servers)
    assert main(["-", "--topic", settings.images_topic, "-q", "--wait", "10"]) == 0
    assert set(_records(settings, 1)) == {f"{tmp_path}/\\xff\\xfe.png"}


# --------------------------------------------------------------------------- claim checks


def test_send_reference_sends_a_redeemable_claim_check(kafka_settings, tmp_path):
    settings = _settings(kafka_settings)
    photo = _photo(400, 300)
    (tmp_path / "a.jpg").write_bytes(photo)
    limits = FetchLimits(file_root=str(tmp_path))
    uri = (tmp_path / "a.jpg").as_uri()

    def send(producer):
        assert producer.send_reference(uri, "camera-1/a.jpg", "cars") is not None
        assert producer.send_reference((tmp_path / "gone.jpg").as_uri(), "camera-1/gone.jpg") is None

    summary = _produce(settings, send, fetch_limits=limits)
    failed = summary.failed["camera-1/gone.jpg"]
    assert summary.claim_checks == 1 and "fetch_refused" in failed and "No such file" in failed  # the cause, here
    record = _records(settings, 1)["camera-1/a.jpg"]
    assert record.value == b"" and header(record, IMAGE_URI_HEADER) == uri
    value = resolve_value(record.key, record.value, record.headers, limits)
    message = parse_image_message(record.key, value, record.headers)  # the key is the photo's sha256
    assert message.data == photo and message.label == "cars"


def test_claim_check_prefix_uploads_large_photos_untouched(kafka_settings, s3, tmp_path):  # noqa: F811
    settings = _settings(kafka_settings)
    limits = FetchLimits(s3_endpoint=s3["endpoint"], s3_region="us-east-1", s3_allowed=("photos/claims",))
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    big.write_bytes(_photo(1600, 1200))
    small.write_bytes(_photo(300, 200))

    def send(producer):
        producer.send_file(big)
        producer.send_file(small)

    summary = _produce(settings, send, claim_check_prefix="s3://photos/claims", fetch_limits=limits)
    assert summary.sent == 2 and summary.claim_checks == 1 and not summary.reencoded and not summary.failed
    records = _records(settings, 2)
    assert records[str(small)].value == small.read_bytes()
    reference = records[str(big)]
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    assert header(reference, IMAGE_URI_HEADER) == f"s3://photos/claims/{digest}.jpg"
    assert resolve_value(reference.key, reference.value, reference.headers, limits) == big.read_bytes()
