"""What differs between Keras 3's backends (TensorFlow, JAX, PyTorch), decided per call.

Which backend runs (``backend_name``), nested structures (``tf.nest`` where TensorFlow is
the backend, ``keras.tree`` elsewhere), Keras 3's symbolic pass and stateless scope, the
strategy ``fit`` runs under (one replica off TensorFlow), PyTorch's parallel optimizers,
and arrays of any backend as numpy. tf-keras always runs on TensorFlow.

`_compat` stays the only module that imports a Keras flavour by name: this one takes
``keras`` and ``IS_TF_KERAS`` from it, and imports Keras 3's private ``keras.src...``
only inside the functions defined here (never at import). `_compat` re-exports every
name of ``__all__``: import them from there.
"""

from __future__ import annotations

import contextlib
from typing import Any

from bnfreeze._compat import IS_TF_KERAS, keras
from bnfreeze._errors import BackendError

__all__ = [
    "backend_name",
    "current_stateless_scope",
    "flatten",
    "is_tensorflow_backend",
    "map_structure",
    "pack_sequence_as",
    "predict_twin",
    "require_tensorflow_backend",
    "same_structure",
    "scaled_and_shifted",
    "squared_in_place",
    "stateless_scope",
    "strategy_of",
    "symbolic_pass",
    "symbolic_spec",
    "to_numpy",
    "torch_parallel_optimizer",
]


def backend_name() -> str:
    """The Keras backend in use (``"tensorflow"`` for tf-keras)."""
    if IS_TF_KERAS:
        return "tensorflow"
    return str(keras.backend.backend())


def is_tensorflow_backend() -> bool:
    """Whether Keras runs on TensorFlow (tf-keras always does)."""
    return backend_name() == "tensorflow"


def require_tensorflow_backend(function: str) -> None:
    """Raise :class:`BackendError` unless Keras runs on TensorFlow (what ``function`` needs:
    graph tracing, ``tf.function`` or ``tf.distribute``)."""
    backend = backend_name()
    if backend == "tensorflow":
        return
    raise BackendError(
        f"`{function}` needs Keras's TensorFlow backend (it traces the model with "
        f"TensorFlow). Received: Keras running on the {backend!r} backend. Set "
        "KERAS_BACKEND=tensorflow before importing Keras; freeze and unfreeze work on "
        "every backend."
    )


def to_numpy(value: Any) -> Any:
    """A variable, tensor or array of any flavour as a numpy array of its own (a copy)."""
    import numpy as np

    detach = getattr(value, "detach", None)  # a torch tensor that requires grad
    if callable(detach) and not hasattr(value, "assign"):
        value = detach()
    numpy = getattr(value, "numpy", None)
    return np.array(numpy() if callable(numpy) else value)


# --- nested structures: tf.nest where TensorFlow is the backend, keras.tree elsewhere ------


def flatten(structure: Any) -> list[Any]:
    """The leaves of a nested structure (dicts by sorted key), as ``tf.nest.flatten``."""
    if is_tensorflow_backend():
        import tensorflow as tf

        return list(tf.nest.flatten(structure))
    return list(keras.tree.flatten(structure))


def map_structure(function: Any, *structures: Any) -> Any:
    """``function`` applied to every leaf, as ``tf.nest.map_structure``."""
    if is_tensorflow_backend():
        import tensorflow as tf

        return tf.nest.map_structure(function, *structures)
    return keras.tree.map_structure(function, *structures)


def pack_sequence_as(structure: Any, leaves: list[Any]) -> Any:
    """``leaves`` in the nesting of ``structure``, as ``tf.nest.pack_sequence_as``."""
    if is_tensorflow_backend():
        import tensorflow as tf

        return tf.nest.pack_sequence_as(structure, leaves)
    return keras.tree.pack_sequence_as(structure, leaves)


def same_structure(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` nest alike, container types included."""
    try:
        if is_tensorflow_backend():
            import tensorflow as tf

            tf.nest.assert_same_structure(a, b, check_types=True)
        else:
            keras.tree.assert_same_structure(a, b)
            # Container types too (a list is not a tuple), as tf.nest's check_types;
            # leaves of any type are alike (an array and None), as there.
            if _skeleton(a) != _skeleton(b):
                return False
    except (TypeError, ValueError):
        return False
    return True


def _skeleton(structure: Any) -> Any:
    return keras.tree.map_structure(lambda _: 0, structure)


def symbolic_spec(shape: tuple[Any, ...], dtype: Any) -> Any:
    """The spec of a tensor of ``shape`` and ``dtype`` (``None``: any size): a
    ``tf.TensorSpec`` where TensorFlow is the backend, a ``keras.KerasTensor`` elsewhere."""
    if is_tensorflow_backend():
        import tensorflow as tf

        return tf.TensorSpec(shape, dtype)
    return keras.KerasTensor(shape, dtype=dtype)


# --- Keras 3's symbolic pass (private API: tests/test_backend_compat.py guards it) ---------


def symbolic_pass(function: Any, spec: Any) -> Any:
    """Run ``function(inputs)`` the way Keras computes output specs, nothing executed.

    Keras 3's ``backend.compute_output_spec`` turns the ``KerasTensor`` leaves of ``spec``
    into the backend's placeholders (a TensorFlow ``FuncGraph``, JAX abstract values,
    torch tensors on the ``meta`` device) and calls ``function`` inside a
    ``StatelessScope``: every ``variable.assign`` it makes is recorded in that scope (read
    it with :func:`current_stateless_scope` while the pass runs) and no variable changes.
    The backend may run ``function`` more than once (torch retries with other sizes for
    ``None`` dimensions, and on real tensors when the meta device fails). Returns its
    output specs.
    """
    from keras.src import backend as keras_backend

    return keras_backend.compute_output_spec(function, spec)


def current_stateless_scope() -> Any:
    """The innermost active ``StatelessScope`` (``None``: none)."""
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    return get_stateless_scope()


def stateless_scope(read: Any = ()) -> Any:
    """Keras 3: a ``keras.StatelessScope`` -- every ``variable.assign`` inside it (moving
    statistics, seed generators, metrics) is recorded in the scope instead of applied, and
    the losses layers add (activity regularizers) are collected as ``fit`` sees them.
    Keras's weight regularizers read their variable from the scope, so the variables in
    ``read`` are entered with their current values. tf-keras has none: ``None`` (the
    caller snapshots and restores instead).
    """
    if IS_TF_KERAS:
        return None
    return keras.StatelessScope(state_mapping=[(v, v) for v in read], collect_losses=True)


# --- a model's predict loop run for a pass, the model untouched (JAX, PyTorch) -----------


def predict_twin(model: Any, predict_step: Any) -> Any:
    """A twin of ``model`` whose ``predict`` runs ``predict_step`` in the trainer's loop
    (jitted on JAX, sharded under ``keras.distribution``), while ``model`` itself stays as
    another thread calling it meanwhile expects.

    The twin is a shallow copy: the same layers and variables, attributes of its own (its
    ``predict_step``, ``predict_function`` and the loop's bookkeeping land on the twin, not
    on ``model``). On JAX Keras's ``predict`` takes the variables' values out of them for
    the loop (``_get_jax_state(purge_model_variables=True)``, the values donated to the
    jitted step) and puts them back at the end (``jax_state_sync``); the twin's loop reads
    copies of the values and writes nothing back, so the model keeps its values throughout
    (private API: tests/test_backend_compat.py guards it).
    """
    twin = object.__new__(type(model))
    twin.__dict__.update(model.__dict__)
    object.__setattr__(twin, "predict_step", predict_step)
    object.__setattr__(twin, "predict_function", None)
    if backend_name() == "jax":

        def state_copies(**which: Any) -> Any:
            which["purge_model_variables"] = False
            state = type(model)._get_jax_state(twin, **which)
            return keras.tree.map_structure(lambda a: a.copy(), state)

        object.__setattr__(twin, "_get_jax_state", state_copies)
        object.__setattr__(twin, "jax_state_sync", lambda: None)
    return twin


def scaled_and_shifted(x: Any, scale: Any, offset: Any) -> Any:
    """``x * scale + offset`` (broadcast), in one pass where the backend has the fused
    operation (PyTorch's ``addcmul``: one output buffer instead of two)."""
    if backend_name() == "torch":
        import torch

        return torch.addcmul(offset, x, scale)
    return x * scale + offset


def squared_in_place(tensor: Any) -> Any:
    """``tensor ** 2``, in place where the backend allows it (PyTorch: no second buffer
    the size of a BN input, whose allocation costs as much as the arithmetic); only for
    a tensor the caller made and does not use again."""
    if backend_name() == "torch":
        return tensor.square_()
    return keras.ops.square(tensor)


# --- replicas, and PyTorch's optimizers ---------------------------------------------------


def strategy_of(model: Any) -> Any:
    """The ``tf.distribute`` strategy ``fit`` runs ``model`` under (the default one if none).

    A model created in ``strategy.scope()`` keeps its strategy; otherwise the strategy
    whose scope is active now. On JAX and PyTorch, where ``tf.distribute`` does not
    apply, one replica (``keras.distribution`` shards a batch inside one program, and BN
    sees the global batch there: KERAS_FACTS fact 20).
    """
    if not is_tensorflow_backend():
        return _ONE_REPLICA
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None)
    return strategy if strategy is not None else tf.distribute.get_strategy()


class _OneReplica:
    """What bnfreeze reads of a strategy, where there is none (JAX, PyTorch)."""

    num_replicas_in_sync = 1

    def scope(self) -> Any:
        return contextlib.nullcontext()


_ONE_REPLICA = _OneReplica()


def torch_parallel_optimizer() -> Any:
    """Keras's base class of the PyTorch optimizers that update every variable in one
    ``torch._foreach_*`` call (``None`` on other backends)."""
    if backend_name() != "torch":
        return None
    from keras.src.backend.torch.optimizers.torch_parallel_optimizer import (
        TorchParallelOptimizer,
    )

    return TorchParallelOptimizer
