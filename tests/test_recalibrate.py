"""recalibrate on one device: exact moments against numpy, data kinds, atomicity, errors."""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import bnfreeze
from bnfreeze import DataError, SelectionError, recalibrate
from bnfreeze._compat import IS_TF_KERAS, keras, to_numpy
from bnfreeze._kinds import is_pinned, pinned_mode
from tests import helpers as h
from tests.helpers import activations, moments, statistics

L = keras.layers

#: 100 samples far from a fresh BN's statistics (mean 0, variance 1) and from FAR_MEAN.
x_data = functools.partial(h.data, n=100, seed=7, loc=1.5, scale=2.0)


def assert_stats(layer: Any, mean: np.ndarray, var: np.ndarray, rtol: float = 1e-5) -> None:
    """The BN's moving statistics equal the reference moments (atol scaled to the data)."""
    got_mean, got_var = statistics(layer)
    scale = np.sqrt(var).max() + 1e-12
    np.testing.assert_allclose(got_mean, mean, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(got_var, var, rtol=rtol, atol=rtol * scale * scale)


def chain() -> Any:
    """Dense -> BN1 -> Dense -> BN2 -> head, BN statistics far from the data."""
    inputs = keras.Input((6,))
    x = L.Dense(8, name="d1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Dense(5, name="d2")(x)
    x = L.BatchNormalization(name="bn2")(x)
    model = keras.Model(inputs, L.Dense(2, name="head")(x), name="chain")
    h.set_far_statistics(model)
    return model


# --- exactness ----------------------------------------------------------------------------


def test_dense_axis_last_uneven_batches() -> None:
    """BN after Dense: moments over all 100 samples, with a last batch of 4."""
    model = chain()
    x = x_data((6,))
    ref = moments(activations(model, "bn1", x), (0,))
    recalibrate(model, x, batch_size=32, verbose=0)
    assert_stats(model.get_layer("bn1"), *ref)


def test_conv_channels_last() -> None:
    """BN after Conv2D (axis -1): moments over samples and all positions."""
    model = h.conv()
    h.set_far_statistics(model)
    x = x_data((8, 8, 3), n=37)
    ref = moments(activations(model, "bn", x), (0, 1, 2))
    recalibrate(model, x, batch_size=10, verbose=0)
    assert_stats(model.get_layer("bn"), *ref)


def test_channels_first_axis_1() -> None:
    """BN with axis=1 on NCHW tensors (TensorFlow's CPU Conv2D has no NCHW kernel)."""
    inputs = keras.Input((3, 5, 4))
    model = keras.Model(inputs, L.BatchNormalization(axis=1, name="bn")(inputs))
    x = x_data((3, 5, 4), n=21)
    x[:, 1] += 10.0
    recalibrate(model, x, batch_size=8, verbose=0)
    assert_stats(model.get_layer("bn"), *moments(x, (0, 2, 3)))


def test_middle_axis() -> None:
    """BN normalising a middle dimension (axis=2 of a rank-4 tensor)."""
    inputs = keras.Input((5, 4, 3))
    model = keras.Model(inputs, L.BatchNormalization(axis=2, name="bn")(inputs))
    x = x_data((5, 4, 3), n=19) * np.arange(1, 5, dtype="float32")[None, None, :, None]
    recalibrate(model, x, batch_size=4, verbose=0)
    assert_stats(model.get_layer("bn"), *moments(x, (0, 1, 3)))


def test_mask_from_embedding() -> None:
    """A mask reaching BN (Embedding mask_zero=True): moments over unmasked positions only."""
    inputs = keras.Input((7,), dtype="int32")
    emb = L.Embedding(12, 4, mask_zero=True, name="emb")(inputs)
    out = L.BatchNormalization(name="bn")(emb)
    model = keras.Model(inputs, out)
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 12, size=(30, 7)).astype("int32")
    lengths = rng.integers(1, 8, size=30)
    tokens[np.arange(7)[None, :] >= lengths[:, None]] = 0
    table = to_numpy(model.get_layer("emb").embeddings)
    vectors = table[tokens[tokens != 0]]
    recalibrate(model, tokens, batch_size=8, verbose=0)
    assert_stats(model.get_layer("bn"), *moments(vectors, (0,)))


def test_batch_split_does_not_matter() -> None:
    """Batch sizes 7 and 100 give the same statistics, to float32 precision of the data."""
    a, b = chain(), chain()
    b.set_weights(a.get_weights())
    x = x_data((6,)) + 1000.0  # large mean, far from the moving mean
    recalibrate(a, x, batch_size=7, verbose=0)
    recalibrate(b, x, batch_size=100, verbose=0)
    ref = moments(activations(a, "bn1", x), (0,))
    for got, want in zip(statistics(a.get_layer("bn1")), ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5)
    for got, want in zip(
        statistics(a.get_layer("bn1")), statistics(b.get_layer("bn1")), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=2e-5)


def test_population_variance_not_mean_of_batch_variances() -> None:
    """Sorted data (each batch its own mean): the spread between batches is counted."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(inputs))
    x = np.sort(x_data((3,), n=90), axis=0)  # batches of 16 have very different means
    recalibrate(model, x, batch_size=16, verbose=0)
    mean, var = moments(x, (0,))
    batch_vars = np.mean([x[i : i + 16].var(axis=0) for i in range(0, 90, 16)], axis=0)
    assert np.all(var > 3 * batch_vars)  # the two really differ on this data
    assert_stats(model.get_layer("bn"), mean, var)


def test_upstream_batch_matches_training_mode_batches() -> None:
    """upstream='batch': BN2 sees BN1 normalising with each batch's statistics, as in fit."""
    model = chain()
    twin = chain()
    twin.set_weights(model.get_weights())
    x = x_data((6,))
    # Reference: Keras's own training-mode forward pass per batch of 32 (on the twin).
    ref = moments(activations(twin, "bn2", x, training=True, batch=32), (0,))
    recalibrate(model, x, batch_size=32, verbose=0)
    assert_stats(model.get_layer("bn2"), *ref)
    # The inference-mode activations differ (so the test can tell the two apart).
    inference = moments(activations(model, "bn2", x), (0,))
    assert not np.allclose(inference[1], ref[1], rtol=1e-3)


def test_upstream_recalibrated_is_consistent_with_predict(capsys: Any) -> None:
    """upstream='recalibrated': every BN's statistics are the moments of its predict-time inputs."""
    model = chain()
    x = x_data((6,))
    recalibrate(model, x, batch_size=32, upstream="recalibrated", verbose=2)
    for name in ("bn1", "bn2"):
        assert_stats(model.get_layer(name), *moments(activations(model, name, x), (0,)))
    printed = capsys.readouterr().out
    assert re.findall(r"Pass \d/\d", printed) == ["Pass 1/2", "Pass 2/2"]


def test_upstream_recalibrated_parallel_branches_one_pass(capsys: Any) -> None:
    """BN layers that do not feed one another are collected in the same pass."""
    model = h.multi_io()
    h.set_far_statistics(model)
    x = h.inputs_for(model, n=40)
    recalibrate(model, x, upstream="recalibrated", verbose=2)
    assert "Pass" not in capsys.readouterr().out
    for name, xi in (("bn_a", x[0]), ("bn_b", x[1])):
        dense = model.get_layer(name.replace("bn", "dense"))
        assert_stats(model.get_layer(name), *moments(to_numpy(dense(xi)), (0,)))


def test_mixed_precision_float16_inputs(mixed_float16: None) -> None:
    """float16 BN inputs under mixed_float16: statistics exact for those float16 values."""
    model = h.conv()
    x = x_data((8, 8, 3), n=20)
    acts = activations(model, "bn", x)
    assert acts.dtype == np.float16
    ref = moments(acts, (0, 1, 2))
    recalibrate(model, x, batch_size=8, verbose=0)
    assert_stats(model.get_layer("bn"), *ref)
    assert to_numpy(model.get_layer("bn").moving_mean).dtype == np.float32


def test_batch_renormalization_keeps_its_moving_stddev_consistent() -> None:
    """renorm=True BN: moving_stddev follows the new variance (it is what renorm updates)."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.BatchNormalization(renorm=True, name="bn")(inputs))
    x = x_data((4,), n=40)
    recalibrate(model, x, verbose=0)
    bn = model.get_layer("bn")
    mean, var = moments(x, (0,))
    assert_stats(bn, mean, var)
    np.testing.assert_allclose(to_numpy(bn.moving_stddev), np.sqrt(var + bn.epsilon), rtol=1e-5)
    np.testing.assert_allclose(model.predict(x, verbose=0).mean(axis=0), 0.0, atol=1e-4)


def test_dropout_is_off_during_the_pass() -> None:
    """A Dropout above the BN does not fire: statistics equal the no-dropout reference."""
    inputs = keras.Input((6,))
    x = L.Dropout(0.5, name="drop")(inputs)
    x = L.Dense(8, name="dense")(x)
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(x))
    x = x_data((6,))
    ref = moments(to_numpy(model.get_layer("dense")(x)), (0,))
    recalibrate(model, x, verbose=0)
    assert_stats(model.get_layer("bn"), *ref)


@pytest.mark.parametrize("kind", ["nested", "subclassed", "shared", "functional", "sequential"])
def test_model_kinds(kind: str) -> None:
    """Every model kind: the first BN gets exact moments; every selected BN changes."""
    model = h.BUILDERS[kind]()
    h.set_far_statistics(model)
    x = h.inputs_for(model, n=50)
    first = {
        "nested": ("middle/inner/d_inner", "middle/inner/bn_inner"),
        "subclassed": ("dense", "bn_attr"),
        "shared": ("shared_dense", "shared_bn"),
        "functional": ("dense", "bn"),
        "sequential": ("dense", "bn"),
    }[kind]
    before = {name: statistics(bn) for name, bn in ((b.name, b) for b in h.bn_layers(model))}
    recalibrate(model, x, batch_size=16, verbose=0)
    for bn in h.bn_layers(model):
        assert not np.allclose(statistics(bn)[0], before[bn.name][0])
    if kind == "shared":
        return  # two calls: covered by test_shared_layer_pools_both_calls
    acts = to_numpy(h.layer_at(model, first[0])(x))
    assert_stats(h.layer_at(model, first[1]), *moments(acts, (0,)))


def test_shared_layer_pools_both_calls() -> None:
    """A BN called twice gets the moments of all its inputs (both calls pooled)."""
    bn = L.BatchNormalization(name="bn")
    a, b = keras.Input((4,)), keras.Input((4,))
    model = keras.Model([a, b], [bn(a), bn(b)])
    xa, xb = x_data((4,), n=30), x_data((4,), n=30) * 3.0 - 5.0
    recalibrate(model, [xa, xb], batch_size=8, upstream="recalibrated", verbose=0)
    assert_stats(bn, *moments(np.concatenate([xa, xb]), (0,)))


def test_self_feeding_shared_layer_refused_for_recalibrated() -> None:
    """A BN fed by its own output has no inference-consistent statistics: clear error."""
    model = h.shared()
    x = h.inputs_for(model)
    assert h.refused(DataError, recalibrate, model, x, upstream="recalibrated", verbose=0) == (
        "Layer 'shared_bn' feeds its own input (it is shared and called on its own output), "
        "so no statistics can be consistent with inference for it. Use upstream='batch', or "
        "leave it out of `layers=`."
    )


# --- data kinds -------------------------------------------------------------------------


class Batches(getattr(keras.utils, "PyDataset", keras.utils.Sequence)):  # type: ignore[misc]
    def __init__(self, x: np.ndarray, size: int) -> None:
        super().__init__()
        self.x, self.size = x, size

    def __len__(self) -> int:
        return -(-len(self.x) // self.size)

    def __getitem__(self, i: int) -> Any:
        part = self.x[i * self.size : (i + 1) * self.size]
        return part, np.zeros((len(part), 2), "float32")


def _gen(x: np.ndarray, size: int, raise_after: int | None = None) -> Any:
    for i, start in enumerate(range(0, len(x), size)):
        if raise_after is not None and i == raise_after:
            raise OSError("disk went away")
        yield x[start : start + size], np.zeros((len(x[start : start + size]), 2), "float32")


@pytest.mark.parametrize("kind", ["dataset_xy", "dataset_x", "pydataset", "generator", "tuple"])
def test_data_kinds(kind: str) -> None:
    """Dataset, PyDataset, generator and (x, y) arrays all give the numpy moments."""
    model = chain()
    x = x_data((6,), n=70)
    y = np.zeros((70, 2), "float32")
    data = {
        "dataset_xy": lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(16),
        "dataset_x": lambda: tf.data.Dataset.from_tensor_slices(x).batch(16),
        "pydataset": lambda: Batches(x, 16),
        "generator": lambda: _gen(x, 16),
        "tuple": lambda: (x, y),
    }[kind]()
    ref = moments(activations(model, "bn1", x), (0,))
    recalibrate(model, data, verbose=0)
    assert_stats(model.get_layer("bn1"), *ref)


def test_steps_bounds_the_data() -> None:
    """steps=2 reads two batches only (here of an infinite dataset)."""
    model = chain()
    x = x_data((6,), n=64)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(16).repeat()
    recalibrate(model, dataset, steps=2, verbose=0)
    assert_stats(model.get_layer("bn1"), *moments(activations(model, "bn1", x[:32]), (0,)))


def test_progress_bar_like_predict(capsys: Any) -> None:
    """verbose='auto' shows a Keras progress bar with the number of batches."""
    model = chain()
    recalibrate(model, x_data((6,), n=70), batch_size=32)
    assert "3/3" in capsys.readouterr().out


# --- leaves everything else alone ----------------------------------------------------


def test_only_selected_statistics_change() -> None:
    """Weights, optimizer state, other BN layers, classes, configs and modes stay exactly."""
    model = chain()
    inputs = model.inputs
    outputs = L.Dropout(0.3, name="drop")(model.outputs[0])
    model = keras.Model(inputs, outputs)
    bnfreeze.freeze(model, ["d1", "bn1"], bn_mode="adapt")
    h.compile_sgd(model)
    x = x_data((6,), n=40)
    model.fit(x, np.zeros((40, 2), "float32"), batch_size=8, epochs=1, verbose=0)
    optimizer_before = [to_numpy(v) for v in model.optimizer.variables]
    configs = {layer.name: layer.get_config() for layer in model.layers}
    classes = {layer.name: type(layer) for layer in model.layers}
    flags = {layer.name: layer.trainable for layer in model.layers}
    bn1, bn2 = model.get_layer("bn1"), model.get_layer("bn2")
    mode = pinned_mode(bn1)
    before = [to_numpy(v) for v in model.weights]
    bn2_before = statistics(bn2)
    recalibrate(model, x, layers="bn1", verbose=0)
    changed = [
        v
        for v, old in zip(model.weights, before, strict=True)
        if not np.array_equal(to_numpy(v), old)
    ]
    assert {id(v) for v in changed} == {id(bn1.moving_mean), id(bn1.moving_variance)}
    np.testing.assert_array_equal(statistics(bn2)[0], bn2_before[0])
    for v, old in zip(model.optimizer.variables, optimizer_before, strict=True):
        np.testing.assert_array_equal(to_numpy(v), old)
    assert {layer.name: layer.get_config() for layer in model.layers} == configs
    assert {layer.name: type(layer) for layer in model.layers} == classes
    assert {layer.name: layer.trainable for layer in model.layers} == flags
    assert is_pinned(bn1) and pinned_mode(bn1) == mode == "adapt"
    assert bn1.momentum == 0.99


def test_variable_length_batches() -> None:
    """Batches whose sequence length varies (padded per batch): moments over all positions."""
    inputs = keras.Input((None, 4))
    hidden = L.Dense(3, name="dense")(inputs)
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(hidden))
    rng = np.random.default_rng(4)
    batches = [rng.normal(2.0, 3.0, size=(5, t, 4)).astype("float32") for t in (7, 3, 9)]
    recalibrate(model, iter(batches), verbose=0)
    acts = np.concatenate([to_numpy(model.get_layer("dense")(b)).reshape(-1, 3) for b in batches])
    assert_stats(model.get_layer("bn"), *moments(acts, (0,)))


@pytest.mark.skipif(IS_TF_KERAS, reason="Keras 3 keeps Dropout's seed state in a variable")
def test_seed_state_restored() -> None:
    """A Dropout hard-coded to training=True fires in the pass; its seed state is restored."""

    class Noisy(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.drop = L.Dropout(0.5, name="drop")
            self.bn = L.BatchNormalization(name="bn")

        def call(self, x: Any, training: Any = None) -> Any:
            return self.bn(self.drop(x, training=True), training=training)

    model = Noisy()
    model(np.zeros((2, 3), "float32"))
    state = model.drop.seed_generator.state
    before = to_numpy(state)
    recalibrate(model, x_data((3,), n=20), verbose=0)
    np.testing.assert_array_equal(to_numpy(state), before)
    assert not np.allclose(statistics(model.bn)[1], 1.0)  # the pass did happen


def test_error_mid_pass_changes_nothing() -> None:
    """Data that raises half-way: the error propagates and the model is bit-for-bit unchanged."""
    model = chain()
    bnfreeze.freeze(model, "bn1", bn_mode="inference")
    x = x_data((6,), n=64)
    before, outputs = h.model_state(model), to_numpy(model(x, training=False))
    with pytest.raises(OSError, match="disk went away"):
        recalibrate(model, _gen(x, 16, raise_after=2), verbose=0)
    h.assert_unchanged(model, before)
    assert pinned_mode(model.get_layer("bn1")) == "inference"
    # A new forward pass computes what it computed before the failed call.
    np.testing.assert_allclose(to_numpy(model(x, training=False)), outputs, rtol=1e-6)


def test_error_in_second_pass_changes_nothing() -> None:
    """upstream='recalibrated' that fails in the second pass leaves the first pass unassigned."""
    model = chain()
    before = h.snapshot(model)
    x = x_data((6,), n=64)

    class Flaky(Batches):
        reads = 0

        def __getitem__(self, i: int) -> Any:
            Flaky.reads += 1
            if Flaky.reads > len(self) + 1:  # the peek + the whole first pass succeed
                raise OSError("second pass failed")
            return super().__getitem__(i)

    with pytest.raises(OSError, match="second pass failed"):
        recalibrate(model, Flaky(x, 16), upstream="recalibrated", verbose=0)
    h.assert_same_values(before, h.snapshot(model))


# --- errors ------------------------------------------------------------------------------


def test_error_empty_array() -> None:
    """An empty array is refused: no batch to compute statistics from."""
    model = chain()
    assert h.refused(DataError, recalibrate, model, np.zeros((0, 6), "float32"), verbose=0) == (
        "`data` (array) yielded no batch. Expected at least one batch of inputs to compute "
        "statistics from."
    )


def test_error_empty_generator() -> None:
    """An exhausted generator is refused: no batch to compute statistics from."""
    model = chain()
    assert h.refused(DataError, recalibrate, model, (v for v in []), verbose=0) == (
        "`data` (Python generator) yielded no batch. Expected at least one batch of inputs to "
        "compute statistics from."
    )


def test_error_wrong_shape() -> None:
    """Batches of the wrong shape are refused with both shapes; nothing changes."""
    model = chain()
    assert h.refused(DataError, recalibrate, model, np.zeros((4, 5), "float32"), verbose=0) == (
        "Expected batches of `data` to match the model's input shape (None, 6). Received: a "
        "batch of shape (4, 5)."
    )


def test_error_no_batch_norm() -> None:
    """A model without BatchNormalization has nothing to recalibrate: clear error."""
    model = keras.Sequential([keras.Input((3,)), L.Dense(2, name="d")])
    assert h.refused(
        SelectionError, recalibrate, model, np.zeros((4, 3), "float32"), verbose=0
    ) == (
        "The model has no BatchNormalization layer, so there are no statistics to "
        "recalibrate. Expected a selection containing at least one BatchNormalization layer."
    )


def test_error_selection_without_batch_norm() -> None:
    """A selection without BatchNormalization is refused, naming the selector."""
    model = chain()
    assert h.refused(SelectionError, recalibrate, model, x_data((6,)), layers="d*", verbose=0) == (
        "`layers`='d*' selects no BatchNormalization layer, so there are no statistics to "
        "recalibrate. Expected a selection containing at least one BatchNormalization layer."
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"upstream": "moving"},
            "Expected `upstream` to be one of ('batch', 'recalibrated'). "
            "Received: upstream='moving'.",
        ),
        ({"steps": 0}, "Expected `steps` to be a positive int or None. Received: steps=0."),
        (
            {"batch_size": 2.5},
            "Expected `batch_size` to be a positive int or None. Received: batch_size=2.5.",
        ),
        ({"verbose": 3}, "Expected `verbose` to be 'auto', 0, 1 or 2. Received: verbose=3."),
    ],
    ids=["upstream", "steps", "batch_size", "verbose"],
)
def test_error_arguments(kwargs: dict[str, Any], message: str) -> None:
    """Each bad argument is refused with what was received and expected; nothing changes."""
    assert (
        h.refused(bnfreeze.ArgumentError, recalibrate, chain(), x_data((6,)), **kwargs) == message
    )


def test_error_generator_with_recalibrated() -> None:
    """upstream='recalibrated' refuses a generator (it reads the data more than once)."""
    model = chain()
    x = x_data((6,))
    assert h.refused(DataError, recalibrate, model, _gen(x, 8), upstream="recalibrated") == (
        "`upstream='recalibrated'` reads `data` once per level of BN dependency, but `data` is "
        "a Python generator, which can be read only once. Expected arrays, a tf.data.Dataset "
        "or a keras.utils.PyDataset; or use upstream='batch' (one pass)."
    )


def test_error_batch_size_with_dataset() -> None:
    """batch_size with an already batched Dataset is refused with the fix."""
    model = chain()
    dataset = tf.data.Dataset.from_tensor_slices(x_data((6,))).batch(8)
    assert h.refused(bnfreeze.ArgumentError, recalibrate, model, dataset, batch_size=8) == (
        "`batch_size` applies to in-memory arrays only; `data` is a tf.data.Dataset, which is "
        "batched already. Received: batch_size=8. Remove `batch_size` (or batch the data "
        "yourself)."
    )


def test_error_infinite_dataset_without_steps() -> None:
    """An infinite Dataset without steps is refused (the pass would never end)."""
    model = chain()
    dataset = tf.data.Dataset.from_tensor_slices(x_data((6,))).batch(8).repeat()
    assert h.refused(DataError, recalibrate, model, dataset) == (
        "`data` is an infinite tf.data.Dataset (it repeats), so the pass would never end. "
        "Expected `steps` to say how many batches to read."
    )


def test_error_unused_layer() -> None:
    """A selected BN the forward pass never calls: clear error, nothing changed."""

    class Skips(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.used = L.BatchNormalization(name="used")
            self.unused = L.BatchNormalization(name="unused")

        def call(self, x: Any, training: Any = None) -> Any:
            return self.used(x, training=training)

    model = Skips()
    model(np.zeros((2, 3), "float32"))
    model.unused.build((None, 3))
    assert h.refused(DataError, recalibrate, model, x_data((3,)), verbose=0) == (
        "Layer 'unused' was not called when the model ran on `data`, so it has no statistics "
        "to recalibrate; nothing was changed. Expected every selected BatchNormalization layer "
        "to be used by the model's forward pass: leave it out of `layers=`."
    )


def test_recalibrate_is_public() -> None:
    """recalibrate is part of the public face: listed in bnfreeze.__all__."""
    assert "recalibrate" in bnfreeze.__all__


@pytest.mark.slow
def test_resnet50_all_bn_layers() -> None:
    """ResNet50 (weights=None): exact first BN, and all 53 BN layers recalibrated."""
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=4)
    h.set_far_statistics(model)
    x = x_data((64, 64, 3), n=10, loc=0.0, scale=1.0)
    recalibrate(model, x, batch_size=4, verbose=0)
    bns = h.bn_layers(model)
    assert len(bns) == 53
    assert all(not np.allclose(statistics(bn)[0], h.FAR_MEAN) for bn in bns)
    conv1 = activations(model, "conv1_bn", x, batch=10)
    assert_stats(model.get_layer("conv1_bn"), *moments(conv1, (0, 1, 2)), rtol=2e-5)
