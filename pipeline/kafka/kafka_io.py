"""The one place that builds kafka-python clients, so every client gets the same safe defaults.

Everything here goes through :meth:`Settings.kafka_client_config`, so pointing
``KAFKA_BOOTSTRAP_SERVERS`` (and the ``KAFKA_SECURITY_*`` settings) at a real Apache Kafka
cluster needs no code change. Nothing here relies on behaviour of the local Tansu broker: the
defaults are the ones a real cluster wants, and where Tansu differs (see ``docs/broker.md``)
the code only uses the standard protocol and treats broker answers defensively.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Any, Iterable, Iterator, Mapping

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kafka_errors

from pipeline.config import Settings
from pipeline.errors import DeeperError
from pipeline.kafka import client_fixes

log = logging.getLogger(__name__)

# A group join that finishes between two polls is applied at the next one (kafka-python 3.0.12
# lost it: a member without partitions, docs/broker.md); before any client exists.
client_fixes.install()

#: Every client's defaults. kafka-python backs off reconnecting exponentially up to 30 s (Java's
#: client: 1 s); a broker down for ~10 s then left every client waiting up to ~25 s more after it
#: answered again, past the 6 s session timeout (group members dropped, a rebalance on top) and
#: past the transaction timeout. 1 s keeps a restart's cost at about the broker's own downtime
#: (docs/faults.md, recovery after a broker restart).
CLIENT_DEFAULTS: dict[str, Any] = {
    "reconnect_backoff_max_ms": 1000,
}

#: Producer defaults. acks=all + idempotence means a retried send can neither be lost nor
#: duplicated in the log; 5 in-flight requests is the most idempotence allows while still
#: keeping per-partition order. A small linger batches bursts from a directory scan without
#: adding noticeable latency. No compression: image bytes (JPEG/PNG) and float32 vectors barely
#: compress, so it would only cost CPU.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "max_in_flight_requests_per_connection": 5,
    "linger_ms": 5,
}

#: Consumer defaults. Offsets are committed by the stream code only after its output is
#: durable (at-least-once), so auto-commit is off. A 6 s session timeout (the minimum a stock
#: Kafka broker accepts, ``group.min.session.timeout.ms``) makes group joins and failover take
#: seconds instead of the ~23 s kafka-python's 45 s default costs on the local broker.
#: ``fetch_max_wait_ms`` bounds how long a broker may hold a fetch when no data is waiting: a
#: broker that doesn't answer the moment a record arrives (Tansu answered after ~110 ms at the
#: 500 ms default, 5 ms at 100 ms; each of the stream's 3 consumer hops pays it) then costs at
#: most 100 ms per hop; an idle consumer sends 10 small fetches/s instead of 2.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 2000,
    "fetch_max_wait_ms": 100,
    # A group leader whose metadata did not list a just-created topic's partitions yet assigns
    # nothing ("No partition metadata for topic"), and the group rebalances only once a metadata
    # refresh shows them: 5 min at kafka-python's default age, 10 s here (one small request).
    "metadata_max_age_ms": 10_000,
    # Never read records of an aborted or still-open transaction: with exactly-once
    # checkpoints, features/labels/dead letters count only once their transaction commits.
    "isolation_level": "read_committed",
}

#: Records per poll. Image featurizing is slow per record, so a small batch keeps each poll
#: loop well inside ``max_poll_interval_ms`` (5 min) and bounds what is redone after a crash.
DEFAULT_MAX_POLL_RECORDS = 64

#: CreateTopics error codes that mean "it is already there", which is what we wanted.
_TOPIC_EXISTS_CODES = frozenset({kafka_errors.TopicAlreadyExistsError.errno})

#: How long to wait for an idempotent producer to obtain its producer id before deciding.
_IDEMPOTENCE_PROBE_S = 10.0


class BrokerUnavailable(DeeperError):
    """No Kafka broker answered at the configured bootstrap servers."""


class TopicSetupError(DeeperError):
    """A topic could not be created (or checked) the way the pipeline needs it."""


# --------------------------------------------------------------------------- producers


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A producer with acks=all and idempotence, falling back loudly if the broker refuses it.

    Idempotence is what turns kafka-python's automatic retries into exactly-once appends per
    partition. Some brokers (very old versions, or clusters whose ACLs deny ``IdempotentWrite``)
    refuse it; then we log a warning and use a plain acks=all producer rather than pretending.
    If the caller explicitly asked for ``enable_idempotence=True``, a refusal is an error instead.
    """
    config = _producer_config(settings, **overrides)
    strict = overrides.get("enable_idempotence") is True
    if not strict and not _idempotence_compatible(config):
        # The caller traded durability for speed (acks!=all, retries=0, >5 in flight);
        # idempotence cannot work with those, so honour the caller's choice.
        config["enable_idempotence"] = False
    if not config.get("enable_idempotence"):
        return _producer(config)
    try:
        producer = _producer(config)
    except kafka_errors.KafkaConfigurationError as exc:
        # kafka-python raises this at construction when the broker's API version predates
        # idempotence (< 0.11) and idempotence was requested explicitly.
        return _fallback_producer(config, exc, strict)
    problem = _idempotence_problem(producer)
    if problem is None:
        return producer
    close_producer(producer, timeout=5)
    return _fallback_producer(config, problem, strict)


def _producer(config: Mapping[str, Any]) -> KafkaProducer:
    """Every producer is built here: a transactional request its sender could not send while the
    broker was away is sent again once it is back (kafka-python 3.0.12 dropped it, client_fixes)."""
    producer = KafkaProducer(**config)
    client_fixes.retry_unready_coordinator(producer)
    return producer


def _producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Every producer's configuration: security, the safe defaults, the one message size limit."""
    return {**settings.kafka_client_config(), **CLIENT_DEFAULTS, **PRODUCER_DEFAULTS,
            "max_request_size": request_size_limit(settings), **overrides}


def request_size_limit(settings: Settings) -> int:
    """kafka-python's ``max_request_size`` for the one message limit (a record plus its batch's
    overhead must fit, so the largest record of ``DEEPER_MAX_MESSAGE_BYTES`` is never refused
    by our own client before the broker sees it)."""
    return settings.message_limit + RECORD_OVERHEAD


#: Bytes a record batch adds around one record (v2 batch header 61 B, record framing, headers'
#: varints): a margin, not a measurement.
RECORD_OVERHEAD = 1024


def make_transactional_producer(settings: Settings, transactional_id: str) -> KafkaProducer:
    """A transactional producer, ready for ``begin_transaction`` (exactly-once checkpoints).

    ``init_transactions`` fences any older producer with the same id and aborts the
    transaction it left open, so a restarted replica that reuses its id unblocks
    ``read_committed`` readers at once instead of after the transaction timeout.
    """
    producer = _producer(_producer_config(settings, transactional_id=transactional_id,
                                          transaction_timeout_ms=TRANSACTION_TIMEOUT_MS))
    try:
        producer.init_transactions()
    except BaseException:
        close_producer(producer, timeout=1)
        raise
    return producer


#: A checkpoint's transaction lives a few seconds; if its producer dies, the broker aborts it
#: after this long (the longest a ``read_committed`` reader can be held up by a crash whose
#: replica does not come back under the same transactional id).
TRANSACTION_TIMEOUT_MS = 30_000


def topic_message_limits(settings: Settings, topics: Iterable[str]) -> dict[str, int]:
    """``max.message.bytes`` of each topic the broker reports (an operator may set it below
    ours); topics or brokers that don't answer DescribeConfigs are left out."""
    from kafka.admin import ConfigResource, ConfigResourceType

    names = sorted(set(topics))
    limits: dict[str, int] = {}
    try:
        admin = make_admin(settings, request_timeout_ms=2000)
    except kafka_errors.KafkaError:
        return limits
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, name, ["max.message.bytes"]) for name in names]
        with _dropped_connections_expected():
            answer = admin.describe_configs(resources, config_filter="all")
        for name, entries in (answer.get("topic") or {}).items():
            value = (entries.get("max.message.bytes") or {}).get("value")
            if value:
                limits[name] = int(value)
    except Exception as exc:  # noqa: BLE001 - only a refinement (Tansu 0.6 drops the connection): the settings' limit applies
        log.debug("topic limits unavailable: %r", exc)
    finally:
        admin.close()
    return limits


class _Expected(logging.Filter):
    """Drops kafka-python's records that contain one of ``phrases``."""

    def __init__(self, phrases: tuple[str, ...]):
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(phrase in text for phrase in self.phrases)


@contextlib.contextmanager
def _kafka_lines_expected(loggers: tuple[str, ...], phrases: tuple[str, ...]) -> Iterator[None]:
    """Keep kafka-python's ERROR lines about something the caller expects and handles out of the
    logs while it happens (process-wide, for the duration only)."""
    quiet = _Expected(phrases)
    found = [logging.getLogger(name) for name in loggers]
    for logger in found:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in found:
            logger.removeFilter(quiet)


def _dropped_connections_expected() -> contextlib.AbstractContextManager[None]:
    """A request that some brokers answer by dropping the connection (Tansu 0.6 and
    DescribeConfigs) is being made: kafka-python logs that as three ERROR lines, which every
    worker start on Tansu printed, while the caller handles the failure."""
    return _kafka_lines_expected(("kafka.net.transport", "kafka.net.connection"),
                                 ("socket disconnected", "Connection lost"))


def closing_quietly() -> contextlib.AbstractContextManager[None]:
    """Clients are being closed: kafka-python may log, at ERROR, a metadata refresh it cancels
    on the way (``Metadata refresh: failed Cancelled``, about one clean stop in seven) or a read
    from a socket it is closing (``Error receiving network data``, with a traceback)."""
    return _kafka_lines_expected(("kafka.cluster", "kafka.net.transport"),
                                 ("failed Cancelled", "Error receiving network data"))


def _idempotence_compatible(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` allows idempotence (it needs acks=all, retries and <= 5 in flight)."""
    return (
        config.get("acks") in ("all", -1)
        and config.get("retries", 1) != 0
        and config.get("max_in_flight_requests_per_connection", 5) <= 5
    )


def _fallback_producer(config: dict[str, Any], reason: BaseException, strict: bool) -> KafkaProducer:
    """Rebuild ``config`` without idempotence, or raise if the caller insisted on it."""
    if strict:
        raise DeeperError(f"the Kafka broker refused an idempotent producer: {reason}") from reason
    log.warning(
        "Kafka broker refused idempotent producing (%s); falling back to acks=all without "
        "idempotence, so a retried send may be written twice.",
        reason,
    )
    return _producer({**config, "enable_idempotence": False})


def _idempotence_problem(producer: KafkaProducer, timeout_s: float = _IDEMPOTENCE_PROBE_S) -> BaseException | None:
    """Wait until an idempotent producer got its producer id; return the broker's refusal if any.

    kafka-python asks for a producer id (InitProducerId) in the background as soon as the
    producer starts, and a refusal only surfaces later as a failed send. Checking right away
    lets :func:`make_producer` fall back before any record is written. kafka-python exposes
    no public API for this, so the private transaction manager is read defensively: if the
    library changes, we skip the check (and say so at debug level) rather than break.
    """
    manager = getattr(producer, "_transaction_manager", None)
    if manager is None or not hasattr(manager, "has_producer_id") or not hasattr(manager, "has_fatal_error"):
        log.debug("cannot verify idempotence with this kafka-python version; trusting the producer")
        return None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if manager.has_producer_id():
            return None
        if manager.has_fatal_error():
            return getattr(manager, "last_error", None) or kafka_errors.KafkaError("InitProducerId failed")
        time.sleep(0.02)
    # Not an outright refusal: the broker may simply be slow. Sends will wait for the id.
    log.warning("idempotent producer got no producer id within %.0f s; keeping it anyway", timeout_s)
    return None


def producer_is_idempotent(producer: KafkaProducer) -> bool:
    """Whether ``producer`` really runs idempotently (after any fallback in :func:`make_producer`)."""
    return bool(getattr(producer, "config", {}).get("enable_idempotence"))


def close_producer(producer: KafkaProducer, timeout: float = 10.0) -> bool:
    """Flush and close ``producer``; False if records were still undelivered at ``timeout``.

    kafka-python 3.0's ``close(timeout)`` raises ``KafkaTimeoutError`` when the flush times
    out (broker gone) and leaves its I/O thread running, so a shutdown path would hang or
    crash. Here the stuck batches are aborted (their futures fail, so callers see which
    records were not written) and the producer is closed anyway.
    """
    try:
        producer.close(timeout=timeout)
        return True
    except kafka_errors.KafkaTimeoutError:
        log.warning("Kafka producer could not deliver all records within %.0f s; aborting them", timeout)
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()  # aborts incomplete batches, then the thread exits
        sender.join(5.0)
    try:
        producer.close(timeout=0)
    except kafka_errors.KafkaError as exc:
        log.debug("producer close after abort: %s", exc)
    return False


# --------------------------------------------------------------------------- consumers


def make_consumer(
    settings: Settings,
    group_id: str | None,
    topics: Iterable[str],
    *,
    max_poll_records: int = DEFAULT_MAX_POLL_RECORDS,
    **overrides: Any,
) -> KafkaConsumer:
    """A group consumer subscribed to ``topics`` that never commits on its own.

    The caller commits (``consumer.commit()``) only after its output is safely written, which
    gives at-least-once processing; ``auto_offset_reset="earliest"`` makes a new group start at
    the beginning so nothing produced before the consumer's first start is skipped.
    """
    config = {
        **settings.kafka_client_config(),
        **CLIENT_DEFAULTS,
        **CONSUMER_DEFAULTS,
        "group_id": group_id,
        "max_poll_records": max_poll_records,
        **overrides,
    }
    topic_list = list(topics)
    return KafkaConsumer(*topic_list, **config)


def consumer_lag(consumer: KafkaConsumer) -> dict[TopicPartition, int] | None:
    """Per-partition lag (end offset minus committed offset) for metrics, or ``None``.

    Only for dashboards: end offsets are whatever the broker reports, and the local Tansu
    broker under-reports them when records are produced in batches (it answers "latest" with
    one past the *first* offset of the last batch). Lag is therefore clamped at zero and must
    never drive correctness decisions. Returns ``None`` when there is nothing assigned yet or
    the broker cannot answer right now.
    """
    assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
    if not assigned:
        return None
    try:
        end = consumer.end_offsets(assigned)
        committed = {tp: consumer.committed(tp) for tp in assigned}
        missing = [tp for tp, offset in committed.items() if offset is None]
        start = consumer.beginning_offsets(missing) if missing else {}
    except kafka_errors.KafkaError as exc:
        log.debug("consumer lag unavailable: %s", exc)
        return None
    lag: dict[TopicPartition, int] = {}
    for tp in assigned:
        done = committed[tp] if committed[tp] is not None else start.get(tp, 0)
        lag[tp] = max(0, int(end.get(tp, done)) - int(done))
    return lag


# --------------------------------------------------------------------------- admin


def make_admin(settings: Settings, **overrides: Any) -> KafkaAdminClient:
    """An admin client; kept here so security settings reach admin calls too."""
    return KafkaAdminClient(**{**settings.kafka_client_config(), **CLIENT_DEFAULTS, **overrides})


def ensure_topics(
    settings: Settings,
    topics: Mapping[str, int],
    *,
    replication_factor: int = -1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics that don't exist yet; return the names actually created.

    Idempotent, and safe when several processes race to create the same topic: "already
    exists" counts as success. ``replication_factor=-1`` means "the broker's default"
    (KIP-464), which is 1 on a single-node dev broker and whatever the operator chose on a real
    cluster. An existing topic with fewer partitions than asked for only gets a warning,
    because adding partitions would re-route keys and is an operator's decision.
    """
    if not topics:
        return []
    admin = make_admin(settings, request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        missing = {name: n for name, n in topics.items() if name not in existing}
        created = _create_missing(admin, missing, replication_factor, timeout_s) if missing else []
        _warn_on_fewer_partitions(admin, {n: p for n, p in topics.items() if n not in created})
        return created
    except kafka_errors.KafkaError as exc:
        raise TopicSetupError(f"cannot create topics {sorted(topics)} on {settings.bootstrap_servers}: {exc}") from exc
    finally:
        admin.close()


def _create_missing(admin: KafkaAdminClient, missing: Mapping[str, int], replication_factor: int,
                    timeout_s: float) -> list[str]:
    """Send one CreateTopics request and sort the per-topic results into created/failed."""
    request = {name: {"num_partitions": n, "replication_factor": replication_factor} for name, n in missing.items()}
    response = admin.create_topics(request, timeout_ms=int(timeout_s * 1000), raise_errors=False)
    created, failed = [], []
    for result in response.get("topics", []):
        code = result.get("error_code", 0)
        if code == 0:
            created.append(result["name"])
        elif code not in _TOPIC_EXISTS_CODES:
            failed.append(f"{result['name']}: {result.get('error_message') or kafka_errors.for_code(code).__name__}")
    if failed:
        raise TopicSetupError("cannot create topics: " + "; ".join(failed))
    if created:
        admin.wait_for_topics(created, timeout_ms=int(timeout_s * 1000))
    return created


def _warn_on_fewer_partitions(admin: KafkaAdminClient, wanted: Mapping[str, int]) -> None:
    """Log when an existing topic has fewer partitions than the pipeline would like."""
    if not wanted:
        return
    for topic in admin.describe_topics(list(wanted)):
        have = len(topic.get("partitions") or [])
        if topic.get("error_code", 0) == 0 and have < wanted[topic["name"]]:
            log.warning("topic %s has %d partitions, %d wanted; leaving it as it is",
                        topic["name"], have, wanted[topic["name"]])


def broker_answers(settings: Settings, timeout_s: float = 2.0) -> bool:
    """One real metadata round trip: True if a broker answered within ``timeout_s``.

    A TCP connect is not enough (a starting broker may accept connections before it can
    serve), so this asks for the topic list like any client would.
    """
    if not _any_port_open(settings, timeout_s):
        return False  # skip kafka-python, which logs every refused connection as an ERROR
    timeout_ms = max(100, int(timeout_s * 1000))
    try:
        admin = make_admin(settings, bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms,
                           reconnect_backoff_max_ms=200)
    except kafka_errors.KafkaError:
        return False
    try:
        admin.list_topics()
        return True
    except kafka_errors.KafkaError:
        return False
    finally:
        admin.close()


def unfenced_brokers(settings: Settings, timeout_s: float = 5.0) -> set[int]:
    """Ids of the brokers the cluster's controller counts as registered and not fenced (empty
    if no broker answers): a node that runs but is not in here serves no partition yet."""
    timeout_ms = int(timeout_s * 1000)
    try:
        admin = make_admin(settings, request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms)
    except kafka_errors.KafkaError:
        return set()
    try:
        brokers = admin.describe_cluster().get("brokers") or []
        return {int(b["broker_id"]) for b in brokers if not b.get("is_fenced")}
    except kafka_errors.KafkaError:
        return set()
    finally:
        admin.close()


def _any_port_open(settings: Settings, timeout_s: float) -> bool:
    """Whether any bootstrap server accepts a TCP connection (cheap pre-check, no logging)."""
    for server in settings.kafka_client_config()["bootstrap_servers"]:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


def wait_for_broker(settings: Settings, timeout: float = 30.0) -> None:
    """Block until a broker answers a metadata request, or raise :class:`BrokerUnavailable`.

    Consumers and producers started together with the broker (docker compose, tests) would
    otherwise fail their first request; waiting here gives one clear error instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if broker_answers(settings, timeout_s=max(0.2, min(2.0, remaining))):
            return
        if time.monotonic() >= deadline:
            raise BrokerUnavailable(
                f"no Kafka broker answered at {settings.bootstrap_servers} within {timeout:.0f} s; "
                "start one with `deeper broker start` or set KAFKA_BOOTSTRAP_SERVERS"
            )
        time.sleep(0.2)
