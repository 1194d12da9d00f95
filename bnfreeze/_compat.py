"""Which Keras is this: the only module that imports a Keras flavour by name.

bnfreeze follows the same rule as TensorFlow's own ``tf.keras``: with the environment
variable ``TF_USE_LEGACY_KERAS=1`` set before import, it works on tf-keras (Keras 2);
otherwise on Keras 3 (``import keras``). Everything that differs between keras 3.15,
3.16 and tf-keras is decided here, once, at import time, without side effects.
"""

from __future__ import annotations

import os
from typing import Any

_LEGACY_ENV = os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower()
IS_TF_KERAS: bool = _LEGACY_ENV in ("1", "true", "yes")

if IS_TF_KERAS:  # pragma: no cover - depends on the flavour under test
    import tf_keras as keras
    from tf_keras.src.layers.normalization.batch_normalization import (
        BatchNormalizationBase as _BNBase,
    )
    from tf_keras.src.saving import object_registration as _registration

    _CUSTOM_NAMES: dict[Any, str] = _registration._GLOBAL_CUSTOM_NAMES
    from tf_keras.src.engine import base_layer_utils as _base_layer_utils
else:
    import keras
    from keras.src.saving import object_registration as _registration

    _BNBase = keras.layers.BatchNormalization
    _CUSTOM_NAMES = _registration.GLOBAL_CUSTOM_NAMES

__all__ = [
    "BN_BASE",
    "FLAVOUR",
    "IS_TF_KERAS",
    "KERAS_VERSION",
    "keras",
]


def _parse_version(text: str) -> tuple[int, int, int]:
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


KERAS_VERSION: tuple[int, int, int] = _parse_version(keras.__version__)
FLAVOUR: str = "tf-keras" if IS_TF_KERAS else "keras"
#: The class every BatchNormalization variant of this flavour derives from.
BN_BASE: type = _BNBase
#: keras >= 3.16 honours an explicit ``training=False`` recorded in a functional graph
#: (and leaks it into the shared call context); 3.0-3.15 overwrite it.
HONOURS_GRAPH_TRAINING: bool = IS_TF_KERAS or KERAS_VERSION >= (3, 16, 0)

Layer = keras.layers.Layer
Model = keras.Model

#: Layers whose ``call`` takes ``training`` only for float8 quantized training (Keras 3).
FLOAT8_TRAINING_ONLY: tuple[type, ...] = tuple(
    getattr(keras.layers, name) for name in ("Dense", "EinsumDense") if hasattr(keras.layers, name)
)


def training_matters_only_for_float8(layer: Any) -> bool:
    """True for a Dense/EinsumDense that is not float8-quantized: ``training`` changes nothing."""
    if IS_TF_KERAS or not isinstance(layer, FLOAT8_TRAINING_ONLY):
        return False
    return getattr(layer, "quantization_mode", None) != "float8"


def flavour_label() -> str:
    """A short human label, e.g. ``"keras 3.15.1"`` or ``"tf-keras 2.21.0"``."""
    return f"{FLAVOUR} {keras.__version__}"


def direct_sublayers(layer: Any) -> list[Any]:
    """Layers tracked directly by ``layer`` (attributes, lists, dicts), in order, once each."""
    if isinstance(layer, keras.Model):
        try:
            found = list(layer.layers)
        except Exception:  # pragma: no cover - defensive: exotic models
            found = []
        if found:
            return [x for x in found if not _is_input_layer(x)]
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:  # pragma: no cover - not a Keras layer
        return []
    return [x for x in flatten(include_self=False, recursive=False) if not _is_input_layer(x)]


def _is_input_layer(layer: Any) -> bool:
    return type(layer).__name__ == "InputLayer"


def is_foreign_keras_object(obj: Any) -> str | None:
    """Name the other Keras flavour when ``obj`` is a model or layer of it, else ``None``."""
    module = type(obj).__module__ or ""
    for klass in type(obj).__mro__:
        module = klass.__module__ or ""
        if IS_TF_KERAS and module.startswith("keras.") and klass.__name__ == "Layer":
            return "Keras 3 (`import keras`)"
        if not IS_TF_KERAS and module.startswith("tf_keras.") and klass.__name__ == "Layer":
            return "tf-keras (`import tf_keras`)"
    return None


def register_serialized_name(cls: type, registered_name: str) -> None:
    """Make instances of ``cls`` serialise under ``registered_name``.

    Several generated classes share one registered name whose ``from_config`` dispatches
    on the config; Keras's public decorator refuses a second registration of a name, so
    only the class-to-name table is written here.
    """
    _CUSTOM_NAMES[cls] = registered_name


def reset_compiled_functions(model: Any) -> None:
    """Drop cached train/test/predict functions so the next call traces the new behaviour."""
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            try:
                setattr(model, attr, None)
            except AttributeError:  # pragma: no cover - read-only on exotic models
                pass


def run_updates_even_if_frozen(updates: Any) -> None:
    """tf-keras: run a layer's ``add_update`` callables even inside a non-trainable part.

    tf-keras skips them whenever any layer on the call stack has ``trainable=False``
    (``call_context().frozen``); bnfreeze's ``adapt`` mode needs them with gamma/beta frozen.
    """
    import tensorflow as tf

    if _base_layer_utils.call_context().in_keras_graph:
        return
    for update in tf.nest.flatten(updates):
        if callable(update):
            update()


def learning_phase_default() -> Any:
    """The flavour's value for ``training=None`` inside a layer's call."""
    if IS_TF_KERAS:
        return keras.backend.learning_phase()
    return False


_MISSING = object()


def _node_kwargs(node: Any) -> Any:
    if IS_TF_KERAS:
        return getattr(node, "call_kwargs", None)
    return getattr(getattr(node, "arguments", None), "kwargs", None)


def recorded_training(layer: Any) -> list[tuple[Any, Any]]:
    """``(node, value)`` for every graph node that calls ``layer`` with a recorded ``training=``."""
    found = []
    for node in getattr(layer, "_inbound_nodes", []):
        kwargs = _node_kwargs(node)
        if isinstance(kwargs, dict) and "training" in kwargs:
            found.append((node, kwargs["training"]))
    return found


def set_recorded_training(node: Any, value: Any) -> None:
    """Record ``training=value`` in ``node``'s call, or remove it when ``value`` is ``_MISSING``."""
    kwargs = dict(_node_kwargs(node))
    if value is _MISSING:
        kwargs.pop("training", None)
    else:
        kwargs["training"] = value
    if not IS_TF_KERAS:
        from keras.src.ops.symbolic_arguments import SymbolicArguments

        node.arguments = SymbolicArguments(*node.arguments.args, **kwargs)
        return
    # tf-keras caches the flattened arguments of a node; recompute them as Node.__init__ does.
    import tensorflow as tf

    node.call_kwargs = kwargs
    node._flat_arguments = tf.nest.flatten((node.call_args, node.call_kwargs.values()))
    node._single_positional_tensor_passed = (
        not node.call_kwargs and len(node.call_args) == 1 and tf.is_tensor(node.call_args[0])
    )
    inputs = [
        (i, x) for i, x in enumerate(node._flat_arguments) if any(x is k for k in node._keras_inputs)
    ]
    node._keras_inputs_ids_and_indices = [(str(id(x)), i) for i, x in inputs]


def stripped_nodes(layer: Any) -> list[Any]:
    """Nodes calling ``layer`` whose recorded ``training=`` bnfreeze removed (and remembers)."""
    return [n for n in getattr(layer, "_inbound_nodes", []) if hasattr(n, "_bnfreeze_training")]
