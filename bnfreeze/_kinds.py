"""What a layer is, for bnfreeze: a BatchNormalization? phase-dependent? pinned, and how?

The questions every other module asks about one layer, answered in one place. Pinned
layers (see ``_layers``) are instances of generated subclasses registered here with the
class they were made from; their mode is kept on the instance. A container that carries
its parts' freeze through saving (see ``_apply``) is an instance of a generated subclass
too, registered here as well but not pinned. Nothing else reads or writes either.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

from bnfreeze._compat import BN_BASE, Model, training_matters_only_for_float8
from bnfreeze._errors import UnsupportedLayerError

_ORIGINAL: dict[type, type] = {}  # generated class -> the class it was made from
_PINNING: set[type] = set()  # the generated classes that pin a layer
_MODE_ATTR = "_bnfreeze_mode"
_KEPT_ACTIVE_ATTR = "_bnfreeze_kept_active"


def is_batch_norm(layer: Any) -> bool:
    """True for BatchNormalization and its subclasses in the installed flavour."""
    return isinstance(layer, BN_BASE)


def register_generated_class(generated: type, original: type, *, pins: bool) -> None:
    """Record that ``generated`` was made from ``original`` by ``_layers``: the pinned form
    of a layer (``pins=True``) or a container carrying its parts' freeze."""
    _ORIGINAL[generated] = original
    if pins:
        _PINNING.add(generated)


def original_class(layer: Any) -> Any:
    """The class ``layer`` had before it was pinned (its own class when not pinned)."""
    return _ORIGINAL.get(type(layer), type(layer))


def is_pinned(layer: Any) -> bool:
    """True when ``layer`` was pinned by bnfreeze."""
    return type(layer) in _PINNING


def pin_state(layer: Any) -> tuple[type, Any, bool]:
    """Everything bnfreeze may set on ``layer`` but its ``trainable`` flag: its class, its
    pinned mode and its kept-active mark (for undoing a failed freeze)."""
    return type(layer), layer.__dict__.get(_MODE_ATTR), is_kept_active(layer)


def restore_pin_state(layer: Any, state: tuple[type, Any, bool]) -> None:
    """Put back what :func:`pin_state` returned."""
    cls, mode, kept = state
    if type(layer) is not cls:
        layer.__class__ = cls
    if mode is None:
        layer.__dict__.pop(_MODE_ATTR, None)
    elif layer.__dict__.get(_MODE_ATTR) != mode:
        set_pinned_mode(layer, mode)
    mark_kept_active(layer, kept)


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
