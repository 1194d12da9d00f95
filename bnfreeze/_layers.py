"""The pinned layers: a frozen layer's behaviour lives in the layer itself.

``pin(layer, mode)`` changes the class of ``layer`` *in place* to a generated subclass of
its own class, of the same name (so saved weight files keep their variable paths). The
instance, its name, its variables and its place in every graph stay exactly the same;
only its ``call`` now decides the learning phase itself:

* a BatchNormalization follows its ``bn_mode`` (see ``_modes``) whatever ``training``
  value and ``trainable`` flag it sees;
* any other phase-dependent layer (Dropout, noise, augmentation, RNN dropout, ...) runs
  as at inference.

Nothing is written into the surrounding graph or the shared call context, so nothing
leaks to later layers (KERAS_FACTS fact 6). Every generated class serialises under one
registered name, ``"bnfreeze>Frozen"``, as ``{"layer": <the original layer's config>,
"mode": ...}``, written from the layer as it is (never rebuilt through ``from_config``);
loading a saved model after ``import bnfreeze`` rebuilds the original layer and pins it
again, and so does ``keras.models.clone_model`` (through the generated class's
``from_config``). ``unpin`` restores the original class, so the layer's ``get_config()``
is again exactly what it was.

**Locks.** ``lock(layer, value)`` makes ``layer.trainable`` answer ``value`` whatever is
set later, on the layer or on any model above it: Keras 3's setter recurses through each
sublayer's ``trainable`` setter (which keeps the locked value and writes it to the
layer's variables again), tf-keras's writes ``_trainable`` on every nested layer
directly (so the getter answers the locked value, and ``trainable_weights`` follows it).
Every generated pinned class honours a lock; a locked layer that is not pinned (a
Conv2D) is switched to a generated *lock-only* subclass that changes nothing but its
``trainable`` property and its saved form. A locked layer saves ``"locked": true`` in
format version 2; an unlocked one still writes version 1, which older bnfreeze reads.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bnfreeze._compat import (
    BN_BASE,
    IS_TF_KERAS,
    keras,
    learning_phase_default,
    register_serialized_name,
    run_updates_even_if_frozen,
)
from bnfreeze._errors import SavedFormatError
from bnfreeze._kinds import (
    clear_pinned_mode,
    is_batch_norm,
    is_lock_only,
    is_pinned,
    locked_value,
    original_class,
    pinned_mode,
    register_generated_class,
    set_locked_value,
    set_pinned_mode,
)
from bnfreeze._modes import MODES, PINNED_INFERENCE, pinned_training, uses_batch_statistics

REGISTERED_NAME = "bnfreeze>Frozen"
#: The version of the saved form of a pinned layer; ``Frozen.from_config`` refuses others.
#: Version 1: ``{"version", "name", "trainable", "mode", "layer"}`` (bnfreeze 0.1.0 wrote
#: the same without ``"version"``).
FORMAT_VERSION = 1
#: Version 2 adds ``"locked": true`` (``"mode"`` may then be ``None``: a lock-only layer);
#: it is written only for locked layers, so files without a lock stay readable by older
#: bnfreeze, and older bnfreeze refuses a lock clearly instead of dropping it.
LOCK_FORMAT_VERSION = 2
READABLE_VERSIONS = (FORMAT_VERSION, LOCK_FORMAT_VERSION)
_GENERATED: dict[type, type] = {}
_LOCK_ONLY: dict[type, type] = {}


def pin(layer: Any, mode: str) -> None:
    """Pin ``layer`` in ``mode`` in place (idempotent; switches the mode when pinned)."""
    cls = pinned_class(original_class(layer))
    if type(layer) is not cls:
        layer.__class__ = cls
    set_pinned_mode(layer, mode)


def unpin(layer: Any) -> None:
    """Return ``layer`` to its original class, or to its lock-only class when it is locked
    (no-op when it is not pinned)."""
    if not is_pinned(layer):
        return
    base = original_class(layer)
    layer.__class__ = lock_class(base) if locked_value(layer) is not None else base
    clear_pinned_mode(layer)


def lock(layer: Any, value: bool) -> None:
    """Lock ``layer.trainable`` at ``value`` in place (a layer that is not pinned moves to
    its lock-only class); the layer's own flag and variables are set to ``value`` too."""
    if not is_pinned(layer) and not is_lock_only(layer):
        layer.__class__ = lock_class(original_class(layer))
    set_locked_value(layer, value)
    write_trainable(layer, value)


def unlock(layer: Any) -> None:
    """Lift the lock of ``layer`` (no-op when it is not locked): its ``trainable`` flag
    keeps the locked value until something sets it, and a lock-only layer returns to its
    original class."""
    value = locked_value(layer)
    if value is None:
        return
    set_locked_value(layer, None)
    if is_lock_only(layer):
        layer.__class__ = original_class(layer)
    write_trainable(layer, value)


def _base_trainable(base: type) -> property:
    """The ``trainable`` property of an original class (Keras's, or a user's)."""
    prop = getattr(base, "trainable", None)
    if not isinstance(prop, property) or prop.fget is None or prop.fset is None:
        raise TypeError(f"{base.__name__}.trainable is not a settable property")
    return prop


def write_trainable(layer: Any, value: bool) -> None:
    """Set the layer's own ``trainable`` state through its original class's setter (past
    a lock, and past Keras 3's short-cut that skips setting a value the getter shows)."""
    _base_trainable(original_class(layer)).fset(layer, bool(value))  # type: ignore[misc]


def _lock_members(base: type) -> dict[str, Any]:
    """The ``trainable`` property of a class that honours a lock."""
    prop = _base_trainable(base)

    def get_trainable(self: Any) -> bool:
        value = locked_value(self)
        return bool(prop.fget(self)) if value is None else value  # type: ignore[misc]

    def set_trainable(self: Any, value: Any) -> None:
        locked = locked_value(self)
        prop.fset(self, value if locked is None else locked)  # type: ignore[misc]

    return {"trainable": property(get_trainable, set_trainable, doc=prop.__doc__)}


#: ``on_call(layer, original_call, signature, args, kwargs) -> outputs``.
OnCall = Callable[[Any, Any, inspect.Signature, tuple[Any, ...], dict[str, Any]], Any]


@contextmanager
def intercepted(layers: Sequence[Any], on_call: OnCall) -> Iterator[None]:
    """For the duration of the block, every call of ``layers`` *made by this thread* goes
    through ``on_call``.

    The one way bnfreeze observes or temporarily replaces what a layer does (the audit's
    tracer, ``compare_phases``, ``recalibrate``'s pass): an instance attribute ``call``
    shadows the class's while any block holds the layer and is removed when the last one
    ends, whatever happens. The layer's class, config and variables are never touched
    (pinning, which must survive saving, changes the class instead: :func:`pin`).

    The thread rule: ``on_call`` sees the calls made by the thread that entered the
    block, and by the replica threads a ``tf.distribute`` strategy starts for it while
    the block is open (``MirroredStrategy.run``). A call from any other thread -- a
    serving thread calling ``predict`` or the model meanwhile -- runs the layer's own
    ``call``, as if nothing were intercepted: ``on_call`` may keep its state per thread.
    Blocks nest and may overlap across threads: within one thread the innermost block's
    ``on_call`` runs, and the ``original`` it is given is the next block's interception
    (or the layer's own ``call``).
    """
    owner = _Owner(on_call, threading.get_ident(), frozenset(threading.enumerate()))
    entered: list[Any] = []
    try:
        with _LOCK:
            for layer in layers:
                _enter(layer, owner)
                entered.append(layer)
        yield
    finally:
        with _LOCK:
            for layer in reversed(entered):
                _leave(layer, owner)


@dataclass(eq=False)
class _Owner:
    """One ``intercepted`` block: its ``on_call``, the thread that entered it and the
    threads already running then (never its replica threads)."""

    on_call: OnCall
    thread: int
    before: frozenset[threading.Thread]

    def sees(self, thread: threading.Thread) -> bool:
        if thread.ident == self.thread:
            return True
        return _is_replica_thread(thread) and thread not in self.before


def _is_replica_thread(thread: threading.Thread) -> bool:
    """A thread a ``tf.distribute`` strategy runs a replica in (duck-typed, no TF import)."""
    return hasattr(thread, "replica_id_in_sync_group") and hasattr(thread, "main_fn")


@dataclass(eq=False)
class _Slot:
    """The interception of one layer: what its ``__dict__`` held before, the layer's own
    call, and the open blocks holding it (oldest first)."""

    had: Any
    own: Any
    signature: inspect.Signature
    owners: list[_Owner] = field(default_factory=list)


_LOCK = threading.RLock()
_SLOTS: dict[int, _Slot] = {}
_MISSING = object()


def _enter(layer: Any, owner: _Owner) -> None:
    slot = _SLOTS.get(id(layer))
    if slot is None:
        own = layer.call
        try:
            signature = inspect.signature(own)
        except (TypeError, ValueError):  # pragma: no cover - builtins
            signature = inspect.Signature()
        slot = _Slot(layer.__dict__.get("call", _MISSING), own, signature)
        _SLOTS[id(layer)] = slot
        object.__setattr__(layer, "call", _dispatcher(layer, slot))
    slot.owners.append(owner)


def _leave(layer: Any, owner: _Owner) -> None:
    slot = _SLOTS[id(layer)]
    slot.owners.remove(owner)
    if slot.owners:
        return
    del _SLOTS[id(layer)]
    if slot.had is _MISSING:
        layer.__dict__.pop("call", None)
    else:
        object.__setattr__(layer, "call", slot.had)


def _through_owner(owner: _Owner, layer: Any, inner: Any, signature: inspect.Signature) -> Any:
    def intercepted_call(*args: Any, **kwargs: Any) -> Any:
        return owner.on_call(layer, inner, signature, args, kwargs)

    intercepted_call.__signature__ = signature  # type: ignore[attr-defined]
    return intercepted_call


def _dispatcher(layer: Any, slot: _Slot) -> Any:
    def through(owners: list[_Owner]) -> Any:
        """The layer's call as the blocks in ``owners`` (oldest first) make it, seen from
        the calling thread."""
        thread = threading.current_thread()
        for depth in range(len(owners) - 1, -1, -1):
            owner = owners[depth]
            if owner.sees(thread):
                return _through_owner(owner, layer, through(owners[:depth]), slot.signature)
        return slot.own

    def call(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            owners = list(slot.owners)
        return through(owners)(*args, **kwargs)

    call.__signature__ = slot.signature  # type: ignore[attr-defined]
    return call


# --- the generated classes ----------------------------------------------------------


def _frozen_get_config(self: Any) -> dict[str, Any]:
    locked = locked_value(self) is not None
    config = {
        "version": LOCK_FORMAT_VERSION if locked else FORMAT_VERSION,
        "name": self.name,
        "trainable": self.trainable,
        "mode": pinned_mode(self),
        "layer": serialize_as_original(self),
    }
    if locked:
        config["locked"] = True
    return config


def serialize_as_original(obj: Any) -> dict[str, Any]:
    """``obj`` (a layer or model of a generated class) serialised exactly as Keras
    serialises it in its original class, without rebuilding it.

    Rebuilding through ``from_config`` would run the constructor again (a ``Lambda``
    refuses that in safe mode, a model may be expensive to build), so the original class
    is put back on this very object for the duration of the call. The build and compile
    entries are left out: Keras writes them once, around the bnfreeze entry. (Inside a
    saving scope Keras then sees the object serialised twice and marks the outer entry
    with a ``shared_object_id``: it is one object, and it loads as one.)
    """
    generated = type(obj)
    obj.__class__ = original_class(obj)
    try:
        config = dict(keras.layers.serialize(obj))
    finally:
        obj.__class__ = generated
    for key in ("build_config", "compile_config", "shared_object_id"):
        config.pop(key, None)
    return config


def for_any_format(config: dict[str, Any]) -> dict[str, Any]:
    """A saved object's config that loads in the legacy (``.h5``) format too: tf-keras's
    legacy loader finds a class by ``class_name`` only, so a registered class must be
    named by its registered name there (the new format looks ``registered_name`` up
    first, so it loads the same)."""
    registered = config.get("registered_name") if isinstance(config, dict) else None
    if not IS_TF_KERAS or not registered or registered == config.get("class_name"):
        return config
    return {**config, "class_name": registered}


def _frozen_from_config(cls: Any, config: dict[str, Any], custom_objects: Any = None) -> Any:
    """``type(layer).from_config(layer.get_config())``, as ``clone_model`` calls it: the
    original class rebuilds the layer from its own config (in the caller's safe-mode
    scope, exactly as for an unpinned layer), then the layer is pinned."""
    base = cls.__bases__[0]  # a generated class derives directly from its original
    if not _is_saved_form(config):
        return base.from_config(config)
    check_saved_form(config)
    with keras.saving.custom_object_scope(custom_objects or {}):
        layer = base.from_config(config["layer"]["config"])
    return _pinned_as_saved(layer, config)


def _batch_statistics_call_keras3(self: Any, inputs: Any, mask: Any) -> Any:
    """Keras 3 BatchNormalization's training branch without its ``self.trainable`` check.

    Keras 3 uses batch statistics only when ``training and self.trainable``; the
    ``adapt`` mode needs them with gamma/beta frozen (``trainable=False``).
    """
    ops = keras.ops
    if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
        raise ValueError(
            "The mask provided should be one dimension less than the inputs. "
            f"Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}"
        )
    compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
    inputs = ops.cast(inputs, compute_dtype)
    moving_mean = ops.cast(self.moving_mean, inputs.dtype)
    moving_variance = ops.cast(self.moving_variance, inputs.dtype)
    gamma = ops.cast(self.gamma, inputs.dtype) if self.scale else None
    beta = ops.cast(self.beta, inputs.dtype) if self.center else None
    mean, variance = self._moments(inputs, mask)
    if getattr(self, "renorm", False):
        r, d, mean, variance = self._renorm_correction_and_moments(mean, variance)
        gamma, beta = self._compose_transforms(r, d, gamma, beta, inputs.dtype)
        self._update_renorm_statistics(mean, variance)
    else:
        self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )
    outputs = ops.batch_normalization(
        x=inputs,
        mean=mean,
        variance=variance,
        axis=self.axis,
        offset=beta,
        scale=gamma,
        epsilon=self.epsilon,
    )
    return ops.cast(outputs, self.compute_dtype)


def _mode(layer: Any) -> str:
    return str(pinned_mode(layer))


def _bn_members(base: Any) -> dict[str, Any]:
    if IS_TF_KERAS:

        def _get_training_value(self: Any, training: Any = None) -> Any:
            if training is None:
                training = learning_phase_default()
            if isinstance(training, int):
                training = bool(training)
            return pinned_training(_mode(self), training)

        def add_update(self: Any, updates: Any) -> None:
            if MODES[_mode(self)].batch_statistics:
                run_updates_even_if_frozen(updates)
            else:
                base.add_update(self, updates)

        return {"_get_training_value": _get_training_value, "add_update": add_update}

    def call(self: Any, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if not uses_batch_statistics(_mode(self), training):
            return base.call(self, inputs, training=False, mask=mask)
        if self.trainable:
            return base.call(self, inputs, training=True, mask=mask)
        return _batch_statistics_call_keras3(self, inputs, mask)

    return {"call": call}


def _inference_members(base: Any) -> dict[str, Any]:
    signature = inspect.signature(base.call)
    params = list(signature.parameters)
    training = signature.parameters.get("training")
    # Its place among the arguments after `self`; none when it is keyword-only (after
    # `*args`, as in TorchModuleWrapper's call): then every positional one is an input.
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    position = (
        params.index("training") - 1
        if training is not None and training.kind in positional
        else None
    )

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if position is not None and len(args) > position:
            args = (*args[:position], False, *args[position + 1 :])
        else:
            kwargs["training"] = False
        return base.call(self, *args, **kwargs)

    call.__signature__ = signature  # type: ignore[attr-defined]
    call.__doc__ = base.call.__doc__
    return {"call": call}


def _saved_form_members(base: type, what: str) -> dict[str, Any]:
    """What every generated class has: the pinned layer's saved form and a docstring."""
    return {
        "get_config": _frozen_get_config,
        "from_config": classmethod(_frozen_from_config),
        "__module__": __name__,
        "__doc__": f"{base.__name__} {what} by bnfreeze (see bnfreeze.freeze).",
    }


def pinned_class(base: type) -> type:
    """The generated pinned subclass of ``base`` (made once, then cached).

    Raises whatever Python raises when ``base`` cannot be subclassed (an
    ``__init_subclass__`` that needs arguments, a final class): ``freeze`` calls it while
    planning, before changing anything.
    """
    cls = _GENERATED.get(base)
    if cls is not None:
        return cls
    members = _saved_form_members(base, "pinned")
    if issubclass(base, BN_BASE):
        members.update(_bn_members(base))
    else:
        members.update(_inference_members(base))
    members.update(_lock_members(base))
    cls = generated_subclass(base, members)
    register_serialized_name(cls, REGISTERED_NAME)
    register_generated_class(cls, base, kind="pin")
    _GENERATED[base] = cls
    return cls


def lock_class(base: type) -> type:
    """The generated lock-only subclass of ``base`` (made once, then cached): ``base``
    with a ``trainable`` that honours a lock and the saved form of a pinned layer (with
    ``"mode": None``); its ``call`` is ``base``'s own.

    Raises what Python raises when ``base`` cannot be subclassed (see `pinned_class`).
    """
    cls = _LOCK_ONLY.get(base)
    if cls is not None:
        return cls
    members = {**_saved_form_members(base, "locked"), **_lock_members(base)}
    cls = generated_subclass(base, members)
    register_serialized_name(cls, REGISTERED_NAME)
    register_generated_class(cls, base, kind="lock")
    _LOCK_ONLY[base] = cls
    return cls


def generated_subclass(base: type, members: dict[str, Any]) -> type:
    """A subclass of ``base`` with ``members``, of the same name as ``base``.

    The name is kept because Keras names saved variables after the class of a layer held
    in a list (``model.layers``): weight files of frozen and plain models stay
    interchangeable. ``is_pinned`` and ``audit`` tell them apart.
    """
    return type(base.__name__, (base,), {**members, "__qualname__": base.__qualname__})


def _is_saved_form(config: Any) -> bool:
    return isinstance(config, dict) and "layer" in config and "mode" in config


def check_saved_form(
    config: dict[str, Any], noun: str = "layer", forms: str = "pinned layers"
) -> None:
    """Raise :class:`SavedFormatError` for a saved bnfreeze entry of another format version."""
    version = config.get("version", 1)  # bnfreeze 0.1.0 wrote version 1 without the key
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise SavedFormatError(
            f"Cannot load {noun} {config.get('name')!r}: it was saved by a bnfreeze that "
            f"writes {forms} in format version {version!r}, and this bnfreeze "
            f"reads format versions {FORMAT_VERSION} and {LOCK_FORMAT_VERSION}. Install the "
            "bnfreeze version that saved the model (or a newer one) to load it."
        )


def _pinned_as_saved(layer: Any, config: dict[str, Any]) -> Any:
    if not isinstance(layer, keras.layers.Layer):
        raise SavedFormatError(
            f"Cannot load layer {config.get('name')!r}: Keras rebuilt its saved config "
            f"({config['layer'].get('class_name')!r}) as a {type(layer).__name__}, not as a "
            "layer, so bnfreeze cannot pin it again."
        )
    locked = config.get("locked", False) is True
    check_saved_mode(layer, config["mode"], locked=locked)
    if config["mode"] is not None:
        pin(layer, config["mode"])
    # Some layers' own config leaves `trainable` out (Keras 3 SpatialDropout, Pipeline).
    if "trainable" in config and bool(layer.trainable) != bool(config["trainable"]):
        layer.trainable = bool(config["trainable"])
    if locked:
        lock(layer, bool(config.get("trainable", layer.trainable)))
    return layer


def check_saved_mode(layer: Any, mode: Any, *, locked: bool = False) -> None:
    """Raise :class:`SavedFormatError` unless ``mode`` is one ``layer`` can be pinned in
    (``None``, for a layer locked and not pinned, only when ``locked``)."""
    if mode is None and locked:
        return
    if is_batch_norm(layer):
        if mode not in MODES:
            raise SavedFormatError(f"Unknown bn_mode {mode!r} in a saved bnfreeze layer config.")
    elif mode != PINNED_INFERENCE:
        raise SavedFormatError(f"Unknown pinned mode {mode!r} in a saved bnfreeze layer config.")


class SavedFormLoader:
    """Base of the classes registered for bnfreeze's saved forms: Keras calls their
    ``from_config``, which returns the rebuilt object (they are never instantiated)."""

    def get_config(self) -> dict[str, Any]:  # pragma: no cover - never instantiated
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="bnfreeze", name="Frozen")
class Frozen(SavedFormLoader):
    """Loads layers saved while pinned by bnfreeze: rebuilds the original layer, pins it."""

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Any:
        check_saved_form(config)
        layer = keras.layers.deserialize(
            for_any_format(config["layer"]), custom_objects=custom_objects
        )
        return _pinned_as_saved(layer, config)
