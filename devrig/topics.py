"""Fresh settings for one rig run, and the same settings as a worker process's environment."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from pipeline.config import Settings
from pipeline.kafka.kafka_io import ensure_topics


def fresh_settings(base: Settings, root: Path, prefix: str = "t", partitions: int = 4, **overrides: str) -> Settings:
    """Fresh topics, groups, data dir (``root/data``) and registry (``root/registry``), topics created.

    Separate groups per run are hygiene, and needed on Tansu 0.6: after a two-member group
    empties, it never answers a new member's JoinGroup (docs/broker.md).
    """
    tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
    root = Path(root)
    settings = dataclasses.replace(
        base, images_topic=f"{tag}.images", features_topic=f"{tag}.features", labels_topic=f"{tag}.labels",
        dead_letter_topic=f"{tag}.dead-letters", featurizer_group=f"{tag}.featurizer", scorer_group=f"{tag}.scorer",
        data_dir=str(root / "data"), registry_dir=str(root / "registry"), **overrides)
    ensure_topics(settings, {settings.images_topic: partitions, settings.features_topic: partitions,
                             settings.labels_topic: partitions, settings.dead_letter_topic: 1})
    return settings


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment with every field of ``settings`` as its variable (``DEEPER_*``,
    ``KAFKA_*``), so a ``deeper featurizer|scorer`` process sees exactly these settings."""
    return settings.child_env(**{"DEEPER_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **extra})
