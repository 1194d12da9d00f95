"""Moments of BatchNormalization inputs: count, mean and centred sum of squares (M2).

Inside recalibrate's pass every BN layer's ``call`` is replaced as the :class:`Plan`
says: a selected layer reduces each batch to (count, mean, M2), centred within the
batch -- in a TensorFlow ``tf.function`` (`_moments_tf`, the TensorFlow backend) or with
``keras.ops`` in the trainer's own predict loop (`_runner_keras`, JAX and PyTorch). On
the host, batches are merged in float64 with Chan et al.'s pairwise formula
(:class:`Moments`), which is exact for any split of the data into batches and replicas.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["Moments", "Plan", "Role", "channel_axes"]


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


def channel_axes(layer: Any, rank: int) -> list[int]:
    """The axes a BN layer keeps statistics for (``layer.axis``, non-negative, sorted)."""
    axis = layer.axis
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    return sorted(int(a) % rank for a in axes)
