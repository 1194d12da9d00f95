"""Which Keras is this: the only module that imports a Keras flavour by name (the
functional graph's internals, which differ the same way, are read in `_nodes`; what
differs between Keras 3's backends is `_backend`'s, re-exported here).

bnfreeze follows the same rule as TensorFlow's own ``tf.keras``: with the environment
variable ``TF_USE_LEGACY_KERAS=1`` set before import, it works on tf-keras (Keras 2);
otherwise on Keras 3 (``import keras``). Everything that differs between keras 3.15,
3.16 and tf-keras is decided here, once, at import time, without side effects.
"""

from __future__ import annotations

import contextlib
from typing import Any

from bnfreeze._version import wants_tf_keras

IS_TF_KERAS: bool = wants_tf_keras()

if IS_TF_KERAS:  # pragma: no cover - depends on the flavour under test
    import tf_keras as keras
    from tf_keras.src.layers.normalization.batch_normalization import (
        BatchNormalizationBase as _BNBase,
    )
    from tf_keras.src.saving import object_registration as _registration

    _CUSTOM_NAMES: dict[Any, str] = _registration._GLOBAL_CUSTOM_NAMES
    from tf_keras.src.engine import base_layer_utils as _base_layer_utils
    from tf_keras.src.engine.functional import Functional as FUNCTIONAL
else:
    import keras
    from keras.src.models.functional import Functional as FUNCTIONAL
    from keras.src.saving import object_registration as _registration

    _BNBase = keras.layers.BatchNormalization
    _CUSTOM_NAMES = _registration.GLOBAL_CUSTOM_NAMES

# `_backend` takes `keras` and `IS_TF_KERAS` from this module: imported once they exist.
from bnfreeze._backend import (  # noqa: E402
    backend_name,
    current_stateless_scope,
    flatten,
    is_tensorflow_backend,
    map_structure,
    pack_sequence_as,
    predict_twin,
    require_tensorflow_backend,
    same_structure,
    scaled_and_shifted,
    squared_in_place,
    stateless_scope,
    strategy_of,
    symbolic_pass,
    symbolic_spec,
    to_numpy,
    torch_parallel_optimizer,
)

__all__ = [
    "BN_BASE",
    "FLAVOUR",
    "FUNCTIONAL",
    "FLOAT8_TRAINING_ONLY",
    "HONOURS_GRAPH_TRAINING",
    "IS_TF_KERAS",
    "KERAS_VERSION",
    "Layer",
    "Model",
    "OPTIMIZER_BUILT",
    "OPTIMIZER_INDEX",
    "backend_name",
    "flatten",
    "is_tensorflow_backend",
    "map_structure",
    "pack_sequence_as",
    "predict_twin",
    "same_structure",
    "scaled_and_shifted",
    "squared_in_place",
    "current_stateless_scope",
    "symbolic_pass",
    "symbolic_spec",
    "bn_branch_decided_upfront",
    "bn_cast_dtype",
    "bn_uses_batch_statistics",
    "compiled_loss_value",
    "created_trainable_variables",
    "defer_optimizer_slots",
    "direct_sublayers",
    "fit_trainable_state",
    "fit_trainable_variables",
    "flavour_label",
    "forget_optimizer_children",
    "forward_state_variables",
    "has_compiled_loss",
    "is_foreign_keras_object",
    "keras",
    "learning_phase_default",
    "learning_rate_attribute",
    "recreating_live_layers",
    "register_serialized_name",
    "require_tensorflow_backend",
    "reset_compiled_functions",
    "restore_backup_into_layout",
    "set_optimizer_attribute",
    "run_updates_even_if_frozen",
    "stateless_scope",
    "undefer_optimizer_slots",
    "strategy_of",
    "tf_variable",
    "to_numpy",
    "torch_parallel_optimizer",
    "trainer_forward",
    "training_matters_only_for_float8",
    "untrack_optimizer_variable",
    "variable_path",
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
    """Make the next ``fit``/``evaluate``/``predict`` see what bnfreeze just changed.

    Drops the cached train/test/predict functions so they are traced again. tf-keras also
    records every layer's ``trainable`` flag at ``compile()`` and puts those flags back
    during ``fit`` (``RespectCompiledTrainableState``), which would silently undo a
    ``freeze`` made after ``compile``; that record is brought up to date as well.
    """
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            with contextlib.suppress(AttributeError):  # read-only on exotic models
                setattr(model, attr, None)
    if IS_TF_KERAS and getattr(model, "_is_compiled", False):
        get_state = getattr(model, "_get_trainable_state", None)
        if callable(get_state) and hasattr(model, "_compiled_trainable_state"):
            # As compile() does it: without attribute tracking (a WeakKeyDictionary).
            object.__setattr__(model, "_compiled_trainable_state", get_state())


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


# --- how fit, evaluate and predict call a model, and what they use ---------------------------


def trainer_forward(model: Any, inputs: Any, *, training: bool) -> Any:
    """Call ``model`` on ``inputs`` exactly as ``fit`` (``training=True``) or ``evaluate``
    and ``predict`` (``training=False``) call it in this flavour's train/test/predict step.

    Keras 3 leaves ``training`` out for a model whose ``call`` does not take it; tf-keras
    always passes it (and drops it itself, KERAS_FACTS fact 4).
    """
    if IS_TF_KERAS or getattr(model, "_call_has_training_arg", True):
        return model(inputs, training=training)
    return model(inputs)


def fit_trainable_state(model: Any) -> Any:
    """A context in which ``trainable`` flags are those ``fit`` would use now.

    tf-keras's ``fit`` applies the flags recorded at ``compile()``
    (``RespectCompiledTrainableState``); Keras 3 uses the current flags (a cached train
    function keeps its traced behaviour, see :func:`fit_trainable_variables`).
    """
    if IS_TF_KERAS and _tf_keras_compiled_state(model) is not None:
        from tf_keras.src.engine import training_utils

        return training_utils.RespectCompiledTrainableState(model)
    return contextlib.nullcontext()


def _tf_keras_compiled_state(model: Any) -> Any:
    """tf-keras: the trainable flags recorded by ``compile()`` (``None`` before compile;
    tf-keras also fills the record at construction, which ``fit`` never uses)."""
    if not getattr(model, "_is_compiled", False):
        return None
    return getattr(model, "_compiled_trainable_state", None)


def fit_trainable_variables(model: Any) -> tuple[list[Any], str]:
    """The variables the next ``fit`` step would train, and where that set comes from.

    Keras 3 on TensorFlow and JAX: once ``fit`` has traced its train function, the
    function and the optimizer keep the set of trainable variables of that moment (until
    ``compile()`` again; on JAX a ``fit`` with a changed set fails); otherwise, and always
    on PyTorch (its train step reads the current flags), the current set. tf-keras: the
    flags recorded at ``compile()``.
    """
    if IS_TF_KERAS:
        if _tf_keras_compiled_state(model) is None:
            return list(model.trainable_weights), "current"
        with fit_trainable_state(model):
            return list(model.trainable_weights), "compile"
    optimizer = getattr(model, "optimizer", None)
    if (
        backend_name() != "torch"
        and getattr(model, "train_function", None) is not None
        and optimizer is not None
        and getattr(optimizer, "built", False)
        and getattr(optimizer, "_trainable_variables", None) is not None
    ):
        return list(optimizer._trainable_variables), "train_function"
    return list(model.trainable_variables), "current"


def variable_path(variable: Any) -> str:
    """A readable unique-ish name of a variable (``"dense/kernel"``)."""
    path = getattr(variable, "path", None)
    if isinstance(path, str):
        return path
    name = str(getattr(variable, "name", variable))
    return name[:-2] if name.endswith(":0") else name


def forward_state_variables(model: Any) -> list[Any]:
    """Every variable a forward pass or a loss computation may change.

    The model's variables (Keras 3 includes its layers' seed-generator states), its
    metrics' variables and Keras 3's global seed generator.
    """
    found: list[Any] = []
    seen: set[int] = set()

    def add(variables: Any) -> None:
        for v in variables or []:
            if id(v) not in seen:
                seen.add(id(v))
                found.append(v)

    add(model.variables)
    if IS_TF_KERAS:
        for metric in getattr(model, "metrics", []) or []:
            add(metric.variables)
        compiled_loss = getattr(model, "compiled_loss", None)
        for metric in getattr(compiled_loss, "metrics", []) or []:
            add(metric.variables)
    else:
        with contextlib.suppress(Exception):  # metrics not built yet
            add(model.metrics_variables)
        from keras.src.backend.common import global_state

        generator = global_state.get_global_attribute("global_seed_generator")
        if generator is not None:
            add([generator.state])
    return found


def tf_variable(variable: Any) -> Any:
    """The TensorFlow variable behind a Keras variable (Keras 3 wraps one; tf-keras is one)."""
    if IS_TF_KERAS:
        return variable
    return getattr(variable, "value", variable)


def recreating_live_layers() -> Any:
    """A context for re-creating layers from the configs of live layers in memory.

    Keras 3 refuses to deserialize a ``Lambda`` layer's Python lambda outside an unsafe
    scope (a guard against code in untrusted files); a config taken from the caller's own
    model in memory comes from no file, so the guard is lifted for the block. tf-keras
    re-creates them anyway.
    """
    if IS_TF_KERAS:
        return contextlib.nullcontext()
    from keras.src.saving.serialization_lib import SafeModeScope

    return SafeModeScope(False)


def bn_uses_batch_statistics(layer: Any, training: Any) -> bool:
    """Whether a BatchNormalization call receiving ``training`` takes the batch branch.

    Keras 3: ``training and self.trainable`` (a pinned layer decides by its mode, see
    ``_layers``); tf-keras: the layer's own ``_get_training_value``. Call it inside the
    call (a trace), so ``trainable`` is what the caller sees at that moment.
    """
    if IS_TF_KERAS:
        value = layer._get_training_value(training)
        if isinstance(value, bool):
            return value
        return isinstance(value, int) and bool(value)
    return bool(training) and bool(layer.trainable)


def compiled_loss_value(model: Any, x: Any, y: Any, y_pred: Any, *, training: bool) -> Any:
    """The loss ``fit`` (``training=True``) or ``evaluate`` reports for one batch.

    Runs the model's own ``compute_loss`` (compiled loss plus the losses the last call
    added, e.g. regularizers); it may update loss-metric variables, which the caller
    restores. Returns ``None`` when the model is not compiled.
    """
    if IS_TF_KERAS:
        if getattr(model, "compiled_loss", None) is None:
            return None
        return model.compute_loss(x, y, y_pred, None)
    if getattr(model, "_compile_loss", None) is None:
        return None
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=None, training=training)


def bn_branch_decided_upfront(layer: Any, cls: Any) -> bool:
    """True for a BatchNormalization of class ``cls`` (its class before bnfreeze pinned it)
    whose ``call`` is the flavour's own, without options that change how its batch branch
    runs (renorm, synchronized, virtual batches, adjustment): its branch is decided before
    any op (``bn_uses_batch_statistics``), and the batch branch always writes both moving
    statistics (unless the layer itself is frozen, when tf-keras skips them -- but then it
    never takes that branch).
    """
    if IS_TF_KERAS:
        return (
            cls.call is _BNBase.call
            and cls._get_training_value is _BNBase._get_training_value
            and not getattr(layer, "renorm", False)
            and getattr(layer, "virtual_batch_size", None) is None
            and getattr(layer, "adjustment", None) is None
            and not getattr(layer, "synchronized", False)
        )
    builtin = keras.layers.BatchNormalization
    return (
        cls.call is builtin.call
        and cls._moments is builtin._moments
        and not getattr(layer, "renorm", False)
        and not getattr(layer, "synchronized", False)
    )


def has_compiled_loss(model: Any) -> bool:
    """Whether ``model`` was compiled with a loss (what ``compiled_loss_value`` uses)."""
    if IS_TF_KERAS:
        return getattr(model, "compiled_loss", None) is not None
    return getattr(model, "_compile_loss", None) is not None


def bn_cast_dtype(layer: Any) -> str:
    """The dtype a BatchNormalization's ``call`` casts integer or boolean inputs to.

    Keras 3 casts to ``result_type(inputs.dtype, "float32")``, float32 for every integer
    type; tf-keras to the layer's compute dtype (float16 under a mixed-precision policy).
    """
    return str(layer.compute_dtype) if IS_TF_KERAS else "float32"


# --- how a built optimizer records the variables it updates ---------------------------------

#: The attribute that says an optimizer is built.
OPTIMIZER_BUILT: str = "_built" if IS_TF_KERAS else "built"
#: The attribute holding a built optimizer's ``{variable key: index}`` table (the index
#: into its per-variable slot lists).
OPTIMIZER_INDEX: str = "_index_dict" if IS_TF_KERAS else "_trainable_variables_indices"


def learning_rate_attribute(optimizer: Any) -> str:
    """The attribute ``optimizer.learning_rate`` returns when it holds no schedule or
    callable: ``_learning_rate``; tf-keras keeps a schedule there and returns its value
    of the step from ``_current_learning_rate``."""
    if IS_TF_KERAS:
        schedule = keras.optimizers.schedules.LearningRateSchedule
        if isinstance(vars(optimizer).get("_learning_rate"), schedule):
            return "_current_learning_rate"
    return "_learning_rate"


def set_optimizer_attribute(optimizer: Any, name: str, value: Any) -> None:
    """Set ``optimizer.<name>`` as the optimizer's own ``build`` does.

    Keras 3 builds without automatic tracking (its list of model variables must not
    become optimizer variables; slots are tracked when created); tf-keras tracks the
    attribute, which is how its checkpoints find the slot lists.
    """
    if IS_TF_KERAS:
        setattr(optimizer, name, value)
        return
    from keras.src.utils.tracking import DotNotTrackScope

    with DotNotTrackScope():
        setattr(optimizer, name, value)


def created_trainable_variables(layer: Any) -> list[Any]:
    """The variables ``layer`` and its sublayers created as trainable: what it trains
    once ``trainable`` is true again, whatever the flags say now (Keras 3 clears a frozen
    layer's variables' own ``trainable`` flag; tf-keras leaves it)."""
    attribute = "_trainable_weights" if IS_TF_KERAS else "_trainable_variables"
    found: list[Any] = []
    seen: set[int] = set()
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        for variable in getattr(sub, attribute, None) or []:
            if id(variable) not in seen:
                seen.add(id(variable))
                found.append(variable)
    return found


def untrack_optimizer_variable(optimizer: Any, variable: Any) -> None:
    """Remove ``variable`` from ``optimizer.variables`` (what it saves and restores)."""
    if not IS_TF_KERAS:
        optimizer._untrack_variable(variable)
        return
    for i, known in enumerate(optimizer._variables):
        if known is variable:
            del optimizer._variables[i]
            return


#: What a tf-keras optimizer's checkpoint keeps while its slots are deferred.
_KEPT_OPTIMIZER_CHILDREN = ("_iterations", "_learning_rate", "_index_dict")


def defer_optimizer_slots(optimizer: Any) -> bool:
    """tf-keras: leave ``optimizer``'s list of variables and its slot lists out of its
    checkpoint children (``iterations`` and the learning rate stay), so that a TensorFlow
    checkpoint restored now defers their values (kept by the optimizer, by name) instead
    of assigning them by position to a layout that is not the saved one. Whether it did
    (``False`` on Keras 3). :func:`undefer_optimizer_slots` undoes it."""
    if not IS_TF_KERAS or not hasattr(optimizer, "_trackable_children"):
        return False
    children = optimizer._trackable_children()  # tf-keras caches what it returns
    kept = {k: v for k, v in children.items() if k in _KEPT_OPTIMIZER_CHILDREN}
    object.__setattr__(optimizer, "_coalesced_children", kept)  # past tracking
    return True


def undefer_optimizer_slots(optimizer: Any) -> None:
    """tf-keras: drop the restores deferred while :func:`defer_optimizer_slots` held, and
    let the optimizer list all its checkpoint children again."""
    deferred = getattr(optimizer, "_self_unconditional_deferred_dependencies", None)
    if isinstance(deferred, dict):
        for name in [n for n in deferred if n not in _KEPT_OPTIMIZER_CHILDREN]:
            del deferred[name]
    forget_optimizer_children(optimizer)


def forget_optimizer_children(optimizer: Any) -> None:
    """tf-keras caches an optimizer's checkpoint children at its first save; drop the
    cache after its slot lists were replaced, so the next save lists the new ones."""
    if IS_TF_KERAS:
        vars(optimizer).pop("_coalesced_children", None)


def restore_backup_into_layout(model: Any) -> bool:
    """tf-keras: load again the checkpoint a running ``BackupAndRestore`` loaded when
    ``fit`` started (its ``model._training_state``), if the optimizer's variables now have
    the count and shapes of the saved ones; whether it was loaded.

    tf-keras restores a TensorFlow checkpoint, whose optimizer slots are matched by their
    position in ``optimizer._variables``, when ``fit`` starts: before the ``Unfreeze``
    stages of the interrupted run give the optimizer the layout that was saved. Keras 3
    holds the values instead (`_optim.hold_unmatched_loads`): ``False`` there.
    """
    state: Any = getattr(model, "_training_state", None) if IS_TF_KERAS else None
    manager = getattr(state, "read_checkpoint_manager", None)
    if manager is None:
        return False
    path = manager.latest_checkpoint
    if _STARTED_FROM_ATTR not in vars(state):  # the first call in this fit: before any save
        setattr(state, _STARTED_FROM_ATTR, path)
    # Only the checkpoint this fit started from, once: a later one holds what the model
    # and its optimizer hold already.
    if not path or path != getattr(state, _STARTED_FROM_ATTR) or vars(state).get(_RESTORED_ATTR):
        return False
    import re

    import tensorflow as tf

    pattern = re.compile(r"^model/optimizer/_variables/(\d+)/\.ATTRIBUTES/VARIABLE_VALUE$")
    saved: dict[int, tuple[int, ...]] = {}
    for name, shape in tf.train.list_variables(path):
        found = pattern.match(name)
        if found:
            saved[int(found.group(1))] = tuple(shape)
    variables = list(model.optimizer.variables)
    own = {i: tuple(v.shape) for i, v in enumerate(variables) if i in saved or i > 0}
    if not saved or own != saved:
        return False
    state.restore()
    setattr(state, _RESTORED_ATTR, True)  # (a new state each fit)
    return True


_STARTED_FROM_ATTR = "_bnfreeze_started_from"
_RESTORED_ATTR = "_bnfreeze_restored"
