"""Bad input: a clear error (the whole message is checked) and a model left exactly as it was."""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

import pytest

import bnfreeze
from bnfreeze._compat import IS_TF_KERAS, flavour_label, keras
from bnfreeze._kinds import pinned_mode
from tests import helpers as h
from tests.helpers import refused


@pytest.mark.parametrize(
    "function", [bnfreeze.freeze, bnfreeze.unfreeze], ids=["freeze", "unfreeze"]
)
def test_unknown_mode(function: Any) -> None:
    """An unknown bn_mode names the four modes and the closest one; nothing changes."""
    model = h.nested()
    bnfreeze.freeze(model, "middle")
    assert refused(bnfreeze.ModeError, function, model, bn_mode="infer") == (
        "Expected `bn_mode` to be one of ('inference', 'affine', 'adapt', 'train'). "
        "Received: bn_mode='infer'. Did you mean 'inference'?"
    )
    assert issubclass(bnfreeze.ModeError, ValueError)


#: Each public function that takes a model, with the arguments it needs after it.
MODEL_FUNCTIONS = {
    "freeze": (bnfreeze.freeze, ()),
    "unfreeze": (bnfreeze.unfreeze, ()),
    "audit": (bnfreeze.audit, ()),
    "compare_phases": (bnfreeze.compare_phases, (h.data((6,)),)),
    "recalibrate": (bnfreeze.recalibrate, (h.data((6,)),)),
}


@pytest.mark.parametrize("name", list(MODEL_FUNCTIONS))
def test_not_a_model(name: str) -> None:
    """Every function taking a model refuses a list or a bare layer, saying what it got."""
    function, args = MODEL_FUNCTIONS[name]
    layer = keras.layers.BatchNormalization(name="lonely_bn")
    for value, received in (([1, 2], "list ([1, 2])"), (layer, f"a Keras layer ({layer!r:.80})")):
        with pytest.raises(bnfreeze.ModelError) as info:
            function(value, *args)
        assert str(info.value) == (
            f"Expected `model` to be a keras.Model. Received: {received}. "
            "Wrap layers in a model first, e.g. keras.Sequential([layer])."
        )
    assert issubclass(bnfreeze.ModelError, TypeError)


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
    selectors = ["middle/bn_middle", "middle/inner/bn_iner"]
    assert refused(bnfreeze.SelectionError, bnfreeze.freeze, h.nested(), selectors) == (
        "`layers` selector 'middle/inner/bn_iner' matched no layer of the model. Expected a "
        "glob pattern over layer paths such as 'outer/inner/layer' (use '*/name' to match at "
        "any depth), a layer of this model, a predicate, bnfreeze.up_to(name), "
        "bnfreeze.starting_at(name), bnfreeze.last(n) or bnfreeze.exclude(...). "
        "Closest layer paths: 'middle/inner/bn_inner', 'middle/inner/d_inner', 'middle/inner'."
    )


def test_bad_selector_type() -> None:
    """A selector of the wrong type says what each selector may be; nothing changes."""
    assert refused(bnfreeze.SelectionError, bnfreeze.freeze, h.functional(), 3) == (
        "Expected each `layers` selector to be a glob pattern over layer paths such as "
        "'outer/inner/layer' (use '*/name' to match at any depth), a layer of this model, a "
        "predicate, bnfreeze.up_to(name), bnfreeze.starting_at(name), bnfreeze.last(n) or "
        "bnfreeze.exclude(...). Received: int 3."
    )


def test_foreign_layer_selector() -> None:
    """A layer that is not part of the model is refused by name; nothing changes."""
    stranger = keras.layers.Dense(3, name="stranger")
    assert refused(bnfreeze.SelectionError, bnfreeze.freeze, h.functional(), stranger) == (
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
    assert refused(bnfreeze.UnsupportedLayerError, bnfreeze.freeze, model) == (
        "Layer 'odd_bn' is a _CustomBN, a BatchNormalization variant that overrides `call`, "
        "so bnfreeze cannot vouch for which statistics it uses. Expected "
        "keras.layers.BatchNormalization (or a subclass that only changes its constructor or "
        "config). Leave it out of `layers=` (for example with a predicate), or replace it "
        "with a standard BatchNormalization."
    )
    assert issubclass(bnfreeze.UnsupportedLayerError, TypeError)
    # Leaving it out works.
    bnfreeze.freeze(model, lambda layer: layer.name != "odd_bn")
    assert pinned_mode(model.get_layer("plain_bn")) == "inference"


def test_keep_dropout_must_be_bool() -> None:
    """keep_dropout is validated before anything changes."""
    message = refused(
        bnfreeze.ArgumentTypeError, bnfreeze.freeze, h.functional(), keep_dropout="yes"
    )
    assert message == "Expected `keep_dropout` to be a bool. Received: keep_dropout='yes'."
    assert issubclass(bnfreeze.ArgumentTypeError, TypeError)


def _installed_flavour() -> str:
    """The Keras this environment selects, and its version from the installed distribution."""
    if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
        return f"tf-keras {metadata.version('tf-keras')}"
    for distribution in ("keras-nightly", "keras"):  # keras-nightly replaces keras
        try:
            return f"keras {metadata.version(distribution)}"
        except metadata.PackageNotFoundError:
            continue
    raise AssertionError("no Keras distribution is installed")


def test_flavour_label_names_the_installed_keras() -> None:
    """The label errors and reports use is the selected Keras and its installed version."""
    assert flavour_label() == _installed_flavour()


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
