"""The one walker over a model's layers, used by freeze, audit and recalibrate.

A layer's *path* is the chain of layer names below the top model joined by ``/``
(``"resnet50/conv4_block1_1_bn"``). The walk is depth-first in each container's layer
order (topological for functional models), visits a shared layer once (at its first
path), and descends into every ``keras.Model``, into any other layer that contains a
BatchNormalization (a custom residual block, ``TimeDistributed(BatchNormalization())``),
and into a layer whose ``call`` takes no ``training`` but holds a Dropout or other
phase-dependent layer (it cannot be pinned as a whole, so its parts are).
Other layers with sublayers (``LSTM`` and its cell, ``Bidirectional``) are units: their
insides decide their behaviour together, so they are pinned and reported as one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bnfreeze._compat import (
    Layer,
    Model,
    direct_sublayers,
    flavour_label,
    is_foreign_keras_object,
)
from bnfreeze._errors import ModelError
from bnfreeze._kinds import depends_on_phase, is_batch_norm, is_pinned


@dataclass(frozen=True, eq=False)
class Node:
    """One layer in a walk."""

    path: str
    layer: Any
    parent: Any | None
    is_container: bool

    @property
    def name(self) -> str:
        return str(self.path.rsplit("/", 1)[-1])


def _contains_batch_norm(layer: Any) -> bool:
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return False
    return any(is_batch_norm(x) for x in flatten(include_self=False, recursive=True))


def _hides_phase_dependent(layer: Any) -> bool:
    """A layer whose ``call`` takes no ``training`` but that holds a phase-dependent layer
    (a custom block calling a Dropout, keras-hub#1500): it cannot be pinned as one unit
    (it has no ``training`` to pass), so its parts are walked and pinned one by one."""
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None or depends_on_phase(layer):
        return False
    return any(depends_on_phase(x) for x in flatten(include_self=False, recursive=True))


def is_container(layer: Any) -> bool:
    """Models, any other layer that holds a BatchNormalization somewhere inside, and a
    layer without a ``training`` argument that holds a phase-dependent layer."""
    if isinstance(layer, Model):
        return True
    return isinstance(layer, Layer) and (
        _contains_batch_norm(layer) or _hides_phase_dependent(layer)
    )


def walk(model: Any, *, include_root: bool = False) -> list[Node]:
    """Every layer of ``model`` at any depth, once, parents before children.

    Args:
        model: A Keras model (or layer).
        include_root: Also yield ``model`` itself, with path ``""``.

    Returns:
        A list of :class:`Node`, depth-first in layer order.
    """
    nodes: list[Node] = []
    seen: set[int] = {id(model)}
    if include_root:
        nodes.append(Node("", model, None, True))

    def visit(container: Any, prefix: str) -> None:
        for child in direct_sublayers(container):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            container_flag = is_container(child)
            nodes.append(Node(path, child, container, container_flag))
            if container_flag:
                visit(child, path + "/")

    visit(model, "")
    return nodes


def descendants(nodes: list[Node], container_path: str) -> list[Node]:
    """Nodes strictly below ``container_path``."""
    prefix = container_path + "/"
    return [n for n in nodes if n.path.startswith(prefix)]


def root(model: Any) -> Node:
    """The node of ``model`` itself (path ``""``), for rules that treat it as a container."""
    return Node("", model, None, True)


def fully_pinned(node: Node, nodes: list[Node]) -> bool:
    """True when ``node``'s phase-dependent layers (all of them, at least one) are pinned.

    A fully pinned part decides its learning phase itself: a ``training=`` recorded for
    it in a graph says nothing any more (``freeze`` removes it, ``audit`` ignores it).
    """
    if not node.is_container:
        return is_pinned(node.layer)
    below = nodes if node.path == "" else descendants(nodes, node.path)
    inside = [n for n in below if not n.is_container]
    phase = [n for n in inside if depends_on_phase(n.layer)]
    return bool(phase) and all(is_pinned(n.layer) for n in phase)


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
