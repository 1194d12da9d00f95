"""Observing what layers do in a traced pass, and the TensorFlow graph plumbing under it.

A trace runs no op, so no variable, seed or optimizer state changes. On the TensorFlow
backend (and tf-keras) it builds ops into a scratch graph: this is how ``fit``'s own
``tf.function`` sees the model before it first runs. On JAX and PyTorch it is Keras 3's
own symbolic pass (``_compat.symbolic_pass``: abstract values, the ``meta`` device),
inside a ``StatelessScope`` that records every variable write instead of applying it.

`Tracer` traces the model the way the installed Keras's ``fit`` and
``evaluate``/``predict`` call it (``model(x, training=True)`` / ``training=False``, or
``model(x)`` when Keras 3 leaves the argument out) while every learning-phase-dependent
layer's ``call`` is intercepted to record

* the ``training`` value it really receives (after Keras resolved recorded graph
  arguments, the shared call context and the call's own default),
* the phase it shows with that value (`phase_shown`: for a BatchNormalization, whether
  it takes the batch-statistics branch, decided inside its call with the ``trainable``
  flags ``fit`` would use), and
* which of its own state variables (moving statistics, power-iteration vectors) the
  traced call writes, read from the assign ops it added to the graph (TensorFlow) or
  from the writes the ``StatelessScope`` recorded during the call (symbolic pass).

The flavour's own ``BatchNormalization.call`` decides its branch first thing (Keras 3:
``training and self.trainable``; tf-keras: ``_get_training_value``; a pinned layer: its
mode) and its batch branch always writes both moving statistics, so its body is not
traced: the interceptor stands in with a same-shaped tensor (tracing BN bodies is most of
the cost of a trace). BN subclasses with their own ``call``, and renorm, synchronized,
virtual-batch or adjusted BN are traced in full and their assign ops read.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnfreeze._compat import (
    IS_TF_KERAS,
    bn_branch_decided_upfront,
    bn_uses_batch_statistics,
    current_stateless_scope,
    fit_trainable_state,
    is_tensorflow_backend,
    keras,
    map_structure,
    strategy_of,
    symbolic_pass,
    tf_variable,
    trainer_forward,
)
from bnfreeze._data import batch_spec
from bnfreeze._kinds import is_batch_norm, is_pinned, original_class, pinned_mode
from bnfreeze._layers import intercepted
from bnfreeze._modes import uses_batch_statistics
from bnfreeze._nodes import first_call_spec, recorded_training, symbolic_inputs
from bnfreeze._report import Phase
from bnfreeze._walk import Node

_ASSIGN_OPS = frozenset({"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp"})


def model_input_spec(model: Any) -> Any:
    """The nested ``tf.TensorSpec`` structure ``model`` is called with, or ``None``.

    Functional and Sequential models know their inputs; a subclassed model knows the
    shape of its first call when that was a single tensor.
    """
    struct = symbolic_inputs(model)
    if struct is None:
        return first_call_spec(model)
    return batch_spec(struct, "keep")


def trace_graph(fn: Any, signature: Any) -> Any:
    """Build (trace) ``fn(placeholders)`` into a fresh graph without executing anything.

    Returns the graph.
    """
    import tensorflow as tf
    from tensorflow.python.framework import func_graph

    graph = func_graph.FuncGraph("bnfreeze_audit")
    with graph.as_default():
        placeholders = tf.nest.map_structure(
            lambda s: tf.compat.v1.placeholder(s.dtype, s.shape), signature
        )
        fn(placeholders)
    return graph


def ops_since(graph: Any, start: int) -> list[Any]:
    """The ops added to ``graph`` after it had ``start`` ops (``graph.version``)."""
    found = []
    for op_id in range(start + 1, graph.version + 1):
        try:
            found.append(graph._nodes_by_id[op_id])
        except (KeyError, IndexError):  # pragma: no cover - ids are dense in practice
            continue
    return found


def variable_handles(variable: Any) -> list[Any]:
    """The TensorFlow resource handles behind a Keras variable (what a graph captures).

    One handle for a plain variable; one per replica for a distributed (mirrored)
    variable, whose own ``handle`` is not available in the cross-replica context.
    """
    tf_var = tf_variable(variable)
    components = getattr(tf_var, "values", None)
    if isinstance(components, (list, tuple)):
        return [getattr(c, "handle", None) for c in components]
    return [getattr(tf_var, "handle", None)]


# --- what one call receives and shows --------------------------------------------------


def received_training(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool | None:
    """The ``training`` value a call gets, its own default applied (``None``: none, or a
    symbolic learning phase)."""
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return _as_bool(kwargs.get("training"))
    if "training" in bound.arguments:
        return _as_bool(bound.arguments["training"])
    param = signature.parameters.get("training")
    return None if param is None else _as_bool(param.default)


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, (bool, int, np.bool_, np.integer)):
        return bool(value)
    return None


def phase_shown(layer: Any, training: Any) -> Phase:
    """The phase rule: which behaviour ``layer`` shows when its call receives ``training``.

    A pinned BatchNormalization follows its mode (``_modes.uses_batch_statistics``), an
    unpinned one its flavour's own rule (evaluated now, so its ``trainable`` flag counts
    as the caller sees it), any other pinned layer runs as at inference, and any other
    layer shows its training behaviour exactly when it receives ``training=True``.
    """
    if is_batch_norm(layer):
        mode = pinned_mode(layer)
        if mode is not None:
            batch = uses_batch_statistics(mode, training)
        else:
            batch = bn_uses_batch_statistics(layer, training)
        return "training" if batch else "inference"
    if is_pinned(layer):
        return "inference"
    return "training" if training is True else "inference"


def recorded_value(layer: Any) -> bool | None:
    """The first ``training=`` bool recorded for ``layer`` in a graph (``None``: none)."""
    for _node, value in recorded_training(layer):
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    return None


def own_variables(node: Node, row_ids: set[int]) -> list[Any]:
    """The layer's variables, minus those of the phase-dependent layers (``row_ids``) inside."""
    inner: set[int] = set()
    flatten = getattr(node.layer, "_flatten_layers", None)
    if flatten is not None:
        for sub in flatten(include_self=False, recursive=True):
            if id(sub) in row_ids:
                inner.update(id(v) for v in sub.weights)
    return [v for v in node.layer.weights if id(v) not in inner]


def _first_shape(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    shape = getattr(args[0], "shape", None) if args else None
    if shape is None:
        return None
    try:
        # A symbolic size (JAX's shape polymorphism, TensorFlow's unknown dimension) is None.
        return tuple(d if isinstance(d, (int, np.integer)) else _static(d) for d in shape)
    except TypeError:
        return None


def _static(dim: Any) -> int | None:
    value = getattr(dim, "value", dim)  # tf-keras's Dimension
    if value is None or not hasattr(value, "__index__"):
        return None
    try:
        return int(value)
    except Exception:  # a symbolic size that refuses to be an int
        return None


# --- the tracer ------------------------------------------------------------------------


@dataclass
class Seen:
    """What an intercepted call saw in one traced forward pass (first call of the layer)."""

    order: int = -1
    takes_training: bool = False  # its call has a ``training`` parameter
    training: bool | None = None  # what it received (when it takes one)
    phase: Phase = "inference"  # what it shows with that value (rows only)
    assigned: set[str] = field(default_factory=set)  # names of captured resources assigned
    input_shape: tuple[Any, ...] | None = None
    shortcut: bool = False  # built-in BN: its call body was not traced (see module doc)


@dataclass
class Observation:
    """Both traced passes: layer id -> `Seen`, and the state-variable names per graph."""

    fit: dict[int, Seen]
    infer: dict[int, Seen]
    fit_names: dict[int, set[str]]  # layer id -> names of its captured state variables
    infer_names: dict[int, set[str]]


class Tracer:
    """Trace ``model`` as the trainer calls it, recording what each row layer sees.

    ``rows`` are the phase-dependent layers to observe; containers are intercepted too, so
    that the ``training`` value each part receives is known.
    """

    def __init__(
        self, model: Any, nodes: list[Node], rows: list[Node], *, symbolic: bool | None = None
    ) -> None:
        self.model = model
        #: Keras 3's symbolic pass (JAX, PyTorch), else a TensorFlow graph; ``symbolic=True``
        #: forces the symbolic pass on TensorFlow too (the tests compare the two).
        self.symbolic = (not is_tensorflow_backend()) if symbolic is None else symbolic
        if self.symbolic and IS_TF_KERAS:
            raise ValueError("tf-keras has no symbolic pass: trace with a TensorFlow graph")
        self.row_ids = {id(n.layer) for n in rows}
        self.watch = [n.layer for n in nodes if id(n.layer) in self.row_ids or n.is_container]
        self.state: dict[int, list[Any]] = {}
        for node in rows:
            own = own_variables(node, self.row_ids)
            self.state[id(node.layer)] = [v for v in own if not v.trainable]
        self.current: dict[int, Seen] = {}

    def run(self, spec: Any) -> Observation:
        """Trace the ``fit`` pass and the ``evaluate``/``predict`` pass on ``spec``."""
        with losses_kept(self.model), intercepted(self.watch, self.on_call):
            if self.symbolic:
                fit, infer = self._symbolic(spec, True), self._symbolic(spec, False)
                names = self._state_ids()
                return Observation(fit, infer, names, names)
            fit, fit_graph = self._trace(spec, True)
            infer, infer_graph = self._trace(spec, False)
        return Observation(fit, infer, self._state_names(fit_graph), self._state_names(infer_graph))

    def on_call(
        self,
        layer: Any,
        original: Any,
        signature: inspect.Signature,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        seen = self.current.get(id(layer))
        first = seen is None
        if seen is None:
            seen = self.current[id(layer)] = Seen(order=len(self.current))
            if "training" in signature.parameters:
                seen.takes_training = True
                seen.training = received_training(signature, args, kwargs)
        if not (first and id(layer) in self.row_ids):
            return original(*args, **kwargs)
        seen.input_shape = _first_shape(args)
        seen.phase = phase_shown(layer, seen.training)
        if is_batch_norm(layer) and bn_branch_decided_upfront(layer, original_class(layer)):
            # Its branch is decided before any op and its batch branch writes both moving
            # statistics: tracing its body adds nothing to observe (see the module doc).
            seen.shortcut = True
            return _cast(args[0], layer.compute_dtype)
        if self.symbolic:
            return self._writes_recorded(layer, seen, original, args, kwargs)
        import tensorflow as tf

        graph = tf.compat.v1.get_default_graph()
        start = graph.version
        out = original(*args, **kwargs)
        if self.state.get(id(layer)):
            for op in ops_since(graph, start):
                if op.type in _ASSIGN_OPS and op.inputs:
                    seen.assigned.add(op.inputs[0].name)
        return out

    def _writes_recorded(
        self, layer: Any, seen: Seen, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Call ``original``; note which state variables it wrote in the stateless scope."""
        state = self.state.get(id(layer)) or []
        scope = current_stateless_scope()
        mapping = getattr(scope, "state_mapping", None)
        before = {id(v): mapping.get(id(v)) for v in state} if mapping is not None else {}
        out = original(*args, **kwargs)
        if mapping is not None:
            for v in state:
                if mapping.get(id(v)) is not before[id(v)]:
                    seen.assigned.add(_state_id(v))
        return out

    def _symbolic(self, spec: Any, training: bool) -> dict[int, Seen]:
        """The pass with Keras 3's symbolic tracing (every backend). The backend may run
        the forward more than once (torch does): the last complete run counts."""
        model = self.model

        def forward(inputs: Any) -> Any:
            self.current = {}
            return trainer_forward(model, inputs, training=training)

        self.current = {}
        symbolic_pass(forward, map_structure(_keras_spec, spec))
        return self.current

    def _state_ids(self) -> dict[int, set[str]]:
        """Layer id -> the names the symbolic pass gives its state variables."""
        return {k: {_state_id(v) for v in vs} for k, vs in self.state.items() if vs}

    def _trace(self, spec: Any, training: bool) -> tuple[dict[int, Seen], Any]:
        self.current = {}
        model = self.model
        replicas = strategy_of(model).num_replicas_in_sync

        def forward(inputs: Any) -> Any:
            if replicas > 1:
                return model.distribute_strategy.run(
                    lambda i: trainer_forward(model, i, training=training), args=(inputs,)
                )
            return trainer_forward(model, inputs, training=training)

        with fit_trainable_state(model) if training else contextlib.nullcontext():
            graph = trace_graph(forward, spec)
        return self.current, graph

    def _state_names(self, graph: Any) -> dict[int, set[str]]:
        """Layer id -> the names under which ``graph`` captured its state variables."""
        by_handle = {id(ext): internal.name for ext, internal in graph.captures}
        names: dict[int, set[str]] = {}
        for layer_id, variables in self.state.items():
            for v in variables:
                for handle in variable_handles(v):
                    name = by_handle.get(id(handle))
                    if name is not None:
                        names.setdefault(layer_id, set()).add(name)
        return names


def _cast(tensor: Any, dtype: Any) -> Any:
    if IS_TF_KERAS:  # no keras.ops in Keras 2
        import tensorflow as tf

        return tf.cast(tensor, dtype)
    return keras.ops.cast(tensor, dtype)


def _keras_spec(spec: Any) -> Any:
    """A ``keras.KerasTensor`` for a spec (a ``tf.TensorSpec`` on TensorFlow)."""
    if isinstance(spec, keras.KerasTensor):
        return spec
    dtype = getattr(spec.dtype, "name", spec.dtype)
    return keras.KerasTensor(tuple(spec.shape), dtype=dtype)


def _state_id(variable: Any) -> str:
    return f"variable-{id(variable)}"


@contextlib.contextmanager
def losses_kept(model: Any) -> Iterator[None]:
    """Put every layer's list of added losses back as it was (a trace appends to them)."""
    saved = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        losses = layer.__dict__.get("_losses")
        if isinstance(losses, list):
            saved.append((layer, list(losses)))
    try:
        yield
    finally:
        for layer, losses in saved:
            current = layer.__dict__.get("_losses")
            if isinstance(current, list):
                current[:] = losses
