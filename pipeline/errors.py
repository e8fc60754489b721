"""Typed errors: each says what went wrong and what the user can do about it.

The CLI turns any :class:`DeeperError` into a one-line message and a non-zero exit instead of
a traceback; stream consumers turn the per-record ones into dead letters.
"""

from __future__ import annotations


class DeeperError(Exception):
    """Base class for every error a user is meant to read."""


class WeightsUnavailable(DeeperError):
    """A backbone's weights cannot be found, downloaded or verified."""


class DecodeError(DeeperError):
    """One image cannot be decoded; ``reason`` is a short machine-friendly code."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class IncompatibleFeatures(DeeperError):
    """Vectors from different backbones, weights or layers were mixed."""


class RegistryError(DeeperError):
    """A model in the registry is missing, tampered with or unreadable."""


class SchemaError(DeeperError):
    """A message or file does not match its documented schema."""
