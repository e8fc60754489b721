"""Labels from a CSV find their rows by image id or by source path: the whole path, or its
longest tail that is a key (a backfill stores absolute paths and s3:// URIs; a CSV usually has
the relative paths it was made with)."""

from __future__ import annotations

from pipeline.learning.training import apply_labels


def test_labels_match_by_image_id_or_by_the_longest_tail_of_the_source_path():
    table = {"train/fish/goldfish.jpg": "fish", "goldfish.jpg": "wrong: a shorter tail", "x.jpg": "b",
             "/abs/y.jpg": "c", "f" * 64: "d", "./rel/z.jpg": "e"}
    ids = ["1", "2", "3", "f" * 64, "5", "6", "7"]
    sources = ["/lake/train/fish/goldfish.jpg", "s3://bucket/k/x.jpg", "/abs/y.jpg", "anything", "/w/rel/z.jpg",
               "/other/place.jpg", "/lake/test/goldfish.jpg"]
    stored = [None, None, "old", None, None, "kept", None]
    assert apply_labels(ids, sources, stored, table) == ["fish", "b", "c", "d", "e", "kept",
                                                         "wrong: a shorter tail"]
