"""The functional graph, across flavours: the nodes that record each layer call, the
``training=`` a call recorded, and the calls of a graph in order.

Keras 3 and tf-keras keep a functional model's graph in different private structures
(``Node.arguments`` against ``Node.call_args``/``call_kwargs``, ``_inputs_struct`` against
``_nested_inputs``, ...). Like `_compat`, whose ``IS_TF_KERAS`` decides each branch, this
is one of the two modules that read Keras internals; the rest of bnfreeze goes through
these functions.
"""

from __future__ import annotations

from typing import Any

from bnfreeze._compat import FUNCTIONAL, IS_TF_KERAS, flatten, keras, symbolic_spec

__all__ = [
    "first_call_spec",
    "graph_calls",
    "graph_nodes",
    "layer_graph",
    "recorded_training",
    "remove_recorded_training",
    "set_recorded_training",
    "symbolic_inputs",
    "symbolic_outputs",
]


def _node_kwargs(node: Any) -> Any:
    if IS_TF_KERAS:
        return getattr(node, "call_kwargs", None)
    return getattr(getattr(node, "arguments", None), "kwargs", None)


def graph_nodes(layer: Any) -> list[Any]:
    """The graph nodes (calls recorded in functional graphs) of ``layer``."""
    return list(getattr(layer, "_inbound_nodes", None) or [])


def recorded_training(layer: Any) -> list[tuple[Any, Any]]:
    """``(node, value)`` for every graph node that calls ``layer`` with a recorded ``training=``."""
    found = []
    for node in graph_nodes(layer):
        kwargs = _node_kwargs(node)
        if isinstance(kwargs, dict) and "training" in kwargs:
            found.append((node, kwargs["training"]))
    return found


def set_recorded_training(node: Any, value: Any) -> None:
    """Record ``training=value`` in ``node``'s call."""
    kwargs = dict(_node_kwargs(node))
    kwargs["training"] = value
    _set_node_kwargs(node, kwargs)


def remove_recorded_training(node: Any) -> None:
    """Remove the ``training=`` recorded in ``node``'s call."""
    kwargs = dict(_node_kwargs(node))
    kwargs.pop("training", None)
    _set_node_kwargs(node, kwargs)


def _set_node_kwargs(node: Any, kwargs: dict[str, Any]) -> None:
    if not IS_TF_KERAS:
        from keras.src.ops.symbolic_arguments import SymbolicArguments

        node.arguments = SymbolicArguments(*node.arguments.args, **kwargs)
        return
    # tf-keras caches the flattened arguments of a node; recompute them as Node.__init__ does.
    import tensorflow as tf

    node.call_kwargs = kwargs
    node._flat_arguments = tf.nest.flatten((node.call_args, node.call_kwargs.values()))
    node._single_positional_tensor_passed = (
        not node.call_kwargs and len(node.call_args) == 1 and tf.is_tensor(node.call_args[0])
    )
    inputs = [
        (i, x)
        for i, x in enumerate(node._flat_arguments)
        if any(x is k for k in node._keras_inputs)
    ]
    node._keras_inputs_ids_and_indices = [(str(id(x)), i) for i, x in inputs]


def symbolic_inputs(model: Any) -> Any:
    """The nested structure of symbolic input tensors of a functional or Sequential model,
    or ``None`` (a subclassed model)."""
    if IS_TF_KERAS:
        return getattr(model, "_nested_inputs", None)
    struct = getattr(model, "_inputs_struct", None)
    if struct is None:
        struct = getattr(getattr(model, "_functional", None), "_inputs_struct", None)
    return struct


def symbolic_outputs(model: Any) -> Any:
    """The nested structure of symbolic output tensors of a functional model (or graph)."""
    if IS_TF_KERAS:
        return getattr(model, "_nested_outputs", None)
    return getattr(model, "_outputs_struct", None)


def layer_graph(model: Any) -> Any:
    """The functional graph that ``model``'s call replays (``model`` itself, or a Keras 3
    Sequential's inner functional), or ``None`` when its call is Python code: a subclassed
    model, a functional subclass that overrides ``call``, a Sequential without a graph."""
    if isinstance(model, keras.Sequential):
        if type(model).call is not keras.Sequential.call:
            return None
        if IS_TF_KERAS:
            return model if getattr(model, "_is_graph_network", False) else None
        return getattr(model, "_functional", None)
    if isinstance(model, FUNCTIONAL) and type(model).call is FUNCTIONAL.call:
        return model
    return None


def graph_calls(
    graph: Any,
) -> list[tuple[Any, tuple[Any, ...], dict[str, Any], list[Any], list[Any]]]:
    """Every layer call recorded in a functional ``graph`` (see :func:`layer_graph`), each
    after the calls that produce its inputs: ``(layer, args, kwargs, inputs, outputs)``
    with the symbolic tensors it consumes and produces as flat lists."""
    calls = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if node.is_input:
                continue
            if IS_TF_KERAS:
                layer, args, kwargs = node.layer, node.call_args, node.call_kwargs
                inputs = list(node.keras_inputs)
            else:
                layer, args, kwargs = node.operation, node.arguments.args, node.arguments.kwargs
                inputs = list(node.arguments.keras_tensors)
            calls.append((layer, tuple(args), dict(kwargs), inputs, flatten(node.outputs)))
    return calls


def first_call_spec(model: Any) -> Any:
    """For a subclassed model: the spec (``_compat.symbolic_spec``, batch dimension
    ``None``) of the input of its first call, or ``None`` when unknown.

    Keras 3 remembers a single tensor's shape (``_build_shapes_dict``; float32 assumed);
    tf-keras the specs of its first call (``_saved_model_inputs_spec``).
    """
    if IS_TF_KERAS:
        import tensorflow as tf

        saved = getattr(model, "_saved_model_inputs_spec", None)
        if saved is None:
            return None
        return tf.nest.map_structure(
            lambda t: tf.TensorSpec((None, *tuple(t.shape)[1:]), t.dtype), saved
        )
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    if len(shapes) != 1:
        return None
    (shape,) = shapes.values()
    if isinstance(shape, (tuple, list)) and all(d is None or isinstance(d, int) for d in shape):
        return symbolic_spec((None, *tuple(shape)[1:]), "float32")
    return None
