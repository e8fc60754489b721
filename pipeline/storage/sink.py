"""The stream's sink: where a stage's rows wait for a checkpoint, and how they are made durable.

Like quix-streams' ``Sink`` and Kafka Connect's ``SinkTask``, the worker
(:mod:`consumers.worker`) drives a sink through a few verbs and knows nothing of what is
behind it. Two implementations, one file each:

* :class:`pipeline.storage.table_sink.TableSink` (``DEEPER_SINK=table``, the default): each
  checkpoint is one Apache Iceberg commit whose snapshot summary records the consumed offsets;
* :class:`pipeline.storage.parquet_sink.ParquetSink` (``DEEPER_SINK=parquet``): part files named
  by topic, partition and first offset.

The order a checkpoint follows is the worker's: work in flight finished -> :meth:`Sink.flush`
(rows durable) -> Kafka transaction (outputs + offsets) committed -> :meth:`Sink.publish`
(what the commit fenced becomes visible: the Parquet sink's final file names; the table's
commit is visible at once and fenced by the offsets it checks). A crash between flush and the
Kafka commit leaves the table ahead of Kafka; :meth:`Sink.assigned` is how the next owner of a
partition learns which offsets are already stored, so it produces their records again without
storing their rows twice (and the Parquet sink publishes or removes what a dead writer staged).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from pipeline.errors import DeeperError
from pipeline.kafka.client import TopicPartition

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.identity import FeatureId
    from pipeline.storage.parquet_writer import FeatureRow


@dataclass(frozen=True)
class Span:
    """What a checkpoint covers on one partition: ``start`` is the first offset not yet committed
    to Kafka, ``end`` the next offset the checkpoint commits (one past the last one consumed)."""

    start: int
    end: int


class Superseded(DeeperError):
    """Another writer moved this partition's stored offsets: this process lost the partition (a
    zombie after a rebalance, or a commit that raced a newer owner). The checkpoint must fail and
    rewind; nothing of it was stored."""


class Sink(abc.ABC):
    """Rows buffered per input partition until :meth:`flush` makes them durable."""

    #: ``table`` or ``parquet``: names the sink in logs and metrics
    kind: str = "sink"

    @abc.abstractmethod
    def add(self, rows: Sequence[FeatureRow]) -> None:
        """Buffer finished rows (in offset order per partition)."""

    @abc.abstractmethod
    def flush(self, spans: Mapping[TopicPartition, Span]) -> list[str]:
        """Make every buffered row durable before the checkpoint commits ``spans`` on Kafka;
        return what was written (paths, for logs).

        Raises :class:`Superseded` when another writer owns a partition now (the worker rewinds);
        any other exception means storage is away (the worker pauses and calls again later, with
        the same rows still buffered, so a retry loses nothing and stores nothing twice).
        """

    @abc.abstractmethod
    def discard(self) -> None:
        """Drop buffered rows: the worker rewound to Kafka's committed offsets and redoes them."""

    @abc.abstractmethod
    def due(self) -> bool:
        """Whether the buffer should be flushed now (size or age)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Rows buffered."""

    @abc.abstractmethod
    def assigned(self, committed: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Partitions this process now owns, with Kafka's committed offset of each.

        Returns, for partitions where the sink already stores offsets at or past ``committed``
        (a crash between a flush and its Kafka commit), the offset up to which it does: those
        offsets are consumed again, their records produced again, their rows not stored again.
        """

    @abc.abstractmethod
    def switch(self, meta: FeatureId) -> None:
        """Rows of another feature identity from now on (called with the buffer empty)."""

    def publish(self) -> list[str]:
        """The checkpoint's Kafka commit succeeded: make what :meth:`flush` wrote visible;
        return it. Raises if storage is away (the worker pauses; :meth:`unpublished` says a
        retry is due before the next flush)."""
        return []

    def unpublished(self) -> bool:
        """Committed output still waiting for :meth:`publish` (its last try failed)."""
        return False

    def open(self) -> None:
        """Check now what would otherwise fail at the first checkpoint (a table's identity) and
        tidy what a killed predecessor left (temporary files); called once at start."""

    def describe(self) -> str:
        """Where rows go, for the start-up log line."""
        return self.kind

    def close(self) -> None:
        """Release what the sink holds (connections); buffered rows are dropped."""


def build_sink(settings: Settings, meta: FeatureId, max_rows: int = 5000, max_seconds: float = 5.0) -> Sink:
    """The sink ``DEEPER_SINK`` names, for rows of ``meta`` (the only place that knows them all)."""
    if settings.sink_kind == "parquet":
        from pipeline.storage.parquet_sink import ParquetSink

        return ParquetSink(settings.features_location(), meta, max_rows, max_seconds)
    from pipeline.storage.table_sink import TableSink

    return TableSink(settings, meta, max_rows, max_seconds)
