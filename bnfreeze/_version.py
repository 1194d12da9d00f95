"""The package's version, and the Keras flavour the environment asks for: both known
without importing Keras, so that ``bnfreeze --version`` answers at once."""

from __future__ import annotations

import os

__version__ = "0.2.0.dev0"


def wants_tf_keras() -> bool:
    """``TF_USE_LEGACY_KERAS`` asks for tf-keras (``1``, ``true`` or ``yes``)."""
    return os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in ("1", "true", "yes")
