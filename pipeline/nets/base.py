"""The contract every backbone network fulfils.

Modelled on TF-Slim's ``nets/``: one module per network, a factory that maps a name to a
network, and every layer exposed as a named end point. A :class:`Backbone` is a *loaded*
network (weights restored, graph built once) that turns a float batch into a dict of end
points. Everything downstream (featurizer, Parquet writer, classifier registry) only sees
this interface, so adding a network never touches the streaming code.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from importlib import resources
from typing import Mapping, Sequence

import numpy as np


def imagenet_class_names(with_background: bool) -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the standard (sorted-synset) order.

    TF-Slim's checkpoints have 1001 outputs: index 0 is ``background`` and index i is
    standard class i-1. The list ships with the package (taken from torchvision's
    BSD-3-licensed ``_IMAGENET_CATEGORIES``) because it cannot be downloaded here.
    """
    text = resources.files("pipeline.nets").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line for line in text.splitlines() if line)
    assert len(names) == 1000, f"imagenet_classes.txt has {len(names)} names, expected 1000"
    return (("background",) + names) if with_background else names


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about a network: what the factory knows before any weights load."""

    name: str
    image_size: int
    num_classes: int
    #: end point name -> size of its vector once flattened (the layers users may pick).
    end_points: Mapping[str, int]
    #: a short human-readable description of the preprocessing, stored in Parquet metadata.
    preprocessing: str
    #: where the weights come from (URL or package), for docs and error messages.
    weights_source: str
    default_layer: str = "logits"
    aliases: Mapping[str, str] = field(default_factory=dict)

    def resolve_layer(self, layer: str) -> str:
        """Map ``logits``/``prelogits`` aliases to real end point names; reject unknown ones."""
        real = self.aliases.get(layer, layer)
        if real not in self.end_points:
            known = sorted(set(self.end_points) | set(self.aliases))
            raise ValueError(f"{self.name} has no layer {layer!r}; choose one of: {', '.join(known)}")
        return real


class Backbone(abc.ABC):
    """A loaded, frozen network.

    Subclasses build their graph once in ``__init__`` and reuse it for every batch; building
    per call would re-create (random) variables with TF-Slim.
    """

    info: BackboneInfo
    #: sha256 of the weights file actually loaded, recorded with every vector.
    weights_digest: str
    class_names: tuple[str, ...]

    @abc.abstractmethod
    def preprocess(self, image):  # tf.Tensor uint8 [H, W, 3] -> tf.Tensor float32 [S, S, 3]
        """TF ops turning one decoded RGB image into the network's input (runs inside tf.data)."""

    @abc.abstractmethod
    def run(self, batch: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Run a preprocessed batch ``float32 [N, S, S, 3]``; return ``{layer: float32 [N, dim]}``.

        ``layers`` are real end point names (see :meth:`BackboneInfo.resolve_layer`); each
        result is flattened to 2-D.
        """

    @property
    def name(self) -> str:
        return self.info.name
