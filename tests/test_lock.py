"""freeze(..., lock=True): locked layers stay as freeze made them whatever `trainable` is
set later, through fit, saving, loading and cloning, until unfreeze lifts the lock.

Every test runs real ``fit`` steps with SGD at a learning rate large enough that every
trainable variable moves, and compares variables bit for bit against snapshots taken
before: a locked layer's variables must not move, the head's must.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import keras, to_numpy
from bnfreeze._kinds import is_locked
from tests import helpers as h
from tests.test_rollback import model_state as full_state

L = keras.layers
LOCKED = ["conv", "bn"]


def _backbone(name: str = "backbone") -> Any:
    """Input -> Conv2D -> BatchNormalization -> ReLU -> GlobalAveragePooling2D."""
    inputs = keras.Input((6, 6, 3))
    hidden = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inputs))
    outputs = L.GlobalAveragePooling2D(name="gap")(L.ReLU(name="relu")(hidden))
    return keras.Model(inputs, outputs, name=name)


def _with_state(model: Any) -> Any:
    """Give every BN moving statistics and gamma/beta far from their defaults."""
    for bn in h.bn_layers(model):
        size = bn.gamma.shape[0]
        bn.gamma.assign(np.linspace(0.5, 1.5, size).astype("float32"))
        bn.beta.assign(np.linspace(-0.3, 0.3, size).astype("float32"))
        bn.moving_mean.assign(np.full(size, 0.4, "float32"))
        bn.moving_variance.assign(np.full(size, 2.5, "float32"))
    return model


def flat() -> Any:
    """Input -> Conv2D -> BN -> ReLU -> GlobalAveragePooling2D -> Dense, one model."""
    inputs = keras.Input((6, 6, 3))
    hidden = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inputs))
    hidden = L.GlobalAveragePooling2D(name="gap")(L.ReLU(name="relu")(hidden))
    return _with_state(keras.Model(inputs, L.Dense(2, name="head")(hidden), name="flat"))


def nested() -> Any:
    """The backbone as a nested model inside an outer model with a Dense head."""
    inputs = keras.Input((6, 6, 3))
    outputs = L.Dense(2, name="head")(_backbone()(inputs))
    return _with_state(keras.Model(inputs, outputs, name="outer"))


def _x() -> np.ndarray:
    return h.data((6, 6, 3), n=16, seed=3, loc=2.0, scale=3.0)


def _y() -> np.ndarray:
    return h.data((2,), n=16, seed=4, loc=5.0)


def _variables(model: Any, paths: list[str]) -> dict[str, np.ndarray]:
    """Every variable of the layers at ``paths``, by layer path and short variable name
    (``"bn:gamma"``; tf-keras names it ``"bn/gamma:0"``)."""
    found = {}
    for path in paths:
        for v in h.layer_at(model, path).weights:
            found[f"{path}:{v.name.split('/')[-1].split(':')[0]}"] = to_numpy(v)
    return found


def _fit(model: Any) -> None:
    h.compile_sgd(model, lr=0.5)
    h.fit_step(model, _x(), _y())


def _assert_moved(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert not np.array_equal(before[key], after[key]), key


def _paths(model: Any) -> list[str]:
    prefix = "backbone/" if model.name == "outer" else ""
    return [prefix + name for name in LOCKED]


def _set_model(model: Any) -> None:
    model.trainable = False
    model.trainable = True


def _set_layers(model: Any) -> None:
    for path in _paths(model):
        h.layer_at(model, path).trainable = True


def _set_nested(model: Any) -> None:
    model.get_layer("backbone").trainable = True
    model.trainable = False
    model.trainable = True


CASES: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "model": (flat, _set_model),
    "layer": (flat, _set_layers),
    "nested": (nested, _set_nested),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_locked_layers_stay_frozen_whatever_trainable_is_set_to(case: str) -> None:
    """After `trainable = True` on the model, the layers or a model above them, a locked
    BN's gamma/beta/statistics and the locked conv kernel do not move in fit; the head does;
    after unfreeze all of them move."""
    build, set_trainable = CASES[case]
    model = build()
    paths = _paths(model)
    selector = "backbone" if case == "nested" else LOCKED
    bnfreeze.freeze(model, selector, lock=True)
    set_trainable(model)
    assert [h.layer_at(model, p).trainable for p in paths] == [False, False]
    assert {id(v) for v in model.trainable_weights} == {
        id(v) for v in model.get_layer("head").weights
    }
    locked, head = _variables(model, paths), _variables(model, ["head"])
    _fit(model)
    h.assert_same_values(locked, _variables(model, paths))
    _assert_moved(head, _variables(model, ["head"]))

    bnfreeze.unfreeze(model, selector)
    assert [h.layer_at(model, p).trainable for p in paths] == [True, True]
    assert not any(is_locked(h.layer_at(model, p)) for p in paths)
    before = _variables(model, paths)
    _fit(model)
    _assert_moved(before, _variables(model, paths))


def test_without_lock_trainable_true_makes_the_frozen_part_train_again() -> None:
    """The reference: the same freeze without lock is undone by `model.trainable = True`."""
    model = flat()
    bnfreeze.freeze(model, LOCKED)
    _set_model(model)
    before = _variables(model, LOCKED)
    _fit(model)
    _assert_moved(
        {k: v for k, v in before.items() if "moving" not in k},
        {k: v for k, v in _variables(model, LOCKED).items() if "moving" not in k},
    )


def test_affine_lock_keeps_gamma_beta_trainable_and_statistics_frozen() -> None:
    """bn_mode="affine" with lock=True: `bn.trainable = False` and a model-wide
    `trainable` round trip leave gamma/beta training and the moving statistics fixed."""
    model = flat()
    bnfreeze.freeze(model, LOCKED, bn_mode="affine", lock=True)
    bn = model.get_layer("bn")
    bn.trainable = False
    _set_model(model)
    model.get_layer("conv").trainable = True
    assert (model.get_layer("conv").trainable, bn.trainable) == (False, True)
    before = _variables(model, LOCKED)
    _fit(model)
    after = _variables(model, LOCKED)
    moving = [k for k in before if "moving" in k]
    conv = [k for k in before if k.startswith("conv:")]
    affine = [k for k in before if k.split(":")[1] in ("gamma", "beta")]
    assert len(moving) == 2 and len(conv) == 2 and len(affine) == 2
    h.assert_same_values(
        {k: before[k] for k in moving + conv}, {k: after[k] for k in moving + conv}
    )
    _assert_moved({k: before[k] for k in affine}, {k: after[k] for k in affine})


def test_freeze_without_lock_keeps_an_existing_lock() -> None:
    """Freezing a locked layer again without `lock` keeps it locked (at the new flag);
    only unfreeze lifts the lock."""
    model = flat()
    bnfreeze.freeze(model, LOCKED, lock=True)
    bnfreeze.freeze(model, "bn", bn_mode="affine")
    bn, conv = model.get_layer("bn"), model.get_layer("conv")
    bn.trainable, conv.trainable = False, True
    assert (is_locked(bn), bn.trainable, is_locked(conv), conv.trainable) == (
        True,
        True,
        True,
        False,
    )
    bnfreeze.unfreeze(model, "bn", bn_mode="inference")
    assert not is_locked(bn) and is_locked(conv)
    bn.trainable = True
    assert bn.trainable


def _save_and_load(model: Any, tmp_path: Any) -> Any:
    path = os.path.join(str(tmp_path), "locked.keras")
    model.save(path)
    return keras.models.load_model(path)


COPIES: dict[str, Callable[[Any, Any], Any]] = {
    "load": _save_and_load,
    "clone": lambda model, _: keras.models.clone_model(model),
}


@pytest.mark.parametrize("copy", sorted(COPIES))
@pytest.mark.parametrize("build", [flat, nested], ids=["flat", "nested"])
def test_the_lock_survives_saving_and_cloning(
    copy: str, build: Callable[[], Any], tmp_path: Any
) -> None:
    """A loaded or cloned model keeps the lock: `trainable = True` does nothing, fit leaves
    the locked variables alone; unfreeze lifts it there too."""
    model = build()
    selector = "backbone" if build is nested else LOCKED
    bnfreeze.freeze(model, selector, lock=True)
    loaded = COPIES[copy](model, tmp_path)
    if copy == "clone":
        loaded.set_weights(model.get_weights())
    paths = _paths(loaded)
    assert all(is_locked(h.layer_at(loaded, p)) for p in paths)
    if build is nested:
        _set_nested(loaded)
    else:
        _set_model(loaded)
    assert [h.layer_at(loaded, p).trainable for p in paths] == [False, False]
    before = _variables(loaded, paths)
    _fit(loaded)
    h.assert_same_values(before, _variables(loaded, paths))
    bnfreeze.unfreeze(loaded)
    before = _variables(loaded, paths)
    _fit(loaded)
    _assert_moved(before, _variables(loaded, paths))


@keras.saving.register_keras_serializable(package="bnfreeze_lock_tests")
class LockBlock(keras.Model):
    """A subclassed backbone: saves its constructor arguments, so it carries the freeze."""

    def __init__(self, filters: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = L.Conv2D(filters, 3, name="conv")
        self.bn = L.BatchNormalization(name="bn")
        self.relu = L.ReLU(name="relu")
        self.pool = L.GlobalAveragePooling2D(name="gap")

    def call(self, inputs: Any, training: Any = None) -> Any:
        return self.pool(self.relu(self.bn(self.conv(inputs), training=training)))

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "filters": self.filters}  # tf-keras's base has no name


def test_a_subclassed_backbone_carries_the_lock_through_saving(tmp_path: Any) -> None:
    """A locked subclassed backbone (rebuilt from its constructor on load) is locked again."""
    inputs = keras.Input((6, 6, 3))
    block = LockBlock(name="backbone")
    model = _with_state(keras.Model(inputs, L.Dense(2, name="head")(block(inputs)), name="sub"))
    bnfreeze.freeze(model, "backbone", lock=True)
    loaded = _save_and_load(model, tmp_path)
    paths = ["backbone/conv", "backbone/bn"]
    assert [is_locked(h.layer_at(loaded, p)) for p in paths] == [True, True]
    h.assert_same_values(_variables(model, paths), _variables(loaded, paths))
    _set_nested(loaded)
    before = _variables(loaded, paths)
    _fit(loaded)
    h.assert_same_values(before, _variables(loaded, paths))


def test_saved_forms_without_a_lock_stay_version_1() -> None:
    """An unlocked pinned layer saves in format version 1 without a lock entry (what older
    bnfreeze reads, and what it wrote: such configs still load, unlocked); a locked one
    saves version 2 with `"locked": true`."""
    model = flat()
    bnfreeze.freeze(model, LOCKED)
    saved = keras.layers.serialize(model.get_layer("bn"))["config"]
    assert saved["version"] == 1 and "locked" not in saved
    reloaded = keras.Model.from_config(model.get_config())
    assert not any(is_locked(x) for x in reloaded.layers)
    bnfreeze.freeze(model, LOCKED, lock=True)
    for name in LOCKED:
        saved = keras.layers.serialize(model.get_layer(name))["config"]
        assert (saved["version"], saved["locked"]) == (2, True)


@pytest.mark.parametrize("value", ["yes", 1, None], ids=["str", "int", "none"])
def test_a_lock_that_is_not_a_bool_is_refused_before_any_change(value: Any) -> None:
    """`lock` must be a bool: the error says what was received, and nothing changed."""
    model = flat()
    bnfreeze.freeze(model, "conv", lock=True)
    state, values = full_state(model), h.snapshot(model)
    with pytest.raises(bnfreeze.ArgumentTypeError) as info:
        bnfreeze.freeze(model, lock=value)
    assert str(info.value) == f"Expected `lock` to be a bool. Received: lock={value!r}."
    assert full_state(model) == state
    h.assert_same_values(values, h.snapshot(model))


def test_audit_marks_locked_layers() -> None:
    """audit's record of a locked BN says locked (text, dict); an unlocked one does not."""
    model = flat()
    bnfreeze.freeze(model, LOCKED, lock=True)
    report = bnfreeze.audit(model)
    record = report.row("bn")
    assert (record.locked, record.trainable, record.bn_mode) == (True, False, "inference")
    assert record.to_dict()["locked"] is True
    line = next(x for x in report.to_text(group=False).splitlines() if x.startswith("bn "))
    assert line.split()[:5] == ["bn", "BatchNormalization", "no", "(locked)", "inference"]
    # The conv has no row (it does not depend on the phase): the report lists it as locked.
    assert report.locked == ["conv", "bn"] == report.to_dict()["locked"]
    assert "locked (freeze(..., lock=True)): 2 layers (conv, bn;" in report.to_text(width=200)
    bnfreeze.unfreeze(model)
    bnfreeze.freeze(model, LOCKED)
    record = bnfreeze.audit(model).row("bn")
    assert (record.locked, record.to_dict()["locked"]) == (False, False)
    assert "(locked)" not in bnfreeze.audit(model).to_text()
    assert bnfreeze.audit(model).locked == []
