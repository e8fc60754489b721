"""Fault injection: crash the consumers and the broker mid-stream and prove nothing is lost.

``harness.py`` is the reusable part (synthetic photos, real worker processes, a durable local
broker, a producer that re-sends what failed, verification and the summary);
``test_crashes.py`` is the short form run in CI and ``long_suite.py`` the long form
(``python -m tests.faults.long_suite`` or ``scripts/fault-suite.sh``). See ``docs/faults.md``.
"""
