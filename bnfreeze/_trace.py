"""Observing what layers do in a traced pass: the TensorFlow graph plumbing.

A trace builds ops into a scratch graph but runs none, so no variable, seed or optimizer
state changes: this is how ``fit``'s own ``tf.function`` sees the model before it first
runs.
"""

from __future__ import annotations

from typing import Any

from bnfreeze._compat import first_call_spec, symbolic_inputs, tf_variable
from bnfreeze._data import batch_spec


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
