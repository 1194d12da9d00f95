"""recalibrate on every backend (TensorFlow, JAX, PyTorch): exact statistics against
numpy float64, the recalibrated upstream, all-or-nothing, and on JAX data-parallel over
two devices giving the single-device statistics."""

from __future__ import annotations

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import IS_TF_KERAS, backend_name, keras, to_numpy
from tests import helpers as h
from tests import trained
from tests.helpers_backend import run_script

L = keras.layers


def _far_data(shape: tuple[int, ...], n: int = 200, seed: int = 0) -> np.ndarray:
    """Inputs of 1000 + N(0, 1): a plain float32 sum of squares gets their variance wrong."""
    return (1000.0 + np.random.default_rng(seed).normal(size=(n, *shape))).astype("float32")


@pytest.mark.parametrize("shape", [(3,), (5, 5, 4)], ids=["dense", "image"])
@pytest.mark.xfail(
    IS_TF_KERAS or backend_name() == "tensorflow",
    strict=True,
    reason="TensorFlow's fused fast path keeps each batch mean in float32: ~7e-6 relative "
    "on inputs around 1000 (issue 15; the keras.ops runner adds a float64 residual)",
)
def test_statistics_are_exact_against_numpy_float64(shape):
    """Moving mean and variance equal numpy's float64 moments of the data (batches of
    uneven size), within 1.5e-6 relative."""
    model = keras.Sequential([keras.Input(shape), L.BatchNormalization(name="bn")])
    x = _far_data(shape)
    bnfreeze.recalibrate(model, x, batch_size=48, verbose=0)
    axes = tuple(range(len(shape)))
    x64 = x.astype("float64")
    bn = model.get_layer("bn")
    np.testing.assert_allclose(to_numpy(bn.moving_mean), x64.mean(axes), rtol=1.5e-6)
    np.testing.assert_allclose(to_numpy(bn.moving_variance), x64.var(axes), rtol=1.5e-6)


def test_recalibrated_upstream_on_a_trained_cnn_matches_predict():
    """With upstream='recalibrated', bn1 gets its input's moments and bn2 the moments of
    its input as predict computes it with bn1's new statistics; nothing else changes."""
    model = trained.image_model()
    x, _ = trained.image_data(40)
    weights_before = [to_numpy(v) for v in model.weights]
    bnfreeze.recalibrate(model, x, batch_size=16, upstream="recalibrated", verbose=0)
    for name, source in [("bn1", "conv1"), ("bn2", "dw2")]:
        probe = keras.Model(model.inputs, model.get_layer(source).output)
        a = to_numpy(probe.predict(x, verbose=0)).astype("float64")
        bn = model.get_layer(name)
        np.testing.assert_allclose(
            to_numpy(bn.moving_mean), a.mean((0, 1, 2)), rtol=2e-5, atol=2e-6
        )
        np.testing.assert_allclose(to_numpy(bn.moving_variance), a.var((0, 1, 2)), rtol=2e-5)
    moving = {id(v) for n in ("bn1", "bn2") for v in model.get_layer(n).non_trainable_weights}
    for variable, old in zip(model.weights, weights_before, strict=True):
        if id(variable) not in moving:
            np.testing.assert_array_equal(to_numpy(variable), old, err_msg=variable.name)


def test_repeated_calls_follow_new_data_weights_and_trainable_sets():
    """recalibrate again (JAX: the kept pass function) on other data, after new weights
    and after freeze moved variables between trainable and not: each time numpy's
    moments of what reaches the BN, as a probe model computes it."""
    model = trained.image_model()
    x, _ = trained.image_data(48)

    def check(data: np.ndarray) -> None:
        bnfreeze.recalibrate(model, data, batch_size=16, verbose=0)
        probe = keras.Model(model.inputs, model.get_layer("conv1").output)
        a = to_numpy(probe.predict(data, verbose=0)).astype("float64")
        bn = model.get_layer("bn1")
        np.testing.assert_allclose(
            to_numpy(bn.moving_mean), a.mean((0, 1, 2)), rtol=2e-5, atol=2e-6
        )
        np.testing.assert_allclose(to_numpy(bn.moving_variance), a.var((0, 1, 2)), rtol=2e-5)

    check(x)
    check(x[:32] * 3.0 + 1.0)  # other data, same shapes
    conv = model.get_layer("conv1")
    conv.kernel.assign(to_numpy(conv.kernel) * -2.0)  # other weights
    check(x)
    bnfreeze.freeze(model, ["conv1", "bn1"])  # the trainer's variable lists change
    check(x)
    bnfreeze.unfreeze(model)
    check(x[:16])


def test_a_new_trainable_set_of_the_same_shapes_is_not_mistaken_for_the_old():
    """d1 frozen, then d2 frozen instead: the trainer's variable lists keep their lengths
    and shapes but hold other variables at each position; the statistics still follow
    d2(d1(x)), not the two kernels swapped."""
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(4, name="d1"),
            L.Dense(4, name="d2"),
            L.BatchNormalization(name="bn"),
        ]
    )
    trained.give_trained_state(model, seed=9)
    x = np.random.default_rng(5).normal(size=(64, 4)).astype("float32")
    for frozen in ("d1", "d2"):
        bnfreeze.unfreeze(model)
        bnfreeze.freeze(model, frozen)
        bnfreeze.recalibrate(model, x, batch_size=16, verbose=0)
        a = to_numpy(model.get_layer("d2")(model.get_layer("d1")(x))).astype("float64")
        bn = model.get_layer("bn")
        np.testing.assert_allclose(to_numpy(bn.moving_mean), a.mean(0), rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(to_numpy(bn.moving_variance), a.var(0), rtol=2e-5)


def test_non_finite_data_changes_nothing_and_names_the_batch():
    """A NaN in the second batch raises the TensorFlow runner's DataError; nothing changes."""
    model = keras.Sequential([keras.Input((3,)), L.BatchNormalization(name="bn")])
    x = _far_data((3,), n=64)
    x[40, 1] = np.nan
    before = h.model_state(model)
    with pytest.raises(bnfreeze.DataError) as error:
        bnfreeze.recalibrate(model, x, batch_size=32, verbose=0)
    assert str(error.value) == (
        "Layer 'bn' would get a non-finite moving_mean: it became non-finite at batch 1 of "
        "`data` (counting from 0), where the layer's inputs hold NaN or infinity, or values "
        "whose mean overflows float32. Nothing was changed. Expected finite inputs of "
        "moderate size: check `data` for NaN and infinite values, and its scale."
    )
    h.assert_unchanged(model, before)


DATA_PARALLEL = r"""
import os, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import numpy as np, keras, bnfreeze
from tests import trained

def stats(model):
    return {n: [keras.ops.convert_to_numpy(model.get_layer(n).moving_mean).tolist(),
                keras.ops.convert_to_numpy(model.get_layer(n).moving_variance).tolist()]
            for n in ("bn1", "bn2")}

x, _ = trained.image_data(40)
single = trained.image_model()
weights = single.get_weights()
bnfreeze.recalibrate(single, x, batch_size=16, upstream="recalibrated", verbose=0)
devices = keras.distribution.list_devices("cpu")
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
parallel = trained.image_model()
parallel.set_weights(weights)
bnfreeze.recalibrate(parallel, x, batch_size=16, upstream="recalibrated", verbose=0)
print(json.dumps({"devices": len(devices), "single": stats(single), "parallel": stats(parallel)}))
"""


@pytest.mark.skipif(IS_TF_KERAS or backend_name() != "jax", reason="keras.distribution on JAX")
def test_data_parallel_on_two_devices_gives_the_single_device_statistics():
    """Under DataParallel over two CPU devices, recalibrate gives the statistics of the
    single-device run (within 1e-6 relative)."""
    found = run_script(DATA_PARALLEL, "jax")
    assert found["devices"] == 2
    for name, (mean, variance) in found["single"].items():
        got_mean, got_variance = found["parallel"][name]
        np.testing.assert_allclose(got_mean, mean, rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(got_variance, variance, rtol=1e-6, err_msg=name)


def test_precise_bn_gives_population_statistics_on_every_backend():
    """PreciseBN inside fit leaves numpy's float64 population moments of the BN's inputs
    (a BN first in the model, so its inputs are the data), on every backend."""
    x = np.random.default_rng(0).normal(3.0, 2.0, (64, 5)).astype("float32")
    y = np.zeros((64, 1), "float32")
    model = keras.Sequential(
        [keras.Input((5,)), L.BatchNormalization(name="bn"), L.Dense(1, name="head")]
    )
    model.compile(optimizer="sgd", loss="mse")
    precise = bnfreeze.callbacks.PreciseBN(x, batch_size=16)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[precise])
    bn = model.get_layer("bn")
    mean, var = h.moments(x, (0,))
    np.testing.assert_allclose(to_numpy(bn.moving_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(bn.moving_variance), var, rtol=1e-5)
