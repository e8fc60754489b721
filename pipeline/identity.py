"""What identifies a feature vector, and the one check that refuses to mix vectors.

Two vectors can be compared (trained on together, scored by one classifier, served from one
cache entry) only if the same network made them the same way: same backbone, compute
precision, weights, layer and size, and the same preprocessing. :class:`FeatureId` holds those
facts once; every place that stores or compares them goes through it:

===================  ===================================================================
Parquet metadata     :meth:`FeatureId.to_parquet_metadata` / :meth:`from_parquet_metadata`
registry JSON        :meth:`FeatureId.to_json` / :meth:`from_json` (``model.json``'s ``features``)
feature records      :meth:`FeatureId.to_record_header` / :meth:`from_record_header`, :meth:`from_record`
feature cache        :meth:`FeatureId.cache_key`
the check            :meth:`FeatureId.check_compatible` -> :class:`IncompatibleFeatures`
===================  ===================================================================

Precision is a field of its own (``fp32`` by default). Before it was, it rode on the backbone
name as ``efficientnet_lite0@bf16``; that legacy form is still accepted everywhere a backbone
name is read (old Parquet files, registry versions, records, and ``FeatureId("name@bf16", ...)``)
and still used where a single name must carry both (:attr:`FeatureId.qualified_name`: display,
the cache key, so existing cache entries stay valid). New files, registry versions and records
store the plain backbone name plus an explicit ``precision``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from pipeline.errors import IncompatibleFeatures
from schemas import parquet as ps

#: The compute precision a backbone runs at unless told otherwise (``pipeline.model.precision``
#: names them all; it lives here so that the identity, a core floor, needs nothing of the model).
DEFAULT_PRECISION = "fp32"

#: Separates backbone and precision in the legacy combined name (``efficientnet_lite0@bf16``).
PRECISION_SEPARATOR = "@"


def split_backbone(name: str, precision: str | None = None) -> tuple[str, str]:
    """``("efficientnet_lite0@bf16", None)`` -> ``("efficientnet_lite0", "bf16")``.

    A suffix and an explicit non-default ``precision`` that disagree are refused: one of them
    is wrong and guessing would mix vectors.
    """
    base, sep, suffix = name.partition(PRECISION_SEPARATOR)
    explicit = precision or DEFAULT_PRECISION
    if not sep:
        return name, explicit
    if not base or not suffix:
        raise IncompatibleFeatures(f"backbone name {name!r} is not NAME or NAME{PRECISION_SEPARATOR}PRECISION")
    if explicit not in (DEFAULT_PRECISION, suffix):
        raise IncompatibleFeatures(f"backbone {name!r} says precision {suffix} but precision {explicit} is recorded")
    return base, suffix


@dataclass(frozen=True)
class FeatureId:
    """What made a set of vectors; vectors whose ids are not compatible are never mixed.

    ``backbone`` is the plain network name (a legacy ``name@precision`` is split on
    construction). ``preprocessing`` is descriptive: it is compared only when both sides
    record one (feature records and old files may not).
    """

    backbone: str
    weights_digest: str
    layer: str
    dim: int
    preprocessing: str = ""
    precision: str = DEFAULT_PRECISION

    def __post_init__(self) -> None:
        backbone, precision = split_backbone(self.backbone, self.precision)
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "precision", precision)
        object.__setattr__(self, "dim", int(self.dim))

    # -- names -----------------------------------------------------------------------------
    @property
    def qualified_name(self) -> str:
        """``efficientnet_lite0`` for fp32, else ``efficientnet_lite0@bf16``: one string naming
        both (what ``load_backbone`` accepts, and the legacy recorded form)."""
        if self.precision == DEFAULT_PRECISION:
            return self.backbone
        return f"{self.backbone}{PRECISION_SEPARATOR}{self.precision}"

    def describe(self) -> str:
        return f"{self.qualified_name}/{self.layer} (dim {self.dim}, weights {self.weights_digest[:12]})"

    # -- the check --------------------------------------------------------------------------
    def differences(self, other: "FeatureId") -> list[str]:
        """Each field that differs, as ``"layer logits vs prelogits"`` (empty: compatible)."""
        out = []
        for name in ("backbone", "precision", "weights_digest", "layer", "dim", "preprocessing"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "preprocessing" and not (mine and theirs):
                continue
            if mine != theirs:
                if name == "weights_digest":
                    mine, theirs = mine[:12], theirs[:12]
                out.append(f"{name.replace('_digest', '')} {mine} vs {theirs}")
        return out

    def check_compatible(self, other: "FeatureId", what: str = "") -> None:
        """Raise :class:`IncompatibleFeatures` naming every difference if the two ids differ.

        ``what`` names the two sides for the message, e.g. ``"a.parquet and b.parquet"``.
        """
        problems = self.differences(other)
        if problems:
            raise IncompatibleFeatures(
                f"cannot mix features{f' ({what})' if what else ''}: {'; '.join(problems)} "
                f"[{self.describe()} vs {other.describe()}]; re-featurize with one backbone, precision and layer")

    # -- Parquet ----------------------------------------------------------------------------
    def to_parquet_metadata(self) -> dict[bytes, bytes]:
        values = {
            ps.META_SCHEMA_VERSION: ps.SCHEMA_VERSION,
            ps.META_BACKBONE: self.backbone,
            ps.META_PRECISION: self.precision,
            ps.META_WEIGHTS_DIGEST: self.weights_digest,
            ps.META_LAYER: self.layer,
            ps.META_DIM: str(self.dim),
            ps.META_PREPROCESSING: self.preprocessing,
        }
        return {k.encode(): v.encode() for k, v in values.items()}

    @classmethod
    def from_parquet_metadata(cls, metadata: Mapping[bytes, bytes] | None, where: str = "") -> "FeatureId":
        """The id of a feature file; files without ``deeper.precision`` (older ones) are fp32
        unless their backbone carries a ``@precision`` suffix."""
        md = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
        where = where or "file"
        if ps.META_BACKBONE not in md:
            raise IncompatibleFeatures(f"{where} is not a go-deeper feature file (no {ps.META_BACKBONE} metadata)")
        version = md.get(ps.META_SCHEMA_VERSION)
        if version not in ps.READS:
            raise IncompatibleFeatures(f"{where}: schema version {version}, this go-deeper reads "
                                       f"{', '.join(sorted(ps.READS))}")
        try:
            return cls(md[ps.META_BACKBONE], md[ps.META_WEIGHTS_DIGEST], md[ps.META_LAYER], int(md[ps.META_DIM]),
                       md.get(ps.META_PREPROCESSING, ""), md.get(ps.META_PRECISION) or DEFAULT_PRECISION)
        except (KeyError, ValueError) as exc:
            raise IncompatibleFeatures(f"{where}: feature metadata incomplete or invalid ({exc})") from None

    # -- registry JSON ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FeatureId":
        """From ``to_json`` output, or an older registry's (no ``precision``; maybe ``name@bf16``).
        Raises ``KeyError``/``ValueError``/``TypeError`` for a malformed mapping."""
        return cls(str(data["backbone"]), str(data["weights_digest"]), str(data["layer"]), int(data["dim"]),
                   str(data.get("preprocessing") or ""), str(data.get("precision") or DEFAULT_PRECISION))

    # -- feature records (the features topic's JSON header) -----------------------------------
    def to_record_header(self) -> dict[str, Any]:
        """The header keys a feature record carries for its id (preprocessing is not sent)."""
        return {"backbone": self.backbone, "precision": self.precision, "weights_digest": self.weights_digest,
                "layer": self.layer, "dim": self.dim}

    @classmethod
    def from_record_header(cls, header: Mapping[str, Any]) -> "FeatureId":
        """From a record's JSON header; an older record (``backbone`` maybe ``name@bf16``, no
        ``precision`` key) reads as before."""
        return cls(str(header["backbone"]), str(header["weights_digest"]), str(header["layer"]), int(header["dim"]),
                   "", str(header.get("precision") or DEFAULT_PRECISION))

    @classmethod
    def from_record(cls, record: Any) -> "FeatureId":
        """From a decoded ``schemas.messages.FeatureRecord``: its precision is a field when the
        schema has one, else the ``precision`` header key (kept in ``record.extra``)."""
        precision = getattr(record, "precision", None) or (getattr(record, "extra", None) or {}).get("precision")
        return cls(record.backbone, record.weights_digest, record.layer, record.dim, "",
                   str(precision or DEFAULT_PRECISION))

    # -- feature cache ----------------------------------------------------------------------
    def cache_key(self) -> str:
        """The feature cache's key. Its format predates the precision field (which then rode
        on the backbone name), so entries cached before stay valid."""
        return f"{self.qualified_name}|{self.weights_digest}|{self.layer}|{self.dim}"
