"""The one table of BatchNormalization modes, read by every module.

A mode pins two things of a frozen BatchNormalization layer:

| ``bn_mode``      | statistics used by ``fit`` | moving statistics updated by ``fit`` | gamma/beta |
| ---------------- | -------------------------- | ------------------------------------ | ---------- |
| ``"inference"``  | moving                     | no                                   | frozen     |
| ``"affine"``     | moving                     | no                                   | trained    |
| ``"adapt"``      | batch                      | yes                                  | frozen     |
| ``"train"``      | batch                      | yes                                  | trained    |

``evaluate`` and ``predict`` always use the moving statistics. A later ``trainable = ...``
decides only which weights receive gradients, never which statistics a pinned BN uses.

This table is the only place the modes are defined: ``freeze``, the pinned layers, the
audit and the docs all read :data:`MODES`, and :func:`uses_batch_statistics` is the one
phase rule ("which statistics does a BN pinned in this mode use under this ``training``").
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

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
    bnfreeze.ModeError: Expected `bn_mode` to be one of ('inference', 'affine', 'adapt', 'train'). Received: bn_mode='infer'. Did you mean 'inference'?
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


def pinned_training(mode: str, training: Any) -> Any:
    """The ``training`` value a BN pinned in ``mode`` acts on when it receives ``training``.

    ``False`` (moving statistics) for the modes that keep the moving statistics, whatever
    arrives; otherwise ``training`` itself, unchanged (it may be a symbolic learning phase
    in tf-keras).

    >>> pinned_training("affine", True), pinned_training("adapt", True)
    (False, True)
    """
    return training if MODES[mode].batch_statistics else False


def uses_batch_statistics(mode: str, training: Any) -> bool:
    """The phase rule: does a BN pinned in ``mode`` normalise with batch statistics?

    >>> [uses_batch_statistics(m, True) for m in MODE_NAMES]
    [False, False, True, True]
    >>> uses_batch_statistics("train", False)
    False
    """
    return bool(pinned_training(mode, training))
