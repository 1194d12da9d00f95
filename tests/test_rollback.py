"""freeze and unfreeze are all-or-nothing: when one step fails, the model is as it was.

Faults come from layers a user may really have (a class that cannot be subclassed without
arguments, a ``trainable`` setter that refuses) and from injecting a failure into each
step ``freeze`` applies in turn (before the step runs, and after it ran half-way). The
model's state is read independently: every layer's class, ``trainable`` flag and
bnfreeze attributes, every variable's ``trainable`` flag and value, the model's config,
and the ``training=`` recorded on every graph call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnfreeze
from bnfreeze import _apply
from bnfreeze._compat import keras
from bnfreeze._nodes import graph_nodes, recorded_training
from bnfreeze._walk import walk
from tests import helpers as h
from tests.test_select import _build, _tree

L = keras.layers
_ABSENT = "<absent>"


def model_state(model: Any) -> dict[str, Any]:
    """Everything freeze may touch, read straight from Keras objects."""
    layers = list(model._flatten_layers(include_self=True, recursive=True))
    return {
        "classes": [(x.name, type(x)) for x in layers],
        "trainable": [(x.name, bool(x.trainable)) for x in layers],
        "attributes": [
            (x.name, sorted((k, v) for k, v in vars(x).items() if k.startswith("_bnfreeze")))
            for x in layers
        ],
        "variable_flags": [(v.name, bool(v.trainable)) for v in model.variables],
        "recorded": [(x.name, [(value,) for _, value in recorded_training(x)]) for x in layers],
        "removed": [
            (x.name, [getattr(n, "_bnfreeze_training", _ABSENT) for n in graph_nodes(x)])
            for x in layers
        ],
        "config": model.get_config(),
    }


def assert_unchanged(model: Any, state: dict[str, Any], values: dict[str, np.ndarray]) -> None:
    now = model_state(model)
    for key in state:
        assert now[key] == state[key], key
    after = h.snapshot(model)
    assert after.keys() == values.keys()
    for name, value in values.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


class Injected(RuntimeError):
    """The failure put into one step."""


class FailAt:
    """Replaces ``_apply._changes``: step ``step`` fails (before it runs, or after it ran);
    every step's description is kept in ``seen``."""

    def __init__(self, step: int | None, *, after: bool = False) -> None:
        self.step, self.after = step, after
        self.seen: list[str] = []
        self.original = _apply._changes

    def __call__(self, plan: Any) -> Iterator[_apply.Change]:
        for change in self.original(plan):
            self.seen.append(change.what)
            if len(self.seen) - 1 != self.step:
                yield change
                continue

            def run(change: _apply.Change = change) -> None:
                if self.after:
                    change.run()
                raise Injected("injected")

            yield _apply.Change(change.what, run)


def _guide_model() -> Any:
    """A nested base called with training=False (a recorded value freeze removes), a Dropout
    head, and a subclassed block (a container that carries its freeze)."""
    base_inputs = keras.Input((6,))
    hidden = L.BatchNormalization(name="bn")(L.Dense(8, name="dense")(base_inputs))
    base = keras.Model(base_inputs, L.Dropout(0.3, name="base_dropout")(hidden), name="base")
    inputs = keras.Input((6,))
    hidden = L.Dropout(0.5, name="head_dropout")(base(inputs, training=False))
    model = keras.Model(inputs, L.Dense(2, name="head")(hidden), name="guide")
    h.set_far_statistics(model)
    return model


def _frozen_guide_model() -> Any:
    model = _guide_model()
    bnfreeze.freeze(model, "base", bn_mode="adapt")
    return model


def _locked_guide_model() -> Any:
    model = _guide_model()
    bnfreeze.freeze(model, ["base/dense", "base/bn"], bn_mode="affine", lock=True)
    return model


def _subclassed_model() -> Any:
    model = h.subclassed()
    h.set_far_statistics(model)
    return model


ACTIONS: dict[str, tuple[Callable[[], Any], Callable[[Any], Any], str]] = {
    "freeze_base": (_guide_model, lambda m: bnfreeze.freeze(m, "base"), "freeze"),
    "freeze_all_keep_dropout": (
        _guide_model,
        lambda m: bnfreeze.freeze(m, keep_dropout=True, bn_mode="affine"),
        "freeze",
    ),
    "unfreeze_to_plain": (_frozen_guide_model, lambda m: bnfreeze.unfreeze(m), "unfreeze"),
    "unfreeze_with_mode": (
        _frozen_guide_model,
        lambda m: bnfreeze.unfreeze(m, "base/*", bn_mode="inference"),
        "unfreeze",
    ),
    "freeze_subclassed": (_subclassed_model, lambda m: bnfreeze.freeze(m), "freeze"),
    "freeze_base_locked": (
        _guide_model,
        lambda m: bnfreeze.freeze(m, "base", lock=True),
        "freeze",
    ),
    "unfreeze_locked": (_locked_guide_model, lambda m: bnfreeze.unfreeze(m), "unfreeze"),
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_a_failure_at_any_step_leaves_the_model_as_it_was(
    action: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step in turn fails after doing its change (and the first before doing it): the
    error names the step and nothing has changed."""
    build, act, function = ACTIONS[action]
    counter, model = FailAt(None), build()
    with monkeypatch.context() as patch:
        patch.setattr(_apply, "_changes", counter)
        act(model)
    assert len(counter.seen) > 5
    for step, after in [(0, False)] + [(step, True) for step in range(len(counter.seen))]:
        model = build()
        state, values = model_state(model), h.snapshot(model)
        fault = FailAt(step, after=after)
        with monkeypatch.context() as patch, pytest.raises(bnfreeze.UnsupportedLayerError) as info:
            patch.setattr(_apply, "_changes", fault)
            act(model)
        assert isinstance(info.value.__cause__, Injected)
        assert str(info.value) == (
            f"`{function}` could not {fault.seen[step]}: Injected: injected. Nothing was "
            "changed: the model is exactly as it was before the call. Leave that layer out "
            "of `layers=` (for example with a predicate), or make it accept the change."
        )
        assert_unchanged(model, state, values)


class MustTrain(L.Dense):
    """A Dense whose ``trainable`` setter refuses to freeze it."""

    @property
    def trainable(self) -> bool:
        return bool(L.Dense.trainable.fget(self))  # type: ignore[attr-defined]

    @trainable.setter
    def trainable(self, value: bool) -> None:
        if not value:
            raise ValueError(f"{self.name} must stay trainable")
        L.Dense.trainable.fset(self, value)  # type: ignore[attr-defined]


def _model_with(layer: Any) -> Any:
    inputs = keras.Input((6,))
    hidden = L.BatchNormalization(name="bn")(L.Dense(8, name="dense")(inputs))
    hidden = L.Dropout(0.5, name="dropout")(layer(hidden))
    model = keras.Model(inputs, L.Dense(2, name="head")(hidden))
    h.set_far_statistics(model)
    return model


def test_a_trainable_setter_that_refuses_leaves_the_model_as_it_was() -> None:
    """A layer whose setter raises half-way through freeze: everything is put back."""
    model = _model_with(MustTrain(8, name="must_train"))
    state, values = model_state(model), h.snapshot(model)
    with pytest.raises(bnfreeze.UnsupportedLayerError) as info:
        bnfreeze.freeze(model, ["dense", "bn", "must_train", "dropout"])
    assert str(info.value) == (
        "`freeze` could not set `trainable=False` on layer 'must_train': ValueError: "
        "must_train must stay trainable. Nothing was changed: the model is exactly as it was "
        "before the call. Leave that layer out of `layers=` (for example with a predicate), "
        "or make it accept the change."
    )
    assert_unchanged(model, state, values)
    bnfreeze.freeze(model, ["dense", "bn", "dropout"])  # without it, freeze goes through
    assert bnfreeze._freeze.frozen_modes(model) == {"bn": "inference", "dropout": "inference"}


class Picky(L.Dropout):
    """A Dropout whose subclasses must name a flavour (so bnfreeze cannot subclass it)."""

    def __init_subclass__(cls, *, flavour: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)


def test_a_class_that_cannot_be_subclassed_is_refused_before_any_change() -> None:
    """Pinning needs a subclass: a class whose __init_subclass__ needs arguments is refused."""
    model = _model_with(Picky(0.5, name="picky"))
    state, values = model_state(model), h.snapshot(model)
    with pytest.raises(bnfreeze.UnsupportedLayerError) as info:
        bnfreeze.freeze(model)
    assert str(info.value) == (
        "Layer 'picky' is a Picky, a class bnfreeze cannot subclass (TypeError: "
        "Picky.__init_subclass__() missing 1 required keyword-only argument: 'flavour'); "
        "bnfreeze pins a layer by switching it to a generated subclass of its own class. "
        "Leave it out of `layers=` (for example with a predicate), or let the class be "
        "subclassed without arguments."
    )
    assert_unchanged(model, state, values)


def test_keyboard_interrupt_during_freeze_leaves_the_model_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An interrupt in the middle of applying is let through, after everything is undone."""
    model = _guide_model()
    state, values = model_state(model), h.snapshot(model)
    original = _apply._changes

    def interrupted(plan: Any) -> Iterator[_apply.Change]:
        for index, change in enumerate(original(plan)):
            if index == 9:
                change.run()
                raise KeyboardInterrupt
            yield change

    monkeypatch.setattr(_apply, "_changes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bnfreeze.freeze(model, "base")
    assert_unchanged(model, state, values)


# --- random graphs, a failure at a random step ---------------------------------------


@settings(max_examples=h.examples(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=_tree,
    data=st.data(),
    mode=st.sampled_from(list(bnfreeze.BN_MODES)),
    after=st.booleans(),
)
def test_random_models_are_untouched_by_a_failure_at_a_random_step(
    spec: Any, data: Any, mode: str, after: bool
) -> None:
    """Random nesting, selection, mode and (un)freeze; a random step fails: nothing changed."""
    model = _build(spec, [0])
    paths = [n.path for n in walk(model)]
    if data.draw(st.booleans(), label="frozen first"):
        bnfreeze.freeze(model, data.draw(_selection(paths), label="first selection"))
    selection = data.draw(_selection(paths), label="selection")
    act = data.draw(st.sampled_from(["freeze", "unfreeze", "unfreeze_with_mode"]), label="act")
    step = data.draw(st.integers(0, 40), label="failing step")
    state, values = model_state(model), h.snapshot(model)
    fault = FailAt(step, after=after)
    original = _apply._changes
    _apply._changes = fault
    try:
        if act == "freeze":
            bnfreeze.freeze(model, selection, bn_mode=mode)
        elif act == "unfreeze":
            bnfreeze.unfreeze(model, selection)
        else:
            bnfreeze.unfreeze(model, selection, bn_mode=mode)
    except bnfreeze.UnsupportedLayerError as exc:
        assert isinstance(exc.__cause__, Injected)
        assert_unchanged(model, state, values)
    else:
        assert step >= len(fault.seen)  # no step failed: the call went through
    finally:
        _apply._changes = original


def _selection(paths: list[str]) -> Any:
    return st.one_of(st.none(), st.lists(st.sampled_from(paths), min_size=1, max_size=3))
