"""Settings, read from the environment so that one variable points everything elsewhere.

Every consumer, producer and CLI command reads a :class:`Settings`; nothing else looks at
``os.environ``. ``KAFKA_BOOTSTRAP_SERVERS`` alone moves the whole pipeline from the local
development broker to a real Kafka cluster; the ``KAFKA_SECURITY_*``/``KAFKA_SASL_*``/
``KAFKA_SSL_*`` settings pass straight through to every kafka-python client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import DeeperError

GUARANTEES = ("exactly-once", "at-least-once")
SINKS = ("table", "parquet")


class ConfigError(DeeperError):
    """A setting has a value the pipeline cannot use."""


class Secret(str):
    """A secret string: the real value to the code that uses it, ``'***'`` in ``repr``.

    kafka-python logs an admin client's whole configuration at DEBUG (``Starting
    KafkaAdminClient with configuration: {...}``); a dict shows its values with ``repr``, so
    wrapping the password keeps it out of that line and of any other logged config dict.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


def _setting(variable: str, default: str, secret: bool = False) -> Any:
    """A settings field: its environment variable and default (secrets stay out of repr)."""
    return field(default=default, metadata={"env": variable, "secret": secret}, repr=not secret)


@dataclass(frozen=True)
class Settings:
    # -- Kafka: where, and how to authenticate (passed to every client) -------------------------
    bootstrap_servers: str = _setting("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    security_protocol: str = _setting("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    sasl_mechanism: str = _setting("KAFKA_SASL_MECHANISM", "")
    sasl_username: str = _setting("KAFKA_SASL_USERNAME", "")
    sasl_password: str = _setting("KAFKA_SASL_PASSWORD", "", secret=True)
    # TLS files (PEM)
    ssl_cafile: str = _setting("KAFKA_SSL_CAFILE", "")
    ssl_certfile: str = _setting("KAFKA_SSL_CERTFILE", "")
    ssl_keyfile: str = _setting("KAFKA_SSL_KEYFILE", "")
    # -- topics and consumer groups --------------------------------------------------------------
    images_topic: str = _setting("DEEPER_IMAGES_TOPIC", "deeper.images")
    features_topic: str = _setting("DEEPER_FEATURES_TOPIC", "deeper.features")
    labels_topic: str = _setting("DEEPER_LABELS_TOPIC", "deeper.labels")
    dead_letter_topic: str = _setting("DEEPER_DEAD_LETTER_TOPIC", "deeper.dead-letters")
    # one group per stage; run more processes of a stage with the same group to share partitions
    featurizer_group: str = _setting("DEEPER_FEATURIZER_GROUP", "deeper-featurizer")
    scorer_group: str = _setting("DEEPER_SCORER_GROUP", "deeper-scorer")
    # -- where things live -------------------------------------------------------------------------
    data_dir: str = _setting("DEEPER_DATA_DIR", "deeper-data")
    registry_dir: str = _setting("DEEPER_REGISTRY", "deeper-data/registry")  # follows data_dir if unset
    cache_dir: str = _setting("DEEPER_CACHE_DIR", str(Path.home() / ".cache" / "go-deeper"))
    #: where the featurizer writes Parquet: a directory or ``s3://bucket/prefix``; empty means
    #: ``$DEEPER_DATA_DIR/features``.
    features_uri: str = _setting("DEEPER_FEATURES_URI", "")
    #: where the stream's rows go: ``table`` (an Apache Iceberg table, pipeline/storage/table.py)
    #: or ``parquet`` (part files under ``features_uri``)
    sink: str = _setting("DEEPER_SINK", "table")
    #: the pyiceberg catalog's name; configured the standard pyiceberg way (~/.pyiceberg.yaml,
    #: PYICEBERG_CATALOG__<NAME>__*) or else the embedded SQLite catalog under the data dir
    catalog: str = _setting("DEEPER_CATALOG", "deeper")
    #: the feature table: "namespace.name", with {backbone}, {precision}, {layer} filled in
    table: str = _setting("DEEPER_TABLE", "deeper.features_{backbone}_{precision}_{layer}")
    #: the embedded catalog's warehouse: ``file://...`` or ``s3://bucket/prefix``; empty means
    #: ``file://<absolute $DEEPER_DATA_DIR>/warehouse``
    warehouse: str = _setting("DEEPER_WAREHOUSE", "")
    # -- the model ---------------------------------------------------------------------------------
    model: str = _setting("DEEPER_MODEL", "auto")
    precision: str = _setting("DEEPER_PRECISION", "fp32")  # fp32, bf16, fp32-lite, int8 (pipeline.model.precision)
    #: the label of a photo whose top probability is under the model's threshold
    unknown_label: str = _setting("DEEPER_UNKNOWN_LABEL", "unknown")
    # -- the stream's contract with the platform ---------------------------------------------------
    #: exactly-once: each checkpoint is one Kafka transaction (outputs + consumed offsets), and
    #: part files are named by topic/partition/first offset, so a replay rewrites the same file.
    guarantee: str = _setting("DEEPER_GUARANTEE", "exactly-once")
    #: the one message size limit of every producer in the stack
    max_message_bytes: str = _setting("DEEPER_MAX_MESSAGE_BYTES", "1048576")
    #: open: any message is an image (id = sha256 of its bytes, original key kept);
    #: strict: only go-deeper's own image messages (schema-version header, sha256 key).
    image_contract: str = _setting("DEEPER_IMAGE_CONTRACT", "open")
    source_header: str = _setting("DEEPER_SOURCE_HEADER", "source")  # where a foreign producer names the photo
    label_header: str = _setting("DEEPER_LABEL_HEADER", "label")  # ... and its known label, if any
    #: runs that may die on one message before it is dead-lettered as ``poison``
    max_attempts: str = _setting("DEEPER_MAX_ATTEMPTS", "3")
    #: names this replica for its transactional id; empty: the host name plus a free slot number
    instance_id: str = _setting("DEEPER_INSTANCE_ID", "")
    # -- claim checks (pipeline/kafka/claim_check.py): messages naming where the photo's bytes are.
    # S3 endpoint, region and credentials are the AWS SDK's own variables (pipeline/storage/__init__.py).
    fetch_max_bytes: str = _setting("DEEPER_FETCH_MAX_BYTES", str(32 * 1024 * 1024))
    fetch_timeout_s: str = _setting("DEEPER_FETCH_TIMEOUT_S", "5")
    #: schemes a claim check may use at most; each is off until its own setting below opens it
    fetch_schemes: str = _setting("DEEPER_FETCH_SCHEMES", "s3,http,https")
    #: ``file://`` claim checks read only under this directory; empty: ``file://`` is off
    fetch_file_root: str = _setting("DEEPER_FETCH_FILE_ROOT", "")
    #: hosts http(s) claim checks may name (``name``, ``.suffix``, ``*``, each with optional ``:port``);
    #: empty: http(s) is off. The fetch policy (pipeline/kafka/fetch_policy.py) says the rest.
    fetch_hosts: str = _setting("DEEPER_FETCH_HOSTS", "")
    #: ``bucket`` or ``bucket/prefix`` entries s3:// claim checks may name; empty: s3:// is off
    fetch_s3: str = _setting("DEEPER_FETCH_S3", "")
    #: address ranges (CIDRs) claim checks may connect to although they are loopback/private/...
    fetch_allow_nets: str = _setting("DEEPER_FETCH_ALLOW_NETS", "")
    # -- observability -----------------------------------------------------------------------------
    metrics_port: str = _setting("DEEPER_METRICS_PORT", "0")
    metrics_addr: str = _setting("DEEPER_METRICS_ADDR", "127.0.0.1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Read every setting from ``environ`` (default ``os.environ``); ``overrides`` win."""
        env = os.environ if environ is None else environ
        values = {name: env.get(var, default) for name, (var, default) in ENVIRONMENT.items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("registry_dir") is None and ENVIRONMENT["registry_dir"][0] not in env:
            values["registry_dir"] = str(Path(values["data_dir"]) / "registry")  # follows the data dir
        return cls(**values)

    def kafka_client_config(self) -> dict[str, Any]:
        """Keyword arguments shared by every kafka-python client (security included)."""
        config: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            config["sasl_mechanism"] = self.sasl_mechanism
            config["sasl_plain_username"] = self.sasl_username
            config["sasl_plain_password"] = Secret(self.sasl_password)  # real value, '***' when logged
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, key):
                config[key] = getattr(self, key)
        return config

    @property
    def exactly_once(self) -> bool:
        if self.guarantee not in GUARANTEES:
            raise ConfigError(f"DEEPER_GUARANTEE={self.guarantee!r}: choose one of {', '.join(GUARANTEES)}")
        return self.guarantee == "exactly-once"

    @property
    def sink_kind(self) -> str:
        """``table`` or ``parquet`` (``DEEPER_SINK``), checked."""
        if self.sink not in SINKS:
            raise ConfigError(f"DEEPER_SINK={self.sink!r}: choose one of {', '.join(SINKS)}")
        return self.sink

    @property
    def message_limit(self) -> int:
        """The one message size limit every producer in the stack uses (bytes)."""
        try:
            return int(self.max_message_bytes)
        except ValueError:
            raise ConfigError(f"DEEPER_MAX_MESSAGE_BYTES={self.max_message_bytes!r} is not a number of bytes") from None

    def features_location(self) -> str:
        """The featurizer's Parquet root: ``DEEPER_FEATURES_URI`` or ``$DEEPER_DATA_DIR/features``."""
        return self.features_uri or str(Path(self.data_dir) / "features")

    def child_env(self, **extra: str) -> dict[str, str]:
        """The environment of a child process (``deeper featurizer``...) that must run with
        exactly these settings: this process's environment, every setting as its variable
        (``DEEPER_*``, ``KAFKA_*``) on top, then ``extra`` (``TF_CPP_MIN_LOG_LEVEL`` & co.)."""
        return {**os.environ, **{f.metadata["env"]: str(getattr(self, f.name)) for f in fields(self)}, **extra}

    def redacted(self) -> dict[str, str]:
        """The settings as a dict safe to log: secrets replaced by ``***``."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if (f.name in SECRET_SETTINGS and value) else value
        return out


#: Setting name -> (environment variable, default): derived from the fields above, the single
#: source of truth; the docker-compose test reads it so the compose file can't drift from the code.
ENVIRONMENT: dict[str, tuple[str, str]] = {f.name: (f.metadata["env"], f.default) for f in fields(Settings)}
SECRET_SETTINGS = frozenset(f.name for f in fields(Settings) if f.metadata["secret"])


#: Where the bundled example photos (``examples/``: train/<class>/, test/, test_labels.csv) are
#: looked for when ``DEEPER_EXAMPLES`` is unset. They live in the repository, not in the installed
#: package (which holds only the product), so this is the checkout beside this package, and only
#: when it is one (a ``pyproject.toml`` next to it): an installed package must never pick up an
#: unrelated ``site-packages/examples`` folder.
EXAMPLES_VARIABLE = "DEEPER_EXAMPLES"


def examples_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The example photos folder (``DEEPER_EXAMPLES``, else the checkout's ``examples/``), or
    None where there is none (an installed package without a checkout): callers say so clearly."""
    env = os.environ if environ is None else environ
    if env.get(EXAMPLES_VARIABLE):
        return Path(env[EXAMPLES_VARIABLE]).expanduser()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "examples").is_dir():
        return checkout / "examples"
    return None
