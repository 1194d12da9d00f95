"""Selectors: which layers a call applies to.

A selector is ``None`` (the whole model), a glob pattern matched against layer paths
(``"resnet50/conv5_*"``), a layer object, a predicate ``callable(layer) -> bool``,
:func:`up_to`, or a list or tuple mixing these. Selecting a container (a nested model)
selects every layer inside it. The result is always a set of *units* (see ``_walk``).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from bnfreeze._compat import Layer
from bnfreeze._errors import SelectionError
from bnfreeze._walk import Node, descendants


@dataclass(frozen=True)
class UpTo:
    """Every layer up to and including ``name``, in topological order. See :func:`up_to`."""

    name: str

    def __repr__(self) -> str:
        return f"up_to({self.name!r})"


def up_to(name: str) -> UpTo:
    """Select every layer up to and including ``name`` in topological order.

    ``name`` is a layer path or, when unique, a bare layer name. The usual
    "freeze the backbone up to block 4".

    Args:
        name: The last layer to include.

    Returns:
        A selector for ``layers=`` of [`bnfreeze.freeze`][] and friends.

    Examples:
        >>> import bnfreeze
        >>> bnfreeze.up_to("conv4_block6_out")
        up_to('conv4_block6_out')
    """
    if not isinstance(name, str) or not name:
        raise SelectionError(
            f"Expected `name` of up_to() to be a non-empty layer name or path. Received: {name!r}."
        )
    return UpTo(name)


Selector = Union[None, str, Any, Callable[[Any], bool], UpTo, Sequence[Any]]  # noqa: UP007


def _close(paths: list[str], word: str) -> list[str]:
    tail = word.rsplit("/", 1)[-1].replace("*", "").replace("?", "")
    by_path = difflib.get_close_matches(word, paths, n=3, cutoff=0.5)
    by_name = [
        p for p in paths if difflib.get_close_matches(tail, [p.rsplit("/", 1)[-1]], cutoff=0.75)
    ]
    seen: list[str] = []
    for p in by_path + by_name:
        if p not in seen:
            seen.append(p)
    return seen[:3]


def _no_match(what: str, word: str, nodes: list[Node], argument: str) -> SelectionError:
    paths = [n.path for n in nodes]
    close = _close(paths, word)
    hint = f" Closest layer paths: {', '.join(repr(c) for c in close)}." if close else ""
    return SelectionError(
        f"`{argument}` selector {what} matched no layer of the model. "
        f"Expected a glob pattern over layer paths such as 'outer/inner/layer' "
        f"(use '*/name' to match at any depth), a layer of this model, a predicate, "
        f"or bnfreeze.up_to(name).{hint}"
    )


def _resolve_up_to(sel: UpTo, nodes: list[Node], argument: str) -> list[Node]:
    matches = [n for n in nodes if n.path == sel.name]
    if not matches:
        matches = [n for n in nodes if n.name == sel.name]
        if len(matches) > 1:
            raise SelectionError(
                f"`{argument}` selector up_to({sel.name!r}) is ambiguous: "
                f"{len(matches)} layers are named {sel.name!r} "
                f"({', '.join(repr(m.path) for m in matches[:4])}). "
                "Pass the full layer path instead."
            )
    if not matches:
        raise _no_match(f"up_to({sel.name!r})", sel.name, nodes, argument)
    target = matches[0]
    index = nodes.index(target)
    chosen = [n for n in nodes[: index + 1] if not n.is_container]
    return chosen + _expand(target, nodes)[0 if target.is_container else 1 :]


def _expand(node: Node, nodes: list[Node]) -> list[Node]:
    if not node.is_container:
        return [node]
    return [n for n in descendants(nodes, node.path) if not n.is_container]


def select(nodes: list[Node], selector: Selector, *, argument: str = "layers") -> list[Node]:
    """Resolve ``selector`` against the walk ``nodes``; units only, in walk order.

    Raises:
        SelectionError: a selector is malformed or matches nothing.
    """
    if selector is None:
        return [n for n in nodes if not n.is_container]
    items: Sequence[Any]
    if isinstance(selector, (list, tuple, set, frozenset)):
        items = list(selector)
        if not items:
            raise SelectionError(
                f"`{argument}` is an empty {type(selector).__name__}. Expected None (the whole "
                "model), a glob pattern, a layer, a predicate, up_to(name), or a non-empty list."
            )
    else:
        items = [selector]
    chosen: dict[int, Node] = {}
    for item in items:
        found: list[Node]
        if isinstance(item, UpTo):
            found = _resolve_up_to(item, nodes, argument)
        elif isinstance(item, str):
            hits = [n for n in nodes if fnmatch.fnmatchcase(n.path, item)]
            if not hits:
                raise _no_match(repr(item), item, nodes, argument)
            found = [m for h in hits for m in _expand(h, nodes)]
        elif isinstance(item, Layer):
            hits = [n for n in nodes if n.layer is item]
            if not hits:
                raise SelectionError(
                    f"`{argument}` selector {type(item).__name__} layer {item.name!r} is not a "
                    "layer of this model. Expected a layer reachable from the model "
                    "(check that you did not rebuild or clone the model after taking it)."
                )
            found = _expand(hits[0], nodes)
        elif callable(item):
            hits = [n for n in nodes if item(n.layer)]
            if not hits:
                raise SelectionError(
                    f"`{argument}` predicate {getattr(item, '__name__', repr(item))} returned "
                    "False for every layer of the model. Expected it to return True for at "
                    "least one layer."
                )
            found = [m for h in hits for m in _expand(h, nodes)]
        else:
            raise SelectionError(
                f"Expected each `{argument}` selector to be a glob pattern (str), a Keras layer, "
                f"a callable(layer) -> bool or bnfreeze.up_to(name). "
                f"Received: {type(item).__name__} {item!r}."
            )
        for node in found:
            chosen.setdefault(id(node), node)
    order = {id(n): i for i, n in enumerate(nodes)}
    return sorted(chosen.values(), key=lambda n: order[id(n)])
