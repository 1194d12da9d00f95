"""freeze under jit_compile, mixed_float16, MirroredStrategy, and on keras.applications models."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import bnfreeze
from bnfreeze._compat import IS_TF_KERAS, keras
from bnfreeze._modes import MODES
from tests import helpers as h


def _fit_once(model: Any, x: Any, y: Any) -> float:
    return float(model.fit(x, y, batch_size=len(x), epochs=1, verbose=0).history["loss"][0])


def _stats(model: Any) -> list[np.ndarray]:
    return [h.to_numpy(bn.moving_mean).copy() for bn in h.bn_layers(model)]


def _gammas(model: Any) -> list[np.ndarray]:
    return [h.to_numpy(bn.gamma).copy() for bn in h.bn_layers(model)]


def _check_mode(model: Any, mode: str, x: Any, y: Any) -> None:
    stats, gammas = _stats(model), _gammas(model)
    _fit_once(model, x, y)
    spec = MODES[mode]
    for before, after in zip(stats, _stats(model), strict=True):
        assert (not np.array_equal(before, after)) == spec.batch_statistics
    for before, after in zip(gammas, _gammas(model), strict=True):
        assert (not np.array_equal(before, after)) == spec.trains_affine


@pytest.mark.parametrize("mode", list(MODES))
def test_jit_compile(mode: str) -> None:
    """Modes hold with jit_compile=True."""
    model = h.conv()
    h.set_far_statistics(model)
    bnfreeze.freeze(model, bn_mode=mode)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", jit_compile=True)
    _check_mode(model, mode, h.data((8, 8, 3)), h.data((2,), seed=5))


@pytest.fixture
def mixed_precision() -> Any:
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("mode", list(MODES))
def test_mixed_float16(mode: str, mixed_precision: Any) -> None:
    """Modes hold under mixed_float16 (fixed loss scale so the first step applies)."""
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    hidden = keras.layers.BatchNormalization(name="bn")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    outputs = keras.layers.Dense(2, dtype="float32", name="head")(hidden)
    model = keras.Model(inputs, outputs)
    h.set_far_statistics(model)
    bnfreeze.freeze(model, ["conv", "bn"], bn_mode=mode)  # the head keeps trainable weights
    if IS_TF_KERAS:
        optimizer = keras.mixed_precision.LossScaleOptimizer(
            keras.optimizers.SGD(0.5), dynamic=False, initial_scale=1.0
        )
        model.compile(optimizer=optimizer, loss="mse")
    else:
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", auto_scale_loss=False)
    _check_mode(model, mode, h.data((8, 8, 3)), h.data((2,), seed=5))


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["inference", "adapt"])
def test_mirrored_strategy(mode: str) -> None:
    """Inside a MirroredStrategy scope with two replicas, modes hold on every replica."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        model = h.conv()
        h.set_far_statistics(model)
        bnfreeze.freeze(model, bn_mode=mode)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    x, y = h.data((8, 8, 3)), h.data((2,), seed=5)
    eval_loss = model.evaluate(x, y, batch_size=8, verbose=0)
    bn = model.get_layer("bn")
    replicas_before = [h.to_numpy(v).copy() for v in _replica_values(bn.moving_mean)]
    fit_loss = _fit_once(model, x, y)
    replicas_after = [h.to_numpy(v) for v in _replica_values(bn.moving_mean)]
    pairs = zip(replicas_before, replicas_after, strict=True)
    changed = [not np.array_equal(a, b) for a, b in pairs]
    if MODES[mode].batch_statistics:
        assert all(changed)
    else:
        assert not any(changed)
        np.testing.assert_allclose(fit_loss, eval_loss, rtol=1e-5)


def _replica_values(variable: Any) -> list[Any]:
    values = getattr(variable, "values", None)
    if values is None:
        inner = getattr(variable, "value", None)
        values = getattr(inner, "values", None)
    return list(values) if values is not None else [variable]


# --- keras.applications ------------------------------------------------------------------

APPS = {
    "ResNet50": lambda: keras.applications.ResNet50(
        weights=None, input_shape=(64, 64, 3), classes=3
    ),
    "MobileNetV2": lambda: keras.applications.MobileNetV2(
        weights=None, input_shape=(64, 64, 3), classes=3
    ),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(
        weights=None, input_shape=(64, 64, 3), classes=3
    ),
    "DenseNet121": lambda: keras.applications.DenseNet121(
        weights=None, input_shape=(64, 64, 3), classes=3
    ),
}


def _realistic_statistics(model: Any, x: np.ndarray) -> None:
    """Moving statistics = moments of each BN's input on generated images (one pass each)."""
    bns = h.bn_layers(model)
    probe = keras.Model(model.inputs, [bn.input for bn in bns])
    for bn, act in zip(bns, probe.predict(x, verbose=0), strict=True):
        axes = tuple(i for i in range(act.ndim) if i != act.ndim - 1)
        bn.moving_mean.assign(act.mean(axis=axes))
        bn.moving_variance.assign(act.var(axis=axes))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(APPS))
def test_applications_single_image_fit_equals_evaluate(name: str) -> None:
    """Frozen application model, one image: fit's loss equals evaluate's; nothing changes."""
    model = APPS[name]()
    images = np.random.default_rng(0).uniform(0, 255, size=(4, 64, 64, 3)).astype("float32")
    _realistic_statistics(model, images)
    bnfreeze.freeze(model)
    assert not model.trainable
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    x, y = images[:1] * 0.5 + 60, np.eye(3, dtype="float32")[:1]
    before = h.snapshot(model)
    eval_loss = model.evaluate(x, y, verbose=0)
    fit_loss = _fit_once(model, x, y)
    np.testing.assert_allclose(fit_loss, eval_loss, rtol=1e-4)
    after = h.snapshot(model)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
