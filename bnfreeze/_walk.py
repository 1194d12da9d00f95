"""The one walker over a model's layers, used by freeze, audit and recalibrate.

A layer's *path* is the chain of layer names below the top model joined by ``/``
(``"resnet50/conv4_block1_1_bn"``). The walk is depth-first in each container's layer
order (topological for functional models), visits a shared layer once (at its first
path), and descends into every ``keras.Model`` and into any other layer that contains a
BatchNormalization (a custom residual block, ``TimeDistributed(BatchNormalization())``).
Other layers with sublayers (``LSTM`` and its cell, ``Bidirectional``) are units: their
insides decide their behaviour together, so they are pinned and reported as one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from typing import Any

from bnfreeze._compat import (
    BN_BASE,
    Layer,
    Model,
    direct_sublayers,
    training_matters_only_for_float8,
)


@dataclass(frozen=True, eq=False)
class Node:
    """One layer in a walk."""

    path: str
    layer: Any
    parent: Any | None
    depth: int
    is_container: bool

    @property
    def name(self) -> str:
        return str(self.path.rsplit("/", 1)[-1])


def is_batch_norm(layer: Any) -> bool:
    """True for BatchNormalization and its subclasses in the installed flavour."""
    return isinstance(layer, BN_BASE)


@cache
def _class_takes_training(cls: type) -> bool:
    call = getattr(cls, "call", None)
    if call is None:
        return False
    try:
        return "training" in inspect.signature(call).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False


def depends_on_phase(layer: Any) -> bool:
    """True when the layer's ``call`` takes ``training`` (and it is not a model).

    Keras 3's Dense and EinsumDense take ``training`` only for float8 quantized training;
    unless they are float8-quantized they do not count.
    """
    if isinstance(layer, Model) or training_matters_only_for_float8(layer):
        return False
    cls: type = getattr(type(layer), "_bnfreeze_base", None) or type(layer)
    return _class_takes_training(cls)


def _contains_batch_norm(layer: Any) -> bool:
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return False
    return any(is_batch_norm(x) for x in flatten(include_self=False, recursive=True))


def is_container(layer: Any) -> bool:
    """Models, and any other layer that holds a BatchNormalization somewhere inside."""
    if isinstance(layer, Model):
        return True
    return isinstance(layer, Layer) and _contains_batch_norm(layer)


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
        nodes.append(Node("", model, None, 0, True))

    def visit(container: Any, prefix: str, depth: int) -> None:
        for child in direct_sublayers(container):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            container_flag = is_container(child)
            nodes.append(Node(path, child, container, depth, container_flag))
            if container_flag:
                visit(child, path + "/", depth + 1)

    visit(model, "", 0)
    return nodes


def descendants(nodes: list[Node], container_path: str) -> list[Node]:
    """Nodes strictly below ``container_path``."""
    prefix = container_path + "/"
    return [n for n in nodes if n.path.startswith(prefix)]
