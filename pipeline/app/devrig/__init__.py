"""The development rig: run the stream for real, break it, and count what came out.

One implementation of everything the stream tests, the fault suite and the benchmarks need
(none of it is used by the product itself; it lives here, not in ``tests/``, so ``bench/`` and
the demo can use it without importing the test suite):

* :mod:`~pipeline.app.devrig.photos`: distinct synthetic JPEGs (:func:`synthetic_photos`) and
  :class:`Photo` (image id, source, label, bytes);
* :mod:`~pipeline.app.devrig.brokers`: :class:`RigBroker`, a private broker of either kind
  (``tansu`` durable or ``kafka``) that can be killed (SIGKILL) and restarted on its data;
* :mod:`~pipeline.app.devrig.hosts`: test hosts (network namespaces on a private switch) that can
  be cut off and healed; :mod:`~pipeline.app.devrig.toxiproxy`: slow and broken links;
  :mod:`~pipeline.app.devrig.cluster`: a three-node Apache Kafka cluster on test hosts;
* :mod:`~pipeline.app.devrig.topics`: :func:`fresh_settings` (fresh topics, groups, data dir and
  registry on a broker) and :func:`worker_env` (the same settings as ``DEEPER_*`` variables);
* :mod:`~pipeline.app.devrig.workers`: :class:`WorkerThread` (a worker in this process, sharing one
  loaded backbone) and :class:`WorkerProcess` (``deeper featurizer|scorer`` subprocesses,
  restartable after a SIGKILL, one JSON log per incarnation);
* :mod:`~pipeline.app.devrig.feeding`: :func:`send_photos` and :class:`Feeder` (a producer thread
  that re-sends exactly the photos that failed);
* :mod:`~pipeline.app.devrig.readback`: :func:`read_records` (``read_committed``, from the
  beginning, no group), :class:`LabelCollector` (label arrival times) and Parquet on disk;
* :mod:`~pipeline.app.devrig.outcomes`: :func:`count_outcomes`: missing ids, duplicate rows on disk
  (raw, before any de-duplication) and duplicate records read with ``read_committed``;
* :mod:`~pipeline.app.devrig.stream`: :class:`StreamRun`, one run of the whole stream (fresh
  settings, the two worker processes, a classifier trained from the stream's own Parquet).
"""

from pipeline.app.devrig.brokers import RigBroker, broker_unavailable
from pipeline.app.devrig.feeding import Feeder, send_photos
from pipeline.app.devrig.outcomes import count_outcomes
from pipeline.app.devrig.photos import Photo, photo_from_bytes, synthetic_photos
from pipeline.app.devrig.readback import LabelCollector, header, read_records
from pipeline.app.devrig.stream import StreamRun
from pipeline.app.devrig.topics import fresh_settings, worker_env
from pipeline.app.devrig.workers import Incarnation, WorkerProcess, WorkerThread

__all__ = ["RigBroker", "broker_unavailable", "Feeder", "send_photos", "count_outcomes", "Photo", "photo_from_bytes",
           "synthetic_photos", "LabelCollector", "header", "read_records", "StreamRun", "fresh_settings", "worker_env",
           "Incarnation", "WorkerProcess", "WorkerThread"]
