"""``python -m tests.poison_hook ARGS``: the ``deeper`` command, whose decoder kills its own process
(a real SIGKILL) on one chosen payload: a stand-in for a native decoder that segfaults or runs
out of memory on a hostile photo. The payload's sha256 is ``$DEEPER_TEST_POISON_SHA256``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys

from pipeline.model import inference

POISON = os.environ["DEEPER_TEST_POISON_SHA256"]


def _or_die(real):
    """``real``, except that it kills the process on the poison payload."""

    def hooked(data: bytes, *args, **kwargs):
        if hashlib.sha256(data).hexdigest() == POISON:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, *args, **kwargs)

    return hooked


# both ways a photo enters decoding: the in-graph JPEG plan first, then Pillow for the rest
inference.graph_plan = _or_die(inference.graph_plan)
inference.decode_image = _or_die(inference.decode_image)

if __name__ == "__main__":
    from pipeline.app.cli import main

    sys.exit(main(sys.argv[1:]))
