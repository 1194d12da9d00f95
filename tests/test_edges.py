"""Edge cases of issue 14 (items 12-17): threads, audit findings, pinned Dropout in custom
layers, tf-keras saving, selectors, and plain errors turned into BNFreezeError."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import keras, to_numpy
from bnfreeze._layers import intercepted
from bnfreeze._walk import walk
from tests import helpers as h
from tests.trained import give_trained_state, image_data, image_model

L = keras.layers


# --- item 12: a serving thread does not notice an interception --------------------------


def _serving_during(model: Any, x: Any, batches: list[Any]) -> tuple[Any, list[np.ndarray]]:
    """Recalibrate ``model`` on ``batches`` while another thread calls the model between
    every two batches (direct call and ``predict``); the thread's outputs and errors."""
    go, done = threading.Event(), threading.Event()
    outputs: list[np.ndarray] = []
    errors: list[BaseException] = []
    finished = threading.Event()

    def serve() -> None:
        while True:
            go.wait()
            go.clear()
            if finished.is_set():
                return
            try:
                outputs.append(to_numpy(model(x, training=False)))
                outputs.append(model.predict(x, verbose=0))
            except BaseException as error:
                errors.append(error)
            done.set()

    def data() -> Any:
        for batch in batches:
            go.set()
            done.wait()
            done.clear()
            yield batch

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        bnfreeze.recalibrate(model, data(), verbose=0)
    finally:
        finished.set()
        go.set()
        thread.join()
    return errors, outputs


def test_serving_thread_sees_plain_model_during_recalibrate() -> None:
    """Another thread calling the model during recalibrate gets a plain model's outputs,
    raises nothing, and the recalibrated statistics equal an undisturbed run's."""
    x, _ = image_data(48, seed=3)
    model = image_model()
    expected = model.predict(x[:4], verbose=0)
    before = h.snapshot(model)
    batches = [x[i : i + 8] for i in range(0, 48, 8)]
    errors, outputs = _serving_during(model, x[:4], batches)
    assert errors == []
    assert len(outputs) == 2 * len(batches)
    for out in outputs:
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    disturbed = h.snapshot(model)
    h.restore(model, before)
    bnfreeze.recalibrate(model, x, batch_size=8, verbose=0)  # undisturbed, same batches
    h.assert_same_values(h.snapshot(model), disturbed)
    assert any(not np.array_equal(disturbed[k], before[k]) for k in before)


def test_interception_is_per_thread_and_removed_after_overlapping_blocks() -> None:
    """Two threads' overlapping blocks each see only their own calls, and when both end
    the layer has no instance ``call`` left (its class's call runs again)."""
    layer = L.Dense(2)
    layer.build((None, 3))
    x = np.ones((1, 3), "float32")
    plain = to_numpy(layer(x))
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def tag(value: float) -> Any:
        def on_call(_layer: Any, original: Any, _sig: Any, args: Any, kwargs: Any) -> Any:
            return original(*args, **kwargs) + value

        return on_call

    def other() -> None:
        with intercepted([layer], tag(100.0)):
            entered.set()
            release.wait()
            seen["other"] = to_numpy(layer(x))

    thread = threading.Thread(target=other)
    with intercepted([layer], tag(1.0)):
        thread.start()
        entered.wait()
        seen["main"] = to_numpy(layer(x))
        with intercepted([layer], tag(10.0)):
            seen["nested"] = to_numpy(layer(x))
    release.set()
    thread.join()
    np.testing.assert_allclose(seen["main"], plain + 1.0, rtol=1e-6)
    np.testing.assert_allclose(seen["nested"], plain + 11.0, rtol=1e-6)
    np.testing.assert_allclose(seen["other"], plain + 100.0, rtol=1e-6)
    assert "call" not in layer.__dict__
    np.testing.assert_array_equal(to_numpy(layer(x)), plain)


# --- items 13 and 14: containers and custom blocks in a frozen part --------------------


@keras.saving.register_keras_serializable(package="bnfreeze_edges")
class ResidualBlock(L.Layer):
    """A custom block passing ``training`` on: Dense -> BN -> Dropout, plus the input."""

    def __init__(self, units: int = 6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.dense = L.Dense(units, name="dense")
        self.bn = L.BatchNormalization(name="bn")
        self.drop = L.Dropout(0.5, name="drop")

    def call(self, x: Any, training: Any = None) -> Any:
        h = self.drop(self.bn(self.dense(x), training=training), training=training)
        return x + h

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="bnfreeze_edges")
class NoTrainingBlock(L.Layer):
    """A custom block whose ``call`` takes no ``training``: Dense -> Dropout (keras-hub#1500)."""

    def __init__(self, units: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.dense = L.Dense(units, name="dense")
        self.drop = L.Dropout(0.5, name="drop")

    def call(self, x: Any) -> Any:
        return self.drop(self.dense(x))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}


def _containers_model() -> Any:
    """Input (5, 6) -> TimeDistributed(BN) -> custom residual block -> flatten -> head."""
    inputs = keras.Input((5, 6))
    x = L.TimeDistributed(L.BatchNormalization(name="tbn"), name="td")(inputs)
    x = ResidualBlock(name="blk")(x)
    x = L.Flatten(name="flat")(x)
    outputs = L.Dense(2, name="head")(x)
    return give_trained_state(keras.Model(inputs, outputs))


def _codes(report: Any, *only: str) -> list[tuple[str, str]]:
    return [(f.code, f.path) for f in report.findings if not only or f.code in only]


def test_fully_frozen_containers_have_no_audit_findings() -> None:
    """A frozen TimeDistributed(BN) and a frozen custom block get no active-in-frozen-part
    warning (freeze on them changes nothing), while unfrozen-but-not-pinned parts do."""
    model = _containers_model()
    model.get_layer("td").trainable = False
    model.get_layer("blk").trainable = False
    assert ("active-in-frozen-part", "blk/drop") in _codes(bnfreeze.audit(model))
    bnfreeze.freeze(model, ["td", "blk"])
    assert _codes(bnfreeze.audit(model)) == []
    bnfreeze.freeze(model)
    assert _codes(bnfreeze.audit(model)) == []


def _no_training_model() -> Any:
    inputs = keras.Input((8,))
    x = NoTrainingBlock(name="blk")(inputs)
    outputs = L.Dense(1, name="head")(x)
    return give_trained_state(keras.Model(inputs, outputs))


def _fit_and_evaluate_loss(model: Any) -> tuple[float, float]:
    """Loss of one full-batch fit step at learning rate 0, and evaluate's loss."""
    x = h.data((8,), n=64, seed=5)
    y = h.data((1,), n=64, seed=6)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    fit = model.fit(x, y, batch_size=64, epochs=1, verbose=0).history["loss"][0]
    return float(fit), float(model.evaluate(x, y, batch_size=64, verbose=0))


def test_dropout_in_block_without_training_is_pinned_by_freeze(tmp_path: Any) -> None:
    """A Dropout in a custom layer whose call takes no `training` runs as at inference after
    freeze (fit loss == evaluate loss), also after a .keras round trip; audit lists it."""
    model = _no_training_model()
    fit, evaluate = _fit_and_evaluate_loss(model)
    assert abs(fit - evaluate) > 1e-3  # it fires in fit before freeze
    model.get_layer("blk").trainable = False
    active = "active-in-frozen-part"
    assert _codes(bnfreeze.audit(model), active) == [(active, "blk/drop")]
    bnfreeze.freeze(model, "blk")
    assert h.frozen_modes(model) == {"blk/drop": "inference"}
    assert [r.path for r in bnfreeze.audit(model).rows] == ["blk/drop"]
    assert _codes(bnfreeze.audit(model), active) == []
    fit, evaluate = _fit_and_evaluate_loss(model)
    np.testing.assert_allclose(fit, evaluate, rtol=1e-6)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    fit, evaluate = _fit_and_evaluate_loss(loaded)
    np.testing.assert_allclose(fit, evaluate, rtol=1e-6)


# --- item 16: selectors -------------------------------------------------------------------


@pytest.mark.skipif(h.TF_KERAS, reason="tf-keras refuses '[' in a layer name (name scopes)")
def test_exact_layer_name_wins_over_glob_brackets() -> None:
    """`"blk[1]"` selects the layer named so, not `blk1` (which the glob would match)."""
    inputs = keras.Input((4,))
    x = L.BatchNormalization(name="blk1")(inputs)
    x = L.BatchNormalization(name="blk[1]")(x)
    model = give_trained_state(keras.Model(inputs, x))
    bnfreeze.freeze(model, "blk[1]")
    assert h.frozen_modes(model) == {"blk[1]": "inference"}
    bnfreeze.unfreeze(model)
    bnfreeze.freeze(model, "blk[1-9]")  # no layer has that name: a glob again
    assert h.frozen_modes(model) == {"blk1": "inference"}


@pytest.mark.skipif(not h.TF_KERAS, reason="Keras 3 refuses '/' in a layer name")
def test_slash_in_layer_name_colliding_with_nested_path_is_refused() -> None:
    """On tf-keras a layer named "blk/bn" next to a nested "blk" holding "bn": the path is
    refused as ambiguous (model unchanged), and the layer object selects just that one."""
    inner = keras.Sequential([keras.Input((4,)), L.BatchNormalization(name="bn")], name="blk")
    inputs = keras.Input((4,))
    model = give_trained_state(
        keras.Model(inputs, inner(L.BatchNormalization(name="blk/bn")(inputs)))
    )
    message = h.refused(bnfreeze.SelectionError, bnfreeze.freeze, model, "blk/bn")
    assert message == (
        "`layers` selector 'blk/bn' is ambiguous: 2 layers have the path 'blk/bn' "
        "(BatchNormalization 'blk/bn', BatchNormalization 'bn' inside 'blk'), because a layer "
        "name contains '/'. Pass the layer object itself (model.get_layer(...)) instead, or "
        "rename the layer."
    )
    top = model.get_layer("blk/bn")
    bnfreeze.freeze(model, top)
    assert type(top) is not L.BatchNormalization  # pinned
    assert type(inner.get_layer("bn")) is L.BatchNormalization  # untouched


# --- item 17: plain errors become BNFreezeError -------------------------------------------


@pytest.mark.skipif(not h.TF_KERAS, reason="virtual_batch_size exists in tf-keras only")
def test_recalibrate_refuses_ghost_batch_norm() -> None:
    """recalibrate on a tf-keras BN with virtual_batch_size raises UnsupportedLayerError
    and changes nothing."""
    inputs = keras.Input((4,))
    x = L.Dense(4, name="dense")(inputs)
    model = give_trained_state(
        keras.Model(inputs, L.BatchNormalization(virtual_batch_size=2, name="ghost")(x))
    )
    data = h.data((4,), n=8)
    message = h.refused(
        bnfreeze.UnsupportedLayerError, bnfreeze.recalibrate, model, data, verbose=0
    )
    assert message == (
        "Layer 'ghost' is a BatchNormalization with virtual_batch_size=2 (ghost batch "
        "normalization), whose moving statistics are averages over virtual batches, so "
        "recalibrate cannot compute them exactly. Expected BatchNormalization layers without "
        "virtual_batch_size. Leave it out of `layers=` (for example layers=lambda layer: "
        "getattr(layer, 'virtual_batch_size', None) is None)."
    )


def _two_inputs() -> Any:
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    x = L.Concatenate(name="join")([L.BatchNormalization(name="bn")(a), b])
    return give_trained_state(keras.Model([a, b], L.Dense(2, name="head")(x)))


def test_recalibrate_refuses_dict_with_wrong_keys() -> None:
    """A dict of inputs without one of the model's input names raises DataError before
    anything changes (it used to fail inside the traced pass with a plain error)."""
    model = _two_inputs()
    data = {"a": h.data((4,), n=8), "c": h.data((3,), n=8)}
    message = h.refused(bnfreeze.DataError, bnfreeze.recalibrate, model, data, verbose=0)
    assert message == (
        "Expected every batch of `data` to be a dict with the model's input names as keys, "
        "['a', 'b']. Received: a batch that is a dict with keys ['a', 'c'], without 'b'. "
        "Name the arrays of `data` after the model's inputs (keras.Input(name=...))."
    )
    good = {"a": data["a"], "b": data["c"]}
    bnfreeze.recalibrate(model, good, verbose=0)  # the right keys still work
    mean, _ = h.statistics(model.get_layer("bn"))
    np.testing.assert_allclose(mean, data["a"].mean(axis=0), rtol=1e-5, atol=1e-5)


def test_audit_refuses_wrong_shaped_x() -> None:
    """audit with an `x` the model cannot take raises DataError naming both shapes."""
    model = _two_inputs()
    x = [h.data((4,), n=8), h.data((5,), n=8)]
    message = h.refused(bnfreeze.DataError, bnfreeze.audit, model, x)
    assert message == (
        "Expected `x` to match the model's input shape [(None, 4), (None, 3)] (any batch "
        "size). Received: x of shape [(8, 4), (8, 5)]. Pass a batch of the model's inputs "
        "(only its shapes and dtypes are used), or leave `x` out: the model declares its "
        "inputs."
    )
    assert bnfreeze.audit(model, [x[0], h.data((3,), n=8)]).rows  # the right shape works


@pytest.mark.parametrize(
    ("width", "error", "expected"),
    [
        (
            -5,
            bnfreeze.ArgumentError,
            "Expected `width` to be at least 20 columns, or None (the terminal's width). "
            "Received: width=-5. Pass a wider width, e.g. width=100.",
        ),
        (
            "80",
            bnfreeze.ArgumentTypeError,
            "Expected `width` to be an int of at least 20 columns, or None (the terminal's "
            "width). Received: width='80' (str).",
        ),
    ],
    ids=["negative", "string"],
)
def test_to_text_refuses_bad_width(width: Any, error: type, expected: str) -> None:
    """to_text(width=...) with a width it cannot wrap to raises a BNFreezeError subclass."""
    report = bnfreeze.audit(_two_inputs())
    with pytest.raises(error) as info:
        report.to_text(width=width)
    assert type(info.value) is error
    assert str(info.value) == expected
    assert report.to_text(width=20).startswith("audit of model")


# --- item 15: saving frozen wrappers and custom blocks --------------------------------------


def _values_by_layer(model: Any) -> dict[str, np.ndarray]:
    """Every variable by its layer's path and its own short name (tf-keras names and
    orders a rebuilt container's variables differently; the values are what matter)."""
    return {
        f"{n.path}:{str(v.name).split('/')[-1]}": to_numpy(v)
        for n in walk(model)
        if not n.is_container
        for v in n.layer.weights
    }


@pytest.mark.parametrize("how", ["keras", "h5", "clone"])
def test_frozen_time_distributed_and_custom_block_save_load_and_clone(
    tmp_path: Any, how: str
) -> None:
    """A frozen model with TimeDistributed(BN) and a custom block loads (.keras, .h5) or
    clones with the same pins and trainable flags, the same values and predictions (when
    loaded), and saves and loads again."""
    model = _containers_model()
    bnfreeze.freeze(model, "td")
    bnfreeze.freeze(model, "blk", bn_mode="affine")
    x = h.data((5, 6), n=4, seed=9)
    expected = model.predict(x, verbose=0)

    def again(m: Any, name: str) -> Any:
        if how == "clone":
            return keras.models.clone_model(m)
        path = str(tmp_path / f"{name}.{how}")
        m.save(path)
        return keras.models.load_model(path)

    loaded = again(model, "first")
    assert (
        h.frozen_modes(loaded)
        == h.frozen_modes(model)
        == {
            "td/tbn": "inference",
            "blk/bn": "affine",
            "blk/drop": "inference",
        }
    )
    assert h.model_state(loaded)["trainable"] == h.model_state(model)["trainable"]
    if how != "clone":  # clone_model re-initialises the variables (KERAS_FACTS fact 5)
        assert _values_by_layer(loaded).keys() == _values_by_layer(model).keys()
        for key, value in _values_by_layer(model).items():
            np.testing.assert_array_equal(_values_by_layer(loaded)[key], value, err_msg=key)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-6)
    second = again(loaded, "second")
    assert h.frozen_modes(second) == h.frozen_modes(model)
    bnfreeze.unfreeze(second)
    assert h.frozen_modes(second) == {}
