"""How the stream featurizer spends its cores: TensorFlow's thread pools, set on purpose.

TensorFlow's default gives every op all the cores (intra-op pool = cores) and runs one model
call at a time. In the stream that call shares the cores with decoding (tf.data threads), the
Kafka clients, and often the broker: when one of an op's threads is preempted, the op waits
for that straggler and the model slows down for every batch.

The plan here runs ``model_threads`` batches side by side instead, each op on
``intra_op`` = cores / model_threads threads (one thread each on a 2-core machine), so a
preempted op delays only its own batch. Measured on the 2-vCPU bench machine (bench/README.md,
stream variants): +8% images/s with bf16 and within noise with fp32; the model alone is as
fast either way. It applies to TensorFlow precisions on CPU; TF-Lite precisions have their own
thread pool and one interpreter (one batch at a time), and a GPU runs one big batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadPlan:
    model_threads: int  # batches run side by side (pipeline.inference.Inference model threads)
    intra_op: int  # threads per op; 0 = TensorFlow's default (all cores)
    inter_op: int  # ops (and function calls) run in parallel; 0 = TensorFlow's default
    why: str


def stream_plan(cores: int | None = None, gpu: bool = False, lite: bool = False,
                model_threads: int = 0) -> ThreadPlan:
    """The featurizer's plan for this machine; ``model_threads`` > 0 overrides the choice."""
    if not cores:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if gpu:
        return ThreadPlan(1, 0, 0, "GPU: one large batch at a time, TensorFlow's default pools")
    if lite:
        return ThreadPlan(1, 0, 0, "TF-Lite precision: one interpreter with its own thread pool")
    threads = model_threads or min(2, cores)
    if threads == 1:
        return ThreadPlan(1, 0, 0, "one model thread: TensorFlow's default pools")
    return ThreadPlan(threads, max(1, cores // threads), threads,
                      f"{threads} batches side by side, {max(1, cores // threads)} thread(s) per op, on {cores} cores")


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
