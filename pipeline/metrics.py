"""Prometheus metrics for the consumers: throughput, batch latency, stage timings, dead letters, lag.

Each consumer process serves ``/metrics`` on ``DEEPER_METRICS_PORT`` (0 = off). Names follow
Prometheus conventions (``_total`` counters, ``_seconds`` histograms) so dashboards can compute
images/s as ``rate(deeper_images_total[1m])``.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The metric families of one consumer process (labelled by ``stage``: featurizer/scorer)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.registry = registry
        self.messages = Counter("deeper_messages_total", "Messages consumed", ["stage"], registry=registry)
        self.images = Counter("deeper_images_total", "Images featurized or vectors scored", ["stage"],
                              registry=registry)
        self.dead_letters = Counter("deeper_dead_letters_total", "Messages sent to the dead-letter topic",
                                    ["stage", "reason"], registry=registry)
        self.batch_seconds = Histogram("deeper_batch_seconds",
                                       "Wall time of one poll's messages, hand-over to outputs sent",
                                       ["stage"], buckets=_BUCKETS, registry=registry)
        self.stage_seconds = Histogram("deeper_stage_seconds", "Time per pipeline step of one batch",
                                       ["stage", "step"], buckets=_BUCKETS, registry=registry)
        self.lag = Gauge("deeper_consumer_lag", "Messages behind the end of the partition (where the broker says)",
                         ["stage", "topic", "partition"], registry=registry)
        self.model_version = Gauge("deeper_model_info", "The classifier version being served", ["version"],
                                   registry=registry)
        self.fallback_scored = Counter("deeper_fallback_scored_total",
                                       "Vectors labelled by an older model because the current one doesn't fit them",
                                       ["version"], registry=registry)
        self.flushes = Counter("deeper_parquet_files_total", "data files the sink wrote (Parquet parts or table data files)", registry=registry)


_metrics: Metrics | None = None


def metrics() -> Metrics:
    """The process-wide metrics (created once: prometheus refuses duplicate names)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` (loopback by default; containers set DEEPER_METRICS_ADDR=0.0.0.0)."""
    if port:
        start_http_server(port, addr=addr)
