"""The feature table's fault scenarios, short form (run in CI on both brokers; long form:
``scripts/fault-suite.sh``). Real processes, a real SQLite catalog, a private broker of the
session's kind (``DEEPER_TEST_BROKER``): kills between the table commit and the Kafka commit and
while writing a data file (``tests/table_kill_hook.py``), the catalog locked, two featurizers
racing on one table. On every broker the table holds each offset once and nothing is missing;
on Apache Kafka with exactly-once no feature is read twice either. The short forms run the
featurizer alone (labels are counted in the long form, with the scorer).
"""

from __future__ import annotations

import pytest

from tests.faults.scenarios import ScenarioResult
from tests.faults.table_scenarios import catalog_unavailable, featurizers_racing, table_kills
from tests.faults.test_crashes import N_IMAGES, _assert_outcomes, _report, plan, rig_broker  # noqa: F401 - fixtures

pytestmark = pytest.mark.stream


def _table_rows_once(result: ScenarioResult) -> None:
    c = result.counts
    assert c["duplicate_offsets_in_table"] == 0 and c["missing"] == 0, result.problems


def test_kills_between_the_table_and_kafka_commits_and_while_writing(plan):
    result = table_kills(plan, kills=2, labels=False)
    _report(result, plan)
    _table_rows_once(result)
    assert result.faults == {"kill_after_table_commit": 1, "kill_writing_data_file": 1}, result.faults
    assert result.workers["featurizer"]["table_ahead_replays"] >= 1  # the replay path ran
    assert result.counts["unreferenced_data_files"] >= 1  # the half-written file, never read
    _assert_outcomes(result, plan, labels=False)


def test_a_locked_catalog_pauses_the_stream_and_it_resumes(plan):
    result = catalog_unavailable(plan, seconds=15, labels=False)
    _report(result, plan)
    _table_rows_once(result)
    assert result.workers["featurizer"]["sink_pauses"] >= 1 and result.workers["featurizer"]["sink_recoveries"] >= 1
    _assert_outcomes(result, plan, labels=False)


def test_two_featurizers_racing_on_one_table(plan):
    result = featurizers_racing(plan, kills=1, labels=False)
    _report(result, plan)
    _table_rows_once(result)
    assert result.workers["featurizer"]["table_commits"] and result.workers["featurizer-b"]["table_commits"]
    _assert_outcomes(result, plan, labels=False)
