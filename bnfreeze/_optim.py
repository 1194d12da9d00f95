"""Lay a built optimizer out for a new set of trainable variables, keeping its state.

What ``callbacks.Unfreeze``/``Freeze`` and ``freeze``/``unfreeze`` inside ``fit`` need:
:func:`relayout` makes the optimizer's per-variable lists (slots, EMA averages), its index
table and its list of variables exactly those of one fresh ``build`` over the new
trainable variables, in the model's order (what Keras pairs by position: ``use_ema``,
``.keras`` loading, JAX's stateless apply), with every slot object of a variable it knew
kept; ``iterations`` and the learning rate (schedule) are untouched.
:func:`hold_unmatched_loads` keeps saved optimizer state that cannot be loaded yet
(``BackupAndRestore`` before the stage that gives the saved layout). The learning-rate
multipliers live in ``_multipliers``.

Wrappers (``LossScaleOptimizer``) are looked through: the innermost optimizer owns the
slots. ``MultiOptimizer`` and tf-keras's legacy optimizers are refused (see
:func:`refusal`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from bnfreeze._compat import (
    OPTIMIZER_BUILT,
    OPTIMIZER_INDEX,
    backend_name,
    defer_optimizer_slots,
    forget_optimizer_children,
    keras,
    set_optimizer_attribute,
    strategy_of,
    to_numpy,
    undefer_optimizer_slots,
)


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


#: Backends on which a change of what trains inside ``fit`` works (the train function is
#: made again and reads the variables at the next step): TensorFlow; JAX, whose trainer
#: gathers its state from the variables again after ``on_epoch_begin``; PyTorch, whose
#: step reads ``model.trainable_weights`` anew every time (numpy cannot train).
IN_FIT_BACKENDS = ("tensorflow", "jax", "torch")


def variable_scope(model: Any) -> Any:
    """Where to create optimizer variables for ``model``: its ``tf.distribute`` strategy's
    scope on TensorFlow, nothing on other backends."""
    if backend_name() != "tensorflow":
        return contextlib.nullcontext()
    return strategy_of(model).scope()


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
    if defer_optimizer_slots(chain(optimizer)[-1]):
        # tf-keras restores a TensorFlow checkpoint, slots matched by their position in
        # its lists, when fit starts: the restore defers them now, and the stages load
        # it again once they gave the optimizer the saved layout (`reattach_slots`).
        return
    load_own_variables = optimizer.load_own_variables

    def holding_load_own_variables(store: Any) -> Any:
        if len(store.keys()) == len(optimizer.variables):
            object.__setattr__(optimizer, _HELD_ATTR, None)
            return load_own_variables(store)
        held = [to_numpy(store[str(i)]).copy() for i in range(len(store.keys()))]
        object.__setattr__(optimizer, _HELD_ATTR, held)
        return None

    object.__setattr__(optimizer, "load_own_variables", holding_load_own_variables)


def reattach_slots(optimizer: Any) -> None:
    """tf-keras: make ``optimizer``'s slots part of its checkpoint again, named by their
    positions now, and drop the restores a checkpoint deferred for them (see
    :func:`hold_unmatched_loads`); a checkpoint restored next loads them. Nothing on
    Keras 3."""
    inner = chain(optimizer)[-1]
    tracking = _tracking_lists(inner)
    if not tracking:
        return
    undefer_optimizer_slots(inner)
    for tracked in tracking:
        _rename_list_dependencies(tracked, list(tracked))


def _tracking_lists(opt: Any) -> list[Any]:
    """The TensorFlow ``ListWrapper`` attributes of ``opt`` (tf-keras: its list of
    variables and its per-variable slot lists, each saved by position)."""
    return [value for value in vars(opt).values() if _is_list_wrapper(value)]


def _is_list_wrapper(tracked: Any) -> bool:
    return isinstance(getattr(tracked, "_storage", None), list)


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
    if _is_list_wrapper(tracked):  # TensorFlow's ListWrapper
        tracked._storage[:] = variables
        # A checkpoint (tf-keras's BackupAndRestore) saves the list as it is now: its
        # dependencies, named by position when each element was appended, are named
        # again after the new contents (stale positions dropped).
        for flag in ("_non_append_mutation_value", "_external_modification_value"):
            if getattr(tracked, flag, False):
                object.__setattr__(tracked, flag, False)
        _rename_list_dependencies(tracked, variables)
        snapshot = getattr(tracked, "_update_snapshot", None)
        if callable(snapshot):
            snapshot()
    elif isinstance(tracked, list):
        list.__setitem__(tracked, slice(None), variables)
    else:
        tracked[:] = variables


def _rename_list_dependencies(tracked: Any, variables: list[Any]) -> None:
    """Name ``tracked``'s checkpoint dependencies (a TensorFlow ``ListWrapper``) by the
    positions of ``variables``, as appending them one by one would have; the restores a
    checkpoint deferred for the list's elements are dropped, not applied to them."""
    deferred = getattr(tracked, "_self_unconditional_deferred_dependencies", None)
    if isinstance(deferred, dict):
        deferred.clear()
    dependencies = getattr(tracked, "_self_unconditional_checkpoint_dependencies", None)
    names = getattr(tracked, "_self_unconditional_dependency_names", None)
    if not isinstance(dependencies, list) or not isinstance(names, dict):
        return
    wanted = {tracked._name_element(i) for i in range(len(variables))}
    dependencies[:] = [d for d in dependencies if d.name in wanted]
    for name in [n for n in names if n not in wanted]:
        del names[name]
    for i, variable in enumerate(variables):
        tracked._track_trackable(variable, name=tracked._name_element(i), overwrite=True)


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
            # A copy: on JAX an assigned array is shared, not copied, and the train step
            # donates each of its buffers once (the same buffer twice fails).
            average.assign(to_numpy(variable))
