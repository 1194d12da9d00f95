"""The data recalibrate reads: every batch checked against the model and the first batch,
length-less PyDatasets, several inputs as tuples, string inputs' signatures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import bnfreeze
from bnfreeze._compat import keras
from bnfreeze._data import batch_spec
from tests import helpers as h

L = keras.layers
PyDataset = getattr(keras.utils, "PyDataset", keras.utils.Sequence)


def bn_model(features: int = 4) -> Any:
    """Input -> BatchNormalization (the BN's statistics are the data's own)."""
    inputs = keras.Input((features,))
    return keras.Model(inputs, L.BatchNormalization(name="bn")(inputs))


def two_inputs() -> Any:
    """Inputs "a" (3 features) and "b" (2), each normalised by its own BN."""
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    outputs = [L.BatchNormalization(name="bn_a")(a), L.BatchNormalization(name="bn_b")(b)]
    return keras.Model([a, b], outputs)


def rows(n: int, features: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(2.0, 3.0, size=(n, features)).astype("float32")


def assert_moments(layer: Any, x: np.ndarray) -> None:
    """``layer``'s moving statistics are numpy's mean and biased variance of ``x``."""
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(h.to_numpy(layer.moving_mean), x64.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(h.to_numpy(layer.moving_variance), x64.var(axis=0), rtol=1e-5)


def refused(model: Any, data: Any) -> str:
    """The whole message of the DataError ``recalibrate(model, data)`` raises; the model's
    variables are checked to be bit-for-bit unchanged."""
    before = h.snapshot(model)
    with pytest.raises(bnfreeze.DataError) as info:
        bnfreeze.recalibrate(model, data, verbose=0)
    after = h.snapshot(model)
    assert before.keys() == after.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    return str(info.value)


class NoLength(PyDataset):  # type: ignore[misc, valid-type]
    """A PyDataset (Sequence) of batches of 8 rows that does not say how many it has."""

    def __init__(self, x: np.ndarray) -> None:
        super().__init__()
        self.x = x

    def __getitem__(self, index: int) -> Any:
        return self.x[index * 8 : (index + 1) * 8]


def test_pydataset_without_length_reads_steps_batches() -> None:
    """A PyDataset without a length is read for `steps` batches: their exact moments."""
    model, x = bn_model(), rows(40)
    bnfreeze.recalibrate(model, NoLength(x), steps=3, verbose=0)
    assert_moments(model.get_layer("bn"), x[:24])


def test_pydataset_without_length_needs_steps() -> None:
    """Without `steps`, a PyDataset without a length is refused before anything runs."""
    assert refused(bn_model(), NoLength(rows(40))) == (
        "`data` is a PyDataset without a length, so the pass would never end. Expected "
        "`steps` to say how many batches to read."
    )


def test_tuple_of_arrays_is_several_inputs() -> None:
    """An (a, b) tuple for a two-input model is two inputs, batched together."""
    model, xa, xb = two_inputs(), rows(20, 3), rows(20, 2, seed=1)
    bnfreeze.recalibrate(model, (xa, xb), batch_size=8, verbose=0)
    assert_moments(model.get_layer("bn_a"), xa)
    assert_moments(model.get_layer("bn_b"), xb)


@h.tensorflow_only("string tensors")
def test_batch_spec_of_strings() -> None:
    """Arrays of Python strings get a tf.string signature."""
    spec = batch_spec([np.array([["a"], ["bc"]]), np.array([[b"x"]], dtype=object)])
    assert spec == [tf.TensorSpec((None, 1), tf.string), tf.TensorSpec((None, 1), tf.string)]


def generator(batches: list[Any]) -> Iterator[Any]:
    yield from batches


def with_keys(x: np.ndarray, keys: tuple[str, str]) -> dict[str, np.ndarray]:
    return {keys[0]: x[:, :3], keys[1]: x[:, 3:5]}


CASES: dict[str, tuple[Callable[[], Any], Callable[[], list[Any]], str]] = {
    "shape": (
        bn_model,
        lambda: [rows(8), rows(8), rows(8, 5)],
        "Expected batches of `data` to match the model's input shape (None, 4). Received: "
        "batch 2 (counting from 0) of shape (8, 5).",
    ),
    "dict-key": (
        two_inputs,
        lambda: [with_keys(rows(8, 5), ("a", "b")), with_keys(rows(8, 5), ("a", "c"))],
        "Expected every batch of `data` to be structured as the first one, a dict with keys "
        "['a', 'b']. Received: batch 1 (counting from 0) that is a dict with keys ['a', 'c'].",
    ),
    "list-not-array": (
        bn_model,
        lambda: [rows(8), rows(8), rows(8), rows(5).tolist()],
        "Expected every batch of `data` to be structured as the first one, an array. "
        "Received: batch 3 (counting from 0) that is a list of 5.",
    ),
    "none": (
        bn_model,
        lambda: [rows(8), None],
        "Expected every batch of `data` to hold arrays or tensors. Received batch 1 "
        "(counting from 0) containing NoneType.",
    ),
    "strings": (
        bn_model,
        lambda: [rows(8), np.full((8, 4), "x")],
        "Expected every batch of `data` to hold numbers of shape (None, 4), as the first "
        "one. Received: batch 1 (counting from 0) holding strings of shape (8, 4).",
    ),
    "ragged-rows": (
        two_inputs,
        lambda: [([rows(8, 3), rows(8, 2)],), ([rows(8, 3), rows(5, 2)],)],  # (x,) elements
        "Expected every array in a batch of `data` to have the same batch size (first "
        "dimension). Received: batch 1 (counting from 0) of arrays of shapes (8, 3), (5, 2).",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_later_batch_unlike_the_first_is_refused(case: str) -> None:
    """A batch unlike the first one (or the model's inputs): DataError naming its index."""
    build, batches, message = CASES[case]
    assert refused(build(), generator(batches())) == message


class Undeclared(keras.Model):
    """A subclassed model: it declares no input shape, so only the first batch says one."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = L.BatchNormalization(name="bn")

    def call(self, x: Any, training: Any = None) -> Any:
        return self.bn(x, training=training)


def test_rank_change_refused_without_declared_inputs() -> None:
    """Without declared inputs, a batch of another rank than the first is refused."""
    model = Undeclared()
    model(rows(2))
    batches = [rows(8), rows(8), rows(8).reshape(8, 2, 2)]
    assert refused(model, generator(batches)) == (
        "Expected every batch of `data` to hold numbers of shape (None, 4), as the first "
        "one. Received: batch 2 (counting from 0) holding numbers of shape (8, 2, 2)."
    )


def test_later_dataset_batch_of_other_width_refused() -> None:
    """A tf.data.Dataset whose later batches change width: refused at that batch."""
    first = tf.data.Dataset.from_tensor_slices(rows(16)).batch(8)
    wider = tf.data.Dataset.from_tensor_slices(rows(8, 5)).batch(8)
    assert refused(bn_model(), first.concatenate(wider)) == (
        "Expected batches of `data` to match the model's input shape (None, 4). Received: "
        "batch 2 (counting from 0) of shape (8, 5)."
    )
