"""freeze / unfreeze: validate -> plan -> apply.

Nothing is changed until every argument, layer and mode has been checked and every
class a layer will be switched to exists; the plan then lists, for every layer, the
``trainable`` flag it ends with, whether it is pinned and whether it is locked, and
``_apply`` makes those changes, undoing all of them if one fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bnfreeze import _multipliers
from bnfreeze._apply import Plan, apply, prepare_carriers
from bnfreeze._compat import OPTIMIZER_BUILT, backend_name
from bnfreeze._errors import ArgumentTypeError, UnsupportedLayerError
from bnfreeze._kinds import (
    check_supported_batch_norm,
    depends_on_phase,
    is_batch_norm,
    is_locked,
    is_pinned,
    original_class,
    pinned_mode,
)
from bnfreeze._layers import lock_class, pinned_class
from bnfreeze._modes import PINNED_INFERENCE, BNMode, check_mode
from bnfreeze._optim import (
    IN_FIT_BACKENDS,
    chain,
    holds_state,
    refusal,
    relayout,
    variable_scope,
)
from bnfreeze._select import Selector, select
from bnfreeze._walk import Node, check_model, walk


@dataclass(frozen=True)
class _Step:
    node: Node
    pin: str | None  # the mode to pin, or None to leave the layer unpinned
    trainable: bool
    kept_active: bool = False  # frozen with keep_dropout=True: active in fit on purpose
    lock: bool | None = None  # True: lock at `trainable`; False: lift a lock; None: keep


def _check_pinnable(steps: list[_Step]) -> None:
    for step in steps:
        layer = step.node.layer
        if is_batch_norm(layer):
            check_supported_batch_norm(step.node.path, layer)
        if step.pin is None and not step.lock:
            continue
        cls = original_class(layer)
        try:
            pinned_class(cls) if step.pin is not None else lock_class(cls)
        except Exception as exc:
            raise UnsupportedLayerError(
                f"Layer {step.node.path!r} is a {cls.__name__}, a class bnfreeze cannot "
                f"subclass ({type(exc).__name__}: {exc}); bnfreeze pins a layer by switching "
                "it to a generated subclass of its own class. Leave it out of `layers=` "
                "(for example with a predicate), or let the class be subclassed without "
                "arguments."
            ) from exc


def _final_trainable(
    nodes: list[Node], model: Any, leaf_trainable: dict[int, bool]
) -> dict[int, bool]:
    """Trainable flag of every layer: units as planned, containers True iff a child is."""
    final: dict[int, bool] = dict(leaf_trainable)
    children: dict[int, list[Node]] = {}
    for node in nodes:
        children.setdefault(id(node.parent), []).append(node)
    for node in reversed(nodes):  # children before parents
        if node.is_container:
            kids = children.get(id(node.layer), [])
            final[id(node.layer)] = (
                any(final[id(c.layer)] for c in kids) if kids else node.layer.trainable
            )
    top = children.get(id(model), [])
    final[id(model)] = any(final[id(n.layer)] for n in top) if top else model.trainable
    return final


def _plan_and_apply(model: Any, nodes: list[Node], planned: list[_Step], function: str) -> None:
    _check_pinnable(planned)
    prepare_carriers(model, nodes)
    compiled = getattr(model, "train_function", None) is not None
    _write_back_trainer_state(model)
    steps = {id(s.node): s for s in planned}
    leaf_trainable = {
        id(n.layer): (steps[id(n)].trainable if id(n) in steps else bool(n.layer.trainable))
        for n in nodes
        if not n.is_container
    }
    plan = Plan(
        model=model,
        nodes=nodes,
        trainable=_final_trainable(nodes, model, leaf_trainable),
        pins=[(s.node, s.pin) for s in planned],
        kept_active=[(s.node, s.kept_active) for s in planned],
        locks=[(s.node, s.lock) for s in planned if s.lock is not None],
    )
    apply(plan, function=function)
    keep_training(model, compiled)


def _write_back_trainer_state(model: Any) -> None:
    """JAX: the trainer keeps the values of a running ``fit`` in ``model._jax_state``, lists
    in the order of the trainable variables *of that moment*, and writes them back by
    position whenever a callback asks. Write them back now and drop them, before the set
    of trainable variables changes (the next step gathers the state again)."""
    if backend_name() != "jax" or getattr(model, "_jax_state", None) is None:
        return
    model.jax_state_sync()
    model._jax_state = None


def keep_training(model: Any, compiled: bool) -> None:
    """After ``trainable`` flags changed: a built optimizer is laid out for what trains now
    (slots kept, as one fresh ``build`` would lay it out) and learns the model's
    learning-rate multipliers; a model that had a train function gets a new one, so a
    ``fit`` running now (a callback called ``freeze``/``unfreeze``) goes on from its next
    step with the new set. An optimizer bnfreeze cannot extend (``MultiOptimizer``,
    tf-keras's legacy ones) is left as it is.
    """
    optimizer = getattr(model, "optimizer", None)
    in_fit = backend_name() in IN_FIT_BACKENDS
    if optimizer is not None and in_fit and refusal(optimizer) is None:
        built = bool(getattr(chain(optimizer)[-1], OPTIMIZER_BUILT, False))
        if built or holds_state(optimizer):
            with variable_scope(model):
                relayout(optimizer, list(model.trainable_weights))
        _multipliers.install(model)
    if compiled and in_fit:
        model.make_train_function(force=True)


def freeze(
    model: Any,
    layers: Selector = None,
    *,
    bn_mode: BNMode = "inference",
    keep_dropout: bool = False,
    lock: bool = False,
) -> Any:
    """Freeze ``layers`` of ``model`` and pin what their BatchNormalization layers do.

    Frozen layers get ``trainable=False``; frozen BN layers follow ``bn_mode`` (the
    [mode table](api.md#modes)) whatever ``training`` value reaches them and whatever is
    later set as ``trainable``; the frozen part's Dropout, noise and augmentation layers
    run as at inference. Why ``trainable`` and ``training`` differ, and freezing a compiled
    model: [the fine-tuning guide](guide-freezing.md).

    With ``lock=True`` the selected layers' ``trainable`` flags are locked too (a hard
    lock, as detectron2's ``FrozenBatchNorm2d``): a later ``model.trainable = True``, or
    any ``trainable`` set on them or on a model above them, leaves them as ``freeze``
    made them until [`unfreeze`][bnfreeze.unfreeze] lifts the lock. ``freeze`` without
    ``lock`` on a locked layer keeps it locked (at what the new call gives it). The lock
    is saved with the model and kept by ``keras.models.clone_model``.

    Note:
        ``model`` is changed in place and returned: no layer is replaced and no variable
        copied. Every check runs first, and a change that fails half-way is undone:
        when ``freeze`` raises, nothing has changed.

    Args:
        model: A built ``keras.Model`` (Sequential, functional, subclassed, nested).
        layers: What to freeze: ``None`` (everything), glob patterns over layer paths
            (``"resnet50/conv4_*"``), layers, a predicate ``callable(layer) -> bool``,
            [`bnfreeze.up_to`][], [`bnfreeze.starting_at`][], [`bnfreeze.last`][], or a
            list of these; [`bnfreeze.exclude`][] leaves layers out, also written
            ``bnfreeze.last(20) - "*_bn"``.
        bn_mode: ``"inference"``, ``"affine"``, ``"adapt"`` or ``"train"``.
        keep_dropout: Leave the frozen part's Dropout-like layers active during ``fit``.
        lock: Lock the selected layers' ``trainable`` flags against later changes.

    Returns:
        ``model`` itself.

    Raises:
        ModelError: ``model`` is not a built Keras model of the installed flavour.
        ModeError: ``bn_mode`` is not one of the four modes.
        SelectionError: ``layers`` matches nothing (the message names close paths).
        UnsupportedLayerError: a selected BN variant overrides its own ``call``, or a
            selected layer refuses the change (its class cannot be subclassed, its
            ``trainable`` setter raises).
        ArgumentTypeError: ``keep_dropout`` or ``lock`` is not a bool.

    Examples:
        >>> import keras, bnfreeze
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="dense"),
        ...     keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1, name="head")])
        >>> model = bnfreeze.freeze(model, ["dense", "bn"], bn_mode="affine")
        >>> [(layer.name, layer.trainable) for layer in model.layers]
        [('dense', False), ('bn', True), ('head', True)]
        >>> model = bnfreeze.freeze(model, "dense", lock=True)
        >>> model.trainable = True
        >>> model.get_layer("dense").trainable
        False
    """
    spec = check_mode(bn_mode)
    for name, value in (("keep_dropout", keep_dropout), ("lock", lock)):
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"Expected `{name}` to be a bool. Received: {name}={value!r}.")
    check_model(model, function="freeze")
    nodes = walk(model)
    selected = select(nodes, layers)
    planned: list[_Step] = []
    for node in selected:
        layer = node.layer
        locks = True if lock or is_locked(layer) else None
        if is_batch_norm(layer):
            planned.append(_Step(node, spec.name, spec.trains_affine, lock=locks))
        elif depends_on_phase(layer) and not keep_dropout:
            planned.append(_Step(node, PINNED_INFERENCE, False, lock=locks))
        elif depends_on_phase(layer):
            planned.append(_Step(node, None, False, kept_active=True, lock=locks))
        else:
            planned.append(_Step(node, None, False, lock=locks))
    _plan_and_apply(model, nodes, planned, "freeze")
    return model


def unfreeze(model: Any, layers: Selector = None, *, bn_mode: BNMode | None = None) -> Any:
    """Make ``layers`` of ``model`` trainable again, optionally keeping BN pinned.

    With ``bn_mode=None`` the selected layers return exactly to what they were before
    [`freeze`][bnfreeze.freeze], so ``unfreeze(freeze(model))`` has the same config and
    weights as ``model`` had (when all its layers were trainable). With a ``bn_mode``, the
    selected BN layers take that mode instead (fine-tune a block, BN on its moving
    statistics). ``unfreeze`` lifts the lock that ``freeze(..., lock=True)`` set on the
    layers it selects. After a ``fit`` has built the optimizer, compile again.

    Note:
        ``model`` is changed in place and returned; when ``unfreeze`` raises, nothing
        has changed.

    Args:
        model: A built ``keras.Model``.
        layers: What to unfreeze; the selectors of [`freeze`][bnfreeze.freeze].
        bn_mode: ``None`` to restore BN layers, or the mode they should take.

    Returns:
        ``model`` itself.

    Raises:
        ModelError, ModeError, SelectionError, UnsupportedLayerError: as
            [`freeze`][bnfreeze.freeze].

    Examples:
        >>> import keras, bnfreeze
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           keras.layers.BatchNormalization()])
        >>> config = model.get_config()
        >>> bnfreeze.unfreeze(bnfreeze.freeze(model)).get_config() == config
        True
    """
    spec = check_mode(bn_mode) if bn_mode is not None else None
    check_model(model, function="unfreeze")
    nodes = walk(model)
    selected = select(nodes, layers)
    planned: list[_Step] = []
    for node in selected:
        if is_batch_norm(node.layer) and spec is not None:
            planned.append(_Step(node, spec.name, spec.trains_affine, lock=False))
        else:
            planned.append(_Step(node, None, True, lock=False))
    _plan_and_apply(model, nodes, planned, "unfreeze")
    return model


def frozen_modes(model: Any) -> dict[str, str]:
    """Path -> pinned mode of every layer of ``model`` that bnfreeze pinned."""
    return {n.path: str(pinned_mode(n.layer)) for n in walk(model) if is_pinned(n.layer)}
