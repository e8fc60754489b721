"""The kafka-python names the rest of the product uses: the one door to the client library.

Everything outside ``pipeline/kafka/`` imports Kafka types from here, never from ``kafka``
(``tests/test_layers.py`` checks it), so changing or patching the client library means reading
one package. Only public kafka-python API is re-exported; where the stream has to reach into
the client's private state, it goes through :mod:`pipeline.kafka.internals`.
"""

from __future__ import annotations

from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka import errors as kafka_errors
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

__all__ = ["ConsumerRebalanceListener", "KafkaConsumer", "KafkaError", "KafkaProducer", "OffsetAndMetadata",
           "TopicPartition", "kafka_errors"]
