"""The one table of BatchNormalization modes, read by every module.

A mode pins two things of a frozen BatchNormalization layer:

==============  =========================  ===================================  ============
``bn_mode``     statistics used by ``fit``  moving statistics updated by ``fit``  gamma/beta
==============  =========================  ===================================  ============
``"inference"``  moving                     no                                   frozen
``"affine"``     moving                     no                                   trained
``"adapt"``      batch                      yes                                  frozen
``"train"``      batch                      yes                                  trained
==============  =========================  ===================================  ============

``evaluate`` and ``predict`` always use the moving statistics.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from bnfreeze._errors import ModeError

BNMode = Literal["inference", "affine", "adapt", "train"]

#: The mode bnfreeze gives the phase-dependent layers (Dropout, noise, augmentation,
#: RNN dropout, ...) of a frozen part: they behave as at inference during ``fit``.
PINNED_INFERENCE = "inference"


@dataclass(frozen=True)
class ModeSpec:
    """What one ``bn_mode`` means."""

    name: str
    batch_statistics: bool
    """``fit`` normalises with the batch's statistics and updates the moving ones."""
    trains_affine: bool
    """gamma/beta receive gradient updates (the layer is left ``trainable``)."""
    summary: str


MODES: dict[str, ModeSpec] = {
    "inference": ModeSpec(
        "inference", False, False, "moving statistics, nothing updated, gamma/beta frozen"
    ),
    "affine": ModeSpec("affine", False, True, "moving statistics, gamma/beta trained"),
    "adapt": ModeSpec(
        "adapt", True, False, "batch statistics, moving statistics updated, gamma/beta frozen"
    ),
    "train": ModeSpec(
        "train", True, True, "batch statistics, moving statistics updated, gamma/beta trained"
    ),
}

MODE_NAMES: tuple[str, ...] = tuple(MODES)


def check_mode(value: object, *, argument: str = "bn_mode") -> ModeSpec:
    """Return the spec of ``value`` or raise :class:`ModeError` naming what was received.

    >>> check_mode("adapt").batch_statistics
    True
    >>> check_mode("infer")
    Traceback (most recent call last):
    ...
    bnfreeze._errors.ModeError: Expected `bn_mode` to be one of ('inference', 'affine', 'adapt', 'train'). Received: bn_mode='infer'. Did you mean 'inference'?
    """
    if isinstance(value, str) and value in MODES:
        return MODES[value]
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value.lower(), MODE_NAMES, n=1, cutoff=0.5)
        if close:
            hint = f" Did you mean {close[0]!r}?"
    raise ModeError(
        f"Expected `{argument}` to be one of {MODE_NAMES}. Received: {argument}={value!r}.{hint}"
    )
