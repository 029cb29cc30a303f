"""Typed exceptions. Everything CoSine raises on purpose derives from :class:`CosineError`."""

from __future__ import annotations


class CosineError(Exception):
    """Base class of every error CoSine raises on purpose."""


class InvalidParameterError(CosineError, ValueError):
    """A request or setting has a value outside its allowed range.

    ``field`` names the offending parameter so callers (and users) can tell what to fix.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelLoadError(CosineError):
    """A model could not be loaded or is incompatible with the others (e.g. vocabulary mismatch)."""


class ZooNotFoundError(ModelLoadError):
    """The demo model zoo is missing; ``cosine zoo build`` creates it."""
