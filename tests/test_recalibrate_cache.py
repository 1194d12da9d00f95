"""A recalibrate that is cheap to repeat: later calls reuse the traced pass of the first one
while the model, the selection, `upstream` and the input signature stay the same, and trace
again when any of them changes; one batch takes one pass whatever `upstream` says."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import IS_TF_KERAS, keras
from tests import helpers as h

L = keras.layers


class Traced(L.Layer):
    """The identity, counting how often its Python `call` runs: only when a pass is traced."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.traces = 0

    def call(self, x: Any) -> Any:
        self.traces += 1
        return x


class Scale(L.Layer):
    """Multiplies by a weight ``w`` (which a test replaces by another variable)."""

    def build(self, input_shape: Any) -> None:
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x: Any) -> Any:
        return x * self.w


def chain(first: Any = None) -> Any:
    """Input -> [first] -> Traced -> Dense -> BN1 -> Dense -> BN2."""
    inputs = keras.Input((4,))
    x = inputs if first is None else first(inputs)
    x = L.Dense(6, name="d1")(Traced(name="traced")(x))
    x = L.Dense(3, name="d2")(L.BatchNormalization(name="bn1")(x))
    return keras.Model(inputs, L.BatchNormalization(name="bn2")(x))


def data(n: int, seed: int = 0, width: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.0, 2.0, size=(n, width)).astype("float32")


def traces(model: Any) -> int:
    return int(model.get_layer("traced").traces)


def keeps_pass(upstream: str = "batch") -> bool:
    """Whether a later call reuses the first call's pass without running the model's
    Python again: TensorFlow (traced passes); JAX for a single pass (one jitted pass
    kept per model); never on PyTorch, whose pass is Python run batch by batch."""
    return h.BACKEND == "tensorflow" or (h.BACKEND == "jax" and upstream == "batch")


def inputs_of(model: Any, name: str, x: np.ndarray, training: bool = False) -> np.ndarray:
    """The inputs of layer ``name`` as Keras computes them, per batch of 16."""
    sub = keras.Model(model.inputs[0], model.get_layer(name).input)
    parts = [h.to_numpy(sub(x[i : i + 16], training=training)) for i in range(0, len(x), 16)]
    return np.concatenate(parts).astype(np.float64)


def assert_moments_of(layer: Any, values: np.ndarray) -> None:
    """``layer``'s statistics are numpy's mean and biased variance of ``values``."""
    axes = tuple(range(values.ndim - 1))
    np.testing.assert_allclose(
        h.to_numpy(layer.moving_mean), values.mean(axis=axes), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        h.to_numpy(layer.moving_variance), values.var(axis=axes), rtol=1e-5, atol=1e-5
    )


def assert_consistent_with_predict(model: Any, x: np.ndarray, names: tuple[str, ...]) -> None:
    """Each BN's statistics are the moments of its inputs as the model now predicts."""
    for name in names:
        assert_moments_of(model.get_layer(name), inputs_of(model, name, x))


# --- reuse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["batch", "recalibrated"])
def test_second_call_reuses_the_traced_pass(upstream: str) -> None:
    """A second call on other data of the same signature traces nothing, and is exact."""
    model = chain()
    bnfreeze.recalibrate(model, data(64), batch_size=16, upstream=upstream, verbose=0)
    traced = traces(model)
    assert traced > 0
    x = data(48, seed=1) * 3.0 - 2.0  # batches of 16 as before (JAX traces per shape)
    bnfreeze.recalibrate(model, x, batch_size=16, upstream=upstream, verbose=0)
    assert traces(model) == traced or not keeps_pass(upstream)
    if upstream == "recalibrated":
        assert_consistent_with_predict(model, x, ("bn1", "bn2"))
    else:
        assert_moments_of(model.get_layer("bn1"), inputs_of(model, "bn1", x))


def test_weights_are_read_when_the_pass_runs() -> None:
    """New weight values (set_weights) keep the traced pass and are used by it."""
    model = chain()
    bnfreeze.recalibrate(model, data(48), batch_size=16, verbose=0)
    traced = traces(model)
    model.get_layer("d1").set_weights([w * 5.0 + 1.0 for w in model.get_layer("d1").get_weights()])
    bnfreeze.recalibrate(model, data(48), batch_size=16, verbose=0)
    assert traces(model) == traced or not keeps_pass()
    assert_moments_of(model.get_layer("bn1"), inputs_of(model, "bn1", data(48)))


# --- what traces again ------------------------------------------------------------------------


def test_added_layers_trace_again() -> None:
    """A layer inserted in front of a selected BN (the same BN object) changes its inputs."""
    bn = L.BatchNormalization(name="bn")
    model = keras.Sequential([keras.Input((4,)), Traced(name="traced"), L.Dense(5, name="d"), bn])
    x = data(32)
    bnfreeze.recalibrate(model, x, verbose=0)
    traced = traces(model)
    model.pop()
    model.add(L.Dense(5, name="d2"))
    model.add(bn)
    bnfreeze.recalibrate(model, x, verbose=0)
    assert traces(model) > traced
    hidden = model.get_layer("d2")(model.get_layer("d")(x))  # (bn.input is its first call's)
    assert_moments_of(bn, h.to_numpy(hidden).astype(np.float64))


class Hardcoded(keras.Model):
    """A Dropout hard-coded to ``training=True`` in front of a BN: it fires in the pass."""

    def __init__(self) -> None:
        super().__init__()
        self.traced = Traced(name="traced")
        self.drop = L.Dropout(0.5, name="drop")
        self.bn = L.BatchNormalization(name="bn")

    def call(self, x: Any, training: Any = None) -> Any:
        return self.bn(self.drop(self.traced(x), training=True), training=training)


def test_pinning_and_unpinning_trace_again() -> None:
    """freeze pins the hard-coded Dropout (it stops firing), unfreeze unpins it: both seen."""
    model = Hardcoded()
    model(data(2))
    x = data(64)
    plain = x.astype(np.float64)
    bnfreeze.recalibrate(model, x, verbose=0)
    fired = h.to_numpy(model.bn.moving_variance)
    assert not np.allclose(fired, plain.var(axis=0), rtol=1e-2)  # the Dropout fired
    bnfreeze.freeze(model, "drop")
    bnfreeze.recalibrate(model, x, verbose=0)
    assert_moments_of(model.bn, plain)
    bnfreeze.unfreeze(model, "drop")
    bnfreeze.recalibrate(model, x, verbose=0)
    assert not np.allclose(h.to_numpy(model.bn.moving_variance), plain.var(axis=0), rtol=1e-2)


def test_another_selection_traces_again() -> None:
    """layers="bn1" then layers="bn2": each call writes its own selection, exactly."""
    model = chain()
    h.set_far_statistics(model)
    x = data(48)
    bnfreeze.recalibrate(model, x, layers="bn1", verbose=0)
    assert_moments_of(model.get_layer("bn1"), inputs_of(model, "bn1", x))
    np.testing.assert_array_equal(h.to_numpy(model.get_layer("bn2").moving_mean), h.FAR_MEAN)
    before = h.to_numpy(model.get_layer("bn1").moving_mean)
    bnfreeze.recalibrate(model, x, layers="bn2", upstream="recalibrated", verbose=0)
    np.testing.assert_array_equal(h.to_numpy(model.get_layer("bn1").moving_mean), before)
    assert_consistent_with_predict(model, x, ("bn2",))


def test_replaced_variables_trace_again() -> None:
    """Variables replaced by others (Keras 3: int8 quantization; tf-keras: a new weight):
    the next pass uses the new ones."""
    model = chain(first=Scale(name="scale"))
    x = data(32)
    bnfreeze.recalibrate(model, x, verbose=0)
    before = h.to_numpy(model.get_layer("bn1").moving_variance)
    if IS_TF_KERAS:
        scale = model.get_layer("scale")
        scale.w = scale.add_weight(shape=(4,), initializer=keras.initializers.Constant(3.0))
    else:
        model.get_layer("d1").quantize("int8")  # a new int8 kernel and its scale
    bnfreeze.recalibrate(model, x, verbose=0)
    acts = inputs_of(model, "bn1", x)
    assert not np.allclose(acts.var(axis=0), before, rtol=1e-4)  # the change shows
    assert_moments_of(model.get_layer("bn1"), acts)


def test_another_input_signature_traces_again() -> None:
    """Sequences of another length, then another dtype: each call exact."""
    inputs = keras.Input((None, 4))
    hidden = L.Dense(3, name="d")(Traced(name="traced")(inputs))
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(hidden))
    rng = np.random.default_rng(5)
    # JAX without x64 has no float64: the same signature as float32 there.
    signatures = [(7, "float32"), (3, "float32")]
    signatures += [(3, "float64")] if h.BACKEND != "jax" else []
    for length, dtype in signatures:
        x = rng.normal(2.0, 3.0, size=(10, length, 4)).astype(dtype)
        traced = traces(model)
        bnfreeze.recalibrate(model, x, verbose=0)
        assert traces(model) > traced
        acts = h.to_numpy(model.get_layer("d")(x.astype("float32"))).reshape(-1, 3)
        assert_moments_of(model.get_layer("bn"), acts.astype(np.float64))


class AlwaysTraining(L.BatchNormalization):
    """A BN variant (not selectable) whose call always asks for batch statistics."""

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        return super().call(inputs, training=True)


def test_trainable_flag_change_traces_again() -> None:
    """Freezing a BN variant that ran on batch statistics changes what the next BN sees."""
    inputs = keras.Input((4,))
    x = AlwaysTraining(name="variant")(Traced(name="traced")(inputs))
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(L.Dense(3, name="d")(x)))
    x = data(64)
    bnfreeze.recalibrate(model, x, layers="bn", batch_size=16, verbose=0)
    assert_moments_of(model.get_layer("bn"), inputs_of(model, "bn", x))
    model.get_layer("variant").trainable = False  # now on its moving statistics
    bnfreeze.recalibrate(model, x, layers="bn", batch_size=16, verbose=0)
    assert_moments_of(model.get_layer("bn"), inputs_of(model, "bn", x))


# --- one batch --------------------------------------------------------------------------------


def test_one_batch_recalibrated_takes_one_pass(capsys: Any) -> None:
    """One batch: upstream='recalibrated' runs one pass and is consistent with predict."""
    model, twin = chain(), chain()
    twin.set_weights(model.get_weights())
    x = data(20)
    bnfreeze.recalibrate(model, x, upstream="recalibrated", verbose=2)
    assert not re.search(r"Pass \d", capsys.readouterr().out)
    assert_consistent_with_predict(model, x, ("bn1", "bn2"))
    bnfreeze.recalibrate(twin, x, upstream="batch", verbose=0)
    for name in ("bn1", "bn2"):
        for stat in ("moving_mean", "moving_variance"):
            np.testing.assert_allclose(
                h.to_numpy(getattr(model.get_layer(name), stat)),
                h.to_numpy(getattr(twin.get_layer(name), stat)),
                rtol=1e-5,
                atol=1e-6,
            )


def test_one_batch_of_a_generator_with_steps() -> None:
    """A generator read for one batch (steps=1) is accepted with upstream='recalibrated'."""
    model = chain()
    x = data(16)
    bnfreeze.recalibrate(model, iter([x, data(16, seed=1)]), steps=1, upstream="recalibrated")
    assert_consistent_with_predict(model, x, ("bn1", "bn2"))


def test_one_batch_bn_called_twice_falls_back() -> None:
    """One batch through a BN fed by its own output: refused as with many batches."""
    model = h.shared()
    with pytest.raises(bnfreeze.DataError) as info:
        bnfreeze.recalibrate(model, h.inputs_for(model), upstream="recalibrated", verbose=0)
    assert str(info.value) == (
        "Layer 'shared_bn' feeds its own input (it is shared and called on its own output), "
        "so no statistics can be consistent with inference for it. Use upstream='batch', or "
        "leave it out of `layers=`."
    )


def test_kept_passes_do_not_change_saving(tmp_path: Any) -> None:
    """A model that keeps traced passes saves, loads, clones and deep-copies as before."""
    import copy

    model = h.functional()
    bnfreeze.recalibrate(model, h.inputs_for(model, n=32), verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for saved, weight in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(saved, weight)
    assert len(keras.models.clone_model(model).weights) == len(model.weights)
    assert len(copy.deepcopy(model).weights) == len(model.weights)
