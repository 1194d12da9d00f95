"""Applying a freeze: every change in small steps, all undone when one of them fails.

A :class:`Plan` says, for one model, the ``trainable`` flag every layer ends with and
which layers are pinned (in which mode), unpinned, marked kept-active, locked or
unlocked. :func:`apply` makes those changes one step at a time (:func:`_changes`), then
brings the ``training=`` values recorded in the graph and the containers' saved form in
line. A snapshot taken before the first step puts back, if any step raises, every
layer's class, pinned mode, kept-active mark, lock and ``trainable`` flag, every
variable's ``trainable`` flag and every recorded ``training=`` value: a failed
``freeze`` leaves the model exactly as it was.

**Containers that rebuild their layers.** A container whose class is not Keras's own (a
subclassed model, a KerasHub backbone or task, a custom block holding a BN) saves its
constructor arguments, not its layers, so loading builds fresh layers and every pin and
flag inside is lost. While anything inside such a container is frozen, it *carries* the
freeze: its class is swapped, as a pinned layer's is, for a generated subclass of the
same name that saves ``{"container": <its own saved form>, "trainable", "layers": [the
path, class, trainable flag, pinned mode and lock of every layer inside]}`` under the
registered name ``"bnfreeze>FrozenContainer"``, and applies that record again (through
:func:`apply`) when it is loaded or cloned.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bnfreeze._compat import IS_TF_KERAS, keras, register_serialized_name, reset_compiled_functions
from bnfreeze._errors import BNFreezeError, UnsupportedLayerError
from bnfreeze._kinds import (
    is_lock_only,
    is_locked,
    is_pinned,
    mark_kept_active,
    original_class,
    pin_state,
    pinned_mode,
    register_generated_class,
    restore_pin_state,
    set_locked_value,
)
from bnfreeze._layers import (
    FORMAT_VERSION,
    LOCK_FORMAT_VERSION,
    SavedFormLoader,
    check_saved_form,
    check_saved_mode,
    for_any_format,
    generated_subclass,
    lock,
    pin,
    serialize_as_original,
    unlock,
    unpin,
)
from bnfreeze._nodes import (
    graph_nodes,
    recorded_training,
    remove_recorded_training,
    set_recorded_training,
)
from bnfreeze._walk import Node, descendants, fully_pinned, root, walk

CONTAINER_REGISTERED_NAME = "bnfreeze>FrozenContainer"
#: Where a graph node keeps the ``training=`` value ``freeze`` removed from it.
_REMOVED_TRAINING = "_bnfreeze_training"
_MISSING = object()


@dataclass(frozen=True)
class Plan:
    """Everything :func:`apply` changes; nothing in it is decided while applying."""

    model: Any
    nodes: list[Node]
    trainable: dict[int, bool]  # id(layer) -> final flag, for the model and every node
    pins: list[tuple[Node, str | None]]  # the mode to pin each layer in, None to unpin
    kept_active: list[tuple[Node, bool]]
    # True: lock the layer at its final flag; False: lift its lock. Others keep theirs.
    locks: list[tuple[Node, bool]] = field(default_factory=list)


class Change(NamedTuple):
    """One step of :func:`apply`: what it does (for the error message), and doing it."""

    what: str
    run: Callable[[], None]


def apply(plan: Plan, *, function: str) -> None:
    """Make every change of ``plan``; when one step raises, undo all and raise.

    Raises:
        UnsupportedLayerError: a step failed (a ``trainable`` setter or a class that
            refused the change); the message names it, and the model is as it was.
    """
    snapshot = _Snapshot(plan.model)
    changes = _changes(plan)
    what = "work out its first change"
    try:
        for change in changes:
            what = change.what
            change.run()
            what = f"work out its next change (after: {what})"
    except Exception as exc:
        failed = snapshot.restore()
        if isinstance(exc, BNFreezeError) and not failed:
            raise
        raise UnsupportedLayerError(_failure_message(function, what, exc, failed)) from exc
    except BaseException:  # KeyboardInterrupt, SystemExit: undo, then let it through
        snapshot.restore()
        raise
    # Last, outside the undo: cached train/test/predict functions are only dropped.
    reset_compiled_functions(plan.model)


def _failure_message(function: str, what: str, exc: Exception, failed: list[str]) -> str:
    text = f"`{function}` could not {what}: {type(exc).__name__}: {exc}. "
    if failed:
        return text + (
            "Undoing the changes made so far failed as well (" + "; ".join(failed) + "), "
            "so the model may be left partly changed: rebuild or reload it."
        )
    return text + (
        "Nothing was changed: the model is exactly as it was before the call. Leave that "
        "layer out of `layers=` (for example with a predicate), or make it accept the change."
    )


def _changes(plan: Plan) -> Iterator[Change]:
    """The steps of ``plan`` in order; the later ones are worked out once the earlier ran."""
    # The locks this plan decides are lifted first (the flags must reach those layers),
    # and set again last; the layers locked before and not in the plan keep their flag.
    for node, _ in plan.locks:
        if is_locked(node.layer):
            yield Change(f"lift the lock of layer {node.path!r}", _bind(unlock, node.layer))
    # Containers first (their setter propagates down), then every layer its own flag.
    yield _set_trainable(plan.model, "the model", plan.trainable[id(plan.model)])
    for node in plan.nodes:
        yield _set_trainable(node.layer, f"layer {node.path!r}", plan.trainable[id(node.layer)])
    for node, mode in plan.pins:
        if mode is None:
            yield Change(f"unpin layer {node.path!r}", _bind(unpin, node.layer))
        else:
            yield Change(f"pin layer {node.path!r} in mode {mode!r}", _bind(pin, node.layer, mode))
    for node, kept in plan.kept_active:
        yield Change(
            f"{'mark' if kept else 'unmark'} layer {node.path!r} as kept active",
            _bind(mark_kept_active, node.layer, kept),
        )
    for node, locked in plan.locks:
        if locked:
            flag = plan.trainable[id(node.layer)]
            yield Change(
                f"lock layer {node.path!r} at `trainable={flag}`",
                _bind(lock, node.layer, flag),
            )
    yield from _recorded_training_changes(plan.model, plan.nodes)
    yield from _carrier_changes(plan.model, plan.nodes)


def _bind(function: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: function(*args)


def _set_trainable(layer: Any, name: str, flag: bool) -> Change:
    def run() -> None:
        layer.trainable = flag

    return Change(f"set `trainable={flag}` on {name}", run)


def _recorded_training_changes(model: Any, nodes: list[Node]) -> Iterator[Change]:
    """Remove ``training=`` recorded in graph calls of fully pinned parts; restore the rest.

    A recorded ``base(x, training=False)`` is ignored by keras 3.0-3.15 and leaks to every
    later layer in 3.16 (the head's Dropout stops). Once the part decides its own phase
    the recorded value says nothing, so it is removed (and remembered on the graph node,
    so :func:`unfreeze` puts it back). The model itself counts too: ``freeze(base)`` on a
    base that an outer graph calls with ``training=False`` fixes that call.
    """
    for node in [root(model), *nodes]:
        where = f"a call of {node.path!r}" if node.path else "a call of the model"
        if fully_pinned(node, nodes):
            for graph_node, value in recorded_training(node.layer):
                yield Change(
                    f"remove the `training={value!r}` recorded for {where}",
                    _bind(_remove_training, graph_node, value),
                )
        else:
            for graph_node in graph_nodes(node.layer):
                if hasattr(graph_node, _REMOVED_TRAINING):
                    yield Change(
                        f"put back the `training=` recorded for {where}",
                        _bind(_put_back_training, graph_node),
                    )


def _remove_training(graph_node: Any, value: Any) -> None:
    setattr(graph_node, _REMOVED_TRAINING, value)
    remove_recorded_training(graph_node)


def _put_back_training(graph_node: Any) -> None:
    set_recorded_training(graph_node, getattr(graph_node, _REMOVED_TRAINING))
    delattr(graph_node, _REMOVED_TRAINING)


# --- the snapshot ---------------------------------------------------------------------


class _Snapshot:
    """What :func:`apply` may change on a model, taken before it changes anything."""

    def __init__(self, model: Any) -> None:
        layers = _every_layer(model)
        self.layers = [(x, pin_state(x), bool(x.trainable)) for x in layers]
        self.variables = [(v, bool(v.trainable)) for v in model.variables]
        self.graph = [
            (layer, graph_node, _recorded(layer, graph_node), _removed(graph_node))
            for layer in layers
            for graph_node in graph_nodes(layer)
        ]

    def restore(self) -> list[str]:
        """Put everything back; returns what could not be put back (empty when all was)."""
        failed: list[str] = []

        def attempt(what: str, action: Callable[[], None]) -> None:
            try:
                action()
            except Exception as exc:  # keep undoing the rest
                failed.append(f"{what}: {type(exc).__name__}: {exc}")

        for layer, state, _ in self.layers:  # unlocked for now: flags must reach them
            unlocked = state._replace(lock=None)
            attempt(f"the class of {layer.name!r}", _bind(restore_pin_state, layer, unlocked))
        for layer, _, flag in self.layers:  # parents before children, as set
            if bool(layer.trainable) != flag:
                attempt(f"`trainable` of {layer.name!r}", _bind(setattr, layer, "trainable", flag))
        for variable, flag in self.variables:
            if bool(variable.trainable) != flag:
                attempt(
                    f"`trainable` of variable {variable.name!r}",
                    _bind(setattr, variable, "trainable", flag),
                )
        for layer, state, _ in self.layers:
            if state.lock is not None:
                attempt(f"the lock of {layer.name!r}", _bind(set_locked_value, layer, state.lock))
        for layer, graph_node, value, removed in self.graph:
            attempt(
                f"a `training=` recorded for {layer.name!r}",
                _bind(_restore_graph_node, layer, graph_node, value, removed),
            )
        return failed


def _every_layer(model: Any) -> list[Any]:
    """The model and every layer inside it at any depth, parents first, once each."""
    flatten = getattr(model, "_flatten_layers", None)
    found = list(flatten(include_self=True, recursive=True)) if flatten else [model]
    seen = {id(x) for x in found}
    for node in walk(model):  # defensive: anything the walker reaches
        if id(node.layer) not in seen:
            seen.add(id(node.layer))
            found.append(node.layer)
    return found


def _recorded(layer: Any, graph_node: Any) -> Any:
    for node, value in recorded_training(layer):
        if node is graph_node:
            return value
    return _MISSING


def _removed(graph_node: Any) -> Any:
    return getattr(graph_node, _REMOVED_TRAINING, _MISSING)


def _restore_graph_node(layer: Any, graph_node: Any, value: Any, removed: Any) -> None:
    if _recorded(layer, graph_node) is not value:
        if value is _MISSING:
            remove_recorded_training(graph_node)
        else:
            set_recorded_training(graph_node, value)
    if _removed(graph_node) is not removed:
        if removed is _MISSING:
            delattr(graph_node, _REMOVED_TRAINING)
        else:
            setattr(graph_node, _REMOVED_TRAINING, removed)


# --- containers that carry their parts' freeze through saving ------------------------

_CARRIERS: dict[type, type | None] = {}  # container class -> its carrier (None: cannot)
_CARRIER_SET: set[type] = set()  # the carrier classes


class Carried(NamedTuple):
    """A record a carrier saves besides the freeze (``_multipliers`` registers one): a
    container holding one carries it even when Keras's own class would save its layers."""

    key: str  # its entry in the carrier's saved form
    record: Callable[[Any], Any]  # container -> what to save (None: it holds none)
    restore: Callable[[Any, Any], None]  # (rebuilt container, saved record) -> None
    before_train: Callable[[Any], None]  # runs in the carrier's make_train_function


CARRIED: list[Carried] = []


def _carries_a_record(layer: Any) -> bool:
    return any(c.record(layer) is not None for c in CARRIED)


def update_carrier(model: Any) -> None:
    """Swap ``model`` (and containers in it) to or from its carrier class as what it holds
    now says (after a change of a :data:`CARRIED` record)."""
    nodes = walk(model)
    prepare_carriers(model, nodes)
    for change in _carrier_changes(model, nodes):
        change.run()


def _rebuilds_its_layers(layer: Any) -> bool:
    """True for a container class defined outside Keras: its config is its constructor's
    arguments (Keras's own Functional, Sequential and wrappers save their layers); and
    for tf-keras's wrappers (``TimeDistributed``): they save their layer, but load it by
    class name in the legacy format, which finds the original class, not the pinned one."""
    if IS_TF_KERAS and isinstance(layer, keras.layers.Wrapper):
        return True
    module = original_class(layer).__module__ or ""
    return not module.startswith(("keras.", "tf_keras."))


def _holds_a_freeze(node: Node, nodes: list[Node]) -> bool:
    below = nodes if node.path == "" else descendants(nodes, node.path)
    if _carries_a_record(node.layer):
        return True
    return not node.layer.trainable or any(
        is_pinned(n.layer) or is_locked(n.layer) or not n.layer.trainable for n in below
    )


def _containers_that_rebuild(model: Any, nodes: list[Node]) -> list[Node]:
    containers = [root(model), *[n for n in nodes if n.is_container]]
    return [n for n in containers if _rebuilds_its_layers(n.layer) or _carries_a_record(n.layer)]


def prepare_carriers(model: Any, nodes: list[Node]) -> None:
    """Make the carrier classes ``apply`` may need (warning, outside ``apply``, about a
    container class that cannot be subclassed)."""
    for node in _containers_that_rebuild(model, nodes):
        carrier_class(original_class(node.layer))


def _carrier_changes(model: Any, nodes: list[Node]) -> Iterator[Change]:
    for node in _containers_that_rebuild(model, nodes):
        name = f"container {node.path!r}" if node.path else "the model"
        carrying = type(node.layer) in _CARRIER_SET
        if _holds_a_freeze(node, nodes):
            carrier = carrier_class(original_class(node.layer))
            if carrier is not None and not carrying:
                yield Change(
                    f"make {name} keep its freeze when saved",
                    _bind(_swap_class, node.layer, carrier),
                )
        elif carrying:
            yield Change(
                f"return {name} to its own class",
                _bind(_swap_class, node.layer, original_class(node.layer)),
            )


def _swap_class(layer: Any, cls: type) -> None:
    layer.__class__ = cls


def carrier_class(base: type) -> type | None:
    """The generated carrier subclass of container class ``base``; ``None`` (with a
    warning, once per class) when ``base`` cannot be subclassed."""
    if base in _CARRIERS:
        return _CARRIERS[base]
    members = {
        "get_config": _carrier_get_config,
        "from_config": classmethod(_carrier_from_config),
        "__module__": __name__,
        "__doc__": f"{base.__name__} carrying a bnfreeze freeze through saving.",
    }
    if IS_TF_KERAS:
        members["build_from_config"] = _carrier_build_from_config
    if callable(getattr(base, "make_train_function", None)):
        members["make_train_function"] = _carrier_make_train_function(base)
    try:
        cls = generated_subclass(base, members)
    except Exception as exc:
        warnings.warn(
            f"bnfreeze cannot subclass {base.__name__} ({type(exc).__name__}: {exc}), so a "
            f"frozen {base.__name__} loses its freeze when saved and loaded: its config "
            "rebuilds its layers. Call bnfreeze.freeze again after loading it.",
            UserWarning,
            stacklevel=5,  # freeze's caller
        )
        _CARRIERS[base] = None
        return None
    register_serialized_name(cls, CONTAINER_REGISTERED_NAME)
    register_generated_class(cls, base, kind="carrier")
    _CARRIER_SET.add(cls)
    _CARRIERS[base] = cls
    return cls


def _carrier_make_train_function(base: Any) -> Callable[..., Any]:
    def make_train_function(self: Any, *args: Any, **kwargs: Any) -> Any:
        for carried in CARRIED:
            carried.before_train(self)
        return base.make_train_function(self, *args, **kwargs)

    return make_train_function


def _carrier_get_config(self: Any) -> dict[str, Any]:
    records = {c.key: r for c in CARRIED if (r := c.record(self)) is not None}
    entries = [
        {
            "path": n.path,
            "class_name": original_class(n.layer).__name__,
            "trainable": bool(n.layer.trainable),
            "mode": pinned_mode(n.layer),
            **({"locked": True} if is_locked(n.layer) else {}),
        }
        for n in walk(self)
    ]
    locked = any("locked" in entry for entry in entries)
    return {
        **records,
        "version": LOCK_FORMAT_VERSION if locked else FORMAT_VERSION,
        "name": self.name,
        "trainable": bool(self.trainable),
        "container": _serialize_unpinned(self),
        "layers": entries,
    }


def _carrier_build_from_config(self: Any, config: dict[str, Any]) -> None:
    """tf-keras: build as the original class does, then record the input shape as a
    call's first build does (a wrapper's ``build`` records its child's shape instead,
    which its next save would write and its next load could not build from)."""
    base: Any = type(self).__bases__[0]
    base.build_from_config(self, config)
    if config.get("input_shape") is not None:
        object.__setattr__(self, "_build_input_shape", config["input_shape"])


def _serialize_unpinned(container: Any) -> dict[str, Any]:
    """The container serialised as its original class with every layer inside unpinned
    for the moment (a wrapper saves its layer's config: the plain one, which every
    format loads; the ``"layers"`` entries pin it again)."""
    inside = [n.layer for n in walk(container) if is_pinned(n.layer) or is_lock_only(n.layer)]
    states = [pin_state(layer) for layer in inside]
    try:
        for layer in inside:
            layer.__class__ = original_class(layer)
        return serialize_as_original(container)
    finally:
        for layer, state in zip(inside, states, strict=True):
            restore_pin_state(layer, state)


def _carrier_from_config(cls: Any, config: dict[str, Any], custom_objects: Any = None) -> Any:
    """``type(container).from_config(container.get_config())`` (``clone_model``)."""
    base = cls.__bases__[0]  # a generated class derives directly from its original
    if not (isinstance(config, dict) and "container" in config and "layers" in config):
        return base.from_config(config)
    check_saved_form(config, "container", "frozen containers")
    with keras.saving.custom_object_scope(custom_objects or {}):
        container = base.from_config(config["container"]["config"])
    return restore(container, config)


@keras.saving.register_keras_serializable(package="bnfreeze", name="FrozenContainer")
class FrozenContainer(SavedFormLoader):
    """Loads containers saved while carrying a freeze: rebuilds, then freezes them again."""

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Any:
        check_saved_form(config, "container", "frozen containers")
        container = keras.layers.deserialize(
            for_any_format(config["container"]), custom_objects=custom_objects
        )
        return restore(container, config)


def restore(container: Any, config: dict[str, Any]) -> Any:
    """Apply the freeze recorded by a carrier's ``get_config`` to a rebuilt ``container``."""
    for carried in CARRIED:
        if carried.key in config:
            carried.restore(container, config[carried.key])
    nodes = walk(container)
    matched, missing = _match(nodes, config["layers"])
    trainable = {id(n.layer): bool(n.layer.trainable) for n in nodes}
    trainable[id(container)] = bool(config["trainable"])
    pins: list[tuple[Node, str | None]] = []
    locks: list[tuple[Node, bool]] = []
    for node, entry in matched:
        trainable[id(node.layer)] = bool(entry["trainable"])
        locked = entry.get("locked", False) is True
        if entry["mode"] is not None or locked:
            check_saved_mode(node.layer, entry["mode"], locked=locked)
        pins.append((node, entry["mode"]))
        if locked:
            locks.append((node, True))
    apply(Plan(container, nodes, trainable, pins, [], locks), function="load")
    if missing:
        warnings.warn(
            f"bnfreeze could not find {len(missing)} of the saved layers of "
            f"{container.name!r} in the rebuilt model ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}), so their freeze is not restored. "
            "Call bnfreeze.freeze on the loaded model.",
            UserWarning,
            stacklevel=2,
        )
    return container


def _match(
    nodes: list[Node], entries: list[dict[str, Any]]
) -> tuple[list[tuple[Node, dict[str, Any]]], list[str]]:
    """Pair saved entries with rebuilt layers: by position when the classes line up (layer
    names made up by Keras may differ in the loading session), else by path."""
    classes = [original_class(n.layer).__name__ for n in nodes]
    if classes == [e["class_name"] for e in entries]:
        return list(zip(nodes, entries, strict=True)), []
    by_path = {n.path: n for n in nodes}
    matched, missing = [], []
    for entry in entries:
        node = by_path.get(entry["path"])
        if node is not None and original_class(node.layer).__name__ == entry["class_name"]:
            matched.append((node, entry))
        else:
            missing.append(str(entry["path"]))
    return matched, missing
