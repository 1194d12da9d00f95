"""Selectors beyond globs: starting_at, last, exclude (and `-`), block prefixes for up_to
and starting_at, and the Keras EfficientNet fine-tuning example rewritten with them."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import keras
from bnfreeze._select import select
from bnfreeze._walk import walk
from tests import helpers as h

L = keras.layers

#: The layers of `blocks_model`, in order: EfficientNet-like block names, one block
#: ("block10") whose number starts with another's ("block1"), and a "top" prefix that
#: names two separate groups.
NAMES = [
    "stem",
    "block1_dense",
    "block1_bn",
    "block2a_dense",
    "block2a_bn",
    "block2b_dense",
    "block2b_bn",
    "top_dense",
    "block10_dense",
    "block10_bn",
    "top_bn",
    "head",
]


def blocks_model(name: str = "blocks") -> Any:
    """A chain of Dense and BatchNormalization layers named `NAMES`."""
    inputs = keras.Input((4,))
    x = inputs
    for layer_name in NAMES:
        if layer_name.endswith("_bn"):
            x = L.BatchNormalization(name=layer_name)(x)
        else:
            x = L.Dense(4, name=layer_name)(x)
    return keras.Model(inputs, x, name=name)


def nested_blocks() -> Any:
    """`blocks_model` as a nested base between an outer Dense and an outer head."""
    base = blocks_model("base")
    inputs = keras.Input((4,))
    x = L.Dense(4, name="pre")(inputs)
    x = base(x)
    return keras.Model(inputs, L.Dense(2, name="outer_head")(x), name="outer")


def paths(model: Any, selector: Any) -> list[str]:
    return [n.path for n in select(walk(model), selector)]


def message(model: Any, selector: Any) -> str:
    with pytest.raises(bnfreeze.SelectionError) as info:
        select(walk(model), selector)
    return str(info.value)


# --- starting_at and up_to ---------------------------------------------------------------


def test_starting_at_selects_the_layer_and_everything_after():
    """starting_at(name) selects that layer and every later one, in order."""
    assert paths(blocks_model(), bnfreeze.starting_at("top_dense")) == NAMES[7:]
    assert paths(nested_blocks(), bnfreeze.starting_at("base/top_bn")) == [
        "base/top_bn",
        "base/head",
        "outer_head",
    ]


def test_starting_at_a_nested_model_starts_at_its_first_layer():
    """starting_at a container selects its first layer onward (the whole container)."""
    assert paths(nested_blocks(), bnfreeze.starting_at("base")) == [
        *(f"base/{name}" for name in NAMES),
        "outer_head",
    ]


def test_up_to_and_starting_at_split_the_model_at_every_layer():
    """For every pair of neighbouring layers, up_to(first) and starting_at(second) are
    disjoint and together select the whole model, in order."""
    model = nested_blocks()
    units = [n.path for n in walk(model) if not n.is_container]
    for before, after in itertools.pairwise(units):
        head = paths(model, bnfreeze.up_to(before))
        tail = paths(model, bnfreeze.starting_at(after))
        assert head + tail == units


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (bnfreeze.up_to("block2"), NAMES[: NAMES.index("block2b_bn") + 1]),
        (bnfreeze.starting_at("block2"), NAMES[NAMES.index("block2a_dense") :]),
        (bnfreeze.up_to("block1"), NAMES[: NAMES.index("block1_bn") + 1]),
        (bnfreeze.starting_at("block10"), NAMES[NAMES.index("block10_dense") :]),
        (bnfreeze.up_to("block2a"), NAMES[: NAMES.index("block2a_bn") + 1]),
    ],
    ids=["up_to-block2", "starting_at-block2", "block1-not-block10", "block10", "block2a"],
)
def test_block_prefix_names_the_block(selector, expected):
    """A prefix that names one block: up_to ends at its last layer, starting_at begins at
    its first; "block1" does not reach into "block10"."""
    assert paths(blocks_model(), selector) == expected


def test_block_prefix_in_a_nested_model():
    """A prefix works on names at any depth and on paths."""
    model = nested_blocks()
    by_name = paths(model, bnfreeze.up_to("block2"))
    assert by_name == ["pre", *(f"base/{n}" for n in NAMES[: NAMES.index("block2b_bn") + 1])]
    assert paths(model, bnfreeze.up_to("base/block2")) == by_name


def test_an_exact_name_wins_over_a_prefix():
    """A layer named exactly `name` is the target even when longer names start with it."""
    inputs = keras.Input((4,))
    x = L.Dense(4, name="block1")(inputs)
    x = L.Dense(4, name="block1_extra")(x)
    model = keras.Model(inputs, L.Dense(4, name="head")(x))
    assert paths(model, bnfreeze.up_to("block1")) == ["block1"]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (
            bnfreeze.up_to("top"),
            "`layers` selector up_to('top') is ambiguous: no layer is named 'top', and the "
            "layers whose names start with it form 2 separate groups, not one block. It "
            "could mean the last layer of any of them: 'top_dense', 'top_bn'. Pass one of "
            "these names, or a longer prefix.",
        ),
        (
            bnfreeze.starting_at("top"),
            "`layers` selector starting_at('top') is ambiguous: no layer is named 'top', and "
            "the layers whose names start with it form 2 separate groups, not one block. It "
            "could mean the first layer of any of them: 'top_dense', 'top_bn'. Pass one of "
            "these names, or a longer prefix.",
        ),
    ],
    ids=["up_to", "starting_at"],
)
def test_ambiguous_prefix_names_the_layers_it_could_mean(selector, expected):
    """A prefix whose layers are not one block is an error listing what it could mean."""
    assert message(blocks_model(), selector) == expected


def test_ambiguous_prefix_lists_at_most_six():
    """With many groups the message lists six candidates and the count."""
    inputs = keras.Input((4,))
    x = inputs
    for i in range(8):
        x = L.Dense(4, name=f"dense_{i}")(x)
        x = L.Activation("relu", name=f"act_{i}")(x)
    model = keras.Model(inputs, x)
    assert message(model, bnfreeze.up_to("dense")) == (
        "`layers` selector up_to('dense') is ambiguous: no layer is named 'dense', and the "
        "layers whose names start with it form 8 separate groups, not one block. It could "
        "mean the last layer of any of them: 'dense_0', 'dense_1', 'dense_2', 'dense_3', "
        "'dense_4', 'dense_5', ... (8 in all). Pass one of these names, or a longer prefix."
    )


def test_unknown_name_names_close_layers():
    """A name that is neither a layer nor a prefix says what was expected and what is close."""
    assert message(blocks_model(), bnfreeze.starting_at("blok2a_bn")) == (
        "`layers` selector starting_at('blok2a_bn') matched no layer of the model. Expected "
        "a glob pattern over layer paths such as 'outer/inner/layer' (use '*/name' to match "
        "at any depth), a layer of this model, a predicate, bnfreeze.up_to(name), "
        "bnfreeze.starting_at(name), bnfreeze.last(n) or bnfreeze.exclude(...). Closest "
        "layer paths: 'block2a_bn', 'block2b_bn', 'block1_bn'."
    )


@pytest.mark.parametrize("name", ["", 3, None])
@pytest.mark.parametrize("function", ["up_to", "starting_at"])
def test_name_must_be_a_non_empty_string(function, name):
    """up_to/starting_at refuse a name that is not a non-empty string, at construction."""
    with pytest.raises(bnfreeze.SelectionError) as info:
        getattr(bnfreeze, function)(name)
    assert str(info.value) == (
        f"Expected `name` of {function}() to be a non-empty layer name, path or block "
        f"prefix. Received: {name!r}."
    )


# --- last ---------------------------------------------------------------------------------


def test_last_n_is_model_layers_slice_on_a_flat_model():
    """On a flat model last(n) selects the layers of Keras's own model.layers[-n:]."""
    model = blocks_model()
    layers = [layer.name for layer in model.layers if not isinstance(layer, L.InputLayer)]
    for n in range(1, len(layers) + 1):
        assert paths(model, bnfreeze.last(n)) == [layer.name for layer in model.layers[-n:]], n


def test_last_counts_the_layers_inside_a_nested_model():
    """last(n) counts a nested model's layers one by one, not the model as one layer."""
    assert paths(nested_blocks(), bnfreeze.last(3)) == ["base/top_bn", "base/head", "outer_head"]


@pytest.mark.parametrize("n", [0, -1, 2.5, True, "3"], ids=repr)
def test_last_needs_a_positive_int(n):
    """last(n) with n not a positive int is refused at construction."""
    with pytest.raises(bnfreeze.SelectionError) as info:
        bnfreeze.last(n)
    assert str(info.value) == f"Expected `n` of last() to be a positive int. Received: {n!r}."


def test_last_more_than_the_model_has():
    """last(n) with more layers than the model has is refused, naming how many it has."""
    assert message(blocks_model(), bnfreeze.last(13)) == (
        "`layers` selector last(13) asks for more layers than the model has: it has 12. "
        "Expected n between 1 and 12."
    )


# --- exclude ------------------------------------------------------------------------------


def test_exclude_alone_is_everything_else():
    """exclude(x) selects every layer that x does not."""
    assert paths(blocks_model(), bnfreeze.exclude("*_bn")) == [
        n for n in NAMES if not n.endswith("_bn")
    ]


def test_minus_is_exclude_within():
    """`selector - excluded` selects what exclude(excluded, within=selector) does, for a
    bnfreeze selector on either side."""
    model = blocks_model()
    assert paths(model, bnfreeze.last(4) - "*_bn") == ["block10_dense", "head"]
    assert paths(model, bnfreeze.exclude("*_bn", within=bnfreeze.last(4))) == [
        "block10_dense",
        "head",
    ]
    assert paths(model, "block*" - bnfreeze.starting_at("block2b")) == [
        "block1_dense",
        "block1_bn",
        "block2a_dense",
        "block2a_bn",
    ]


def test_exclude_reprs_read_as_written():
    """The selectors' reprs are the calls that build them."""
    assert repr(bnfreeze.last(20) - "*_bn") == "exclude('*_bn', within=last(20))"
    assert repr(["a", "b"] - bnfreeze.up_to("x")) == "exclude(up_to('x'), within=['a', 'b'])"
    assert repr(bnfreeze.exclude("head")) == "exclude('head')"


def test_exclude_in_a_list_is_a_union_member():
    """An exclusion inside a list adds its layers to the other items'."""
    selector = ["stem", bnfreeze.exclude("*_dense", within="block2*")]
    assert paths(blocks_model(), selector) == ["stem", "block2a_bn", "block2b_bn"]


def test_exclude_everything_is_an_error():
    """An exclusion that leaves no layer is an error, not an empty selection."""
    assert message(blocks_model(), bnfreeze.last(2) - ["top_bn", "head"]) == (
        "`layers` selector exclude(['top_bn', 'head'], within=last(2)) selects no layer: "
        "every layer it selects from is excluded. Expected a selection that keeps at least "
        "one layer."
    )


def test_exclude_of_something_absent_is_an_error():
    """What is excluded must match a layer (a typo there would silently exclude nothing)."""
    assert message(blocks_model(), bnfreeze.exclude("*_batchnorm")).startswith(
        "`layers` selector '*_batchnorm' matched no layer of the model."
    )


# --- used by freeze, unfreeze and recalibrate ---------------------------------------------


def test_freeze_from_a_block_on_and_a_failed_selection_changes_nothing():
    """freeze(starting_at(block)) freezes exactly the layers from that block on; a
    selector that fails leaves the model as it was."""
    model = blocks_model()
    config = model.get_config()
    with pytest.raises(bnfreeze.SelectionError):
        bnfreeze.freeze(model, bnfreeze.starting_at("top"))
    assert model.get_config() == config
    assert all(layer.trainable for layer in model.layers)
    bnfreeze.freeze(model, bnfreeze.starting_at("block2"))
    frozen = {layer.name for layer in model.layers if not layer.trainable}
    assert frozen == set(NAMES[NAMES.index("block2a_dense") :])


def test_recalibrate_layers_selector_changes_only_the_selected_statistics():
    """recalibrate(layers=starting_at(...) - ...) reaches only the selected BN layers: the
    others keep their moving statistics bit for bit."""
    model = blocks_model()
    h.set_far_statistics(model)
    bns = h.bn_layers(model)
    before = [h.to_numpy(bn.moving_mean) for bn in bns]
    x = h.data((4,), n=32)
    bnfreeze.recalibrate(model, x, layers=bnfreeze.starting_at("block10") - "top_bn", verbose=0)
    changed = {
        bn.name
        for bn, mean in zip(bns, before, strict=True)
        if not np.array_equal(mean, h.to_numpy(bn.moving_mean))
    }
    assert changed == {"block10_bn"}


# --- the Keras EfficientNet fine-tuning example ---------------------------------------------


def efficientnet_example() -> tuple[Any, Any]:
    """The model of Keras's "Image classification via fine-tuning with EfficientNet"
    example (weights=None: nothing is downloaded), and its base."""
    inputs = L.Input(shape=(32, 32, 3))
    base = keras.applications.EfficientNetB0(include_top=False, input_tensor=inputs, weights=None)
    x = L.GlobalAveragePooling2D(name="avg_pool")(base.output)
    x = L.BatchNormalization()(x)
    x = L.Dropout(0.2, name="top_dropout")(x)
    outputs = L.Dense(5, activation="softmax", name="pred")(x)
    return keras.Model(inputs, outputs, name="EfficientNet"), base


def _flags(model: Any) -> list[tuple[str, bool]]:
    """(class, trainable) of every layer but the input, in order (the two builds' automatic
    names differ)."""
    layers = [layer for layer in model.layers if not isinstance(layer, L.InputLayer)]
    return [(type(layer).__name__, layer.trainable) for layer in layers]


@pytest.mark.slow
def test_efficientnet_example_in_one_line():
    """The example's "unfreeze the top 20 layers while leaving BatchNorm layers frozen"
    (a loop over model.layers[-20:]) is `unfreeze(model, last(20) - "*_bn")`: the same
    trainable flags, and the BN layers stay pinned to their moving statistics."""
    reference, base = efficientnet_example()
    base.trainable = False  # the example's first stage
    for layer in reference.layers[-20:]:  # the example's unfreeze_model
        if not isinstance(layer, L.BatchNormalization):
            layer.trainable = True
    expected = _flags(reference)

    model, _ = efficientnet_example()
    bnfreeze.freeze(model, bnfreeze.up_to("top_activation"))
    bnfreeze.unfreeze(model, bnfreeze.last(20) - "*_bn")

    assert _flags(model) == expected
    modes = bnfreeze._freeze.frozen_modes(model)
    base_bn = [n.path for n in walk(model) if n.path.endswith("_bn")]
    assert {path: modes.get(path) for path in base_bn} == dict.fromkeys(base_bn, "inference")
