"""freeze / unfreeze: validate -> plan -> apply.

Nothing is changed until every argument, layer and mode has been checked; the plan then
lists, for every layer, the class and ``trainable`` flag it will end with, and applying
it is a loop with no decision left in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bnfreeze._compat import (
    graph_nodes,
    recorded_training,
    remove_recorded_training,
    reset_compiled_functions,
    set_recorded_training,
)
from bnfreeze._errors import ArgumentTypeError
from bnfreeze._kinds import (
    check_supported_batch_norm,
    depends_on_phase,
    is_batch_norm,
    is_pinned,
    mark_kept_active,
    pinned_mode,
)
from bnfreeze._layers import pin, unpin
from bnfreeze._modes import PINNED_INFERENCE, BNMode, check_mode
from bnfreeze._select import Selector, select
from bnfreeze._walk import Node, check_model, fully_pinned, root, walk

#: Where a graph node keeps the ``training=`` value ``freeze`` removed from it.
_REMOVED_TRAINING = "_bnfreeze_training"


@dataclass(frozen=True)
class _Step:
    node: Node
    pin: str | None  # the mode to pin, or None to leave the layer unpinned
    trainable: bool
    kept_active: bool = False  # frozen with keep_dropout=True: active in fit on purpose


def _check_supported(steps: list[_Step]) -> None:
    for step in steps:
        if is_batch_norm(step.node.layer):
            check_supported_batch_norm(step.node.path, step.node.layer)


def _final_trainable(
    nodes: list[Node], model: Any, leaf_trainable: dict[int, bool]
) -> dict[int, bool]:
    """Trainable flag of every node: units as planned, containers True iff a child is."""
    final: dict[int, bool] = dict(leaf_trainable)
    children: dict[int, list[Node]] = {}
    for node in nodes:
        children.setdefault(id(node.parent), []).append(node)
    for node in reversed(nodes):  # children before parents
        if node.is_container:
            kids = children.get(id(node.layer), [])
            final[id(node)] = any(final[id(c)] for c in kids) if kids else node.layer.trainable
    top = children.get(id(model), [])
    final[id(model)] = any(final[id(n)] for n in top) if top else model.trainable
    return final


def _apply(model: Any, nodes: list[Node], steps: dict[int, _Step], final: dict[int, bool]) -> None:
    # Containers first (their setter propagates down), then every layer gets its own flag.
    model.trainable = final[id(model)]
    for node in nodes:
        node.layer.trainable = final[id(node)]
    for node in nodes:
        step = steps.get(id(node))
        if step is None:
            continue
        if step.pin is None:
            unpin(node.layer)
        else:
            pin(node.layer, step.pin)
        mark_kept_active(node.layer, step.kept_active)
    _sync_recorded_training(model, nodes)
    reset_compiled_functions(model)


def _sync_recorded_training(model: Any, nodes: list[Node]) -> None:
    """Remove ``training=`` recorded in graph calls of fully pinned parts; restore the rest.

    A recorded ``base(x, training=False)`` is ignored by keras 3.0-3.15 and leaks to every
    later layer in 3.16 (the head's Dropout stops). Once the part decides its own phase
    the recorded value says nothing, so it is removed (and remembered on the node, so
    :func:`unfreeze` puts it back). The model itself counts too: ``freeze(base)`` on a
    base that an outer graph calls with ``training=False`` fixes that call.
    """
    for node in [root(model), *nodes]:
        if fully_pinned(node, nodes):
            for graph_node, value in recorded_training(node.layer):
                setattr(graph_node, _REMOVED_TRAINING, value)
                remove_recorded_training(graph_node)
        else:
            for graph_node in graph_nodes(node.layer):
                if hasattr(graph_node, _REMOVED_TRAINING):
                    set_recorded_training(graph_node, getattr(graph_node, _REMOVED_TRAINING))
                    delattr(graph_node, _REMOVED_TRAINING)


def _plan_and_apply(model: Any, nodes: list[Node], planned: list[_Step]) -> None:
    _check_supported(planned)
    steps = {id(s.node): s for s in planned}
    leaf_trainable = {
        id(n): (steps[id(n)].trainable if id(n) in steps else bool(n.layer.trainable))
        for n in nodes
        if not n.is_container
    }
    final = _final_trainable(nodes, model, leaf_trainable)
    _apply(model, nodes, steps, final)


def freeze(
    model: Any,
    layers: Selector = None,
    *,
    bn_mode: BNMode = "inference",
    keep_dropout: bool = False,
) -> Any:
    """Freeze ``layers`` of ``model`` and pin what their BatchNormalization layers do.

    Frozen layers get ``trainable=False``; frozen BN layers follow ``bn_mode`` (the
    [mode table](api.md#modes)) whatever ``training`` value reaches them and whatever is
    later set as ``trainable``; the frozen part's Dropout, noise and augmentation layers
    run as at inference. Why ``trainable`` and ``training`` differ, and freezing a compiled
    model: [the fine-tuning guide](guide-freezing.md).

    Note:
        ``model`` is changed in place and returned: no layer is replaced and no variable
        copied. Every check runs first: when ``freeze`` raises, nothing has changed.

    Args:
        model: A built ``keras.Model`` (Sequential, functional, subclassed, nested).
        layers: What to freeze: ``None`` (everything), glob patterns over layer paths
            (``"resnet50/conv4_*"``), layers, a predicate ``callable(layer) -> bool``,
            [`bnfreeze.up_to`][], or a list of these.
        bn_mode: ``"inference"``, ``"affine"``, ``"adapt"`` or ``"train"``.
        keep_dropout: Leave the frozen part's Dropout-like layers active during ``fit``.

    Returns:
        ``model`` itself.

    Raises:
        ModelError: ``model`` is not a built Keras model of the installed flavour.
        ModeError: ``bn_mode`` is not one of the four modes.
        SelectionError: ``layers`` matches nothing (the message names close paths).
        UnsupportedLayerError: a selected BN variant overrides its own ``call``.
        ArgumentTypeError: ``keep_dropout`` is not a bool.

    Examples:
        >>> import keras, bnfreeze
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="dense"),
        ...     keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1, name="head")])
        >>> model = bnfreeze.freeze(model, ["dense", "bn"], bn_mode="affine")
        >>> [(layer.name, layer.trainable) for layer in model.layers]
        [('dense', False), ('bn', True), ('head', True)]
    """
    spec = check_mode(bn_mode)
    if not isinstance(keep_dropout, bool):
        raise ArgumentTypeError(
            f"Expected `keep_dropout` to be a bool. Received: keep_dropout={keep_dropout!r}."
        )
    check_model(model, function="freeze")
    nodes = walk(model)
    selected = select(nodes, layers)
    planned: list[_Step] = []
    for node in selected:
        layer = node.layer
        if is_batch_norm(layer):
            planned.append(_Step(node, spec.name, spec.trains_affine))
        elif depends_on_phase(layer) and not keep_dropout:
            planned.append(_Step(node, PINNED_INFERENCE, False))
        elif depends_on_phase(layer):
            planned.append(_Step(node, None, False, kept_active=True))
        else:
            planned.append(_Step(node, None, False))
    _plan_and_apply(model, nodes, planned)
    return model


def unfreeze(model: Any, layers: Selector = None, *, bn_mode: BNMode | None = None) -> Any:
    """Make ``layers`` of ``model`` trainable again, optionally keeping BN pinned.

    With ``bn_mode=None`` the selected layers return exactly to what they were before
    [`freeze`][bnfreeze.freeze], so ``unfreeze(freeze(model))`` has the same config and
    weights as ``model`` had (when all its layers were trainable). With a ``bn_mode``, the
    selected BN layers take that mode instead (fine-tune a block, BN on its moving
    statistics). After a ``fit`` has built the optimizer, compile again.

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
        ModelError, ModeError, SelectionError: as [`freeze`][bnfreeze.freeze].

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
            planned.append(_Step(node, spec.name, spec.trains_affine))
        else:
            planned.append(_Step(node, None, True))
    _plan_and_apply(model, nodes, planned)
    return model


def frozen_modes(model: Any) -> dict[str, str]:
    """Path -> pinned mode of every layer of ``model`` that bnfreeze pinned."""
    return {n.path: str(pinned_mode(n.layer)) for n in walk(model) if is_pinned(n.layer)}
