"""How the stream featurizer spends its cores: one model thread, or batches side by side.

TensorFlow's default gives every op all the cores (intra-op pool = cores) and runs one model
call at a time. In the stream that call shares the cores with decoding (tf.data threads), the
Kafka clients and often the broker; when one of an op's threads is preempted, the op waits for
that straggler. Running batches side by side lets a preempted op delay only its own batch,
at the price of a second batch's activations in memory (~300-500 MiB measured).

Which is faster depends on the machine (cores, their cache, what else runs), and on the
2-vCPU bench machine the two were within its noise (bench/README.md). So by default (CPU,
TensorFlow precisions) the featurizer decides when it starts: :func:`probe` runs the loaded
model on a synthetic batch, two batches one after the other against two at once, a couple of
seconds in all, and :func:`choose` takes side by side only when it is clearly faster
(:data:`MIN_GAIN`: it costs memory). Both ways use TensorFlow's default pools, since the pools
are fixed before the model can run. ``--model-threads N`` skips the probe: N batches side by
side, the cores split between them (per-op pools). TF-Lite precisions (their own thread pool,
one interpreter) and GPUs (one large batch) always use one model thread.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.model.precision import is_lite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadPlan:
    model_threads: int  # batches run side by side (pipeline.model.inference.Inference model threads)
    intra_op: int  # threads per op; 0 = TensorFlow's default (all cores)
    inter_op: int  # ops (and function calls) run in parallel; 0 = TensorFlow's default
    why: str


DEFAULT_POOLS = ThreadPlan(1, 0, 0, "one model thread, TensorFlow's default pools")


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


#: ``model_threads`` of a plan still to be measured (:func:`settle`, when the model is loaded).
MEASURE = 0
#: Side by side is chosen only when it runs the model this much faster than one batch at a time.
MIN_GAIN = 1.10
#: Rounds of the start-up probe (each: two batches in turn, then two at once).
PROBE_ROUNDS = 2


def stream_plan(precision: str = "fp32", cores: int | None = None, gpu: bool = False,
                model_threads: int = 0) -> ThreadPlan:
    """The featurizer's plan before its model is loaded: ``model_threads`` > 0 is taken as
    given; otherwise one model thread on a GPU or TF-Lite, and :data:`MEASURE` on CPU."""
    cores = cores or usable_cores()
    if gpu:
        return ThreadPlan(1, 0, 0, "GPU: one large batch at a time, TensorFlow's default pools")
    if is_lite(precision):
        return ThreadPlan(1, 0, 0, "TF-Lite precision: one interpreter with its own thread pool")
    if model_threads == 1:
        return DEFAULT_POOLS
    if model_threads <= 0:
        return ThreadPlan(MEASURE, 0, 0, "to be measured when the model is loaded: one batch at a time or two "
                                         "side by side, whichever runs it faster here")
    per_op = max(1, cores // model_threads)
    return ThreadPlan(model_threads, per_op, model_threads,
                      f"{model_threads} batches side by side, {per_op} thread(s) per op, on {cores} cores (asked for)")


@dataclass(frozen=True)
class Probe:
    """Seconds to run two batches of the model: one after the other, and both at once."""

    in_turn_s: float
    at_once_s: float

    @property
    def gain(self) -> float:
        return self.in_turn_s / self.at_once_s if self.at_once_s > 0 else 1.0


def choose(probe: Probe, cores: int | None = None) -> ThreadPlan:
    """Two batches side by side if the probe found them :data:`MIN_GAIN` faster, else one."""
    cores = cores or usable_cores()
    measured = (f"two batches in turn {probe.in_turn_s:.3f} s, at once {probe.at_once_s:.3f} s "
                f"(x{probe.gain:.2f}) on {cores} cores")
    if probe.gain >= MIN_GAIN:
        return ThreadPlan(2, 0, 0, f"two batches side by side, TensorFlow's default pools: measured at start, "
                                   f"{measured}")
    return ThreadPlan(1, 0, 0, f"one model thread, TensorFlow's default pools: measured at start, {measured}; "
                               f"side by side needs x{MIN_GAIN:.2f}")


def probe(run: Callable[[], object], rounds: int = PROBE_ROUNDS,
          clock: Callable[[], float] = time.perf_counter) -> Probe:
    """Time ``run`` (one model batch) twice in turn and twice at once, ``rounds`` times
    alternating, after one uncounted run (tracing); the median of each."""
    run()
    in_turn, at_once = [], []
    for _ in range(rounds):
        started = clock()
        run()
        run()
        in_turn.append(clock() - started)
        started = clock()
        _at_once(run)
        at_once.append(clock() - started)
    return Probe(statistics.median(in_turn), statistics.median(at_once))


def _at_once(run: Callable[[], object]) -> None:
    errors: list[BaseException] = []

    def one() -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    other = threading.Thread(target=one, name="deeper-thread-probe")
    other.start()
    one()
    other.join()
    if errors:
        raise errors[0]


def settle(plan: ThreadPlan, run: Callable[[], object], cores: int | None = None) -> ThreadPlan:
    """``plan`` itself, or, when it is :data:`MEASURE`, the plan :func:`probe` finds best."""
    if plan.model_threads != MEASURE:
        return plan
    return choose(probe(run), cores)


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
