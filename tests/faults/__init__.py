"""Fault injection: crash the consumers and the broker mid-stream and count what came out.

The rig itself (brokers, worker processes, producing, reading back, counting) is
:mod:`devrig`; here are the scenarios (``scenarios.py``), recovery times
(``recovery.py``), the summary (``summary.py``), the short form run in CI (``test_crashes.py``)
and the long form (``long_suite.py``, via ``scripts/fault-suite.sh``). See ``docs/faults.md``.
"""
