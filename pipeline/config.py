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
    bootstrap_servers: str = _setting("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    images_topic: str = _setting("DEEPER_IMAGES_TOPIC", "deeper.images")
    features_topic: str = _setting("DEEPER_FEATURES_TOPIC", "deeper.features")
    labels_topic: str = _setting("DEEPER_LABELS_TOPIC", "deeper.labels")
    dead_letter_topic: str = _setting("DEEPER_DEAD_LETTER_TOPIC", "deeper.dead-letters")
    featurizer_group: str = _setting("DEEPER_FEATURIZER_GROUP", "deeper-featurizer")
    scorer_group: str = _setting("DEEPER_SCORER_GROUP", "deeper-scorer")
    data_dir: str = _setting("DEEPER_DATA_DIR", "deeper-data")
    registry_dir: str = _setting("DEEPER_REGISTRY", "deeper-data/registry")  # follows data_dir if unset
    cache_dir: str = _setting("DEEPER_CACHE_DIR", str(Path.home() / ".cache" / "go-deeper"))
    model: str = _setting("DEEPER_MODEL", "auto")
    precision: str = _setting("DEEPER_PRECISION", "fp32")  # fp32, bf16, fp32-lite, int8 (pipeline.precision)
    metrics_port: str = _setting("DEEPER_METRICS_PORT", "0")
    metrics_addr: str = _setting("DEEPER_METRICS_ADDR", "127.0.0.1")
    max_message_bytes: str = _setting("DEEPER_MAX_MESSAGE_BYTES", "1048576")
    offline: str = _setting("DEEPER_OFFLINE", "")  # read by pipeline.weights before any download
    security_protocol: str = _setting("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    sasl_mechanism: str = _setting("KAFKA_SASL_MECHANISM", "")
    sasl_username: str = _setting("KAFKA_SASL_USERNAME", "")
    sasl_password: str = _setting("KAFKA_SASL_PASSWORD", "", secret=True)
    ssl_cafile: str = _setting("KAFKA_SSL_CAFILE", "")
    ssl_certfile: str = _setting("KAFKA_SSL_CERTFILE", "")
    ssl_keyfile: str = _setting("KAFKA_SSL_KEYFILE", "")

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
