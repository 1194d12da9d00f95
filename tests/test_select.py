"""The walker and the selectors: paths, nesting, shared layers, globs, up_to."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnfreeze
from bnfreeze._compat import keras
from bnfreeze._select import select
from bnfreeze._walk import walk
from tests import helpers as h


def _paths(model: Any) -> list[str]:
    return [n.path for n in walk(model)]


def test_nested_paths_depth_first_in_layer_order() -> None:
    """Paths join names with '/', parents before children, in topological order."""
    assert _paths(h.nested()) == [
        "middle",
        "middle/inner",
        "middle/inner/d_inner",
        "middle/inner/bn_inner",
        "middle/bn_middle",
        "bn_outer",
        "head",
    ]


def test_shared_layer_visited_once() -> None:
    """A layer used twice appears once."""
    assert _paths(h.shared()) == ["shared_dense", "shared_bn", "head"]


def test_subclassed_attribute_list_and_dict_layers() -> None:
    """BN as attribute, in a list and in a dict are all found."""
    paths = _paths(h.subclassed())
    for name in ("bn_attr", "bn_list", "bn_dict", "dense", "dense_list", "head"):
        assert name in paths


def test_layer_holding_a_batch_norm_is_descended() -> None:
    """A custom Layer (not a Model) that holds a BN is a container; LSTM is a unit."""

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(4, name="inner_dense")
            self.bn = keras.layers.BatchNormalization(name="inner_bn")

        def call(self, x: Any, training: Any = None) -> Any:
            return self.bn(self.dense(x), training=training)

    inputs = keras.Input((5, 3))
    hidden = keras.layers.LSTM(4, dropout=0.5, return_sequences=True, name="lstm")(inputs)
    outputs = Block(name="block")(hidden)
    nodes = walk(keras.Model(inputs, outputs))
    assert [(n.path, n.is_container) for n in nodes] == [
        ("lstm", False),
        ("block", True),
        ("block/inner_dense", False),
        ("block/inner_bn", False),
    ]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (
            None,
            [
                "middle/inner/d_inner",
                "middle/inner/bn_inner",
                "middle/bn_middle",
                "bn_outer",
                "head",
            ],
        ),
        ("middle", ["middle/inner/d_inner", "middle/inner/bn_inner", "middle/bn_middle"]),
        ("*bn_*", ["middle/inner/bn_inner", "middle/bn_middle", "bn_outer"]),
        (["head", "middle/inner/*"], ["middle/inner/d_inner", "middle/inner/bn_inner", "head"]),
        (
            lambda layer: layer.name.startswith("bn_"),
            ["middle/inner/bn_inner", "middle/bn_middle", "bn_outer"],
        ),
        (
            bnfreeze.up_to("middle/inner/bn_inner"),
            ["middle/inner/d_inner", "middle/inner/bn_inner"],
        ),
        (
            bnfreeze.up_to("bn_outer"),
            ["middle/inner/d_inner", "middle/inner/bn_inner", "middle/bn_middle", "bn_outer"],
        ),
    ],
    ids=["none", "container", "glob", "list", "predicate", "up_to_path", "up_to_name"],
)
def test_selectors(selector: Any, expected: list[str]) -> None:
    """Each selector kind resolves to the expected units, in walk order."""
    nodes = walk(h.nested())
    assert [n.path for n in select(nodes, selector)] == expected


def test_layer_object_selector() -> None:
    """A layer object selects that layer; a nested model object selects its contents."""
    model = h.nested()
    nodes = walk(model)
    inner = model.get_layer("middle").get_layer("inner")
    assert [n.path for n in select(nodes, inner)] == [
        "middle/inner/d_inner",
        "middle/inner/bn_inner",
    ]
    assert [n.path for n in select(nodes, model.get_layer("head"))] == ["head"]


def _two_bases() -> Any:
    """Two nested bases side by side: two layers named 'bn' ('first/bn', 'second/bn')."""
    first, second = h.base(name="first"), h.base(name="second")
    inputs = keras.Input((6,))
    return keras.Model(inputs, keras.layers.Add(name="add")([first(inputs), second(inputs)]))


def test_up_to_a_name_several_layers_share_asks_for_the_path() -> None:
    """up_to(name) with a name two layers share raises, listing both paths; nothing changes."""
    selector = bnfreeze.up_to("bn")
    assert h.refused(bnfreeze.SelectionError, bnfreeze.freeze, _two_bases(), selector) == (
        "`layers` selector up_to('bn') is ambiguous: 2 layers are named 'bn' ('first/bn', "
        "'second/bn'). Pass the full layer path instead."
    )


def test_up_to_a_full_path_where_the_name_is_shared() -> None:
    """up_to(path) resolves a shared name by its path: everything up to that layer only."""
    nodes = walk(_two_bases())
    assert [n.path for n in select(nodes, bnfreeze.up_to("first/bn"))] == [
        "first/dense",
        "first/bn",
    ]
    assert [n.path for n in select(nodes, bnfreeze.up_to("second/bn"))] == [
        "first/dense",
        "first/bn",
        "second/dense",
        "second/bn",
    ]


def test_empty_list_selector() -> None:
    """An empty list is an error, not 'nothing'."""
    with pytest.raises(bnfreeze.SelectionError) as info:
        select(walk(h.functional()), [])
    assert str(info.value) == (
        "`layers` is an empty list. Expected None (the whole model), a glob pattern, a layer, "
        "a predicate, up_to(name), starting_at(name), last(n), exclude(...), or a non-empty "
        "list."
    )


# --- random nested architectures --------------------------------------------------------

_layer_kinds = st.sampled_from(["dense", "bn", "dropout"])
_tree = st.recursive(
    st.lists(_layer_kinds, min_size=1, max_size=3),
    lambda children: st.lists(st.one_of(_layer_kinds, children), min_size=1, max_size=3),
    max_leaves=8,
)


def _build(spec: Any, counter: list[int]) -> Any:
    inputs = keras.Input((4,))
    x = inputs
    for item in spec:
        counter[0] += 1
        name = f"l{counter[0]}"
        if isinstance(item, list):
            x = _build(item, counter)(x)
        elif item == "dense":
            x = keras.layers.Dense(4, name=name)(x)
        elif item == "bn":
            x = keras.layers.BatchNormalization(name=name)(x)
        else:
            x = keras.layers.Dropout(0.3, name=name)(x)
    counter[0] += 1
    return keras.Model(inputs, x, name=f"m{counter[0]}")


@settings(max_examples=h.examples(8), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_tree, mode=st.sampled_from(list(bnfreeze.BN_MODES)))
def test_random_nested_models_round_trip(spec: Any, mode: str) -> None:
    """Random nesting: unique paths, every unit reached, unfreeze(freeze(m)) restores config."""
    model = _build(spec, [0])
    nodes = walk(model)
    paths = [n.path for n in nodes]
    assert len(paths) == len(set(paths))
    everything = [
        x
        for x in model._flatten_layers(include_self=False, recursive=True)
        if type(x).__name__ != "InputLayer"
    ]
    assert {id(n.layer) for n in nodes} == {id(x) for x in everything}
    config = model.get_config()
    bnfreeze.freeze(model, bn_mode=mode)
    frozen_paths = set(h.frozen_modes(model))
    assert {
        p for p in paths if p.rsplit("/", 1)[-1] in _names_of(model, "BatchNormalization")
    } <= frozen_paths
    bnfreeze.unfreeze(model)
    assert model.get_config() == config


def _names_of(model: Any, class_name: str) -> set[str]:
    return {
        x.name
        for x in model._flatten_layers(include_self=False, recursive=True)
        if class_name in type(x).__name__
    }
