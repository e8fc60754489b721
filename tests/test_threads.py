"""The featurizer's thread plan (pipeline/model/threads.py): what it chooses per machine and precision."""

from __future__ import annotations

import pytest

from pipeline.model.threads import DEFAULT_POOLS, stream_plan


@pytest.mark.parametrize("cores, expected", [(1, (2, 1, 2)), (2, (2, 1, 2)), (3, (2, 1, 2)), (16, (2, 8, 2))])
def test_two_batches_side_by_side_split_the_cores(cores, expected):
    plan = stream_plan("bf16", cores=cores, model_threads=2)
    assert (plan.model_threads, plan.intra_op, plan.inter_op) == expected
    assert plan.why


@pytest.mark.parametrize("precision", ["fp32-lite", "int8"])  # TF precisions are measured (test_thread_chooser)
def test_other_precisions_keep_one_model_thread_and_the_default_pools(precision):
    assert (stream_plan(precision, cores=8).model_threads, stream_plan(precision, cores=8).intra_op) == (1, 0)


def test_a_gpu_runs_one_batch_at_a_time():
    plan = stream_plan("bf16", cores=8, gpu=True, model_threads=4)
    assert (plan.model_threads, plan.intra_op, plan.inter_op) == (1, 0, 0)


def test_an_explicit_model_thread_count_wins():
    assert stream_plan("fp32", cores=8, model_threads=1) == DEFAULT_POOLS
    plan = stream_plan("fp32", cores=8, model_threads=4)
    assert (plan.model_threads, plan.intra_op, plan.inter_op) == (4, 2, 4)
