"""freeze / unfreeze: real fit steps, variables snapshotted before and after."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import backend_name, keras, to_numpy
from bnfreeze._modes import MODES
from bnfreeze._walk import walk
from tests import helpers as h

MODE_NAMES = list(MODES)
KINDS = list(h.BUILDERS)


def _non_bn_weights(model: Any) -> dict[int, np.ndarray]:
    bn_vars = {id(v) for bn in h.bn_layers(model) for v in bn.weights}
    return {id(v): to_numpy(v) for v in model.weights if id(v) not in bn_vars}


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_mode_behaves_as_its_spec_on_every_model_kind(kind: str, mode: str) -> None:
    """Each mode of MODES on each model kind: one real fit step does what its ModeSpec says."""
    model = h.BUILDERS[kind]()
    h.set_far_statistics(model)
    bnfreeze.freeze(model, bn_mode=mode)
    h.compile_sgd(model, lr=0.5)
    frozen_before = _non_bn_weights(model)
    seen = h.observe_fit(model, h.inputs_for(model), h.targets_for(model))
    h.assert_follows_mode(seen, MODES[mode])
    assert len(seen.changed) == len(h.bn_layers(model))
    for key, value in _non_bn_weights(model).items():
        np.testing.assert_array_equal(frozen_before[key], value)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_batch_statistics_match_numpy(mode: str) -> None:
    """adapt/train: fit's new moving statistics follow numpy moments of the BN's input."""
    model = h.functional()
    h.set_far_statistics(model)
    bn = model.get_layer("bn")
    x, y = h.inputs_for(model), h.targets_for(model)
    bn_input = h.activations(model, "bn", x)
    old_mean, old_var = h.statistics(bn)
    bnfreeze.freeze(model, bn_mode=mode)
    h.fit_step(h.compile_sgd(model, lr=0.0), x, y)
    m = bn.momentum
    if MODES[mode].batch_statistics:
        expect_mean = m * old_mean + (1 - m) * bn_input.mean(axis=0)
        expect_var = m * old_var + (1 - m) * bn_input.var(axis=0)
    else:
        expect_mean, expect_var = old_mean, old_var
    mean, var = h.statistics(bn)
    np.testing.assert_allclose(mean, expect_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, expect_var, rtol=1e-4, atol=1e-5)


def _guide_model(rate: float = 0.5) -> tuple[Any, Any]:
    """The guide's pattern on a functional base: (model, base)."""
    guide = h.guide(h.base("functional"), rate=rate)
    return guide.model, guide.base


def test_guide_pattern_base_unfrozen_keeps_inference_and_head_dropout() -> None:
    """#20285: freeze(base), base.trainable = True: BN stays in inference, head Dropout fires."""
    model, base = _guide_model()
    h.set_far_statistics(model)
    bnfreeze.freeze(model, "base")
    base.trainable = True
    assert base.get_layer("dense").trainable
    h.compile_sgd(model, lr=0.0)
    x, y = h.inputs_for(model), h.targets_for(model)
    bn = base.get_layer("bn")
    stats = to_numpy(bn.moving_mean)
    eval_loss = h.evaluate_loss(model, x, y)
    fit_losses = [h.fit_step(model, x, y) for _ in range(3)]
    np.testing.assert_array_equal(stats, to_numpy(bn.moving_mean))
    # Dropout fires in the head: fit's losses differ from evaluate's and from each other.
    assert len({round(v, 6) for v in fit_losses}) > 1
    assert all(not np.isclose(v, eval_loss, rtol=1e-4) for v in fit_losses)
    # Without the head Dropout the same model has fit == evaluate.
    model2, base2 = _guide_model(rate=0.0)
    h.set_far_statistics(model2)
    bnfreeze.freeze(model2, "base")
    base2.trainable = True
    h.compile_sgd(model2, lr=0.0)
    np.testing.assert_allclose(h.fit_step(model2, x, y), h.evaluate_loss(model2, x, y), rtol=1e-5)


def test_pin_holds_after_trainable_changes() -> None:
    """A later model.trainable = True trains weights but never changes the pinned statistics."""
    model = h.functional()
    h.set_far_statistics(model)
    bnfreeze.freeze(model)
    assert model.trainable is False
    model.trainable = True
    h.compile_sgd(model, lr=0.5)
    bn = model.get_layer("bn")
    before = to_numpy(bn.moving_mean), to_numpy(bn.gamma)
    x, y = h.inputs_for(model), h.targets_for(model)
    eval_loss = h.evaluate_loss(model, x, y)
    np.testing.assert_allclose(h.fit_step(model, x, y), eval_loss, rtol=1e-5)
    np.testing.assert_array_equal(before[0], to_numpy(bn.moving_mean))
    assert not np.array_equal(before[1], to_numpy(bn.gamma))  # trainable decides gradients


def test_nested_frozen_container_reports_untrainable_and_can_be_unfrozen() -> None:
    """A nested model whose layers are all frozen says trainable=False; unfreezing it works."""
    model, base = _guide_model(rate=0.0)
    bnfreeze.freeze(model, "base")
    assert base.trainable is False
    assert model.trainable is True
    assert model.get_layer("head").trainable is True
    base.trainable = True
    h.compile_sgd(model, lr=0.5)
    kernel = to_numpy(base.get_layer("dense").kernel)
    h.fit_step(model, h.inputs_for(model), h.targets_for(model))
    assert not np.array_equal(kernel, to_numpy(base.get_layer("dense").kernel))


def test_single_image_frozen_model_fit_equals_evaluate() -> None:
    """The original report, small: everything frozen, one image, fit loss == evaluate loss."""
    model = h.conv()
    h.set_far_statistics(model)
    bnfreeze.freeze(model)
    model.compile(optimizer="adam", loss="mse")
    x = h.data((8, 8, 3), n=1)
    y = h.data((2,), n=1, seed=3)
    np.testing.assert_allclose(h.fit_step(model, x, y), h.evaluate_loss(model, x, y), rtol=1e-5)


def test_frozen_part_dropout_off_and_keep_dropout() -> None:
    """Dropout inside the frozen part is off during fit, unless keep_dropout=True."""

    def build() -> Any:
        return keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, name="d"),
                keras.layers.Dropout(0.5, name="drop"),
                keras.layers.Dense(2, name="head"),
            ]
        )

    x, y = h.data((6,)), h.data((2,), seed=9)
    model = bnfreeze.freeze(build(), ["d", "drop"])
    h.compile_sgd(model, lr=0.0)
    np.testing.assert_allclose(h.fit_step(model, x, y), h.evaluate_loss(model, x, y), rtol=1e-5)
    model = bnfreeze.freeze(build(), ["d", "drop"], keep_dropout=True)
    h.compile_sgd(model, lr=0.0)
    assert not np.isclose(h.fit_step(model, x, y), h.evaluate_loss(model, x, y))


@pytest.mark.parametrize("kind", KINDS)
def test_unfreeze_restores_config_and_values(kind: str) -> None:
    """unfreeze(freeze(m)) has m's get_config() and identical variable values."""
    model = h.BUILDERS[kind]()
    h.set_far_statistics(model)
    config = model.get_config()
    before = h.snapshot(model)
    bnfreeze.unfreeze(bnfreeze.freeze(model, bn_mode="adapt"))
    assert model.get_config() == config
    h.assert_same_values(before, h.snapshot(model))
    assert all(type(bn) is keras.layers.BatchNormalization for bn in h.bn_layers(model))


def test_guide_pattern_roundtrip_restores_recorded_training() -> None:
    """The training=False recorded in the guide graph comes back with unfreeze."""
    from bnfreeze._nodes import recorded_training

    model, base = _guide_model()
    config = model.get_config()
    assert [value for _, value in recorded_training(base)] == [False]
    bnfreeze.freeze(model, "base")
    assert recorded_training(base) == []
    bnfreeze.unfreeze(model, "base")
    assert model.get_config() == config
    bnfreeze.freeze(base)  # freezing the base itself fixes the outer graph's call too
    assert recorded_training(base) == []
    bnfreeze.unfreeze(base)
    assert model.get_config() == config


@pytest.mark.parametrize("kind", ["functional", "nested", "subclassed"])
def test_no_variable_is_copied(kind: str) -> None:
    """freeze/unfreeze keep every variable object (identity), so optimizers keep working."""
    model = h.BUILDERS[kind]()
    ids = sorted(id(v) for v in model.weights)
    bnfreeze.freeze(model, bn_mode="train")
    assert sorted(id(v) for v in model.weights) == ids
    bnfreeze.unfreeze(model)
    assert sorted(id(v) for v in model.weights) == ids


def test_freeze_is_idempotent_and_switches_modes() -> None:
    """Freezing twice equals freezing once; freezing again with another mode switches."""
    twice = bnfreeze.freeze(h.nested(), bn_mode="affine")
    config = twice.get_config()
    flags = [n.layer.trainable for n in walk(twice)]
    bnfreeze.freeze(twice, bn_mode="affine")
    assert twice.get_config() == config
    assert [n.layer.trainable for n in walk(twice)] == flags
    bnfreeze.freeze(twice, bn_mode="adapt")
    assert set(h.frozen_modes(twice).values()) == {"adapt"}
    assert all(not bn.trainable for bn in h.bn_layers(twice))


def test_unfreeze_with_mode_fine_tunes_top_block() -> None:
    """unfreeze(m, part, bn_mode='inference'): the part trains, its BN stays in inference."""
    model = h.nested()
    h.set_far_statistics(model)
    bnfreeze.freeze(model)
    bnfreeze.unfreeze(model, ["middle/inner/*"], bn_mode="inference")
    inner = model.get_layer("middle").get_layer("inner")
    assert inner.get_layer("d_inner").trainable and not inner.get_layer("bn_inner").trainable
    h.compile_sgd(model, lr=0.5)
    bn = inner.get_layer("bn_inner")
    stats, kernel = (
        to_numpy(bn.moving_mean),
        to_numpy(inner.get_layer("d_inner").kernel),
    )
    h.fit_step(model, h.inputs_for(model), h.targets_for(model))
    np.testing.assert_array_equal(stats, to_numpy(bn.moving_mean))
    assert not np.array_equal(kernel, to_numpy(inner.get_layer("d_inner").kernel))


def test_up_to_freezes_prefix_in_topological_order() -> None:
    """up_to(name) freezes every unit up to and including name, nothing after it."""
    model = h.nested()
    bnfreeze.freeze(model, bnfreeze.up_to("bn_middle"))
    middle = model.get_layer("middle")
    assert not middle.trainable
    assert model.get_layer("bn_outer").trainable and model.get_layer("head").trainable
    assert h.frozen_modes(model) == {
        "middle/inner/bn_inner": "inference",
        "middle/bn_middle": "inference",
    }


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_save_and_load_keeps_modes_and_weights(mode: str, tmp_path: Any) -> None:
    """A frozen model saved as .keras and loaded (safe mode) keeps modes, weights, behaviour."""
    model, _ = _guide_model()
    h.set_far_statistics(model)
    bnfreeze.freeze(model, "base", bn_mode=mode)
    path = str(tmp_path / "frozen.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert h.frozen_modes(loaded) == h.frozen_modes(model)
    before, after = h.snapshot(model), h.snapshot(loaded)
    for (k1, v1), (k2, v2) in zip(before.items(), after.items(), strict=True):
        np.testing.assert_array_equal(v1, v2, err_msg=f"{k1} vs {k2}")
    h.compile_sgd(loaded, lr=0.0)
    bn = loaded.get_layer("base").get_layer("bn")
    stats = to_numpy(bn.moving_mean)
    h.fit_step(loaded, h.inputs_for(loaded), h.targets_for(loaded))
    assert np.array_equal(stats, to_numpy(bn.moving_mean)) != MODES[mode].batch_statistics
    # and it unfreezes to a plain model again
    bnfreeze.unfreeze(loaded)
    assert type(bn) is keras.layers.BatchNormalization


def test_weight_files_interchangeable_between_frozen_and_plain(tmp_path: Any) -> None:
    """save_weights of a frozen model loads into a plain one (same variable paths), and back."""
    frozen = h.nested()
    h.set_far_statistics(frozen)
    bnfreeze.freeze(frozen, bn_mode="affine")
    path = str(tmp_path / "frozen.weights.h5")
    frozen.save_weights(path)
    plain = h.nested()
    plain.load_weights(path)
    for a, b in zip(h.bn_layers(frozen), h.bn_layers(plain), strict=True):
        np.testing.assert_array_equal(to_numpy(a.moving_mean), to_numpy(b.moving_mean))


def test_subclassed_save_load_keeps_weights_and_pins(tmp_path: Any) -> None:
    """A subclassed model is rebuilt by its own __init__ on load: weights and pins come back."""
    model = h.base("subclassed", name="savable")
    h.set_far_statistics(model)
    bnfreeze.freeze(model, bn_mode="adapt")
    path = str(tmp_path / "sub.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded.bn.moving_mean), to_numpy(model.bn.moving_mean))
    assert h.frozen_modes(loaded) == {"bn": "adapt"}


@pytest.mark.parametrize(
    "target", ["outer", "base"], ids=["freeze_outer_path", "freeze_base_itself"]
)
@pytest.mark.parametrize("base_kind", h.BASE_KINDS)
@pytest.mark.parametrize("mode", ["inference", "adapt"])
def test_guide_pattern_every_base_kind(base_kind: str, mode: str, target: str) -> None:
    """KERAS_FACTS rows: base(x, training=False) for every base kind, base unfrozen afterwards.

    The BN follows the frozen mode on every flavour, and the head's Dropout still fires.
    """
    guide = h.guide(h.base(base_kind))
    model, base = guide.model, guide.base
    h.set_far_statistics(model)
    if target == "outer":
        bnfreeze.freeze(model, "base", bn_mode=mode)
    else:
        bnfreeze.freeze(base, bn_mode=mode)
    base.trainable = True
    h.compile_sgd(model, lr=0.0)
    x, y = h.inputs_for(model), h.targets_for(model)
    bn = h.bn_layers(base)[0]
    stats = to_numpy(bn.moving_mean)
    eval_loss = h.evaluate_loss(model, x, y)
    fit_losses = [h.fit_step(model, x, y) for _ in range(3)]
    changed = not np.array_equal(stats, to_numpy(bn.moving_mean))
    assert changed == MODES[mode].batch_statistics
    assert len({round(v, 6) for v in fit_losses}) > 1, "the head's Dropout did not fire"
    assert all(not np.isclose(v, eval_loss, rtol=1e-4) for v in fit_losses)


def _exotic_bn_model() -> Any:
    inputs = keras.Input((4, 6))
    hidden = keras.layers.Dense(6, name="d")(inputs)
    hidden = keras.layers.BatchNormalization(
        axis=1, momentum=0.9, epsilon=1e-2, center=False, name="bn_axis1"
    )(hidden)
    # synchronized=True exists on the TensorFlow backend only (Keras refuses it elsewhere).
    synchronized = {"synchronized": True} if backend_name() == "tensorflow" else {}
    hidden = keras.layers.BatchNormalization(
        renorm=True, renorm_momentum=0.8, name="bn_renorm_sync", **synchronized
    )(hidden)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_exotic_bn_settings_follow_mode_and_round_trip(mode: str) -> None:
    """axis=1, center=False, renorm, synchronized: modes hold and unfreeze restores the config."""
    model = _exotic_bn_model()
    h.set_far_statistics(model)
    config, before = model.get_config(), h.snapshot(model)
    bnfreeze.freeze(model, bn_mode=mode)
    h.compile_sgd(model, lr=0.1)
    seen = h.observe_fit(model, h.data((4, 6)), h.data((4, 2), seed=4))
    h.assert_follows_mode(seen, MODES[mode])
    # Values changed by the step, but config is restored exactly and no variable was lost.
    bnfreeze.unfreeze(model)
    assert model.get_config() == config
    assert h.snapshot(model).keys() == before.keys()


def test_freeze_after_compile_and_fit_takes_effect() -> None:
    """Freezing a compiled, already trained model holds at the next fit (no recompile)."""
    model = h.functional()
    h.set_far_statistics(model)
    h.compile_sgd(model, lr=0.5)
    x, y = h.inputs_for(model), h.targets_for(model)
    h.fit_step(model, x, y)
    bnfreeze.freeze(model, ["dense", "bn"])
    kernel = to_numpy(model.get_layer("dense").kernel)
    stats = to_numpy(model.get_layer("bn").moving_mean)
    head = to_numpy(model.get_layer("head").kernel)
    h.fit_step(model, x, y)
    np.testing.assert_array_equal(kernel, to_numpy(model.get_layer("dense").kernel))
    np.testing.assert_array_equal(stats, to_numpy(model.get_layer("bn").moving_mean))
    assert not np.array_equal(head, to_numpy(model.get_layer("head").kernel))
