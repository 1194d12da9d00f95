"""Exceptions. Each subclasses a built-in so existing ``except ValueError`` handlers work."""

from __future__ import annotations


class BNFreezeError(ValueError):
    """Base class of bnfreeze's errors about arguments and models."""


class ModeError(BNFreezeError):
    """An unknown ``bn_mode`` (or other mode string)."""


class SelectionError(BNFreezeError):
    """A layer selector that is malformed or matches nothing."""


class ModelError(BNFreezeError, TypeError):
    """Not a Keras model of the installed flavour, or not built."""


class UnsupportedLayerError(BNFreezeError, TypeError):
    """A BatchNormalization variant whose statistics bnfreeze cannot pin."""


class FindingsError(BNFreezeError):
    """Raised by ``AuditReport.raise_for_findings`` when an audit has findings."""


class DataError(BNFreezeError):
    """``data`` given to ``recalibrate`` is empty, malformed or cannot be read as needed."""
