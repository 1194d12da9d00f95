"""The one error family. Each class subclasses a built-in, so ``except ValueError`` works.

Every bad argument to a public function raises a :class:`BNFreezeError` subclass:

==========================  =============================  ==================================
class                       also a                          raised for
==========================  =============================  ==================================
``ArgumentError``           ``ValueError``                  an argument with a wrong value
``ArgumentTypeError``       ``ValueError``, ``TypeError``   an argument of the wrong type
``ModeError``               ``ValueError``                  an unknown ``bn_mode``
``SelectionError``          ``ValueError``                  a selector that is malformed or
                                                            matches nothing
``ModelError``              ``ValueError``, ``TypeError``   not a built model of this flavour
``UnsupportedLayerError``   ``ValueError``, ``TypeError``   a BN variant bnfreeze cannot pin
``DataError``               ``ValueError``                  data that cannot be used
``FindingsError``           ``ValueError``                  an audit with findings
``BackendError``            ``ValueError``                  a function that needs TensorFlow
                                                            on another Keras backend
``SavedFormatError``        ``ValueError``                  a saved pinned layer of an
                                                            unknown format version
==========================  =============================  ==================================
"""

from __future__ import annotations


class BNFreezeError(ValueError):
    """Base class of bnfreeze's errors about arguments, models and data."""


class ArgumentError(BNFreezeError):
    """An argument with a value the function cannot use (``steps=0``, ``upstream="x"``)."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type (``keep_dropout="yes"``)."""


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
    """``data`` is empty, malformed, non-finite or cannot be read as needed."""


class BackendError(BNFreezeError):
    """A function that needs Keras's TensorFlow backend was called on another backend."""


class SavedFormatError(BNFreezeError):
    """A saved pinned layer whose format version this bnfreeze does not know."""
