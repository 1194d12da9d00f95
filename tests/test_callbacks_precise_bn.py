"""bnfreeze.callbacks.PreciseBN: population statistics before validation and at the end.

The reference statistics are numpy's mean and (biased) variance of the BN input over the
calibration data, computed in float64 from the dense layer's weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import keras
from bnfreeze.callbacks import PreciseBN
from tests import helpers as h

L = keras.layers
X = h.data((6,), n=48, seed=0) * 2.0 + 1.0
Y = h.data((2,), n=48, seed=1)
X_CAL = h.data((6,), n=40, seed=2) * 2.0 + 1.0
X_VAL, Y_VAL = h.data((6,), n=24, seed=3) * 2.0 + 1.0, h.data((2,), n=24, seed=4)


def small() -> Any:
    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, name="dense"),
            L.BatchNormalization(name="bn"),
            L.Dense(2, name="head"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def population(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy mean and biased variance of the BN input over X_CAL."""
    hidden = X_CAL.astype("float64") @ kernel.astype("float64") + bias.astype("float64")
    return hidden.mean(axis=0), hidden.var(axis=0)


def assert_population(mean: np.ndarray, var: np.ndarray, kernel: Any, bias: Any) -> None:
    ref_mean, ref_var = population(np.asarray(kernel), np.asarray(bias))
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=2e-5)
    np.testing.assert_allclose(var, ref_var, rtol=2e-5)


def assert_model_population(model: Any) -> None:
    """The model's BN statistics now are the population statistics of its input now."""
    bn, dense = model.get_layer("bn"), model.get_layer("dense")
    values = [bn.moving_mean, bn.moving_variance, dense.kernel, dense.bias]
    assert_population(*(h.to_numpy(v) for v in values))


class Record(keras.callbacks.Callback):  # type: ignore[misc]
    """Weights and logs at every epoch end (placed after PreciseBN)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []
        self.logs: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.weights.append([h.to_numpy(v).copy() for v in self.model.weights])
        self.logs.append(dict(logs or {}))


def stats(weights: list[np.ndarray], model: Any) -> dict[str, np.ndarray]:
    names = {
        id(model.get_layer("dense").kernel): "kernel",
        id(model.get_layer("dense").bias): "bias",
        id(model.get_layer("bn").moving_mean): "mean",
        id(model.get_layer("bn").moving_variance): "var",
    }
    return {names[id(v)]: w for v, w in zip(model.weights, weights, strict=True) if id(v) in names}


def test_population_statistics_and_last_val_loss() -> None:
    """After fit: population BN statistics, and the last val_loss equals evaluate."""
    model = small()
    history = model.fit(
        X,
        Y,
        batch_size=8,
        epochs=3,
        validation_data=(X_VAL, Y_VAL),
        callbacks=[PreciseBN(X_CAL, batch_size=16)],
        verbose=0,
    )
    assert_model_population(model)
    val_loss = model.evaluate(X_VAL, Y_VAL, batch_size=8, verbose=0)
    assert history.history["val_loss"][-1] == val_loss


def test_recalibrates_before_each_due_validation() -> None:
    """every=2: epochs 1 and 3 validate with population statistics, 0 and 2 with fit's."""
    # Each logged val_loss equals evaluate of the weights recorded at that epoch's end, so a
    # recalibration after validation instead of before it would show.
    model = small()
    record = Record()
    model.fit(
        X,
        Y,
        batch_size=8,
        epochs=4,
        validation_data=(X_VAL, Y_VAL),
        callbacks=[PreciseBN(X_CAL, every=2, batch_size=16), record],
        verbose=0,
    )
    twin = small()
    for epoch, weights in enumerate(record.weights):
        s = stats(weights, model)
        ref_mean, _ = population(s["kernel"], s["bias"])
        recalibrated = np.allclose(s["mean"], ref_mean, rtol=0, atol=2e-5)
        assert recalibrated == (epoch in (1, 3)), epoch
        if recalibrated:
            assert_population(s["mean"], s["var"], s["kernel"], s["bias"])
        twin.set_weights(weights)
        loss = twin.evaluate(X_VAL, Y_VAL, batch_size=8, verbose=0)
        assert record.logs[epoch]["val_loss"] == loss, epoch


def test_without_validation_recalibrates_at_epoch_end() -> None:
    """Without validation data the due epochs end with population statistics."""
    model = small()
    record = Record()
    model.fit(X, Y, batch_size=8, epochs=2, callbacks=[PreciseBN(X_CAL), record], verbose=0)
    for weights in record.weights:
        s = stats(weights, model)
        assert_population(s["mean"], s["var"], s["kernel"], s["bias"])


def test_recalibrates_at_the_end_after_later_training() -> None:
    """Training after the last due epoch is followed by a final recalibration."""
    model = small()
    record = Record()
    model.fit(
        X, Y, batch_size=8, epochs=3, callbacks=[PreciseBN(X_CAL, every=2), record], verbose=0
    )
    last = stats(record.weights[-1], model)
    ref_mean, _ = population(last["kernel"], last["bias"])
    assert not np.allclose(last["mean"], ref_mean, rtol=0, atol=2e-5)  # fit's average
    assert_model_population(model)


def test_evaluate_outside_fit_changes_nothing() -> None:
    """Only validation inside fit triggers it: evaluate(callbacks=[PreciseBN]) does not."""
    model = small()
    before = h.snapshot(model)
    model.evaluate(X_VAL, Y_VAL, callbacks=[PreciseBN(X_CAL)], verbose=0)
    for key, value in h.snapshot(model).items():
        np.testing.assert_array_equal(value, before[key])


def test_with_unfreeze_stages() -> None:
    """After an Unfreeze restoring BN (bn_mode=None): population statistics at the end."""
    model = small()
    bnfreeze.freeze(model, ["dense", "bn"])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    stage = bnfreeze.callbacks.Unfreeze(1, ["dense", "bn"], bn_mode=None)
    model.fit(X, Y, batch_size=8, epochs=2, callbacks=[stage, PreciseBN(X_CAL)], verbose=0)
    assert model.get_layer("dense").trainable and model.get_layer("bn").trainable
    assert_model_population(model)


def _generator() -> Any:
    yield X_CAL


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "message"),
    [
        (
            X_CAL,
            {"every": 0},
            bnfreeze.ArgumentError,
            "Expected `every` to be a positive int. Received: every=0.",
        ),
        (
            X_CAL,
            {"steps": 0},
            bnfreeze.ArgumentError,
            "Expected `steps` to be a positive int or None. Received: steps=0.",
        ),
        (
            X_CAL,
            {"upstream": "moving"},
            bnfreeze.ArgumentError,
            "Expected `upstream` to be one of ('batch', 'recalibrated'). "
            "Received: upstream='moving'.",
        ),
        (
            None,
            {},
            bnfreeze.ArgumentTypeError,
            "Expected `data` to be arrays, a tf.data.Dataset or a keras.utils.PyDataset, "
            "which PreciseBN reads again at every recalibration. Received: NoneType, which "
            "can be read never.",
        ),
        (
            "generator",
            {},
            bnfreeze.ArgumentTypeError,
            "Expected `data` to be arrays, a tf.data.Dataset or a keras.utils.PyDataset, "
            "which PreciseBN reads again at every recalibration. Received: generator, which "
            "can be read once.",
        ),
    ],
    ids=["every", "steps", "upstream", "none", "generator"],
)
def test_bad_arguments(data: Any, kwargs: dict[str, Any], error: type, message: str) -> None:
    """Bad arguments are refused at construction, with the whole message."""
    if isinstance(data, str):
        data = _generator()
    with pytest.raises(error) as info:
        PreciseBN(data, **kwargs)
    assert str(info.value) == message


def test_selection_without_bn_fails_before_training() -> None:
    """`layers` selecting no BN raises when fit starts, before any step."""
    model = small()
    before = h.snapshot(model)
    with pytest.raises(bnfreeze.SelectionError) as info:
        model.fit(X, Y, epochs=1, callbacks=[PreciseBN(X_CAL, layers="dense")], verbose=0)
    assert str(info.value) == (
        "`layers`='dense' selects no BatchNormalization layer, so there are no statistics to "
        "recalibrate. Expected a selection containing at least one BatchNormalization layer."
    )
    for key, value in h.snapshot(model).items():
        np.testing.assert_array_equal(value, before[key])


def _endless() -> Any:
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(X_CAL).batch(8).repeat()


def _batched() -> Any:
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(X_CAL).batch(8)


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "message"),
    [
        (
            _endless,
            {},
            bnfreeze.DataError,
            "`data` is an infinite tf.data.Dataset (it repeats), so the pass would never "
            "end. Expected `steps` to say how many batches to read.",
        ),
        (
            _batched,
            {"batch_size": 4},
            bnfreeze.ArgumentError,
            "`batch_size` applies to in-memory arrays only; `data` is a tf.data.Dataset, "
            "which is batched already. Received: batch_size=4. Remove `batch_size` (or "
            "batch the data yourself).",
        ),
        (
            lambda: X_CAL[:, :5],
            {},
            bnfreeze.DataError,
            "Expected batches of `data` to match the model's input shape (None, 6). "
            "Received: a batch of shape (32, 5).",
        ),
    ],
    ids=["endless_without_steps", "batch_size_with_dataset", "wrong_shape"],
)
def test_unreadable_data_fails_before_any_epoch_trains(
    data: Any, kwargs: dict[str, Any], error: type, message: str
) -> None:
    """Data PreciseBN can never read raises when fit starts, before any step trains."""
    model = small()
    before = h.snapshot(model)
    with pytest.raises(error) as info:
        model.fit(X, Y, epochs=2, callbacks=[PreciseBN(data(), **kwargs)], verbose=0)
    assert str(info.value) == message
    for key, value in h.snapshot(model).items():
        np.testing.assert_array_equal(value, before[key])
