"""Training-script workflows around Unfreeze / Freeze, on models with trained state.

Checkpoints saved across an ``Unfreeze`` load and resume the same run, weight averaging
pairs each average with its own variable, the optimizer is laid out as a fresh build, and
``freeze``/``unfreeze`` called from a user's callback keep ``fit`` going (issue 14).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze import _multipliers
from bnfreeze._compat import IS_TF_KERAS, OPTIMIZER_INDEX, keras, to_numpy
from bnfreeze.callbacks import Freeze, Unfreeze
from tests.trained import give_trained_state

L = keras.layers
OPT = keras.optimizers
RNG = np.random.default_rng(3)
X = RNG.normal(size=(32, 4)).astype("float32")
Y = RNG.normal(size=(32, 2)).astype("float32")


def same_shaped() -> Any:
    """a -> bn -> b -> head, ``a`` and ``b`` of one shape (the silent case), trained state."""
    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(4, name="a"),
            L.BatchNormalization(name="bn"),
            L.Dense(4, name="b"),
            L.Dense(2, name="head"),
        ]
    )
    give_trained_state(model, seed=5)
    return bnfreeze.freeze(model, ["a", "bn", "b"])


class StepLosses(keras.callbacks.Callback):  # type: ignore[misc]
    """The loss of every training step, as ``fit`` reports it."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.losses.append(float(logs["loss"]))


def stages() -> list[Any]:
    return [Unfreeze(1, ["a", "b"], lr_multiplier=lambda n: 0.5 / (n + 1)), Freeze(3, "a")]


def fit(model: Any, callbacks: list[Any], epochs: int, **kw: Any) -> Any:
    return model.fit(
        X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks, **kw
    )


def weights(model: Any) -> list[np.ndarray]:
    return [to_numpy(v).copy() for v in model.weights]


# --- the optimizer's layout ------------------------------------------------------------


def test_layout_after_unfreeze_is_a_fresh_builds_with_slots_kept() -> None:
    """After Unfreeze: names, shapes and order of the optimizer's variables are a fresh
    build's over the trainable variables; the head's slots keep their values."""
    model2 = same_shaped()
    model2.compile(optimizer=OPT.Adam(0.01, use_ema=True), loss="mse")
    keep: dict[str, Any] = {}

    class AtUnfreeze(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            opt = self.model.optimizer
            head = self.model.get_layer("head").kernel
            i = getattr(opt, OPTIMIZER_INDEX)[opt._var_key(head)]
            keep[f"m{epoch}"] = to_numpy(opt._momentums[i]).copy()

    fit(model2, [Unfreeze(1, ["a", "b"]), AtUnfreeze()], epochs=2)
    opt = model2.optimizer
    fresh = OPT.Adam(0.01, use_ema=True, name=opt.name)
    fresh.build(model2.trainable_variables)
    assert [tuple(v.shape) for v in opt.variables] == [tuple(v.shape) for v in fresh.variables]
    assert [v.name for v in opt.variables] == [v.name for v in fresh.variables]
    if not IS_TF_KERAS:  # what Keras 3 pairs the averages with
        pairs = zip(opt._trainable_variables, model2.trainable_variables, strict=True)
        assert all(mine is theirs for mine, theirs in pairs)
    # The head's first moment at the start of epoch 1 (after Unfreeze ran, callbacks in
    # order) is the one it had at the end of epoch 0: kept, not reset.
    assert np.any(keep["m1"] != 0)


# --- checkpoints and resume ---------------------------------------------------------------


def test_checkpoint_every_epoch_resumes_the_same_run(tmp_path: Any) -> None:
    """ModelCheckpoint each epoch across Unfreeze/Freeze: each checkpoint loads and, resumed
    with initial_epoch and the same callbacks, gives the uninterrupted run's step losses."""
    epochs = 5
    model = same_shaped()
    model.compile(optimizer=OPT.Adam(0.01), loss="mse")
    path = os.path.join(str(tmp_path), "ckpt-{epoch}.keras")
    straight = StepLosses()
    fit(model, [*stages(), keras.callbacks.ModelCheckpoint(path), straight], epochs)
    steps = len(straight.losses) // epochs
    for k in range(1, epochs):
        loaded = keras.models.load_model(path.format(epoch=k))
        resumed = StepLosses()
        fit(loaded, [*stages(), resumed], epochs, initial_epoch=k)
        np.testing.assert_allclose(
            resumed.losses, straight.losses[k * steps :], rtol=1e-6, atol=1e-6
        )
    assert (
        _multipliers.multipliers(loaded) == {"b/kernel": 0.5 / 4, "b/bias": 0.5 / 4} or IS_TF_KERAS
    )


def test_multipliers_survive_save_and_load(tmp_path: Any) -> None:
    """A model saved after the unfreeze epoch keeps its multipliers, and training it after
    load (no extra call) scales the learning rate: the first SGD step is k times plain."""
    model = same_shaped()
    model.compile(optimizer=OPT.SGD(0.1), loss="mse")
    fit(model, [Unfreeze(1, ["a", "b"], lr_multiplier=0.25)], epochs=2)
    file = os.path.join(str(tmp_path), "m.keras")
    model.save(file)
    loaded = keras.models.load_model(file)
    assert _multipliers.stored(loaded) == _multipliers.stored(model)
    assert set(_multipliers.stored(loaded).values()) == {0.25}
    plain = keras.models.load_model(file)
    _multipliers.set_multipliers(plain, {}, replace=True)
    plain.compile(optimizer=OPT.SGD(0.1), loss="mse")
    loaded.compile(optimizer=OPT.SGD(0.1), loss="mse")
    before = loaded.get_layer("a").kernel.numpy().copy()
    loaded.fit(X[:8], Y[:8], batch_size=8, epochs=1, verbose=0, shuffle=False)
    plain.fit(X[:8], Y[:8], batch_size=8, epochs=1, verbose=0, shuffle=False)
    step = loaded.get_layer("a").kernel.numpy() - before
    full = plain.get_layer("a").kernel.numpy() - before
    np.testing.assert_allclose(step, 0.25 * full, rtol=1e-5, atol=1e-7)


# --- weight averaging ------------------------------------------------------------------


@pytest.mark.skipif(IS_TF_KERAS, reason="tf-keras has no SwapEMAWeights callback")
def test_ema_pairs_each_average_with_its_variable() -> None:
    """use_ema + Unfreeze of same-shaped layers: the averages swapped in are a numpy EMA of
    each variable's own per-step values."""
    model = same_shaped()
    frozen = {v.path: to_numpy(v).copy() for v in model.weights}
    momentum = 0.9
    model.compile(optimizer=OPT.Adam(0.01, use_ema=True, ema_momentum=momentum), loss="mse")
    history: list[dict[str, np.ndarray]] = []

    class Record(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            values = {v.path: to_numpy(v).copy() for v in self.model.trainable_variables}
            history.append(values)

    swap = keras.callbacks.SwapEMAWeights(swap_on_epoch=False)
    fit(model, [Unfreeze(1, ["a", "b"]), Record(), swap], epochs=3)
    # Reference: an average starts at its variable's value at Keras's first step, or, for a
    # variable that starts training later, at its value when it is unfrozen.
    ref: dict[str, np.ndarray] = {}
    for step, values in enumerate(history):
        for name, value in values.items():
            if name not in ref:
                if step == 0:  # Keras's first step copies the variable
                    ref[name] = value.copy()
                    continue
                ref[name] = frozen[name].copy()
            ref[name] = momentum * ref[name] + (1 - momentum) * value
    assert len(ref) == 6
    # SwapEMAWeights put the averages into the model at the end of fit.
    for v in model.trainable_variables:
        np.testing.assert_allclose(to_numpy(v), ref[v.path], rtol=1e-5, atol=1e-6)


# --- errors and edge cases -------------------------------------------------------------


def test_callable_returning_a_bad_value_changes_nothing() -> None:
    """lr_multiplier returning a bad value: BNFreezeError, and the layers stay frozen."""
    model = same_shaped()
    model.compile(optimizer=OPT.SGD(0.1), loss="mse")
    with pytest.raises(bnfreeze.BNFreezeError) as info:
        fit(model, [Unfreeze(1, ["a", "b"], lr_multiplier=lambda n: -1.0)], epochs=2)
    assert str(info.value) == (
        "Expected `lr_multiplier` to be a finite float >= 0. Received: "
        "lr_multiplier(0) returned -1.0."
    )
    assert not model.get_layer("a").trainable and not model.get_layer("b").trainable


def test_huge_multiplier_is_refused() -> None:
    """lr_multiplier=10**400 (no float holds it): ArgumentError, not OverflowError."""
    with pytest.raises(bnfreeze.ArgumentError) as info:
        Unfreeze(1, "a", lr_multiplier=10**400)
    assert str(info.value).startswith(
        "Expected `lr_multiplier` to be a finite float >= 0. Received: lr_multiplier=1000"
    )
    assert str(info.value).endswith("(401 digits).")


@pytest.mark.parametrize("function", ["unfreeze", "freeze"])
def test_freeze_from_a_user_callback_works_from_the_next_step(function: str) -> None:
    """freeze/unfreeze called in a user's on_epoch_begin: fit goes on and trains the new
    set from that epoch, exactly as the Freeze/Unfreeze callback does."""
    runs = []
    for own in (True, False):
        model = same_shaped()
        if function == "freeze":
            bnfreeze.unfreeze(model, ["a", "b"])
        model.compile(optimizer=OPT.Adam(0.01), loss="mse")

        class Mine(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                if epoch == 1:
                    getattr(bnfreeze, function)(self.model, ["a", "b"], bn_mode="inference")

        stage = Unfreeze(1, ["a", "b"]) if function == "unfreeze" else Freeze(1, ["a", "b"])
        if own:
            model.optimizer.build(model.trainable_variables)
        fit(model, [Mine()] if own else [stage], epochs=3)
        runs.append(weights(model))
    for x, y in zip(*runs, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.skipif(IS_TF_KERAS, reason="tf-keras: the paused variable's lr is scaled to 0")
def test_zero_multiplier_keeps_paused_gradients_out_of_global_clipnorm() -> None:
    """global_clipnorm with lr_multiplier=0: the rest trains exactly as if nothing had been
    unfrozen (the paused gradients do not enter the norm)."""
    runs = []
    for stage in ([], [Unfreeze(1, ["a", "b"], lr_multiplier=0.0)]):
        model = same_shaped()
        model.compile(optimizer=OPT.SGD(0.5, global_clipnorm=0.01), loss="mse")
        model.optimizer.build(model.trainable_variables)
        fit(model, stage, epochs=3)
        runs.append(weights(model))
    for x, y in zip(*runs, strict=True):
        np.testing.assert_array_equal(x, y)
