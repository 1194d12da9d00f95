"""compare_phases: regularized models, and every input checked before anything runs.

Losses are compared with what Keras's own ``evaluate`` and one learning-rate-0 ``fit``
step report, and with an independent numpy reference (mean squared error of ``predict``
plus the regularization terms computed from the weights and activations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import bnfreeze
from bnfreeze._compat import keras, to_numpy
from tests.helpers import compile_sgd, data, functional, multi_io, set_far_statistics, snapshot

L = keras.layers
KERNEL_L2, GAMMA_L2, ACTIVITY_L1 = 0.1, 0.5, 0.05


def regularized() -> Any:
    """Dense (kernel L2) -> BN (gamma L2) -> Dense (activity L1) -> head; far BN statistics."""
    inputs = keras.Input((6,))
    h = L.Dense(8, kernel_regularizer=keras.regularizers.L2(KERNEL_L2), name="dense")(inputs)
    h = L.BatchNormalization(name="bn", gamma_regularizer=keras.regularizers.L2(GAMMA_L2))(h)
    h = L.Dense(4, activity_regularizer=keras.regularizers.L1(ACTIVITY_L1), name="act")(h)
    model = keras.Model(inputs, L.Dense(2, name="head")(h), name="regularized")
    set_far_statistics(model)
    return compile_sgd(model, lr=0.0)


def numpy_inference_loss(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """MSE of predict, plus kernel L2, gamma L2 and the per-example activity L1."""
    pred = to_numpy(model.predict(x, verbose=0))
    act = to_numpy(keras.Model(model.input, model.get_layer("act").output)(x))
    kernel = to_numpy(model.get_layer("dense").kernel)
    gamma = to_numpy(model.get_layer("bn").gamma)
    return float(
        np.mean((pred - y) ** 2)
        + KERNEL_L2 * np.sum(kernel**2)
        + GAMMA_L2 * np.sum(gamma**2)
        + ACTIVITY_L1 * np.sum(np.abs(act)) / len(x)
    )


def test_regularized_model_losses_equal_evaluate_and_one_lr0_fit_step() -> None:
    """With weight and activity regularizers, both losses match evaluate and a real fit step."""
    model = regularized()
    x, y = data((6,), 8), data((2,), 8, seed=1)
    before = snapshot(model)
    result = bnfreeze.compare_phases(model, x, y)
    explicit = bnfreeze.compare_phases(model, x, y, loss="mse")
    after = snapshot(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert result.loss is not None and explicit.loss == pytest.approx(result.loss, rel=1e-5)
    reference = numpy_inference_loss(model, x, y)
    evaluated = model.evaluate(x, y, batch_size=len(x), verbose=0)
    fitted = model.fit(x, y, batch_size=len(x), verbose=0, shuffle=False).history["loss"][0]
    np.testing.assert_allclose(result.loss["inference"], evaluated, rtol=1e-5)
    np.testing.assert_allclose(result.loss["inference"], reference, rtol=1e-4)
    np.testing.assert_allclose(result.loss["training"], fitted, rtol=1e-5)
    assert result.loss["training"] != pytest.approx(result.loss["inference"], rel=0.1)


# --- inputs checked before anything runs --------------------------------------------------

X_EXPECTED = (
    "Expected `x` to be one batch of inputs: a numpy array or tensor, or a list, tuple or "
    "dict of them. "
)
X16, Y16 = data((6,), 16), data((2,), 16, seed=1)


def _with_value(array: np.ndarray, index: tuple[int, int], value: float) -> np.ndarray:
    changed = array.copy()
    changed[index] = value
    return changed


BAD_CALLS: dict[str, tuple[Callable[[Any], Any], type[Exception], str]] = {
    "x-none": (
        lambda m: bnfreeze.compare_phases(m, None),
        bnfreeze.ArgumentTypeError,
        X_EXPECTED + "Received: x=None.",
    ),
    "x-dataset": (
        lambda m: bnfreeze.compare_phases(m, tf.data.Dataset.from_tensor_slices((X16, Y16))),
        bnfreeze.ArgumentTypeError,
        X_EXPECTED + "Received: x is a tf.data.Dataset. Take one batch from it first: "
        "`x, y = next(iter(dataset))`.",
    ),
    "x-sparse": (
        lambda m: bnfreeze.compare_phases(m, tf.sparse.from_dense(X16)),
        bnfreeze.ArgumentTypeError,
        X_EXPECTED + "Received: x is a tf.SparseTensor of shape (16, 6). Pass it as a dense "
        "tensor: `tf.sparse.to_dense(x)`.",
    ),
    "x-list-of-floats": (
        lambda m: bnfreeze.compare_phases(m, [[1.0] * 6] * 16),
        bnfreeze.ArgumentTypeError,
        X_EXPECTED + "Received: x[0][0]=1.0 (float).",
    ),
    "x-objects": (
        lambda m: bnfreeze.compare_phases(m, np.array([{}] * 16, dtype=object)),
        bnfreeze.ArgumentTypeError,
        "Expected `x` to hold numbers (or strings, for a model that reads them). "
        "Received: x of dtype object.",
    ),
    "x-scalar": (
        lambda m: bnfreeze.compare_phases(m, np.float32(1.0)),
        bnfreeze.ArgumentError,
        "Expected `x` to have a batch dimension (one row per example). Received: x of shape ().",
    ),
    "x-wrong-shape": (
        lambda m: bnfreeze.compare_phases(m, data((5,), 16)),
        bnfreeze.ArgumentError,
        "Expected `x` to match the input shape of model 'functional', (None, 6). "
        "Received: x of shape (16, 5).",
    ),
    "x-two-arrays": (
        lambda m: bnfreeze.compare_phases(m, [X16, X16]),
        bnfreeze.ArgumentError,
        "Expected `x` to hold 1 array, one per input of model 'functional'. Received: 2 arrays.",
    ),
    "x-empty": (
        lambda m: bnfreeze.compare_phases(m, X16[:0], Y16[:0]),
        bnfreeze.DataError,
        "Expected `x` to hold at least one example. Received: x with 0 rows.",
    ),
    "x-nan": (
        lambda m: bnfreeze.compare_phases(m, _with_value(X16, (5, 1), np.nan), Y16),
        bnfreeze.DataError,
        "Expected finite values in `x`. Received: x holds 1 NaN or infinite value, the "
        "first at index (5, 1). Replace or drop them: compare_phases would report NaN losses.",
    ),
    "y-inf": (
        lambda m: bnfreeze.compare_phases(
            m, X16, _with_value(_with_value(Y16, (15, 0), np.inf), (15, 1), -np.inf)
        ),
        bnfreeze.DataError,
        "Expected finite values in `y`. Received: y holds 2 NaN or infinite values, the "
        "first at index (15, 0). Replace or drop them: compare_phases would report NaN losses.",
    ),
    "y-10-rows-for-16": (
        lambda m: bnfreeze.compare_phases(m, X16, Y16[:10]),
        bnfreeze.ArgumentError,
        "Expected `y` to hold one target per example of `x` (16 rows). Received: y with 10 rows.",
    ),
    "y-one-row": (
        lambda m: bnfreeze.compare_phases(m, X16, Y16[:1]),
        bnfreeze.ArgumentError,
        "Expected `y` to hold one target per example of `x` (16 rows). Received: y with 1 row.",
    ),
    "loss-42": (
        lambda m: bnfreeze.compare_phases(m, X16, Y16, loss=42),
        bnfreeze.ArgumentTypeError,
        "Expected `loss` to be a loss name (e.g. 'mse') or a callable loss(y_true, y_pred). "
        "Received: loss=42 (int).",
    ),
    "loss-unknown-name": (
        lambda m: bnfreeze.compare_phases(m, X16, Y16, loss="nope"),
        bnfreeze.ArgumentError,
        "Expected `loss` to be the name of a Keras loss (e.g. 'mse'). Received: loss='nope'.",
    ),
    "loss-without-y": (
        lambda m: bnfreeze.compare_phases(m, X16, loss="mse"),
        bnfreeze.ArgumentError,
        "compare_phases received `loss` but no targets `y`. Received: loss='mse', y=None. "
        "Expected targets to compute the loss on, or no loss= to compare the outputs only.",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_inputs_raise_naming_the_argument_and_leave_the_model_untouched(case: str) -> None:
    """Each bad x, y or loss raises its error with the whole message; nothing changes."""
    call, error, message = BAD_CALLS[case]
    model = compile_sgd(functional())
    before = snapshot(model)
    with pytest.raises(error) as info:
        call(model)
    assert str(info.value) == message
    assert isinstance(info.value, bnfreeze.BNFreezeError)
    after = snapshot(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all("call" not in vars(layer) for layer in model.layers)


def test_arrays_of_one_input_of_several_must_agree_in_length() -> None:
    """A two-input model given 16 and 10 rows: the error names both arrays."""
    model = compile_sgd(multi_io())
    with pytest.raises(bnfreeze.ArgumentError) as info:
        bnfreeze.compare_phases(model, [data((6,), 16), data((4,), 10)])
    assert str(info.value) == (
        "Expected every array in `x` to hold the same number of examples. "
        "Received: x[0] with 16 rows and x[1] with 10 rows."
    )


def test_valid_structures_are_accepted() -> None:
    """A tuple of inputs and a list of targets for a two-input, two-output model work."""
    model = compile_sgd(multi_io())
    x = (data((6,), 8), data((4,), 8, seed=1))
    y = [data((2,), 8, seed=2), data((1,), 8, seed=3)]
    result = bnfreeze.compare_phases(model, x, y)
    evaluated = model.evaluate(list(x), y, batch_size=8, verbose=0)
    assert result.loss is not None
    np.testing.assert_allclose(result.loss["inference"], evaluated[0], rtol=1e-5)
