"""Bad input: a clear error (the whole message is checked) and a model left exactly as it was."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import IS_TF_KERAS, flavour_label, keras
from tests import helpers as h


def _state(model: Any) -> tuple[Any, dict[str, np.ndarray], list[type], list[bool]]:
    from bnfreeze._walk import walk

    nodes = walk(model)
    return (
        model.get_config(),
        h.snapshot(model),
        [type(n.layer) for n in nodes],
        [n.layer.trainable for n in nodes],
    )


def _assert_unchanged(model: Any, before: Any) -> None:
    after = _state(model)
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys()
    for key in before[1]:
        np.testing.assert_array_equal(before[1][key], after[1][key])
    assert after[2] == before[2]
    assert after[3] == before[3]


@pytest.mark.parametrize(
    "function", [bnfreeze.freeze, bnfreeze.unfreeze], ids=["freeze", "unfreeze"]
)
def test_unknown_mode(function: Any) -> None:
    """An unknown bn_mode names the four modes and the closest one; nothing changes."""
    model = h.nested()
    bnfreeze.freeze(model, "middle")
    before = _state(model)
    with pytest.raises(bnfreeze.ModeError) as info:
        function(model, bn_mode="infer")
    assert str(info.value) == (
        "Expected `bn_mode` to be one of ('inference', 'affine', 'adapt', 'train'). "
        "Received: bn_mode='infer'. Did you mean 'inference'?"
    )
    assert isinstance(info.value, ValueError)
    _assert_unchanged(model, before)


def test_not_a_model() -> None:
    """A non-model gets a TypeError subclass that says what was received."""
    with pytest.raises(bnfreeze.ModelError) as info:
        bnfreeze.freeze([1, 2])
    assert str(info.value) == (
        "Expected `model` to be a keras.Model. Received: list ([1, 2]). "
        "Wrap layers in a model first, e.g. keras.Sequential([layer])."
    )
    assert isinstance(info.value, TypeError)


def test_a_layer_is_not_a_model() -> None:
    """A bare layer is refused with the fix (wrap it in a model)."""
    layer = keras.layers.BatchNormalization(name="lonely_bn")
    with pytest.raises(bnfreeze.ModelError) as info:
        bnfreeze.freeze(layer)
    assert str(info.value).startswith(
        "Expected `model` to be a keras.Model. Received: a Keras layer ("
    )
    assert str(info.value).endswith("Wrap layers in a model first, e.g. keras.Sequential([layer]).")


def test_unbuilt_model() -> None:
    """An unbuilt subclassed model is refused before anything changes."""
    model = h.Subclassed(name="unbuilt")
    with pytest.raises(bnfreeze.ModelError) as info:
        bnfreeze.freeze(model)
    assert str(info.value) == (
        "Expected a built model, but model 'unbuilt' is not built, so its layers have no "
        "variables yet. Call the model on data once, or call model.build(input_shape), "
        "before bnfreeze."
    )


def test_selector_matches_nothing_names_close_paths() -> None:
    """A selector that matches nothing names the closest layer paths; nothing changes."""
    model = h.nested()
    before = _state(model)
    with pytest.raises(bnfreeze.SelectionError) as info:
        bnfreeze.freeze(model, ["middle/bn_middle", "middle/inner/bn_iner"])
    assert str(info.value) == (
        "`layers` selector 'middle/inner/bn_iner' matched no layer of the model. Expected a "
        "glob pattern over layer paths such as 'outer/inner/layer' (use '*/name' to match at "
        "any depth), a layer of this model, a predicate, bnfreeze.up_to(name), "
        "bnfreeze.starting_at(name), bnfreeze.last(n) or bnfreeze.exclude(...). "
        "Closest layer paths: 'middle/inner/bn_inner', 'middle/inner/d_inner', 'middle/inner'."
    )
    _assert_unchanged(model, before)


def test_bad_selector_type() -> None:
    """A selector of the wrong type says what each selector may be."""
    model = h.functional()
    with pytest.raises(bnfreeze.SelectionError) as info:
        bnfreeze.freeze(model, 3)
    assert str(info.value) == (
        "Expected each `layers` selector to be a glob pattern over layer paths such as "
        "'outer/inner/layer' (use '*/name' to match at any depth), a layer of this model, a "
        "predicate, bnfreeze.up_to(name), bnfreeze.starting_at(name), bnfreeze.last(n) or "
        "bnfreeze.exclude(...). Received: int 3."
    )


def test_foreign_layer_selector() -> None:
    """A layer that is not part of the model is refused by name."""
    model = h.functional()
    stranger = keras.layers.Dense(3, name="stranger")
    with pytest.raises(bnfreeze.SelectionError) as info:
        bnfreeze.freeze(model, stranger)
    assert str(info.value) == (
        "`layers` selector Dense layer 'stranger' is not a layer of this model. Expected a "
        "layer reachable from the model (check that you did not rebuild or clone the model "
        "after taking it)."
    )


class _CustomBN(keras.layers.BatchNormalization):
    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        return super().call(inputs, training=True)


def test_bn_variant_that_overrides_call_is_refused() -> None:
    """A BN subclass with its own call is refused with its path; nothing else was frozen."""
    inputs = keras.Input((4,))
    hidden = keras.layers.BatchNormalization(name="plain_bn")(inputs)
    outputs = _CustomBN(name="odd_bn")(keras.layers.Dense(4, name="d")(hidden))
    model = keras.Model(inputs, outputs)
    before = _state(model)
    with pytest.raises(bnfreeze.UnsupportedLayerError) as info:
        bnfreeze.freeze(model)
    assert str(info.value) == (
        "Layer 'odd_bn' is a _CustomBN, a BatchNormalization variant that overrides `call`, "
        "so bnfreeze cannot vouch for which statistics it uses. Expected "
        "keras.layers.BatchNormalization (or a subclass that only changes its constructor or "
        "config). Leave it out of `layers=` (for example with a predicate), or replace it "
        "with a standard BatchNormalization."
    )
    assert isinstance(info.value, TypeError)
    _assert_unchanged(model, before)
    # Leaving it out works.
    bnfreeze.freeze(model, lambda layer: layer.name != "odd_bn")
    assert bnfreeze._kinds.pinned_mode(model.get_layer("plain_bn")) == "inference"


def test_keep_dropout_must_be_bool() -> None:
    """keep_dropout is validated before anything changes."""
    model = h.functional()
    before = _state(model)
    with pytest.raises(TypeError) as info:
        bnfreeze.freeze(model, keep_dropout="yes")  # type: ignore[arg-type]
    assert str(info.value) == "Expected `keep_dropout` to be a bool. Received: keep_dropout='yes'."
    _assert_unchanged(model, before)


def test_flavour_label_names_the_installed_keras() -> None:
    """Errors about flavours name the installed one; the label reflects keras.__version__."""
    assert flavour_label().endswith(keras.__version__)


@pytest.mark.skipif(not IS_TF_KERAS, reason="needs both flavours importable (the tf-keras venv)")
def test_model_of_the_other_flavour_names_the_fix() -> None:
    """A Keras 3 model while bnfreeze runs on tf-keras: the error says which variable to set."""
    import keras as keras3  # Keras 3, installed beside tf-keras by TensorFlow

    model = keras3.Sequential([keras3.Input((2,)), keras3.layers.Dense(1)])
    with pytest.raises(bnfreeze.ModelError) as info:
        bnfreeze.freeze(model)
    assert str(info.value) == (
        "`freeze` received a model of Keras 3 (`import keras`), but bnfreeze is running on "
        f"{flavour_label()}. Expected a model of the installed flavour: set "
        "TF_USE_LEGACY_KERAS=1 before importing TensorFlow and bnfreeze to use tf-keras, or "
        "unset it to use Keras 3."
    )
