"""What bnfreeze reads as data: batches of model inputs, and their signatures."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np


def batch_spec(structure: Any, batch_size: int | Literal["keep"] | None = None) -> Any:
    """``tf.TensorSpec`` of every array, tensor or symbolic input in ``structure``, with
    the batch dimension set to ``batch_size`` (``None``: any batch size; ``"keep"``: as is).

    >>> batch_spec({"a": np.zeros((4, 3), "float32")})
    {'a': TensorSpec(shape=(None, 3), dtype=tf.float32, name=None)}
    """
    import tensorflow as tf

    def one(value: Any) -> Any:
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            value = np.asarray(value)
        shape = tuple(value.shape)
        dtype = tf.as_dtype(getattr(value.dtype, "name", value.dtype))
        batch = shape[0] if batch_size == "keep" and shape else batch_size
        return tf.TensorSpec((batch, *shape[1:]), dtype)

    if isinstance(structure, tuple):
        structure = list(structure)
    return tf.nest.map_structure(one, structure)
