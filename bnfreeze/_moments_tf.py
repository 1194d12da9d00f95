"""recalibrate's moments inside a TensorFlow ``tf.function`` (the TensorFlow backend and
tf-keras): the fast path, with TensorFlow's fused batch-norm kernel and ``tf.distribute``
all-reduce. Imported only where TensorFlow is the backend (by `_runner`).

:func:`bn_call` stands in for every BN layer's ``call`` in the traced step: a layer
whose statistics are collected reduces its batch to moments -- by the fused kernel
(float32, as Keras's own BN computes batch statistics) or in float64 (masks, other
axes) -- all-reduced across the replicas of a ``tf.distribute`` strategy, and
normalises as the :class:`~bnfreeze._moments.Plan` says.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from bnfreeze._compat import bn_cast_dtype, tf_variable
from bnfreeze._errors import ArgumentError
from bnfreeze._moments import Plan, Role, channel_axes

__all__ = ["bn_call", "replicas_in_sync"]


def replicas_in_sync() -> int:
    """How many replicas run the current step (1 outside a ``tf.distribute`` replica)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def _all_reduce(values: list[tf.Tensor]) -> list[tf.Tensor]:
    """The sums of ``values`` over all replicas of the current step (``values`` on one)."""
    if replicas_in_sync() == 1:
        return values
    context = tf.distribute.get_replica_context()
    return list(context.all_reduce(tf.distribute.ReduceOp.SUM, values))


def _batch_moments(
    inputs: tf.Tensor, mask: Any, reduce_axes: list[int], broadcast: list[Any]
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Global (all replicas) count, mean and M2 of this batch over ``reduce_axes``, in
    float64; masked positions (``mask`` False) do not count."""
    x = tf.cast(inputs, tf.float64)
    if mask is None:
        where = None
        sums = tf.reduce_sum(x, reduce_axes)
        shape = tf.shape(x, out_type=tf.int64)
        n = tf.cast(tf.reduce_prod(tf.gather(shape, reduce_axes)), tf.float64)
        count = tf.ones_like(sums) * n
    else:
        where = tf.broadcast_to(tf.expand_dims(tf.cast(mask, tf.bool), -1), tf.shape(x))
        sums = tf.reduce_sum(tf.where(where, x, tf.zeros_like(x)), reduce_axes)
        count = tf.reduce_sum(tf.cast(where, tf.float64), reduce_axes)
    count, sums = _all_reduce([count, sums])
    mean = tf.math.divide_no_nan(sums, count)
    centred = x - tf.reshape(mean, broadcast)
    squares = centred * centred
    if where is not None:
        squares = tf.where(where, squares, tf.zeros_like(squares))
    (m2,) = _all_reduce([tf.reduce_sum(squares, reduce_axes)])
    return count, mean, m2


def _read(variable: Any) -> tf.Tensor:
    return tf.convert_to_tensor(tf_variable(variable))


def bn_call(plan: Plan, layer: Any, inputs: Any, mask: Any) -> Any:
    """What BN ``layer`` computes on ``inputs`` in the pass, as ``plan`` says (in a trace)."""
    role = plan.roles.get(id(layer), Role("moving"))
    if not inputs.dtype.is_floating:  # an Input(dtype="int32"), a one-hot StringLookup
        inputs = tf.cast(inputs, bn_cast_dtype(layer))
    rank = inputs.shape.rank
    axes = channel_axes(layer, rank)
    reduce_axes = [i for i in range(rank) if i not in axes]
    dynamic = tf.shape(inputs)
    broadcast = [1] * rank
    for a in axes:
        broadcast[a] = inputs.shape[a] if inputs.shape[a] is not None else dynamic[a]
    compute_dtype = tf.float32 if inputs.dtype in (tf.float16, tf.bfloat16) else inputs.dtype
    x = tf.cast(inputs, compute_dtype)
    if mask is not None and mask.shape.rank != rank - 1:
        raise ArgumentError(
            "The mask provided should be one dimension less than the inputs. Received: "
            f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
        )
    if role.kind == "collect" and _fusable(inputs, mask, axes):
        return _fused_collect(plan, role, layer, inputs)
    if role.kind == "collect":
        count, mean64, m2 = _batch_moments(inputs, mask, reduce_axes, broadcast)
        plan.local.collected.setdefault(role.index, []).append((count, mean64, m2))
        if plan.upstream == "batch":
            variance64 = tf.math.divide_no_nan(m2, count)
            mean = tf.cast(mean64, compute_dtype)
            variance = tf.cast(variance64, compute_dtype)
        else:
            mean = tf.cast(_read(layer.moving_mean), compute_dtype)
            variance = tf.cast(_read(layer.moving_variance), compute_dtype)
    elif role.kind == "fixed":
        given_mean, given_variance = plan.local.fixed[role.index]
        mean = tf.cast(given_mean, compute_dtype)
        variance = tf.cast(given_variance, compute_dtype)
    else:
        mean = tf.cast(_read(layer.moving_mean), compute_dtype)
        variance = tf.cast(_read(layer.moving_variance), compute_dtype)
    scale = tf.math.rsqrt(tf.reshape(variance, broadcast) + tf.cast(layer.epsilon, compute_dtype))
    if getattr(layer, "scale", False) and getattr(layer, "gamma", None) is not None:
        scale = scale * tf.reshape(tf.cast(_read(layer.gamma), compute_dtype), broadcast)
    offset = -tf.reshape(mean, broadcast) * scale
    if getattr(layer, "center", False) and getattr(layer, "beta", None) is not None:
        offset = offset + tf.reshape(tf.cast(_read(layer.beta), compute_dtype), broadcast)
    outputs = x * scale + offset
    if role.kind == "probe":
        outputs = tf.identity(outputs, name="bnfreeze_probe")
        plan.local.probes.append((role.index, inputs, outputs))
    return tf.cast(outputs, layer.compute_dtype)


def _fusable(inputs: tf.Tensor, mask: Any, axes: list[int]) -> bool:
    """Channels-last, unmasked, float32/16 inputs: TensorFlow's fused kernel applies."""
    rank = inputs.shape.rank
    return (
        mask is None
        and axes == [rank - 1]
        and inputs.shape[-1] is not None
        and inputs.dtype in (tf.float32, tf.float16, tf.bfloat16)
    )


def _affine(layer: Any, channels: int) -> tuple[tf.Tensor, tf.Tensor]:
    gamma = getattr(layer, "gamma", None) if getattr(layer, "scale", False) else None
    beta = getattr(layer, "beta", None) if getattr(layer, "center", False) else None
    scale = tf.cast(_read(gamma), tf.float32) if gamma is not None else tf.ones([channels])
    offset = tf.cast(_read(beta), tf.float32) if beta is not None else tf.zeros([channels])
    return scale, offset


def _fused_collect(plan: Plan, role: Role, layer: Any, inputs: tf.Tensor) -> tf.Tensor:
    """Collect with TensorFlow's fused batch-norm kernel (one pass, as Keras's BN in fit).

    The kernel gives this replica's batch mean and (Bessel-corrected) variance in float32,
    computed the way Keras's own BatchNormalization computes batch statistics; they are
    turned into (count, mean, M2) in float64 and merged across replicas with Chan's
    formula.
    """
    channels = int(inputs.shape[-1])
    flat = tf.reshape(inputs, [-1, 1, 1, channels])
    scale, offset = _affine(layer, channels)
    epsilon = float(layer.epsilon)
    size = tf.shape(flat, out_type=tf.int64)[0]
    n = tf.cast(size, tf.float64)

    def fused(given: Any = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Normalise with the batch's statistics (``given=None``) or ``(mean, variance)``."""
        none = tf.zeros([0])
        y, batch_mean, batch_variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=flat,
            scale=scale,
            offset=offset,
            mean=none if given is None else given[0],
            variance=none if given is None else given[1],
            epsilon=epsilon,
            data_format="NHWC",
            is_training=given is None,
        )
        return y, batch_mean, batch_variance

    distributed = replicas_in_sync() > 1
    if distributed:  # a replica's share of a small batch may be empty
        y, mean32, variance32 = tf.cond(
            size > 0,
            fused,
            lambda: (tf.zeros_like(flat), tf.zeros([channels]), tf.zeros([channels])),
        )
    else:
        y, mean32, variance32 = fused()
    mean = tf.cast(mean32, tf.float64)
    m2 = tf.cast(variance32, tf.float64) * tf.maximum(n - 1.0, 0.0)  # undo Bessel
    count = tf.ones_like(mean) * n
    if distributed:
        count_g, sums = _all_reduce([count, count * mean])
        mean_g = tf.math.divide_no_nan(sums, count_g)
        (m2_g,) = _all_reduce([m2 + count * tf.square(mean - mean_g)])
        count, mean, m2 = count_g, mean_g, m2_g
        if plan.upstream == "batch":  # normalise with the global batch's statistics
            variance = tf.math.divide_no_nan(m2, count)
            y, _, _ = fused((tf.cast(mean, tf.float32), tf.cast(variance, tf.float32)))
    plan.local.collected.setdefault(role.index, []).append((count, mean, m2))
    # With upstream="recalibrated" this layer's output feeds only layers of later levels,
    # which are not collected in this pass: any normalisation will do.
    return tf.cast(tf.reshape(y, tf.shape(inputs)), layer.compute_dtype)
