"""Per-variable learning-rate multipliers: the one home of the rule.

**Where they live.** On the model, as ``{variable key: multiplier}`` (the key: the
owning layer's path in the model and the variable's name, see :func:`variable_keys`),
an attribute set past Keras's tracking, so it is no weight and no dependency. A model holding
multipliers *carries* them through saving the way a container carries a freeze
(``_apply``'s carriers): its class is swapped for the generated carrier subclass of the
same name, registered as ``"bnfreeze>FrozenContainer"``, whose saved form gets an entry
``"lr_multipliers": {"version": 1, "values": {path: multiplier}}``; loading it (after
``import bnfreeze``) rebuilds the model and puts the table back before anything else.
A multiplier of 1 is no entry: a model without multipliers keeps its own class.

**How they apply.** :func:`apply_to` installs them on the optimizer a model is compiled
with (the innermost one of a wrapper such as ``LossScaleOptimizer``). The carrier's
``make_train_function`` calls it before every train function is made, so a model that was
loaded, compiled again or given its multipliers before ``compile`` trains with them with
no further call; :func:`set_multipliers` calls it for a compiled model and makes the
train function again when the traced step must change.

**What they do.** The learning rate of each listed variable is multiplied (never the
gradient: for Adam they differ), in its update and in decoupled weight decay. On Keras 3
a multiplier of 0 pauses the variable exactly: it is left out of the step altogether (no
update, no slot change, no weight decay, and its gradient does not enter
``global_clipnorm``). tf-keras's optimizers get the learning rate multiplied by 0 (the
variable does not move; its slots still see its gradient).

Keras 3 calls ``update_step(gradient, variable, learning_rate)`` per variable on the
TensorFlow backend (under ``tf.distribute`` too), which is where a nonzero multiplier
scales the learning rate it is given (a scalar variable per entry, so a change of value
needs no new trace). On JAX the multiplier is a constant of the traced step (a new
value makes the train function again). PyTorch's built-in optimizers update all
variables in one ``torch._foreach_*`` call that never reads ``update_step``: while a
nonzero multiplier is set, that call runs once per multiplier value, with the learning
rate scaled (``Nadam``, whose call advances shared state, steps variable by variable);
without one, the parallel path is untouched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real
from typing import Any

from bnfreeze._apply import CARRIED, Carried, update_carrier
from bnfreeze._compat import (
    IS_TF_KERAS,
    backend_name,
    keras,
    learning_rate_attribute,
    torch_parallel_optimizer,
)
from bnfreeze._errors import ArgumentError, ArgumentTypeError, SavedFormatError
from bnfreeze._optim import chain, refusal, variable_scope
from bnfreeze._walk import walk

#: Version of the saved ``"lr_multipliers"`` record.
FORMAT_VERSION = 1
_RECORD_KEY = "lr_multipliers"
_MODEL_ATTR = "_bnfreeze_lr_multipliers"  # {variable path: float}, on the model
_OPT_ATTR = "_bnfreeze_lr_table"  # _Table, on the innermost optimizer


def variable_keys(model: Any) -> dict[int, str]:
    """``id(variable) -> key`` for every variable a layer of ``model`` creates as
    trainable: the layer's path in ``model`` and the variable's own name
    (``"block/conv/kernel"``). Unlike Keras's ``variable.path``, which depends on the name
    scope the variable was created in, the key is the same after ``load_model``.

    A layer the walk treats as one unit (a Transformer block, an attention layer) may
    hold sublayers of its own: their variables are keyed under the unit's path by the
    part of their own path (or name) that follows the unit's name
    (``"encoder/transformer_layer_0/self_attention/query/kernel"``).
    """
    keys: dict[int, str] = {}
    attribute = "_trainable_weights" if IS_TF_KERAS else "_trainable_variables"
    for node in walk(model):
        layer = node.layer
        for variable in getattr(layer, attribute, None) or []:
            keys.setdefault(id(variable), f"{node.path}/{_own_name(variable)}")
        if node.is_container:
            continue
        flatten = getattr(layer, "_flatten_layers", None)
        inner = list(flatten(include_self=False, recursive=True)) if flatten else []
        for sub in inner:
            for variable in getattr(sub, attribute, None) or []:
                if id(variable) not in keys:
                    keys[id(variable)] = f"{node.path}/{_relative_name(variable, layer.name)}"
    return keys


def _own_name(variable: Any) -> str:
    return str(variable.name).split("/")[-1].split(":")[0]


def _relative_name(variable: Any, unit: str) -> str:
    full = str(getattr(variable, "path", None) or variable.name).split(":")[0]
    parts = full.split("/")
    if unit in parts[:-1]:
        index = len(parts) - 1 - parts[::-1].index(unit)
        return "/".join(parts[index + 1 :])
    return full


def stored(model: Any) -> dict[str, float]:
    """The multipliers held by ``model`` (a copy), keyed by variable path."""
    return dict(vars(model).get(_MODEL_ATTR) or {})


def multipliers(model: Any) -> dict[str, float]:
    """The multiplier of every trainable variable of ``model`` that has one."""
    table = stored(model)
    keys = variable_keys(model)
    found = {}
    for variable in model.trainable_weights:
        path = keys.get(id(variable))
        if path in table:
            found[path] = table[path]
    return found


def check_multiplier(value: Any, received: str, *, name: str = "lr_multiplier") -> float:
    """``value`` as a float >= 0, or an ``ArgumentError`` saying what was received."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ArgumentTypeError(
            f"Expected `{name}` to be a float >= 0 or a callable(epochs_since_unfreezing)"
            f" -> float. Received: {received.format(value)}."
        )
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        shown = received.format(value)
        if len(shown) > 120:
            shown = shown[:100] + f"... ({len(str(value))} digits)"
        raise ArgumentError(f"Expected `{name}` to be a finite float >= 0. Received: {shown}.")
    return number


def set_multipliers(model: Any, mapping: Mapping[str, float], *, replace: bool = False) -> bool:
    """Give ``model`` the multipliers ``mapping`` (``{variable path: float >= 0}``, merged
    into what it holds unless ``replace``); 1 removes an entry. Validates first.

    A compiled model's optimizer gets them at once, and its train function is made again
    when the traced step must change (inside ``fit`` too: it takes effect from the next
    step). Returns whether the traced step had to change.
    """
    checked = {
        str(path): check_multiplier(value, f"{{!r}} for {path!r}")
        for path, value in mapping.items()
    }
    table = {} if replace else stored(model)
    table.update(checked)
    table = {path: value for path, value in table.items() if value != 1.0}
    object.__setattr__(model, _MODEL_ATTR, table)
    update_carrier(model)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or refusal(optimizer) is not None:
        return False
    changed = apply_to(optimizer, model)
    if changed and getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    return changed


# --- saving ------------------------------------------------------------------------------


def _record(model: Any) -> Any:
    table = vars(model).get(_MODEL_ATTR)
    if not table:
        return None
    return {"version": FORMAT_VERSION, "values": dict(table)}


def _restore(model: Any, record: Any) -> None:
    version = record.get("version") if isinstance(record, dict) else None
    if version != FORMAT_VERSION or not isinstance(record.get("values"), dict):
        raise SavedFormatError(
            f"Cannot load the learning-rate multipliers of {getattr(model, 'name', model)!r}: "
            f"they were saved in format version {version!r}, and this bnfreeze reads format "
            f"version {FORMAT_VERSION}. Install the bnfreeze version that saved the model "
            "(or a newer one) to load it."
        )
    values = {str(k): float(v) for k, v in record["values"].items()}
    object.__setattr__(model, _MODEL_ATTR, values)


def install(model: Any) -> None:
    """Give the optimizer ``model`` is compiled with the multipliers it holds (if any)."""
    optimizer = getattr(model, "optimizer", None)
    if (vars(model).get(_MODEL_ATTR) or _installed(optimizer)) and refusal(optimizer) is None:
        changed = apply_to(optimizer, model)
        if changed and getattr(model, "train_function", None) is not None:
            model.train_function = None  # traced with other scaled or paused variables


def _installed(optimizer: Any) -> bool:
    return optimizer is not None and _OPT_ATTR in vars(chain(optimizer)[-1])


CARRIED.append(Carried(_RECORD_KEY, _record, _restore, install))


# --- on the optimizer ------------------------------------------------------------------


class _Table:
    """What the patched optimizer reads while a step is traced."""

    def __init__(self) -> None:
        self.scales: dict[Any, Any] = {}  # variable key -> scalar variable (nonzero)
        self.paused: set[Any] = set()  # variable keys with multiplier 0
        self.holders: dict[str, Any] = {}  # variable path -> its scalar variable

    def structure(self) -> tuple[frozenset[Any], frozenset[Any]]:
        constants = {(k, v) for k, v in self.scales.items() if isinstance(v, float)}
        return frozenset([*self.scales, *constants]), frozenset(self.paused)


def apply_to(optimizer: Any, model: Any) -> bool:
    """Make ``optimizer`` use ``model``'s multipliers from its next traced step.

    Returns whether a train function traced before must be made again (the set of scaled
    or paused variables changed; a changed value of a scaled one is read at every step).
    """
    inner = chain(optimizer)[-1]
    table = _table(inner)
    before = table.structure()
    values = stored(model)
    keys = variable_keys(model)
    scales: dict[Any, Any] = {}
    paused: set[Any] = set()
    for variable in model.weights:
        path = keys.get(id(variable))
        value = None if path is None else values.get(path)
        if path is None or value is None:
            continue
        key = inner._var_key(variable)
        if value == 0.0 and not IS_TF_KERAS:
            paused.add(key)
            continue
        if backend_name() != "tensorflow":
            scales[key] = value  # a constant of the trace: a new value needs a new one
            continue
        holder = table.holders.get(path)
        if holder is None:
            holder = table.holders[path] = _scalar(model, value)
        else:
            holder.assign(value)
        scales[key] = holder
    table.scales, table.paused = scales, paused
    return table.structure() != before


def _scalar(model: Any, value: float) -> Any:
    import tensorflow as tf

    with variable_scope(model):
        return tf.Variable(value, dtype=tf.float32, trainable=False)


def _table(opt: Any) -> _Table:
    table: _Table | None = vars(opt).get(_OPT_ATTR)
    if table is not None:
        return table
    table = _Table()
    # Set past the optimizer's attribute tracking: nothing here is optimizer state to
    # save (the model holds the multipliers) or a dependency to checkpoint.
    object.__setattr__(opt, _OPT_ATTR, table)
    _patch(opt, table)
    return table


def _patch(opt: Any, table: _Table) -> None:
    update_step = opt.update_step
    apply_weight_decay = opt._apply_weight_decay

    def scaled_update_step(gradient: Any, variable: Any, *args: Any) -> Any:
        scale = table.scales.get(opt._var_key(variable))
        if scale is None:
            return update_step(gradient, variable, *args)
        if args:  # Keras 3 passes the learning rate in
            return update_step(gradient, variable, _times(args[0], scale), *args[1:])
        with _reading_scaled_learning_rate(opt, scale):  # tf-keras reads self.learning_rate
            return update_step(gradient, variable)

    def scaled_weight_decay(variables: Sequence[Any]) -> Any:
        if not getattr(opt, "weight_decay", None):
            return apply_weight_decay(variables)  # no decay: nothing to scale
        groups: dict[Any, tuple[Any, list[Any]]] = {}
        plain = []
        for variable in variables:
            scale = table.scales.get(opt._var_key(variable))
            if scale is None:
                plain.append(variable)
            else:
                # One group per scalar variable (TensorFlow) or per value (a constant).
                key = scale if isinstance(scale, float) else id(scale)
                groups.setdefault(key, (scale, []))[1].append(variable)
        if not groups:
            return apply_weight_decay(variables)
        if plain:
            apply_weight_decay(plain)
        for scale, group in groups.values():
            with _reading_scaled_learning_rate(opt, scale):
                apply_weight_decay(group)
        return None

    object.__setattr__(opt, "update_step", scaled_update_step)
    object.__setattr__(opt, "_apply_weight_decay", scaled_weight_decay)
    if IS_TF_KERAS:
        return
    apply_gradients = opt._backend_apply_gradients

    def pausing_apply_gradients(grads: Sequence[Any], variables: Sequence[Any]) -> Any:
        if not table.paused:
            return apply_gradients(grads, variables)
        kept = [
            (g, v)
            for g, v in zip(grads, variables, strict=True)
            if opt._var_key(v) not in table.paused
        ]
        if not kept and not getattr(opt, "use_ema", False):
            return None
        return apply_gradients([g for g, _ in kept], [v for _, v in kept])

    object.__setattr__(opt, "_backend_apply_gradients", pausing_apply_gradients)
    sequential = _sequential_update_step(type(opt))
    if sequential is not None:
        update_all = opt._backend_update_step
        nadam = getattr(keras.optimizers, "Nadam", None)
        # Nadam's parallel step advances its shared ``u_product``: once per step only.
        one_call_per_step = nadam is not None and isinstance(opt, nadam)

        def grouped_update_step(grads: Any, variables: Any, learning_rate: Any) -> Any:
            if not table.scales:
                return update_all(grads, variables, learning_rate)
            if one_call_per_step:
                return sequential(opt, grads, variables, learning_rate)
            groups: dict[float, tuple[list[Any], list[Any]]] = {}
            for gradient, variable in zip(grads, variables, strict=True):
                scale = table.scales.get(opt._var_key(variable), 1.0)
                group = groups.setdefault(scale, ([], []))
                group[0].append(gradient)
                group[1].append(variable)
            for scale, (group_grads, group_variables) in groups.items():
                rate = learning_rate if scale == 1.0 else _times(learning_rate, scale)
                update_all(group_grads, group_variables, rate)
            return None

        object.__setattr__(opt, "_backend_update_step", grouped_update_step)


def _sequential_update_step(cls: type) -> Any:
    """PyTorch: the per-variable ``_backend_update_step`` that the class's parallel one
    (all variables in one ``torch._foreach_*`` update, which never calls ``update_step``)
    stands in front of, or ``None`` on other backends and for optimizers without one.

    While multipliers are set, the parallel step runs once per multiplier value over the
    variables of that value, with the learning rate scaled (it reads each variable's
    slots by index and the shared ``iterations``, so a subset is fine). ``Nadam``'s
    advances its shared ``u_product`` at every call: it takes the per-variable path, which
    calls ``update_step`` for each variable (the multiplier scales the learning rate
    there) after the class's own once-per-step ``_backend_update_step``.
    """
    parallel = torch_parallel_optimizer()
    if parallel is None or not issubclass(cls, parallel):
        return None
    for klass in cls.__mro__:
        if "_backend_update_step" in vars(klass) and not issubclass(klass, parallel):
            return vars(klass)["_backend_update_step"]
    return None


def _times(learning_rate: Any, scale: Any) -> Any:
    if isinstance(scale, float):  # a constant (JAX)
        return keras.ops.multiply(learning_rate, scale)
    import tensorflow as tf

    value = tf.convert_to_tensor(learning_rate)
    return value * tf.cast(scale, value.dtype)


@contextlib.contextmanager
def _reading_scaled_learning_rate(opt: Any, scale: Any) -> Iterator[None]:
    """Inside the block (a trace), ``opt.learning_rate`` reads ``learning_rate * scale``.

    The attribute the flavour's ``learning_rate`` property returns holds, for the block,
    a tensor of the scaled value (a schedule object itself stays where it is, so code
    asking whether the learning rate is a schedule or callable gets the same answer).
    """
    name = learning_rate_attribute(opt)
    scaled = _times(opt.learning_rate, scale)
    saved = vars(opt)[name]
    object.__setattr__(opt, name, scaled)
    try:
        yield
    finally:
        object.__setattr__(opt, name, saved)
