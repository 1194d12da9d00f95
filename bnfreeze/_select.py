"""Selectors: which layers a call applies to.

A selector is ``None`` (the whole model), a glob pattern matched against layer paths
(``"resnet50/conv5_*"``), a layer object, a predicate ``callable(layer) -> bool``,
:func:`up_to`, :func:`starting_at`, :func:`last`, :func:`exclude` (also written
``selector - excluded``), or a list or tuple mixing these (their union). Selecting a
container (a nested model) selects every layer inside it. The result is always a set of
*units* (see ``_walk``), in walk order: topological, a nested model's layers where it is
called.
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

#: Shown in errors: every kind of selector.
_KINDS = (
    "a glob pattern over layer paths such as 'outer/inner/layer' (use '*/name' to match "
    "at any depth), a layer of this model, a predicate, bnfreeze.up_to(name), "
    "bnfreeze.starting_at(name), bnfreeze.last(n) or bnfreeze.exclude(...)"
)


class _Selector:
    """The selectors bnfreeze builds; ``a - b`` is ``exclude(b, within=a)``."""

    def __sub__(self, excluded: Any) -> Exclude:
        return exclude(excluded, within=self)

    def __rsub__(self, within: Any) -> Exclude:
        return exclude(self, within=within)


@dataclass(frozen=True)
class UpTo(_Selector):
    """Every layer up to and including ``name``, in walk order. See :func:`up_to`."""

    name: str

    def __repr__(self) -> str:
        return f"up_to({self.name!r})"


@dataclass(frozen=True)
class StartingAt(_Selector):
    """Every layer from ``name`` on, in walk order. See :func:`starting_at`."""

    name: str

    def __repr__(self) -> str:
        return f"starting_at({self.name!r})"


@dataclass(frozen=True)
class Last(_Selector):
    """The last ``n`` layers in walk order. See :func:`last`."""

    n: int

    def __repr__(self) -> str:
        return f"last({self.n})"


@dataclass(frozen=True, eq=False)
class Exclude(_Selector):
    """What ``within`` selects except what ``excluded`` selects. See :func:`exclude`."""

    excluded: Any
    within: Any = None

    def __repr__(self) -> str:
        if self.within is None:
            return f"exclude({self.excluded!r})"
        return f"exclude({self.excluded!r}, within={self.within!r})"


Selector = Union[  # noqa: UP007
    None, str, Any, Callable[[Any], bool], UpTo, StartingAt, Last, Exclude, Sequence[Any]
]


def _check_name(name: Any, function: str) -> None:
    if not isinstance(name, str) or not name:
        raise SelectionError(
            f"Expected `name` of {function}() to be a non-empty layer name, path or block "
            f"prefix. Received: {name!r}."
        )


def up_to(name: str) -> UpTo:
    """Select every layer up to and including ``name``, in topological order.

    ``name`` is a layer path, a layer name (when unique), or the prefix of a block's layer
    names (``"conv4"``, ``"block6"``): then up to that block's last layer. The usual
    "freeze the backbone up to block 4". See [selectors](quickstart.md#choose-the-layers).

    Args:
        name: The last layer to include, or the block that ends the selection.

    Returns:
        A selector for ``layers=`` of [`bnfreeze.freeze`][] and friends.

    Raises:
        SelectionError: ``name`` is not a non-empty string.

    Examples:
        >>> import bnfreeze
        >>> bnfreeze.up_to("conv4_block6_out")
        up_to('conv4_block6_out')
    """
    _check_name(name, "up_to")
    return UpTo(name)


def starting_at(name: str) -> StartingAt:
    """Select every layer from ``name`` on, in topological order, ``name`` included.

    The other half of [`bnfreeze.up_to`][]: ``up_to("conv4")`` and ``starting_at("conv5")``
    together select a ResNet50 whole. ``name`` is a layer path, a layer name (when unique),
    or the prefix of a block's layer names: then from that block's first layer.

    Args:
        name: The first layer to include, or the block that starts the selection.

    Returns:
        The selector, for ``layers=`` of [`bnfreeze.unfreeze`][] (fine-tune from a stage
        on), [`bnfreeze.freeze`][] or [`bnfreeze.recalibrate`][].

    Raises:
        SelectionError: ``name`` is not a non-empty string (a name that matches no layer
            is reported when the selector is used).

    Examples:
        >>> import bnfreeze
        >>> [bnfreeze.up_to("conv4"), bnfreeze.starting_at("conv5")]  # all of ResNet50
        [up_to('conv4'), starting_at('conv5')]
    """
    _check_name(name, "starting_at")
    return StartingAt(name)


def last(n: int) -> Last:
    """Select the last ``n`` layers in topological order, as ``model.layers[-n:]`` does
    for a flat model; layers inside nested models count one by one.

    Args:
        n: How many layers, at least 1.

    Returns:
        A selector for ``layers=`` of [`bnfreeze.freeze`][] and friends.

    Raises:
        SelectionError: ``n`` is not a positive int.

    Examples:
        >>> import bnfreeze
        >>> bnfreeze.last(20) - "*_bn"  # the top 20 layers but their BatchNormalization
        exclude('*_bn', within=last(20))
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SelectionError(f"Expected `n` of last() to be a positive int. Received: {n!r}.")
    return Last(n)


def exclude(excluded: Selector, *, within: Selector = None) -> Exclude:
    """Select what ``within`` selects (the whole model by default) except ``excluded``.

    ``selector - excluded`` means ``exclude(excluded, within=selector)`` when
    ``selector`` is one of bnfreeze's (``bnfreeze.last(20) - "*_bn"``).

    Args:
        excluded: Any selector: what to leave out.
        within: Any selector: what to select from; ``None`` for every layer.

    Returns:
        A selector for ``layers=`` of [`bnfreeze.freeze`][] and friends.

    Examples:
        >>> import bnfreeze
        >>> bnfreeze.exclude("head")  # freeze(model, ...) this: all but the head
        exclude('head')
    """
    return Exclude(excluded, within)


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
        f"`{argument}` selector {what} matched no layer of the model. Expected {_KINDS}.{hint}"
    )


def _exact(nodes: list[Node], path: str, what: str, argument: str) -> list[Node]:
    """The node whose path is exactly ``path`` (none: ``[]``); two such nodes (tf-keras
    allows ``/`` in a layer name: a layer ``"blk/bn"`` next to a nested ``"blk"`` holding
    ``"bn"``) make the path ambiguous."""
    matches = [n for n in nodes if n.path == path]
    if len(matches) > 1:
        kinds = ", ".join(
            f"{type(n.layer).__name__} {n.layer.name!r}"
            + (
                f" inside {n.parent.name!r}"
                if n.parent is not None and "/" in n.path and n.name == n.layer.name
                else ""
            )
            for n in matches[:4]
        )
        raise SelectionError(
            f"`{argument}` selector {what} is ambiguous: {len(matches)} layers have the path "
            f"{path!r} ({kinds}), because a layer name contains '/'. Pass the layer object "
            "itself (model.get_layer(...)) instead, or rename the layer."
        )
    return matches


def _starts_block(text: str, prefix: str) -> bool:
    """``text`` starts with ``prefix`` and does not go on with its number
    (``"block1"`` starts ``"block1a_bn"``, not ``"block10_bn"``)."""
    if not text.startswith(prefix) or len(text) == len(prefix):
        return False
    return not (prefix[-1].isdigit() and text[len(prefix)].isdigit())


def _runs(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _target(sel: UpTo | StartingAt, nodes: list[Node], argument: str) -> Node:
    """The layer that ends (``up_to``) or starts (``starting_at``) the selection."""
    name = sel.name
    matches = _exact(nodes, name, repr(sel), argument)
    if not matches:
        matches = [n for n in nodes if n.name == name]
        if len(matches) > 1:
            raise SelectionError(
                f"`{argument}` selector {sel!r} is ambiguous: "
                f"{len(matches)} layers are named {name!r} "
                f"({', '.join(repr(m.path) for m in matches[:4])}). "
                "Pass the full layer path instead."
            )
    if matches:
        return matches[0]
    units = [n for n in nodes if not n.is_container]
    hits = [
        i for i, n in enumerate(units) if _starts_block(n.path, name) or _starts_block(n.name, name)
    ]
    if not hits:
        raise _no_match(repr(sel), name, nodes, argument)
    runs = _runs(hits)
    end = isinstance(sel, UpTo)
    if len(runs) == 1:
        return units[runs[0][-1] if end else runs[0][0]]
    candidates = [units[run[-1] if end else run[0]].path for run in runs]
    listed = ", ".join(repr(c) for c in candidates[:6])
    more = f", ... ({len(candidates)} in all)" if len(candidates) > 6 else ""
    raise SelectionError(
        f"`{argument}` selector {sel!r} is ambiguous: no layer is named {name!r}, and the "
        f"layers whose names start with it form {len(runs)} separate groups, not one block. "
        f"It could mean the {'last' if end else 'first'} layer of any of them: "
        f"{listed}{more}. Pass one of these names, or a longer prefix."
    )


def _resolve_up_to(sel: UpTo, nodes: list[Node], argument: str) -> list[Node]:
    target = _target(sel, nodes, argument)
    index = nodes.index(target)
    chosen = [n for n in nodes[: index + 1] if not n.is_container]
    return chosen + _expand(target, nodes)[0 if target.is_container else 1 :]


def _resolve_starting_at(sel: StartingAt, nodes: list[Node], argument: str) -> list[Node]:
    target = _target(sel, nodes, argument)
    return [n for n in nodes[nodes.index(target) :] if not n.is_container]


def _resolve_last(sel: Last, nodes: list[Node], argument: str) -> list[Node]:
    units = [n for n in nodes if not n.is_container]
    if sel.n > len(units):
        raise SelectionError(
            f"`{argument}` selector {sel!r} asks for more layers than the model has: it has "
            f"{len(units)}. Expected n between 1 and {len(units)}."
        )
    return units[-sel.n :]


def _resolve_exclude(sel: Exclude, nodes: list[Node], argument: str) -> list[Node]:
    within = select(nodes, sel.within, argument=argument)
    excluded = {id(n) for n in select(nodes, sel.excluded, argument=argument)}
    left = [n for n in within if id(n) not in excluded]
    if not left:
        raise SelectionError(
            f"`{argument}` selector {sel!r} selects no layer: every layer it selects from "
            "is excluded. Expected a selection that keeps at least one layer."
        )
    return left


def _expand(node: Node, nodes: list[Node]) -> list[Node]:
    if not node.is_container:
        return [node]
    return [n for n in descendants(nodes, node.path) if not n.is_container]


def select(nodes: list[Node], selector: Selector, *, argument: str = "layers") -> list[Node]:
    """Resolve ``selector`` against the walk ``nodes``; units only, in walk order.

    Raises:
        SelectionError: a selector is malformed or matches nothing.
    """
    resolvers: dict[type, Callable[[Any, list[Node], str], list[Node]]] = {
        UpTo: _resolve_up_to,
        StartingAt: _resolve_starting_at,
        Last: _resolve_last,
        Exclude: _resolve_exclude,
    }
    if selector is None:
        return [n for n in nodes if not n.is_container]
    items: Sequence[Any]
    if isinstance(selector, (list, tuple, set, frozenset)):
        items = list(selector)
        if not items:
            raise SelectionError(
                f"`{argument}` is an empty {type(selector).__name__}. Expected None (the whole "
                "model), a glob pattern, a layer, a predicate, up_to(name), starting_at(name), "
                "last(n), exclude(...), or a non-empty list."
            )
    else:
        items = [selector]
    chosen: dict[int, Node] = {}
    for item in items:
        found: list[Node]
        if type(item) in resolvers:
            found = resolvers[type(item)](item, nodes, argument)
        elif isinstance(item, str):
            # An exact layer path wins over glob syntax ("blk[1]" is a layer's name).
            hits = _exact(nodes, item, repr(item), argument)
            hits = hits or [n for n in nodes if fnmatch.fnmatchcase(n.path, item)]
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
                f"Expected each `{argument}` selector to be {_KINDS}. "
                f"Received: {type(item).__name__} {item!r}."
            )
        for node in found:
            chosen.setdefault(id(node), node)
    order = {id(n): i for i, n in enumerate(nodes)}
    return sorted(chosen.values(), key=lambda n: order[id(n)])
