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

#: Setting name -> (environment variable, default). The single source of truth, also read by
#: the docker-compose test so the compose file can't drift from the code.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "bootstrap_servers": ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
    "images_topic": ("DEEPER_IMAGES_TOPIC", "deeper.images"),
    "features_topic": ("DEEPER_FEATURES_TOPIC", "deeper.features"),
    "labels_topic": ("DEEPER_LABELS_TOPIC", "deeper.labels"),
    "dead_letter_topic": ("DEEPER_DEAD_LETTER_TOPIC", "deeper.dead-letters"),
    "featurizer_group": ("DEEPER_FEATURIZER_GROUP", "deeper-featurizer"),
    "scorer_group": ("DEEPER_SCORER_GROUP", "deeper-scorer"),
    "data_dir": ("DEEPER_DATA_DIR", "deeper-data"),
    "registry_dir": ("DEEPER_REGISTRY", "deeper-data/registry"),
    "cache_dir": ("DEEPER_CACHE_DIR", str(Path.home() / ".cache" / "go-deeper")),
    "model": ("DEEPER_MODEL", "auto"),
    "metrics_port": ("DEEPER_METRICS_PORT", "0"),
    "metrics_addr": ("DEEPER_METRICS_ADDR", "127.0.0.1"),
    "max_message_bytes": ("DEEPER_MAX_MESSAGE_BYTES", "1048576"),
    "offline": ("DEEPER_OFFLINE", ""),  # read by pipeline.weights before any download attempt
    "security_protocol": ("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
    "sasl_mechanism": ("KAFKA_SASL_MECHANISM", ""),
    "sasl_username": ("KAFKA_SASL_USERNAME", ""),
    "sasl_password": ("KAFKA_SASL_PASSWORD", ""),
    "ssl_cafile": ("KAFKA_SSL_CAFILE", ""),
    "ssl_certfile": ("KAFKA_SSL_CERTFILE", ""),
    "ssl_keyfile": ("KAFKA_SSL_KEYFILE", ""),
}

SECRET_SETTINGS = frozenset({"sasl_password"})


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str = ENVIRONMENT["bootstrap_servers"][1]
    images_topic: str = ENVIRONMENT["images_topic"][1]
    features_topic: str = ENVIRONMENT["features_topic"][1]
    labels_topic: str = ENVIRONMENT["labels_topic"][1]
    dead_letter_topic: str = ENVIRONMENT["dead_letter_topic"][1]
    featurizer_group: str = ENVIRONMENT["featurizer_group"][1]
    scorer_group: str = ENVIRONMENT["scorer_group"][1]
    data_dir: str = ENVIRONMENT["data_dir"][1]
    registry_dir: str = ENVIRONMENT["registry_dir"][1]
    cache_dir: str = ENVIRONMENT["cache_dir"][1]
    model: str = ENVIRONMENT["model"][1]
    metrics_port: str = ENVIRONMENT["metrics_port"][1]
    metrics_addr: str = ENVIRONMENT["metrics_addr"][1]
    max_message_bytes: str = ENVIRONMENT["max_message_bytes"][1]
    offline: str = ENVIRONMENT["offline"][1]
    security_protocol: str = ENVIRONMENT["security_protocol"][1]
    sasl_mechanism: str = ENVIRONMENT["sasl_mechanism"][1]
    sasl_username: str = ENVIRONMENT["sasl_username"][1]
    sasl_password: str = field(default=ENVIRONMENT["sasl_password"][1], repr=False)
    ssl_cafile: str = ENVIRONMENT["ssl_cafile"][1]
    ssl_certfile: str = ENVIRONMENT["ssl_certfile"][1]
    ssl_keyfile: str = ENVIRONMENT["ssl_keyfile"][1]

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
            config["sasl_plain_password"] = self.sasl_password
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
