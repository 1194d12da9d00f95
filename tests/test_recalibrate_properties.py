"""Property: on any stream of batches, recalibrate gives numpy's statistics, or raises a
BNFreezeError (or the stream's own error) and leaves the model exactly as it was.

The streams vary the feature shape, the dtype, the BN axis (TensorFlow's fused kernel or
the float64 path), the batch sizes (empty batches included), `steps`, and may hold a NaN,
an infinity or a huge finite value, a batch of another shape, or fail part-way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import bnfreeze
from bnfreeze._compat import keras
from tests import helpers as h

SPECIALS = (np.nan, np.inf, -np.inf, 1e30)


class StreamFailed(OSError):
    """What a failing stream raises."""


@dataclass
class Stream:
    dtype: str
    shape: tuple[int, ...]
    axis: int
    batches: list[np.ndarray]
    steps: int | None
    fail_at: int | None
    odd_at: int | None  # a batch of another feature shape

    def read(self) -> Any:
        for index, batch in enumerate(self.batches):
            if index == self.fail_at:
                raise StreamFailed("the stream failed")
            if index == self.odd_at:
                yield np.zeros((len(batch), *self.shape[:-1], self.shape[-1] + 1), self.dtype)
            else:
                yield batch


@st.composite
def streams(draw: Any) -> Stream:
    # JAX without x64 has no float64 (it warns and uses float32).
    dtypes = ["float32", "float64", "int32"] if h.BACKEND != "jax" else ["float32", "int32"]
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.sampled_from([(3,), (2, 3), (2, 2, 3)]))
    axis = draw(st.sampled_from([-1, 1])) if len(shape) > 1 else -1
    sizes = draw(st.lists(st.integers(0, 6), min_size=1, max_size=5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    loc, scale = draw(st.floats(-10, 10)), draw(st.floats(0.5, 5))
    if dtype == "int32":
        batches = [rng.integers(-50, 50, size=(n, *shape)).astype(dtype) for n in sizes]
    else:
        batches = [rng.normal(loc, scale, size=(n, *shape)).astype(dtype) for n in sizes]
    filled = [i for i, n in enumerate(sizes) if n]
    if dtype != "int32" and filled and draw(st.integers(0, 3)) == 0:
        batch = draw(st.sampled_from(filled))
        position = tuple(int(rng.integers(0, d)) for d in batches[batch].shape)
        batches[batch][position] = draw(st.sampled_from(SPECIALS))
    count = len(sizes)
    rarely = [None] * (5 * count)  # most streams neither fail nor change shape
    return Stream(
        dtype=dtype,
        shape=shape,
        axis=axis,
        batches=batches,
        steps=draw(st.sampled_from([None, *range(1, count + 1)])),
        fail_at=draw(st.sampled_from([*rarely, *range(count)])),
        odd_at=draw(st.sampled_from([*rarely, *range(1, count)])),
    )


@dataclass
class Outcome:
    """Statistics (``mean``, ``var``) or an error (``error``, and ``text`` in its message)."""

    mean: Any = None
    var: Any = None
    error: type[BaseException] | None = None
    text: str = ""


def expected(stream: Stream) -> Outcome:
    """What must happen, computed with numpy from the batches ``steps`` lets be read."""
    rank = len(stream.shape) + 1
    axes = tuple(i for i in range(rank) if i != stream.axis % rank)
    used: list[np.ndarray] = []
    limit = len(stream.batches) if stream.steps is None else stream.steps
    for index, batch in enumerate(stream.batches[:limit]):
        if index == stream.fail_at:
            return Outcome(error=StreamFailed, text="the stream failed")
        if index == stream.odd_at:
            return Outcome(error=bnfreeze.DataError, text=f"batch {index} (counting from 0)")
        if not len(batch):
            continue
        used.append(batch.astype(np.float32).astype(np.float64))  # as Keras casts it
        values = np.concatenate(used)
        with np.errstate(all="ignore"):
            mean, var = values.mean(axis=axes), values.var(axis=axes)
            finite = np.isfinite(mean.astype(np.float32)) & np.isfinite(var.astype(np.float32))
        if not finite.all():
            return Outcome(error=bnfreeze.DataError, text=f"at batch {index} of `data`")
    if not used:
        return Outcome(error=bnfreeze.DataError, text="yielded only empty batches")
    return Outcome(mean=mean, var=var)


@cache
def model_for(dtype: str, shape: tuple[int, ...], axis: int) -> Any:
    """One model per kind of stream, reused across examples (its statistics are reset)."""
    inputs = keras.Input(shape, dtype=dtype)
    return keras.Model(inputs, keras.layers.BatchNormalization(axis=axis, name="bn")(inputs))


@pytest.fixture(autouse=True)
def _fresh_models() -> Any:
    model_for.cache_clear()  # the session was cleared: build models again
    yield
    model_for.cache_clear()


@settings(
    max_examples=h.examples(60),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=streams())
def test_exact_statistics_or_an_error_with_the_model_untouched(stream: Stream) -> None:
    """Numpy's statistics of the batches read, or an error and every variable unchanged."""
    model = model_for(stream.dtype, stream.shape, stream.axis)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full(bn.moving_mean.shape, -3.0, "float32"))
    bn.moving_variance.assign(np.full(bn.moving_variance.shape, 0.05, "float32"))
    before = h.snapshot(model)
    want = expected(stream)
    event(want.error.__name__ if want.error else "statistics")
    if want.error is None:
        bnfreeze.recalibrate(model, stream.read(), steps=stream.steps, verbose=0)
        atol = 1e-5 * (1.0 + np.abs(want.mean).max() + want.var.max())
        np.testing.assert_allclose(h.to_numpy(bn.moving_mean), want.mean, rtol=1e-5, atol=atol)
        np.testing.assert_allclose(h.to_numpy(bn.moving_variance), want.var, rtol=1e-4, atol=atol)
        return
    with pytest.raises(want.error) as info:
        bnfreeze.recalibrate(model, stream.read(), steps=stream.steps, verbose=0)
    assert want.text in str(info.value)
    assert want.error is StreamFailed or isinstance(info.value, bnfreeze.BNFreezeError)
    after = h.snapshot(model)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
