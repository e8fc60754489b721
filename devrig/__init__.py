"""The development rig: run the stream for real, break it, and count what came out.

One implementation of everything the stream tests, the fault suite and the benchmarks need
(none of it is used by the product itself: it lives in the checkout, outside the installed package,
and not in ``tests/``, so ``bench/`` can use it without importing the test suite):

* :mod:`~devrig.photos`: distinct synthetic JPEGs (:func:`synthetic_photos`) and
  :class:`Photo` (image id, source, label, bytes);
* :mod:`~devrig.brokers`: :class:`RigBroker`, a private broker of either kind
  (``tansu`` durable or ``kafka``) that can be killed (SIGKILL) and restarted on its data;
* :mod:`~devrig.hosts`: test hosts (network namespaces on a private switch) that can
  be cut off and healed; :mod:`~devrig.toxiproxy`: slow and broken links;
  :mod:`~devrig.cluster`: a three-node Apache Kafka cluster on test hosts;
* :mod:`~devrig.topics`: :func:`fresh_settings` (fresh topics, groups, data dir and
  registry on a broker) and :func:`worker_env` (the same settings as ``DEEPER_*`` variables);
* :mod:`~devrig.workers`: :class:`WorkerThread` (a worker in this process, sharing one
  loaded backbone) and :class:`WorkerProcess` (``deeper featurizer|scorer`` subprocesses,
  restartable after a SIGKILL, one JSON log per incarnation);
* :mod:`~devrig.feeding`: :func:`send_photos` and :class:`Feeder` (a producer thread
  that re-sends exactly the photos that failed);
* :mod:`~devrig.readback`: :func:`read_records` (``read_committed``, from the
  beginning, no group), :class:`LabelCollector` (label arrival times) and Parquet on disk;
* :mod:`~devrig.outcomes`: :func:`count_outcomes`: missing ids, duplicate rows on disk
  (raw, before any de-duplication) and duplicate records read with ``read_committed``;
* :mod:`~devrig.stream`: :class:`StreamRun`, one run of the whole stream (fresh
  settings, the two worker processes, a classifier trained from the stream's own Parquet).
"""

from devrig.brokers import RigBroker, broker_unavailable
from devrig.feeding import Feeder, send_photos
from devrig.outcomes import count_outcomes
from devrig.photos import Photo, photo_from_bytes, synthetic_photos
from devrig.readback import LabelCollector, header, read_records
from devrig.stream import StreamRun
from devrig.topics import fresh_settings, worker_env
from devrig.workers import Incarnation, WorkerProcess, WorkerThread

__all__ = ["RigBroker", "broker_unavailable", "Feeder", "send_photos", "count_outcomes", "Photo", "photo_from_bytes",
           "synthetic_photos", "LabelCollector", "header", "read_records", "StreamRun", "fresh_settings", "worker_env",
           "Incarnation", "WorkerProcess", "WorkerThread"]
