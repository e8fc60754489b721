"""The featurizer's thread plan (pipeline/threads.py): what it chooses per machine."""

from __future__ import annotations

import pytest

from pipeline.threads import stream_plan


@pytest.mark.parametrize("cores, expected", [(1, (1, 0, 0)), (2, (2, 1, 2)), (3, (2, 1, 2)), (16, (2, 8, 2))])
def test_cpu_plans_run_two_batches_side_by_side_with_the_cores_split(cores, expected):
    plan = stream_plan(cores=cores)
    assert (plan.model_threads, plan.intra_op, plan.inter_op) == expected
    assert plan.why


def test_gpu_and_tf_lite_run_one_batch_at_a_time_with_default_pools():
    for plan in (stream_plan(cores=8, gpu=True), stream_plan(cores=8, lite=True)):
        assert (plan.model_threads, plan.intra_op, plan.inter_op) == (1, 0, 0)


def test_an_explicit_model_thread_count_wins():
    assert stream_plan(cores=8, model_threads=1).model_threads == 1
    plan = stream_plan(cores=8, model_threads=4)
    assert (plan.model_threads, plan.intra_op, plan.inter_op) == (4, 2, 4)
