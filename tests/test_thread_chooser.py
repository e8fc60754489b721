"""The featurizer's start-up choice between one model thread and two batches side by side
(pipeline/model/threads.py): a fake clock and a fake model, nothing timed for real."""

from __future__ import annotations

import threading

import pytest

from pipeline.model import threads
from pipeline.model.threads import MEASURE, MIN_GAIN, Probe, ThreadPlan, choose, probe, settle, stream_plan


class FakeClock:
    """Hands out the given readings in order (probe reads it before and after each timing)."""

    def __init__(self, readings: list[float]):
        self.readings = list(readings)

    def __call__(self) -> float:
        return self.readings.pop(0)


class FakeModel:
    """Records which thread each run was in."""

    def __init__(self):
        self.threads: list[str] = []

    def __call__(self) -> None:
        self.threads.append(threading.current_thread().name)


def test_side_by_side_is_chosen_only_when_clearly_faster():
    assert choose(Probe(in_turn_s=1.0, at_once_s=1.0 / MIN_GAIN), cores=2).model_threads == 2
    assert choose(Probe(in_turn_s=1.0, at_once_s=0.95), cores=2).model_threads == 1
    assert choose(Probe(in_turn_s=1.0, at_once_s=1.3), cores=2).model_threads == 1


def test_the_chosen_plan_says_why_with_the_numbers():
    plan = choose(Probe(in_turn_s=0.5, at_once_s=0.4), cores=4)
    assert (plan.model_threads, plan.intra_op, plan.inter_op) == (2, 0, 0)  # the pools the probe ran on
    assert "0.500 s" in plan.why and "0.400 s" in plan.why and "x1.25" in plan.why and "4 cores" in plan.why


def test_probe_times_in_turn_and_at_once_alternately_and_takes_medians():
    model = FakeModel()
    # round 1: in turn 0->2.0, at once 2.0->3.0; round 2: in turn 3.0->4.4, at once 4.4->5.6
    clock = FakeClock([0.0, 2.0, 2.0, 3.0, 3.0, 4.4, 4.4, 5.6])
    result = probe(model, rounds=2, clock=clock)
    assert len(model.threads) == 1 + 2 * 4  # one warm-up, then per round two in turn and two at once
    assert model.threads.count("deeper-thread-probe") == 2  # one of each "at once" pair in a second thread
    assert result == Probe(in_turn_s=pytest.approx(1.7), at_once_s=pytest.approx(1.1))
    assert not clock.readings


def test_a_failing_model_fails_the_probe():
    def broken() -> None:
        raise RuntimeError("no model")

    with pytest.raises(RuntimeError, match="no model"):
        probe(broken, rounds=1, clock=FakeClock([0.0] * 4))


def test_settle_measures_only_a_plan_left_to_measure(monkeypatch):
    monkeypatch.setattr(threads, "probe", lambda run: Probe(in_turn_s=2.0, at_once_s=1.0))
    assert settle(ThreadPlan(MEASURE, 0, 0, "auto"), run=lambda: None, cores=2).model_threads == 2
    given = ThreadPlan(3, 1, 3, "asked for")
    assert settle(given, run=lambda: None, cores=2) is given


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_tensorflow_precisions_are_measured_unless_told(precision):
    assert stream_plan(precision, cores=8).model_threads == MEASURE
    assert stream_plan(precision, cores=8, model_threads=1).model_threads == 1
    assert stream_plan(precision, cores=8, model_threads=2).model_threads == 2


@pytest.mark.parametrize("precision", ["fp32-lite", "int8"])
def test_lite_precisions_and_gpus_are_never_measured(precision):
    assert stream_plan(precision, cores=8).model_threads == 1
    assert stream_plan("fp32", cores=8, gpu=True).model_threads == 1
