"""localbucket, plus the one S3 feature Tansu's durable storage relies on: ``If-Match`` writes.

Tansu's S3 storage advances a partition's ``watermark.json`` with a conditional PUT
(``If-Match: <etag>``) and relies on a 412 when another write got there first. localbucket
1.2.1 honours only ``If-None-Match: *`` and silently ignores ``If-Match``, so two produce
requests racing on one partition (typical right after a broker restart) could both take the
same base offset: the partition then held overlapping offsets, and consumers whose committed
offset was past them never saw the later records (found by the fault suite: docs/faults.md).
Real S3 and MinIO honour ``If-Match``. Writes are serialised under one lock so the check and
the write are atomic. ``pipeline.app.broker.local`` starts durable brokers' S3 with this module.

    python -m pipeline.app.broker.local_s3 --host 127.0.0.1 --port PORT DIR     # same arguments as localbucket
"""

from __future__ import annotations

import sys
import threading

#: Written to the server's log each time a stale conditional write is refused.
IF_MATCH_REFUSED = "if-match refused"


def main() -> int:
    import localbucket

    lock = threading.Lock()
    original = localbucket.S3Handler._write_object

    def write_object(self, bucket, key, write):
        expected = self.headers.get("If-Match")
        with lock:
            if expected is not None:
                target = self._object_path(bucket, key)
                if not target.is_file() or not localbucket.etag_matches(expected, localbucket.object_etag(target)):
                    localbucket.logger.info("%s: %s/%s", IF_MATCH_REFUSED, bucket, key)
                    raise self._precondition_failed_error()
            return original(self, bucket, key, write)

    localbucket.S3Handler._write_object = write_object
    return localbucket.main()


if __name__ == "__main__":
    sys.exit(main())
