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

from pipeline.model.precision import DEFAULT_PRECISION


def imagenet_class_names(with_background: bool) -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the standard (sorted-synset) order.

    TF-Slim's checkpoints have 1001 outputs: index 0 is ``background`` and index i is
    standard class i-1. The list ships with the package (taken from torchvision's
    BSD-3-licensed ``_IMAGENET_CATEGORIES``) because it cannot be downloaded here.
    """
    text = resources.files("pipeline.model.nets").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line for line in text.splitlines() if line)
    assert len(names) == 1000, f"imagenet_classes.txt has {len(names)} names, expected 1000"
    return (("background",) + names) if with_background else names


#: Joins end points in a multi-level layer spec, e.g. ``prelogits+block_14+block_15``.
LEVEL_SEPARATOR = "+"


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
    #: spatial end point -> number of positions (H*W) in its (H, W, C)-flattened vector; what a
    #: multi-level spec average-pools over. End points not listed are vectors already.
    positions: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # ``end_points[spec]`` also answers for multi-level specs, so code that sizes a layer
        # by lookup (inference, feature identity) takes a spec without knowing about levels.
        object.__setattr__(self, "end_points", _EndPoints(self.end_points, self))

    def resolve_layer(self, layer: str) -> str:
        """Map aliases to real end point names; reject unknown ones.

        A multi-level spec (``prelogits+block_14+block_15``) resolves part by part and comes
        back joined the same way, so the resolved spec is the feature layer's recorded name.
        """
        parts = [part.strip() for part in layer.split(LEVEL_SEPARATOR)]
        real = [self.aliases.get(part, part) for part in parts]
        unknown = [part for part, name in zip(parts, real) if name not in self.end_points]
        if unknown:
            known = sorted(set(self.end_points) | set(self.aliases))
            raise ValueError(f"{self.name} has no layer {unknown[0]!r}; choose one of: {', '.join(known)} "
                             f"(or several joined with {LEVEL_SEPARATOR!r})")
        if len(set(real)) != len(real):
            raise ValueError(f"layer spec {layer!r} names the same end point twice")
        return LEVEL_SEPARATOR.join(real)

    def pooled_dim(self, end_point: str) -> int:
        """Size of one level in a multi-level spec: channels if spatial, else the vector size."""
        size = dict.__getitem__(self.end_points, end_point)
        return size // self.positions.get(end_point, 1)

    def layer_dim(self, layer: str) -> int:
        """Vector size of a resolved layer spec (one end point, or several levels)."""
        parts = levels(layer)
        if len(parts) == 1:
            return dict.__getitem__(self.end_points, parts[0])
        return sum(self.pooled_dim(part) for part in parts)


class _EndPoints(dict):
    """The end point table; a lookup of a multi-level spec gives the combined vector size."""

    def __init__(self, table: Mapping[str, int], info: BackboneInfo):
        super().__init__(table)
        self._info = info

    def __missing__(self, key: str) -> int:
        if isinstance(key, str) and LEVEL_SEPARATOR in key:
            return self._info.layer_dim(key)
        raise KeyError(key)


def levels(layer: str) -> list[str]:
    """The end points of a resolved layer spec, in spec order."""
    return layer.split(LEVEL_SEPARATOR)


def combine_levels(outputs: Mapping[str, np.ndarray], parts: Sequence[str], info: BackboneInfo) -> np.ndarray:
    """Multi-level features: each level global-average-pooled (if spatial), L2-normalised, concatenated.

    Why normalise each level: their scales differ by orders of magnitude (a ReLU6 block vs the
    head's pool), and a linear classifier on the raw concatenation would mostly see the loudest
    one. Pooling keeps the vector small (channels, not H*W*C) and position-invariant.
    """
    pooled = []
    for part in parts:
        x = np.asarray(outputs[part], dtype=np.float32)
        positions = info.positions.get(part, 1)
        if positions > 1:
            x = x.reshape(x.shape[0], positions, -1).mean(axis=1)
        pooled.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    return np.concatenate(pooled, axis=1).astype(np.float32)


class Backbone(abc.ABC):
    """A loaded, frozen network.

    Subclasses build their graph once in ``__init__`` and reuse it for every batch; building
    per call would re-create (random) variables with TF-Slim.
    """

    info: BackboneInfo
    #: sha256 of the weights file actually loaded, recorded with every vector.
    weights_digest: str
    class_names: tuple[str, ...]
    #: the numeric format it computes in (see :mod:`pipeline.model.precision`), recorded with every
    #: vector so vectors of different precisions are never mixed; networks that take a
    #: ``precision`` set their own.
    precision: str = DEFAULT_PRECISION

    #: the central part of each side the network keeps before resizing (its evaluation crop)
    central_fraction: float = 0.875

    def preprocess(self, image):  # tf.Tensor uint8 [H, W, 3] -> tf.Tensor float32 [S, S, 3]
        """TF ops turning one decoded RGB image into the network's input (runs inside tf.data):
        the central crop, then :meth:`preprocess_cropped`. Split in two so that a decoder that
        crops while it decodes (:mod:`pipeline.model.graph_decode`) can skip the first step."""
        import tensorflow as tf

        return self.preprocess_cropped(tf.image.central_crop(tf.convert_to_tensor(image), self.central_fraction))

    @abc.abstractmethod
    def preprocess_cropped(self, image):  # tf.Tensor [h, w, 3], already cropped -> float32 [S, S, 3]
        """Resize and scale an image that is already the central crop (see :meth:`preprocess`)."""

    def run(self, batch: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Run a preprocessed batch ``float32 [N, S, S, 3]``; return ``{layer: float32 [N, dim]}``.

        ``layers`` are resolved specs (see :meth:`BackboneInfo.resolve_layer`): a real end
        point name (flattened to 2-D) or several joined by ``+`` (see :func:`combine_levels`).
        The network runs once for the union of every end point asked for.
        """
        wanted = list(dict.fromkeys(part for layer in layers for part in levels(layer)))
        size = self.info.image_size
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise ValueError(f"expected a float32 batch [N, {size}, {size}, 3], got {batch.shape}")
        outputs = self._run(batch, wanted)
        return {layer: outputs[layer] if LEVEL_SEPARATOR not in layer
                else combine_levels(outputs, levels(layer), self.info) for layer in layers}

    @abc.abstractmethod
    def _run(self, batch: np.ndarray, end_points: Sequence[str]) -> dict[str, np.ndarray]:
        """Compute real end points for a preprocessed batch, each flattened to float32 [N, dim]."""

    @property
    def name(self) -> str:
        return self.info.name
