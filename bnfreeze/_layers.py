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
"mode": ...}``; loading a saved model after ``import bnfreeze`` rebuilds the original
layer and pins it again. ``unpin`` restores the original class, so the layer's
``get_config()`` is again exactly what it was.
"""

from __future__ import annotations

import inspect
from typing import Any

from bnfreeze._compat import (
    BN_BASE,
    IS_TF_KERAS,
    keras,
    learning_phase_default,
    register_serialized_name,
    run_updates_even_if_frozen,
)
from bnfreeze._modes import MODES, PINNED_INFERENCE
from bnfreeze._walk import is_batch_norm

REGISTERED_NAME = "bnfreeze>Frozen"
_GENERATED: dict[type, type] = {}


def is_pinned(layer: Any) -> bool:
    """True when ``layer`` was pinned by bnfreeze."""
    return getattr(type(layer), "_bnfreeze_base", None) is not None


def pinned_mode(layer: Any) -> str | None:
    """The pinned mode of ``layer`` (a ``bn_mode`` for BN, ``"inference"`` otherwise)."""
    if not is_pinned(layer):
        return None
    return str(layer._bnfreeze_mode)


def original_class(layer: Any) -> Any:
    """The class ``layer`` had before it was pinned (its own class when not pinned)."""
    base = getattr(type(layer), "_bnfreeze_base", None)
    return base if base is not None else type(layer)


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


def pin(layer: Any, mode: str) -> None:
    """Pin ``layer`` in ``mode`` in place (idempotent; switches the mode when pinned)."""
    cls = _generated_class(original_class(layer))
    if type(layer) is not cls:
        layer.__class__ = cls
    layer._bnfreeze_mode = mode


def unpin(layer: Any) -> None:
    """Return ``layer`` to its original class (no-op when it is not pinned)."""
    if not is_pinned(layer):
        return
    layer.__class__ = original_class(layer)
    try:
        del layer._bnfreeze_mode
    except AttributeError:  # pragma: no cover - Keras 3 tracking may refuse deletion
        object.__delattr__(layer, "_bnfreeze_mode")


# --- the generated classes ----------------------------------------------------------


def _frozen_get_config(self: Any) -> dict[str, Any]:
    base: Any = original_class(self)
    fresh = base.from_config(base.get_config(self))
    return {
        "name": self.name,
        "trainable": self.trainable,
        "mode": self._bnfreeze_mode,
        "layer": keras.layers.serialize(fresh),
    }


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


def _bn_members(base: Any) -> dict[str, Any]:
    if IS_TF_KERAS:

        def _get_training_value(self: Any, training: Any = None) -> Any:
            if not MODES[self._bnfreeze_mode].batch_statistics:
                return False
            if training is None:
                training = learning_phase_default()
            if isinstance(training, int):
                training = bool(training)
            return training

        def add_update(self: Any, updates: Any) -> None:
            if MODES[self._bnfreeze_mode].batch_statistics:
                run_updates_even_if_frozen(updates)
            else:
                base.add_update(self, updates)

        return {"_get_training_value": _get_training_value, "add_update": add_update}

    def call(self: Any, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if not (MODES[self._bnfreeze_mode].batch_statistics and training):
            return base.call(self, inputs, training=False, mask=mask)
        if self.trainable:
            return base.call(self, inputs, training=True, mask=mask)
        return _batch_statistics_call_keras3(self, inputs, mask)

    return {"call": call}


def _inference_members(base: Any) -> dict[str, Any]:
    signature = inspect.signature(base.call)
    params = list(signature.parameters)
    position = params.index("training") - 1 if "training" in params else None

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if position is not None and len(args) > position:
            args = (*args[:position], False, *args[position + 1 :])
        else:
            kwargs["training"] = False
        return base.call(self, *args, **kwargs)

    call.__signature__ = signature  # type: ignore[attr-defined]
    call.__doc__ = base.call.__doc__
    return {"call": call}


def _generated_class(base: type) -> type:
    cls = _GENERATED.get(base)
    if cls is not None:
        return cls
    members: dict[str, Any] = {
        "_bnfreeze_base": base,
        "get_config": _frozen_get_config,
        "__module__": __name__,
        "__doc__": f"{base.__name__} pinned by bnfreeze (see bnfreeze.freeze).",
    }
    if issubclass(base, BN_BASE):
        members.update(_bn_members(base))
    else:
        members.update(_inference_members(base))
    # The generated class keeps its base's name: Keras names saved variables after the
    # class of a layer held in a list (``model.layers``), so weight files of frozen and
    # unfrozen models stay interchangeable. ``is_pinned`` and ``audit`` tell them apart.
    members["__qualname__"] = base.__qualname__
    cls = type(base.__name__, (base,), members)
    register_serialized_name(cls, REGISTERED_NAME)
    _GENERATED[base] = cls
    return cls


@keras.saving.register_keras_serializable(package="bnfreeze", name="Frozen")
class Frozen:
    """Loads layers saved while pinned by bnfreeze: rebuilds the original layer, pins it."""

    def get_config(self) -> dict[str, Any]:  # pragma: no cover - never instantiated
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Any:
        layer = keras.layers.deserialize(config["layer"], custom_objects=custom_objects)
        mode = config["mode"]
        if is_batch_norm(layer):
            if mode not in MODES:
                raise ValueError(f"Unknown bn_mode {mode!r} in a saved bnfreeze layer config.")
        elif mode != PINNED_INFERENCE:
            raise ValueError(f"Unknown pinned mode {mode!r} in a saved bnfreeze layer config.")
        pin(layer, mode)
        return layer
