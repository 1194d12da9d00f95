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

Each class's ``__module__`` is ``"bnfreeze"``, where users import it from: tracebacks print
``bnfreeze.ModeError``, and pickle finds the class there.
"""

from __future__ import annotations


class BNFreezeError(ValueError):
    """Base class of bnfreeze's errors about arguments, models and data."""

    __module__ = "bnfreeze"


class ArgumentError(BNFreezeError):
    """An argument with a value the function cannot use (``steps=0``, ``upstream="x"``)."""

    __module__ = "bnfreeze"


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type (``keep_dropout="yes"``)."""

    __module__ = "bnfreeze"


class ModeError(BNFreezeError):
    """An unknown ``bn_mode`` (or other mode string)."""

    __module__ = "bnfreeze"


class SelectionError(BNFreezeError):
    """A layer selector that is malformed or matches nothing."""

    __module__ = "bnfreeze"


class ModelError(BNFreezeError, TypeError):
    """Not a Keras model of the installed flavour, or not built."""

    __module__ = "bnfreeze"


class UnsupportedLayerError(BNFreezeError, TypeError):
    """A BatchNormalization variant whose statistics bnfreeze cannot pin."""

    __module__ = "bnfreeze"


class FindingsError(BNFreezeError):
    """Raised by ``AuditReport.raise_for_findings`` when an audit has findings."""

    __module__ = "bnfreeze"


class DataError(BNFreezeError):
    """``data`` is empty, malformed, non-finite or cannot be read as needed."""

    __module__ = "bnfreeze"


class BackendError(BNFreezeError):
    """A function that needs Keras's TensorFlow backend was called on another backend."""

    __module__ = "bnfreeze"


class SavedFormatError(BNFreezeError):
    """A saved pinned layer whose format version this bnfreeze does not know."""

    __module__ = "bnfreeze"
