"""recalibrate on awkward data: non-finite values refused before anything is written,
empty batches skipped, integer inputs cast as Keras's BN casts them, progress of streams
of unknown length."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import bnfreeze
from bnfreeze._compat import keras
from tests import helpers as h

L = keras.layers


def moments(a: Any, axes: tuple[int, ...] = (0,)) -> tuple[np.ndarray, np.ndarray]:
    """numpy mean and biased variance in float64 (the reference)."""
    a = np.asarray(a, dtype=np.float64)
    return a.mean(axis=axes), a.var(axis=axes)


def assert_stats(layer: Any, mean: np.ndarray, var: np.ndarray, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(h.to_numpy(layer.moving_mean), mean, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(h.to_numpy(layer.moving_variance), var, rtol=rtol, atol=rtol)


def bn_on_inputs(shape: tuple[int, ...] = (4,), dtype: str = "float32", axis: int = -1) -> Any:
    """Input -> BatchNormalization: the BN's statistics are those of the data itself."""
    inputs = keras.Input(shape, dtype=dtype)
    return keras.Model(inputs, L.BatchNormalization(axis=axis, name="bn")(inputs))


def chain() -> Any:
    """Dense -> BN1 -> Dense -> BN2."""
    inputs = keras.Input((4,))
    x = L.BatchNormalization(name="bn1")(L.Dense(6, name="d1")(inputs))
    return keras.Model(inputs, L.BatchNormalization(name="bn2")(L.Dense(3, name="d2")(x)))


def data(n: int, shape: tuple[int, ...] = (4,), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.5, 2.0, size=(n, *shape)).astype("float32")


def refused(model: Any, x: Any, **kwargs: Any) -> str:
    """The whole DataError message; the model's variables must be bit-for-bit unchanged."""
    before = h.snapshot(model)
    with pytest.raises(bnfreeze.DataError) as info:
        bnfreeze.recalibrate(model, x, verbose=0, **kwargs)
    after = h.snapshot(model)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    return str(info.value)


def non_finite(layer: str, which: str, batch: int) -> str:
    return (
        f"Layer {layer!r} would get a non-finite moving_{which}: it became non-finite at "
        f"batch {batch} of `data` (counting from 0), where the layer's inputs hold NaN or "
        f"infinity, or values whose {which} overflows float32. Nothing was changed. Expected "
        "finite inputs of moderate size: check `data` for NaN and infinite values, and its "
        "scale."
    )


# --- non-finite data ---------------------------------------------------------------------


def test_nan_refused_as_in_the_issue() -> None:
    """The issue's example (one NaN behind a Dense layer) is refused; nothing is written."""
    model = keras.Sequential([keras.Input((4,)), L.Dense(8), L.BatchNormalization(name="bn")])
    x = data(64)
    x[5, 1] = np.nan
    assert refused(model, x) == non_finite("bn", "mean", 0)


@pytest.mark.parametrize(
    ("value", "which"), [(np.inf, "mean"), (-np.inf, "mean"), (1e30, "variance")]
)
def test_non_finite_or_overflowing_value_names_its_batch(value: float, which: str) -> None:
    """inf, -inf, and a finite 1e30 whose variance overflows float32: refused at its batch."""
    model = bn_on_inputs()
    x = data(80)
    x[70, 2] = value  # batch 4 of 16
    assert refused(model, x, batch_size=16) == non_finite("bn", which, 4)


@pytest.mark.parametrize("upstream", ["batch", "recalibrated"])
def test_first_layer_in_model_order_is_named(upstream: str) -> None:
    """NaN feeding a chain of BN layers names the first one, and the batch holding it."""
    x = data(48)
    x[20, 0] = np.nan  # batch 1 of 16
    assert refused(chain(), x, batch_size=16, upstream=upstream) == non_finite("bn1", "mean", 1)


def test_overflow_across_batches_named_where_it_happens() -> None:
    """Two 1e30 values in different single-row batches: finite alone, refused once merged."""
    model = bn_on_inputs()
    batches = [data(4), data(1), data(4, seed=1), data(1, seed=2)]
    batches[1][0, 0] = 1e30
    batches[3][0, 0] = -1e30
    assert refused(model, iter(batches)) == non_finite("bn", "variance", 1)


# --- empty batches ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis"), [((4,), -1), ((3, 5), 1)], ids=["fused-kernel", "float64-path"]
)
def test_empty_batches_are_skipped(shape: tuple[int, ...], axis: int) -> None:
    """Empty batches (first, middle, last) in a clean stream change nothing: exact moments."""
    model = bn_on_inputs(shape, axis=axis)
    full = [data(16, shape, seed=i) for i in range(3)]
    empty = np.zeros((0, *shape), "float32")
    bnfreeze.recalibrate(model, iter([empty, full[0], empty, full[1], full[2], empty]), verbose=0)
    axes = tuple(i for i in range(len(shape) + 1) if i != axis % (len(shape) + 1))
    assert_stats(model.get_layer("bn"), *moments(np.concatenate(full), axes))


def test_empty_batches_in_a_chain_with_recalibrated_upstream() -> None:
    """Empty batches skipped in every pass of upstream='recalibrated' (a PyDataset)."""
    model, twin = chain(), chain()
    twin.set_weights(model.get_weights())
    x = data(32)
    batches = [x[:16], x[:0], x[16:]]

    class Batches(getattr(keras.utils, "PyDataset", keras.utils.Sequence)):  # type: ignore[misc]
        def __len__(self) -> int:
            return len(batches)

        def __getitem__(self, i: int) -> Any:
            return batches[i]

    bnfreeze.recalibrate(model, Batches(), upstream="recalibrated", verbose=0)
    bnfreeze.recalibrate(twin, x, batch_size=16, upstream="recalibrated", verbose=0)
    for name in ("bn1", "bn2"):
        got, want = model.get_layer(name), twin.get_layer(name)
        assert_stats(got, h.to_numpy(want.moving_mean), h.to_numpy(want.moving_variance))


def test_only_empty_batches_refused() -> None:
    """A stream of empty batches only has no statistics: DataError, nothing written."""
    empty = np.zeros((0, 4), "float32")
    assert refused(bn_on_inputs(), iter([empty, empty, empty])) == (
        "`data` (Python generator) yielded only empty batches (3). Expected at least one "
        "batch of inputs to compute statistics from."
    )


# --- integer inputs -----------------------------------------------------------------------


# JAX without x64 warns that it keeps int64 as int32 (values this small are unchanged).
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype int64")
@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool"])
@pytest.mark.parametrize("upstream", ["batch", "recalibrated"])
def test_integer_inputs_cast_as_keras_casts_them(dtype: str, upstream: str) -> None:
    """BN fed integers or booleans directly: the numpy moments of those values."""
    model = bn_on_inputs((3,), dtype=dtype)
    x = np.random.default_rng(2).integers(0, 200, size=(50, 3)).astype(dtype)
    bnfreeze.recalibrate(model, x, batch_size=16, upstream=upstream, verbose=0)
    assert_stats(model.get_layer("bn"), *moments(x))
    predicted = model.predict(x, verbose=0)  # the model now normalises its data
    np.testing.assert_allclose(predicted.mean(axis=0), 0.0, atol=1e-4)


@h.tensorflow_only("string tensors (StringLookup on a tf.data dataset)")
def test_string_lookup_one_hot_feeds_batch_norm() -> None:
    """BN after StringLookup(output_mode="one_hot") (integer one-hot): numpy moments."""
    inputs = keras.Input((1,), dtype="string")
    lookup = L.StringLookup(vocabulary=["a", "b", "c"], output_mode="one_hot")
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(lookup(inputs)))
    words = np.random.default_rng(3).choice(["a", "b", "c", "unknown"], size=(40, 1))
    dataset = tf.data.Dataset.from_tensor_slices(words).batch(16)
    bnfreeze.recalibrate(model, dataset, verbose=0)
    one_hot = np.eye(4)[[{"a": 1, "b": 2, "c": 3}.get(w, 0) for w in words[:, 0]]]
    assert_stats(model.get_layer("bn"), *moments(one_hot))


# --- progress ------------------------------------------------------------------------------


def stream(n: int) -> Iterator[np.ndarray]:
    for i in range(n):
        yield data(8, seed=i)


def test_unknown_length_shows_batches_seen(capsys: Any) -> None:
    """With the default verbose, a generator of unknown length shows how many batches it read."""
    bnfreeze.recalibrate(bn_on_inputs(), stream(3))
    assert "3/Unknown" in capsys.readouterr().out


def test_steps_gives_the_progress_bar_its_end(capsys: Any) -> None:
    """With `steps`, the progress bar of an endless generator counts up to it."""

    def endless() -> Iterator[np.ndarray]:
        while True:
            yield data(8)

    bnfreeze.recalibrate(bn_on_inputs(), endless(), steps=4)
    out = capsys.readouterr().out
    assert "4/4" in out and "Unknown" not in out
