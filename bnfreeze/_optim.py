"""Teach a built optimizer new variables, and give some variables a scaled learning rate.

What ``callbacks.Unfreeze`` needs from an optimizer that ``fit`` has already built:

* :func:`add_variables` gives it fresh slots (momentum, Adam moments, ...) for variables
  that will start training later, **keeping every slot it has**, ``iterations`` and the
  learning rate (schedule) untouched. The optimizer's own ``build`` creates the new
  slots, for the new variables only; its per-variable lists are then joined (old + new)
  and its index table extended, exactly as one ``build`` over all the variables would
  have laid them out per variable. A scalar state that ``build`` creates once
  (``Nadam``'s ``u_product``) keeps its current value.
* :func:`scale_learning_rate` makes the optimizer use ``learning_rate * scale`` for the
  given variables: in ``update_step`` (Keras 3 passes the learning rate in, scaled here;
  tf-keras reads ``self.learning_rate``, which reads the scaled value while that one
  variable is updated) and in decoupled weight decay (``AdamW``'s ``lr * wd * w``, which
  reads ``self.learning_rate`` in both flavours). The learning
  rate is scaled, never the gradient (for Adam they differ). Variables without a scale
  run through the optimizer's own code, unchanged.

Wrappers (``LossScaleOptimizer``) are looked through: the innermost optimizer owns the
slots. ``MultiOptimizer`` and tf-keras's legacy optimizers are refused (see
:func:`refusal`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf

from bnfreeze._compat import (
    OPTIMIZER_BUILT,
    OPTIMIZER_INDEX,
    forget_optimizer_children,
    keras,
    learning_rate_attribute,
    set_optimizer_attribute,
    to_numpy,
)

_SCALES_ATTR = "_bnfreeze_lr_scales"  # {variable key: scalar tf.Variable}, on the optimizer


def chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and every optimizer it wraps (``inner_optimizer``), outermost first."""
    found = [optimizer]
    while getattr(found[-1], "inner_optimizer", None) is not None:
        found.append(found[-1].inner_optimizer)
    return found


def refusal(optimizer: Any) -> str | None:
    """Why bnfreeze cannot give ``optimizer`` new variables and per-variable learning
    rates (a phrase about "its optimizer"), or ``None`` when it can."""
    multi = getattr(keras.optimizers, "MultiOptimizer", None)
    for depth, opt in enumerate(chain(optimizer)):
        if multi is not None and isinstance(opt, multi):
            return (
                f"its optimizer {'is' if depth == 0 else 'wraps'} a MultiOptimizer, whose "
                "apply() requires a gradient for every variable it was built with, so it "
                "cannot hold slots for variables that start training later"
            )
    inner = chain(optimizer)[-1]
    if not isinstance(inner, keras.optimizers.Optimizer):
        kind = type(inner).__module__ + "." + type(inner).__name__
        legacy = " (a legacy optimizer)" if ".legacy" in kind else ""
        return (
            f"its optimizer is a {kind}{legacy}, not a keras.optimizers.Optimizer, so "
            "bnfreeze cannot add slots for new variables or scale their learning rate"
        )
    return None


def divides_by_learning_rate(optimizer: Any) -> bool:
    """Ftrl divides by its learning rate: a zero rate turns the weights into NaN."""
    ftrl = getattr(keras.optimizers, "Ftrl", None)
    return ftrl is not None and isinstance(chain(optimizer)[-1], ftrl)


def knows(optimizer: Any, variable: Any) -> bool:
    """Whether ``optimizer`` (built) has slots for ``variable``."""
    inner = chain(optimizer)[-1]
    if not bool(getattr(inner, OPTIMIZER_BUILT, False)):
        return False
    return inner._var_key(variable) in getattr(inner, OPTIMIZER_INDEX)


def relayout(optimizer: Any, variables: Sequence[Any]) -> bool:
    """Lay ``optimizer`` out exactly as one fresh ``build(variables)`` would, keeping state.

    ``variables`` are what ``fit`` trains from now on, in the model's order. A built
    optimizer is built again over them by its own ``build``; every variable it knew keeps
    its slot objects (so their values), every new one gets the slots ``build`` made for it,
    and the slots of variables no longer listed are dropped. Its per-variable lists, its
    index table, its list of variables (what saving writes, by position) and the moving
    averages (``use_ema``, paired by position) are then those of a fresh build; a state
    made once by ``build`` (``Nadam``'s ``u_product``) keeps its current object and value.
    An optimizer that is not built yet is built. Returns whether anything changed. Call
    it inside the model's distribution strategy scope.
    """
    optimizers = chain(optimizer)
    inner = optimizers[-1]
    wanted = _unique(variables)
    if not bool(getattr(inner, OPTIMIZER_BUILT, False)):
        optimizer.build(wanted)
        _load_held(optimizer)
        return True
    if _laid_out_for(inner, wanted):
        _load_held(optimizer)
        return False
    _rebuild(inner, wanted, inner.build)
    for wrapper in optimizers[:-1]:
        # A Keras 3 LossScaleOptimizer keeps its own index of the inner one's variables
        # (the base class's part of its build); tf-keras's delegates everything.
        if isinstance(getattr(wrapper, OPTIMIZER_INDEX, None), dict):
            base_build = keras.optimizers.Optimizer.build.__get__(wrapper)
            _rebuild(wrapper, wanted, base_build)
    _load_held(optimizer)
    return True


_HELD_ATTR = "_bnfreeze_held_state"  # saved optimizer values waiting for their layout


def hold_unmatched_loads(optimizer: Any) -> None:
    """Make ``optimizer`` keep saved state it cannot load yet instead of dropping it.

    Keras loads an optimizer's saved variables by position, and skips them (with a
    warning) when their number differs from its own. ``BackupAndRestore`` loads before
    the epoch at which an ``Unfreeze`` gives the optimizer the layout that was saved: the
    values are held, and :func:`relayout` loads them once the layout matches (same number
    and shapes).
    """
    if _HELD_ATTR in vars(optimizer):
        return
    object.__setattr__(optimizer, _HELD_ATTR, None)
    load_own_variables = optimizer.load_own_variables

    def holding_load_own_variables(store: Any) -> Any:
        if len(store.keys()) == len(optimizer.variables):
            object.__setattr__(optimizer, _HELD_ATTR, None)
            return load_own_variables(store)
        held = [to_numpy(store[str(i)]).copy() for i in range(len(store.keys()))]
        object.__setattr__(optimizer, _HELD_ATTR, held)
        return None

    object.__setattr__(optimizer, "load_own_variables", holding_load_own_variables)


def holds_state(optimizer: Any) -> bool:
    """Whether ``optimizer`` holds saved state waiting for its layout."""
    return vars(optimizer).get(_HELD_ATTR) is not None


def _load_held(optimizer: Any) -> None:
    held = vars(optimizer).get(_HELD_ATTR)
    if held is None:
        return
    variables = list(optimizer.variables)
    if len(variables) != len(held) or any(
        tuple(v.shape) != tuple(x.shape) for v, x in zip(variables, held, strict=True)
    ):
        return
    for variable, value in zip(variables, held, strict=True):
        variable.assign(value)
    object.__setattr__(optimizer, _HELD_ATTR, None)


def _laid_out_for(opt: Any, variables: list[Any]) -> bool:
    index = getattr(opt, OPTIMIZER_INDEX)
    keys = [opt._var_key(v) for v in variables]
    return len(index) == len(keys) and all(index.get(k) == i for i, k in enumerate(keys))


def _unique(variables: Sequence[Any]) -> list[Any]:
    seen: set[int] = set()
    found = []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            found.append(v)
    return found


def _flat_variables(value: Any) -> list[Any]:
    """The variables an optimizer attribute holds (a variable, or a list of them)."""
    if isinstance(value, list | tuple):
        return [v for v in value if _is_variable(v)]
    return [value] if _is_variable(value) else []


def _is_variable(value: Any) -> bool:
    return value is not None and hasattr(value, "assign") and hasattr(value, "shape")


def _rebuild(opt: Any, variables: list[Any], build: Any) -> None:
    """Run ``build(variables)`` on the built ``opt``, then put back the state it had."""
    before = dict(vars(opt))
    old_index = dict(getattr(opt, OPTIMIZER_INDEX))
    tracked = opt._variables
    tracked_before = list(tracked)
    known_before = {id(v) for v in tracked_before}
    set_optimizer_attribute(opt, OPTIMIZER_INDEX, {})
    set_optimizer_attribute(opt, OPTIMIZER_BUILT, False)
    try:
        build(variables)
    except BaseException:
        for name, value in before.items():
            if vars(opt).get(name) is not value:
                set_optimizer_attribute(opt, name, value)
        _replace_contents(tracked, tracked_before)
        raise
    new_index = dict(getattr(opt, OPTIMIZER_INDEX))
    created = [v for v in tracked if id(v) not in known_before]
    keep: dict[int, Any] = {}  # id(variable build just made) -> the old one standing for it
    rebuilt: set[int] = set()  # ids of the old variables the previous build had made
    for name, value in list(vars(opt).items()):
        old = before.get(name)
        if name == OPTIMIZER_INDEX or name not in before or value is old:
            continue
        rebuilt.update(id(v) for v in _flat_variables(old))
        if isinstance(old, list) and isinstance(value, list) and len(old) == len(old_index):
            # One slot per variable: the old slot object goes on for a variable it knew.
            joined = list(value)
            for variable in variables:
                key = opt._var_key(variable)
                if key in old_index and _is_variable(joined[new_index[key]]):
                    slot = old[old_index[key]]
                    if _is_variable(slot):
                        keep[id(joined[new_index[key]])] = slot
                        joined[new_index[key]] = slot
            set_optimizer_attribute(opt, name, joined)
        elif _is_variable(old) and _is_variable(value):
            keep[id(value)] = old  # made once by build (Nadam's u_product): keeps its value
            set_optimizer_attribute(opt, name, old)
    # What saving writes, by position: the state made before any build, then what one
    # build makes, in the order it made it.
    laid_out = [v for v in tracked_before if id(v) not in rebuilt]
    laid_out += [keep.get(id(v), v) for v in created]
    _replace_contents(tracked, laid_out)
    forget_optimizer_children(opt)
    new = [v for v in variables if opt._var_key(v) not in old_index]
    _start_averages(opt, new)


def _replace_contents(tracked: Any, variables: list[Any]) -> None:
    """Put ``variables`` in the optimizer's list of its variables, the list object kept
    (Keras 3's tracker holds it); past the tracking list's own methods, which compare
    variables with ``==``."""
    storage = getattr(tracked, "_storage", None)  # TensorFlow's ListWrapper
    if isinstance(storage, list):
        storage[:] = variables
        # A checkpoint (tf-keras's BackupAndRestore) saves the list as it is now.
        for flag in ("_non_append_mutation_value", "_external_modification_value"):
            if getattr(tracked, flag, False):
                object.__setattr__(tracked, flag, False)
        snapshot = getattr(tracked, "_update_snapshot", None)
        if callable(snapshot):
            snapshot()
    elif isinstance(tracked, list):
        list.__setitem__(tracked, slice(None), variables)
    else:
        tracked[:] = variables


def _start_averages(opt: Any, variables: Sequence[Any]) -> None:
    """EMA slots of variables added after the first step start at the variable's value
    (Keras 3 creates them as zeros and relies on its first step to copy the weights)."""
    averages = getattr(opt, "_model_variables_moving_average", None)
    if not getattr(opt, "use_ema", False) or not averages:
        return
    index = getattr(opt, OPTIMIZER_INDEX)
    for variable in variables:
        average = averages[index[opt._var_key(variable)]]
        if average is not None:
            average.assign(variable)


# --- per-variable learning-rate scale ----------------------------------------------------


def scale_learning_rate(optimizer: Any, variables: Sequence[Any], scale: Any) -> None:
    """From the next traced step on, ``optimizer`` uses ``learning_rate * scale`` for
    ``variables`` (``scale``: a scalar ``tf.Variable``, read at every step)."""
    inner = chain(optimizer)[-1]
    table = _scales(inner)
    for variable in variables:
        table[inner._var_key(variable)] = scale


def _scales(opt: Any) -> dict[Any, Any]:
    table: dict[Any, Any] | None = vars(opt).get(_SCALES_ATTR)
    if table is not None:
        return table
    table = {}
    # Set past the optimizer's attribute tracking: nothing here is optimizer state to
    # save (the scales are recomputed from the epoch) or a dependency to checkpoint.
    object.__setattr__(opt, _SCALES_ATTR, table)
    update_step = opt.update_step
    apply_weight_decay = opt._apply_weight_decay

    def scaled_update_step(gradient: Any, variable: Any, *args: Any) -> Any:
        scale = table.get(opt._var_key(variable))
        if scale is None:
            return update_step(gradient, variable, *args)
        if args:  # Keras 3 passes the learning rate in
            return update_step(gradient, variable, _times(args[0], scale), *args[1:])
        with _reading_scaled_learning_rate(opt, scale):  # tf-keras reads self.learning_rate
            return update_step(gradient, variable)

    def scaled_weight_decay(variables: Sequence[Any]) -> Any:
        groups: dict[int, tuple[Any, list[Any]]] = {}
        plain = []
        for variable in variables:
            scale = table.get(opt._var_key(variable))
            if scale is None:
                plain.append(variable)
            else:
                groups.setdefault(id(scale), (scale, []))[1].append(variable)
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
    return table


def _times(learning_rate: Any, scale: Any) -> Any:
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
