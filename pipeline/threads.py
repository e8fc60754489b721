"""How the stream featurizer spends its cores: TensorFlow's thread pools, chosen on purpose.

TensorFlow's default gives every op all the cores (intra-op pool = cores) and runs one model
call at a time. In the stream that call shares the cores with decoding (tf.data threads), the
Kafka clients and often the broker; when one of an op's threads is preempted, the op waits for
that straggler. Running ``model_threads`` batches side by side, each op on
``cores / model_threads`` threads, lets a preempted op delay only its own batch.

Measured on the 2-vCPU bench machine (stream of 500 photos, medians of 3 interleaved runs,
three sessions' runs on 2026-11-22; bench/README.md), two batches side by side against one:
fp32 +7%, -3%, +7%; bf16 +5%, +7%, -14%. That is within this shared host's noise, while the
featurizer's memory grew by ~300-500 MiB and once stopped staying flat over 10,000 photos. So
the default stays one model thread with TensorFlow's default pools (every op on all cores);
``--model-threads N`` runs N batches side by side, cores split between them, for machines where
it measures faster. TF-Lite precisions (their own thread pool, one interpreter) and GPUs (one
large batch) always use one model thread.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pipeline.precision import is_lite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadPlan:
    model_threads: int  # batches run side by side (pipeline.inference.Inference model threads)
    intra_op: int  # threads per op; 0 = TensorFlow's default (all cores)
    inter_op: int  # ops (and function calls) run in parallel; 0 = TensorFlow's default
    why: str


DEFAULT_POOLS = ThreadPlan(1, 0, 0, "one model thread, TensorFlow's default pools")


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def stream_plan(precision: str = "fp32", cores: int | None = None, gpu: bool = False,
                model_threads: int = 0) -> ThreadPlan:
    """The featurizer's plan: one model thread unless ``model_threads`` > 0 asks for more on CPU."""
    cores = cores or usable_cores()
    if gpu:
        return ThreadPlan(1, 0, 0, "GPU: one large batch at a time, TensorFlow's default pools")
    if is_lite(precision):
        return ThreadPlan(1, 0, 0, "TF-Lite precision: one interpreter with its own thread pool")
    threads = model_threads or 1
    if threads == 1:
        return DEFAULT_POOLS
    per_op = max(1, cores // threads)
    return ThreadPlan(threads, per_op, threads, f"{threads} batches side by side, {per_op} thread(s) per op, "
                                                f"on {cores} cores")


def apply(plan: ThreadPlan) -> bool:
    """Set TensorFlow's pools; must run before TensorFlow executes anything (False if too late)."""
    import tensorflow as tf

    try:
        if plan.intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(plan.intra_op)
        if plan.inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(plan.inter_op)
    except RuntimeError as exc:  # the runtime is already initialized: keep its pools
        log.warning("thread plan not applied (%s); TensorFlow's pools are already set", exc)
        return False
    return True
