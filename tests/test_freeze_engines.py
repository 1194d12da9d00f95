"""freeze under jit_compile, mixed_float16, MirroredStrategy, and on keras.applications models."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import IS_TF_KERAS, keras
from bnfreeze._modes import MODES
from tests import helpers as h


@h.NO_JIT_COMPILE
@pytest.mark.parametrize("mode", list(MODES))
def test_jit_compile(mode: str) -> None:
    """Modes hold with jit_compile=True: one fit step does what the mode's ModeSpec says."""
    model = h.conv()
    h.set_far_statistics(model)
    bnfreeze.freeze(model, bn_mode=mode)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", jit_compile=True)
    seen = h.observe_fit(model, h.data((8, 8, 3)), h.data((2,), seed=5))
    h.assert_follows_mode(seen, MODES[mode])


@pytest.mark.parametrize("mode", list(MODES))
def test_mixed_float16(mode: str, mixed_float16: None) -> None:
    """Modes hold under mixed_float16 (fixed loss scale so the first step applies)."""
    model = h.conv(head_dtype="float32")
    h.set_far_statistics(model)
    bnfreeze.freeze(model, ["conv", "bn"], bn_mode=mode)  # the head keeps trainable weights
    if IS_TF_KERAS:
        optimizer = keras.mixed_precision.LossScaleOptimizer(
            keras.optimizers.SGD(0.5), dynamic=False, initial_scale=1.0
        )
        model.compile(optimizer=optimizer, loss="mse")
    else:
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", auto_scale_loss=False)
    seen = h.observe_fit(model, h.data((8, 8, 3)), h.data((2,), seed=5))
    h.assert_follows_mode(seen, MODES[mode], rtol=1e-3)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["inference", "adapt"])
def test_mirrored_strategy(mode: str) -> None:
    """Inside a MirroredStrategy scope with two replicas, modes hold on every replica."""
    strategy = h.mirrored()
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        model = h.conv()
        h.set_far_statistics(model)
        bnfreeze.freeze(model, bn_mode=mode)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    x, y = h.data((8, 8, 3)), h.data((2,), seed=5)
    eval_loss = h.evaluate_loss(model, x, y)
    bn = model.get_layer("bn")
    replicas_before = h.replica_values(bn.moving_mean, strategy)
    fit_loss = h.fit_step(model, x, y)
    replicas_after = h.replica_values(bn.moving_mean, strategy)
    assert len(replicas_before) == 2
    pairs = zip(replicas_before, replicas_after, strict=True)
    changed = [not np.array_equal(a, b) for a, b in pairs]
    if MODES[mode].batch_statistics:
        assert all(changed)
    else:
        assert not any(changed)
        np.testing.assert_allclose(fit_loss, eval_loss, rtol=1e-5)


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
    probe = keras.Model(model.input, [bn.input for bn in bns])
    for bn, act in zip(bns, [h.to_numpy(a) for a in probe(x, training=False)], strict=True):
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
    eval_loss = h.evaluate_loss(model, x, y)
    fit_loss = h.fit_step(model, x, y)
    np.testing.assert_allclose(fit_loss, eval_loss, rtol=1e-4)
    h.assert_same_values(before, h.snapshot(model))
