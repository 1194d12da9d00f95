"""freeze / unfreeze: validate -> plan -> apply.

Nothing is changed until every argument, layer and mode has been checked; the plan then
lists, for every layer, the class and ``trainable`` flag it will end with, and applying
it is a loop with no decision left in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bnfreeze._compat import (
    _MISSING,
    Layer,
    Model,
    flavour_label,
    is_foreign_keras_object,
    recorded_training,
    reset_compiled_functions,
    set_recorded_training,
    stripped_nodes,
)
from bnfreeze._errors import ModelError, UnsupportedLayerError
from bnfreeze._layers import (
    is_pinned,
    original_class,
    overridden_phase_method,
    pin,
    pinned_mode,
    unpin,
)
from bnfreeze._modes import PINNED_INFERENCE, BNMode, check_mode
from bnfreeze._select import Selector, select
from bnfreeze._walk import Node, depends_on_phase, descendants, is_batch_norm, walk


@dataclass(frozen=True)
class _Step:
    node: Node
    pin: str | None  # the mode to pin, or None to leave the layer unpinned
    trainable: bool


def check_model(model: Any, *, function: str) -> None:
    """Raise :class:`ModelError` unless ``model`` is a built Keras model of this flavour."""
    if not isinstance(model, Model):
        foreign = is_foreign_keras_object(model)
        if foreign is not None:
            raise ModelError(
                f"`{function}` received a model of {foreign}, but bnfreeze is running on "
                f"{flavour_label()}. Expected a model of the installed flavour: set "
                "TF_USE_LEGACY_KERAS=1 before importing TensorFlow and bnfreeze to use "
                "tf-keras, or unset it to use Keras 3."
            )
        kind = "a Keras layer" if isinstance(model, Layer) else type(model).__name__
        raise ModelError(
            f"Expected `model` to be a keras.Model. Received: {kind} ({model!r:.80}). "
            "Wrap layers in a model first, e.g. keras.Sequential([layer])."
        )
    if not model.built:
        raise ModelError(
            f"Expected a built model, but model {model.name!r} is not built, so its layers "
            "have no variables yet. Call the model on data once, or call "
            "model.build(input_shape), before bnfreeze."
        )


def _check_supported(steps: list[_Step]) -> None:
    for step in steps:
        layer = step.node.layer
        if not is_batch_norm(layer):
            continue
        method = overridden_phase_method(layer)
        if method is not None:
            raise UnsupportedLayerError(
                f"Layer {step.node.path!r} is a {original_class(layer).__name__}, a "
                f"BatchNormalization variant that overrides `{method}`, so bnfreeze cannot "
                "guarantee which statistics "
                "it uses. Expected keras.layers.BatchNormalization (or a subclass that only "
                "changes its constructor or config). Leave it out of `layers=` (for example "
                f"with a predicate), or replace it with a standard BatchNormalization."
            )


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
    _sync_recorded_training(model, nodes)
    reset_compiled_functions(model)


def fully_pinned(node: Node, nodes: list[Node]) -> bool:
    """True when ``node``'s phase-dependent layers (all of them, at least one) are pinned."""
    if not node.is_container:
        return is_pinned(node.layer)
    below = nodes if node.path == "" else descendants(nodes, node.path)
    inside = [n for n in below if not n.is_container]
    phase = [n for n in inside if depends_on_phase(n.layer)]
    return bool(phase) and all(is_pinned(n.layer) for n in phase)


def _sync_recorded_training(model: Any, nodes: list[Node]) -> None:
    """Remove ``training=`` recorded in graph calls of fully pinned parts; restore the rest.

    A recorded ``base(x, training=False)`` is ignored by keras 3.0-3.15 and leaks to every
    later layer in 3.16 (the head's Dropout stops). Once the part decides its own phase
    the recorded value says nothing, so it is removed (and remembered on the node, so
    :func:`unfreeze` puts it back). The model itself counts too: ``freeze(base)`` on a
    base that an outer graph calls with ``training=False`` fixes that call.
    """
    for node in [Node("", model, None, 0, True), *nodes]:
        if fully_pinned(node, nodes):
            for graph_node, value in recorded_training(node.layer):
                graph_node._bnfreeze_training = value
                set_recorded_training(graph_node, _MISSING)
        else:
            for graph_node in stripped_nodes(node.layer):
                set_recorded_training(graph_node, graph_node._bnfreeze_training)
                del graph_node._bnfreeze_training


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

    The model is changed **in place** and returned (the same object): no layer is
    replaced and no variable is copied, so optimizers, callbacks and other references
    keep working. Frozen non-BN layers get ``trainable=False``. Frozen BN layers follow
    ``bn_mode``:

    | ``bn_mode``     | statistics used by fit | moving statistics updated by fit | gamma/beta |
    | --------------- | ---------------------- | -------------------------------- | ---------- |
    | ``"inference"`` | moving                 | no                               | frozen     |
    | ``"affine"``    | moving                 | no                               | trained    |
    | ``"adapt"``     | batch                  | yes                              | frozen     |
    | ``"train"``     | batch                  | yes                              | trained    |

    ``evaluate`` and ``predict`` always use the moving statistics. The other layers of the
    frozen part whose ``call`` takes ``training`` (Dropout, noise, augmentation, RNN
    dropout, ...) run as at inference during ``fit`` unless ``keep_dropout=True``. Layers
    outside the selection keep their normal behaviour.

    **trainable versus training.** ``trainable`` decides which weights receive gradients;
    ``training`` is the flag Keras passes down a call to say "this is fit". Keras ties the
    two together in ways that differ between versions (a ``training=False`` recorded in a
    graph is ignored by keras 3.15, leaks to later layers in 3.16, is dropped by tf-keras
    for some subclassed models). bnfreeze separates them: what ``freeze`` pins (the BN mode
    and the inference behaviour of the frozen part) lives in each layer and holds whatever
    ``training`` value arrives and whatever a later ``layer.trainable = ...`` does, until
    [`unfreeze`][bnfreeze.unfreeze] changes it; ``trainable`` then only decides which
    weights are trained (the ``norm_eval`` rule of mmdetection). A nested model all of whose
    layers are frozen reports ``trainable=False`` itself, so ``base.trainable = True``
    unfreezes its weights.

    Freeze before ``compile()``, or compile again afterwards. On a compiled model the
    cached train/test/predict functions are dropped (and tf-keras's record of the
    compile-time ``trainable`` flags is updated), so the next ``fit`` already follows the
    freeze. An optimizer that has already taken a step only knows the variables it was
    built with: after ``unfreeze`` on a trained model, ``compile`` again (Keras refuses
    the new variables otherwise).

    Args:
        model: A built ``keras.Model`` (Sequential, functional, subclassed, nested).
        layers: What to freeze: ``None`` (the whole model), a glob pattern or list of
            patterns over layer paths (``"resnet50/conv4_*"``), layer objects, a predicate
            ``callable(layer) -> bool``, or [`bnfreeze.up_to`][]. A nested model selects
            every layer inside it.
        bn_mode: What the frozen BatchNormalization layers do (table above).
        keep_dropout: Leave Dropout, noise, augmentation and RNN-dropout layers of the
            frozen part active during ``fit``.

    Returns:
        ``model`` itself.

    Raises:
        ModelError: ``model`` is not a built Keras model of the installed flavour.
        ModeError: ``bn_mode`` is not one of the four modes.
        SelectionError: ``layers`` matches nothing (the message names close paths).
        UnsupportedLayerError: a selected BN variant overrides its own ``call``.

    Every check runs before anything changes: when ``freeze`` raises, the model is
    exactly as it was.

    Examples:
        >>> import keras, numpy as np, bnfreeze
        >>> inputs = keras.Input((4,))
        >>> h = keras.layers.Dense(8, name="dense")(inputs)
        >>> h = keras.layers.BatchNormalization(name="bn")(h)
        >>> model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h))
        >>> model = bnfreeze.freeze(model, ["dense", "bn"], bn_mode="affine")
        >>> [(layer.name, layer.trainable) for layer in model.layers[1:]]
        [('dense', False), ('bn', True), ('head', True)]
        >>> bnfreeze.audit(model).row("bn").bn_mode
        'affine'
    """
    spec = check_mode(bn_mode)
    if not isinstance(keep_dropout, bool):
        raise TypeError(
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
        else:
            planned.append(_Step(node, None, False))
    _plan_and_apply(model, nodes, planned)
    return model


def unfreeze(model: Any, layers: Selector = None, *, bn_mode: BNMode | None = None) -> Any:
    """Make ``layers`` of ``model`` trainable again; the model is changed in place.

    With ``bn_mode=None`` the selected BatchNormalization layers return exactly to what
    they were before [`freeze`][bnfreeze.freeze] (class, config, variables), so
    ``unfreeze(freeze(model))`` has the same ``get_config()`` and weights as ``model``
    had (when all its layers were trainable). With a ``bn_mode``, they take that mode
    instead: ``unfreeze(m, "resnet50/conv5_*", bn_mode="inference")`` fine-tunes the top
    block with BN kept in inference mode (gamma/beta follow the mode). Other pinned layers
    (Dropout, ...) of the selection get their normal behaviour back.

    Args:
        model: A built ``keras.Model``.
        layers: What to unfreeze; the same selectors as [`freeze`][bnfreeze.freeze].
        bn_mode: ``None`` to restore BN layers, or the mode they should take.

    Returns:
        ``model`` itself.

    Raises:
        ModelError, ModeError, SelectionError: as [`freeze`][bnfreeze.freeze], before any change.

    Examples:
        >>> import keras, bnfreeze
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d"),
        ...                           keras.layers.BatchNormalization(name="bn")])
        >>> config = model.get_config()
        >>> model = bnfreeze.unfreeze(bnfreeze.freeze(model))
        >>> model.get_config() == config
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
