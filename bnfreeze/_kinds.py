"""What a layer is, for bnfreeze: a BatchNormalization? phase-dependent? pinned, and how?

The questions every other module asks about one layer, answered in one place. Pinned
layers (see ``_layers``) are instances of generated subclasses registered here with the
class they were made from; their mode is kept on the instance. A layer locked by
``freeze(..., lock=True)`` keeps its locked ``trainable`` value on the instance too; a
locked layer that is not pinned (a Conv2D) is an instance of a generated *lock-only*
subclass. A container that carries its parts' freeze through saving (see ``_apply``) is
an instance of a generated subclass too, registered here as well but neither pinned nor
locking. Nothing else reads or writes any of these.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any, Literal, NamedTuple

from bnfreeze._compat import BN_BASE, Model, training_matters_only_for_float8
from bnfreeze._errors import UnsupportedLayerError

_ORIGINAL: dict[type, type] = {}  # generated class -> the class it was made from
_PINNING: set[type] = set()  # the generated classes that pin a layer
_LOCKING: set[type] = set()  # the generated lock-only classes (locked, not pinned)
_MODE_ATTR = "_bnfreeze_mode"
_KEPT_ACTIVE_ATTR = "_bnfreeze_kept_active"
_LOCK_ATTR = "_bnfreeze_locked"

#: What a generated class does: pin a layer, only lock it, or carry a container's freeze.
GeneratedKind = Literal["pin", "lock", "carrier"]


def is_batch_norm(layer: Any) -> bool:
    """True for BatchNormalization and its subclasses in the installed flavour."""
    return isinstance(layer, BN_BASE)


def register_generated_class(generated: type, original: type, *, kind: GeneratedKind) -> None:
    """Record that ``generated`` was made from ``original``: the pinned form of a layer
    (``"pin"``), the lock-only form of a layer (``"lock"``) or a container carrying its
    parts' freeze (``"carrier"``)."""
    _ORIGINAL[generated] = original
    if kind == "pin":
        _PINNING.add(generated)
    elif kind == "lock":
        _LOCKING.add(generated)


def original_class(layer: Any) -> Any:
    """The class ``layer`` had before it was pinned (its own class when not pinned)."""
    return _ORIGINAL.get(type(layer), type(layer))


def is_pinned(layer: Any) -> bool:
    """True when ``layer`` was pinned by bnfreeze."""
    return type(layer) in _PINNING


def is_lock_only(layer: Any) -> bool:
    """True when ``layer`` is of a generated lock-only class (locked, not pinned)."""
    return type(layer) in _LOCKING


class PinState(NamedTuple):
    """Everything bnfreeze may set on a layer but its ``trainable`` flag."""

    cls: type
    mode: Any
    kept_active: bool
    lock: bool | None  # the locked ``trainable`` value, None when not locked


def pin_state(layer: Any) -> PinState:
    """Everything bnfreeze may set on ``layer`` but its ``trainable`` flag: its class, its
    pinned mode, its kept-active mark and its lock (for undoing a failed freeze)."""
    return PinState(
        type(layer), layer.__dict__.get(_MODE_ATTR), is_kept_active(layer), locked_value(layer)
    )


def restore_pin_state(layer: Any, state: PinState) -> None:
    """Put back what :func:`pin_state` returned."""
    if type(layer) is not state.cls:
        layer.__class__ = state.cls
    if state.mode is None:
        layer.__dict__.pop(_MODE_ATTR, None)
    elif layer.__dict__.get(_MODE_ATTR) != state.mode:
        set_pinned_mode(layer, state.mode)
    mark_kept_active(layer, state.kept_active)
    set_locked_value(layer, state.lock)


def locked_value(layer: Any) -> bool | None:
    """The ``trainable`` value ``layer`` is locked at, or ``None`` when it is not locked."""
    value = layer.__dict__.get(_LOCK_ATTR)
    return None if value is None else bool(value)


def is_locked(layer: Any) -> bool:
    """True when ``freeze(..., lock=True)`` locked ``layer``'s ``trainable`` flag."""
    return locked_value(layer) is not None


def set_locked_value(layer: Any, value: bool | None) -> None:
    """Lock ``layer``'s ``trainable`` flag at ``value`` (``None``: lift the lock). Only
    the instance attribute: the class that honours it is ``_layers``' business."""
    if value is None:
        layer.__dict__.pop(_LOCK_ATTR, None)
    else:
        object.__setattr__(layer, _LOCK_ATTR, bool(value))


def pinned_mode(layer: Any) -> str | None:
    """The pinned mode of ``layer`` (a ``bn_mode`` for BN, ``"inference"`` otherwise)."""
    if not is_pinned(layer):
        return None
    return str(getattr(layer, _MODE_ATTR))


def set_pinned_mode(layer: Any, mode: str) -> None:
    """Store ``mode`` on a pinned layer."""
    setattr(layer, _MODE_ATTR, mode)


def clear_pinned_mode(layer: Any) -> None:
    """Remove the stored mode (when a layer is unpinned)."""
    try:
        delattr(layer, _MODE_ATTR)
    except AttributeError:  # pragma: no cover - Keras 3 tracking may refuse deletion
        object.__delattr__(layer, _MODE_ATTR)


def mark_kept_active(layer: Any, kept: bool) -> None:
    """Record (or clear) that ``freeze(..., keep_dropout=True)`` left ``layer`` active in a
    frozen part on purpose. Not saved with the model."""
    if kept:
        object.__setattr__(layer, _KEPT_ACTIVE_ATTR, True)
    else:
        layer.__dict__.pop(_KEPT_ACTIVE_ATTR, None)


def is_kept_active(layer: Any) -> bool:
    """True when ``freeze(..., keep_dropout=True)`` left ``layer`` active on purpose."""
    return bool(layer.__dict__.get(_KEPT_ACTIVE_ATTR, False))


@cache
def _class_takes_training(cls: type) -> bool:
    call = getattr(cls, "call", None)
    if call is None:
        return False
    try:
        return "training" in inspect.signature(call).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False


def depends_on_phase(layer: Any) -> bool:
    """True when the layer's ``call`` takes ``training`` (and it is not a model).

    Keras 3's Dense and EinsumDense take ``training`` only for float8 quantized training;
    unless they are float8-quantized they do not count.
    """
    if isinstance(layer, Model) or training_matters_only_for_float8(layer):
        return False
    return _class_takes_training(original_class(layer))


def overridden_phase_method(layer: Any) -> str | None:
    """The BN method a custom subclass overrides that bnfreeze relies on, or ``None``.

    bnfreeze decides a BatchNormalization's statistics through Keras's own ``call``
    (and tf-keras's ``_get_training_value``); a subclass outside Keras that overrides
    one of them may use other statistics, so freeze and recalibrate refuse it.
    """
    base = original_class(layer)
    for name in ("call", "_get_training_value"):
        for klass in base.__mro__:
            if name in vars(klass):
                module = klass.__module__ or ""
                if not module.startswith(("keras.", "tf_keras.", "bnfreeze.")):
                    return name
                break
    return None


def check_supported_batch_norm(path: str, layer: Any) -> None:
    """Raise :class:`UnsupportedLayerError` for a BN variant bnfreeze cannot vouch for."""
    method = overridden_phase_method(layer)
    if method is None:
        return
    raise UnsupportedLayerError(
        f"Layer {path!r} is a {original_class(layer).__name__}, a BatchNormalization variant "
        f"that overrides `{method}`, so bnfreeze cannot vouch for which statistics it uses. "
        "Expected keras.layers.BatchNormalization (or a subclass that only changes its "
        "constructor or config). Leave it out of `layers=` (for example with a predicate), "
        "or replace it with a standard BatchNormalization."
    )


def check_recalibratable(path: str, layer: Any) -> None:
    """Raise :class:`UnsupportedLayerError` for a BN whose statistics recalibrate cannot
    compute: the variants :func:`check_supported_batch_norm` refuses, and tf-keras's ghost
    batch normalization (``virtual_batch_size``), whose moving statistics are kept per
    virtual batch."""
    check_supported_batch_norm(path, layer)
    virtual = getattr(layer, "virtual_batch_size", None)
    if virtual is None:
        return
    raise UnsupportedLayerError(
        f"Layer {path!r} is a BatchNormalization with virtual_batch_size={virtual} (ghost "
        "batch normalization), whose moving statistics are averages over virtual batches, "
        "so recalibrate cannot compute them exactly. Expected BatchNormalization layers "
        "without virtual_batch_size. Leave it out of `layers=` (for example "
        "layers=lambda layer: getattr(layer, 'virtual_batch_size', None) is None)."
    )
