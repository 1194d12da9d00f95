"""Moments of BatchNormalization inputs: count, mean and centred sum of squares (M2).

Inside recalibrate's traced step, :func:`bn_call` stands in for every BN layer's
``call``: a layer whose statistics are collected reduces its batch to moments -- by
TensorFlow's fused batch-norm kernel (float32, as Keras's own BN computes batch
statistics) or in float64 (masks, other axes) -- all-reduced across the replicas of a
``tf.distribute`` strategy, and normalises as the :class:`Plan` says. On the host,
batches are merged in float64 with Chan et al.'s pairwise formula (:class:`Moments`),
which is exact for any split of the data into batches and replicas.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from bnfreeze._compat import bn_cast_dtype, tf_variable
from bnfreeze._errors import ArgumentError

__all__ = ["Moments", "Plan", "Role", "bn_call", "replicas_in_sync"]


@dataclass
class Moments:
    """Exact running (count, mean, centred sum of squares) per channel, in float64."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @staticmethod
    def empty(shape: tuple[int, ...]) -> Moments:
        return Moments(np.zeros(shape), np.zeros(shape), np.zeros(shape))

    def add(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan et al.'s pairwise update: exact for any split into batches.

        Channels that counted nothing (an empty batch or replica share, a fully masked
        channel) are skipped exactly, whatever their ``mean`` and ``m2`` say (the fused
        kernel gives NaN for zero rows).
        """
        counted = count > 0
        total = self.count + count
        frac = np.divide(count, total, out=np.zeros_like(total), where=total > 0)
        with np.errstate(all="ignore"):  # non-finite inputs stay so; non_finite() tells
            delta = np.where(counted, mean - self.mean, 0.0)
            self.mean = self.mean + delta * frac
            self.m2 = self.m2 + np.where(counted, m2, 0.0) + delta * delta * self.count * frac
        self.count = total

    def variance(self) -> np.ndarray:
        """The biased variance (what Keras's BN keeps); 0 where nothing was counted."""
        return np.asarray(self.m2 / np.maximum(self.count, 1e-300))

    def non_finite(self, dtype: Any) -> str | None:
        """``"mean"`` or ``"variance"`` when that statistic is not finite in ``dtype``
        (NaN, infinity, or too large for it), else ``None``."""
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.all(np.isfinite(self.mean.astype(dtype))):
                return "mean"
            if not np.all(np.isfinite(self.variance().astype(dtype))):
                return "variance"
        return None


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


# --- the BN layer's call during the pass ------------------------------------------------


@dataclass
class Role:
    """What one BN layer does in a pass: normalise with its ``moving`` statistics,
    ``collect`` its input's moments, normalise with ``fixed`` ones (already
    recalibrated), or ``probe`` (record its input and output, to find which BN feeds
    which)."""

    kind: Literal["moving", "collect", "fixed", "probe"]
    index: int = -1


@dataclass
class Plan:
    """What each BN layer does in the current pass, by ``id(layer)``; read at trace time.

    ``local`` holds, while tracing, the given statistics of ``fixed`` layers (``fixed``:
    target index -> ``(mean, variance)`` tensors) and what the trace collects:
    ``collected`` (target index -> one ``(count, mean, M2)`` per call) and ``probes``.
    """

    upstream: str
    roles: dict[int, Role] = field(default_factory=dict)
    local: threading.local = field(default_factory=threading.local)


def _read(variable: Any) -> tf.Tensor:
    return tf.convert_to_tensor(tf_variable(variable))


def _channel_axes(layer: Any, rank: int) -> list[int]:
    axis = layer.axis
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    return sorted(int(a) % rank for a in axes)


def bn_call(plan: Plan, layer: Any, inputs: Any, mask: Any) -> Any:
    """What BN ``layer`` computes on ``inputs`` in the pass, as ``plan`` says (in a trace)."""
    role = plan.roles.get(id(layer), Role("moving"))
    if not inputs.dtype.is_floating:  # an Input(dtype="int32"), a one-hot StringLookup
        inputs = tf.cast(inputs, bn_cast_dtype(layer))
    rank = inputs.shape.rank
    axes = _channel_axes(layer, rank)
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
