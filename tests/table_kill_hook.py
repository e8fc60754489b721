"""``python -m tests.table_kill_hook ARGS``: the ``deeper`` command, which SIGKILLs its own process
at a chosen point of the table sink's work (a stand-in for a crash, an OOM kill, a node lost):

* ``DEEPER_TEST_KILL_AT=after-table-commit``: right after the N-th table commit returned, before
  the checkpoint's Kafka transaction commits (the table is then ahead of Kafka);
* ``DEEPER_TEST_KILL_AT=writing-data-file``: half-way through writing the N-th data file (half
  its bytes are on disk, under its final name, and no snapshot names it).

``DEEPER_TEST_KILL_AFTER=N`` (default 1). Test code only: nothing in the product reads these.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import pyarrow.parquet as pq

from pipeline.storage import table as tables

WHERE = os.environ.get("DEEPER_TEST_KILL_AT", "")
AFTER = int(os.environ.get("DEEPER_TEST_KILL_AFTER", "1"))
_seen = [0]


def _due() -> bool:
    _seen[0] += 1
    return _seen[0] >= AFTER


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _commit_then_die(real):
    def hooked(table, writer, *args, **kwargs):
        result = real(table, writer, *args, **kwargs)
        if writer == "stream" and _due():
            _die()
        return result

    return hooked


def _die_while_writing(real):
    def hooked(table, data, name):
        if not _due():
            return real(table, data, name)
        buffer = io.BytesIO()
        pq.write_table(data, buffer)
        path = f"{table.location()}/data/{name}"
        with table.io.new_output(path).create(overwrite=True) as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        _die()

    return hooked


if WHERE == "after-table-commit":
    tables.commit = _commit_then_die(tables.commit)
elif WHERE == "writing-data-file":
    tables.write_data_file = _die_while_writing(tables.write_data_file)
elif WHERE:
    raise SystemExit(f"DEEPER_TEST_KILL_AT={WHERE!r}: after-table-commit or writing-data-file")

if __name__ == "__main__":
    from pipeline.app.cli import main

    sys.exit(main(sys.argv[1:]))
