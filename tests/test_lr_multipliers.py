"""Per-layer learning rates (issue 17): ``set_lr_multipliers``, ``lr_multipliers``,
``layer_decay``, on every flavour and backend.

The reference is a twin: the same model with the same weights and no multipliers, trained
one step on the same batch. A variable with multiplier ``k`` must move exactly ``k`` times
as far as its twin (for Adam too, where scaling the gradient instead would change
nothing), and every other variable exactly as far as its twin.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import IS_TF_KERAS, keras, to_numpy
from tests.trained import give_trained_state

L = keras.layers
OPT = keras.optimizers
BACKEND = "tensorflow" if IS_TF_KERAS else keras.backend.backend()
RNG = np.random.default_rng(7)
X = RNG.normal(size=(16, 6)).astype("float32")
Y = RNG.normal(size=(16, 2)).astype("float32")


def build(seed: int = 1) -> Any:
    """stem -> block1 (dense, bn) -> block2 (dense) -> head, with trained state."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    x = L.Dense(8, name="stem")(inputs)
    x = L.Dense(8, name="block1_dense")(x)
    x = L.BatchNormalization(name="block1_bn")(x)
    x = L.Dense(8, name="block2_dense")(x)
    outputs = L.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs)
    give_trained_state(model, seed=seed + 10)
    return model


def twin(model: Any) -> Any:
    other = build()
    other.set_weights(model.get_weights())
    return other


def values(model: Any) -> dict[str, np.ndarray]:
    return {
        f"{layer.name}/{w.name.split('/')[-1].split(':')[0]}": to_numpy(w).astype(np.float64)
        for layer in model.layers
        for w in layer.weights
    }


def step(model: Any) -> dict[str, np.ndarray]:
    """One real fit step on the whole batch; each weight's change."""
    before = values(model)
    model.fit(X, Y, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
    after = values(model)
    return {k: after[k] - before[k] for k in before}


OPTIMIZERS = {
    "sgd-momentum": lambda: OPT.SGD(0.05, momentum=0.9),
    "adam": lambda: OPT.Adam(0.01),
    "adamw-decay": lambda: OPT.AdamW(0.01, weight_decay=0.5),
}


def assert_scaled(
    moved: dict[str, np.ndarray], plain: dict[str, np.ndarray], scale: dict[str, float]
) -> None:
    for key, delta in plain.items():
        k = scale.get(key, 1.0)
        np.testing.assert_allclose(
            moved[key], k * delta, rtol=2e-4, atol=1e-7, err_msg=f"{key}: expected x{k}"
        )
        if key.endswith("kernel") and k != 0.0 and key.split("/")[0] in ("stem", "head"):
            assert np.abs(delta).max() > 0, f"{key} did not move: the test shows nothing"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_first_update_is_k_times_the_update_without(name: str) -> None:
    model = build()
    reference = twin(model)
    bnfreeze.set_lr_multipliers(model, {"stem": 0.25, "block1_*": 3.0, "head": 0.0})
    model.compile(OPTIMIZERS[name](), "mse")
    reference.compile(OPTIMIZERS[name](), "mse")
    moved, plain = step(model), step(reference)
    scale = {
        **dict.fromkeys(["stem/kernel", "stem/bias"], 0.25),
        **dict.fromkeys(["block1_dense/kernel", "block1_dense/bias"], 3.0),
        **dict.fromkeys(["block1_bn/gamma", "block1_bn/beta"], 3.0),
        **dict.fromkeys(["head/kernel", "head/bias"], 0.0),
    }
    assert_scaled(moved, plain, scale)
    assert np.abs(plain["block2_dense/kernel"]).max() > 0
    # The BN statistics are no learning-rate matter: the same in both.
    np.testing.assert_allclose(
        moved["block1_bn/moving_mean"], plain["block1_bn/moving_mean"], rtol=1e-5, atol=1e-7
    )


def test_multipliers_given_after_compile_and_later_entries_win() -> None:
    model = build()
    reference = twin(model)
    model.compile(OPT.Adam(0.01), "mse")
    reference.compile(OPT.Adam(0.01), "mse")
    step(model), step(reference)  # both built and traced before the multipliers
    bnfreeze.set_lr_multipliers(model, [(["stem", "block1_*"], 0.5), ("block1_bn", 2.0)])
    assert bnfreeze.lr_multipliers(model) == {
        "stem/kernel": 0.5,
        "stem/bias": 0.5,
        "block1_dense/kernel": 0.5,
        "block1_dense/bias": 0.5,
        "block1_bn/gamma": 2.0,
        "block1_bn/beta": 2.0,
    }
    # Second Adam step: its update is no longer the sign of the gradient, so only a
    # learning-rate scale (not a gradient scale) gives exactly k times the twin's step.
    moved, plain = step(model), step(reference)
    scale = {k: v for k, v in bnfreeze.lr_multipliers(model).items()}
    assert_scaled(moved, plain, scale)


def test_paused_variable_keeps_its_slots_and_empty_mapping_removes_all() -> None:
    model = build()
    bnfreeze.set_lr_multipliers(model, {"block2_dense": 0.0})
    model.compile(OPT.Adam(0.01), "mse")
    moved = step(model)
    assert not np.any(moved["block2_dense/kernel"])
    assert np.abs(moved["head/kernel"]).max() > 0
    bnfreeze.set_lr_multipliers(model, {})
    assert bnfreeze.lr_multipliers(model) == {}
    assert np.abs(step(model)["block2_dense/kernel"]).max() > 0


def test_save_and_load_keep_the_multipliers_and_training_after_load_applies_them(
    tmp_path: Any,
) -> None:
    model = build()
    bnfreeze.set_lr_multipliers(model, {"stem": 0.1, "block2_dense": 4.0})
    model.compile(OPT.Adam(0.01), "mse")
    step(model)
    path = os.fspath(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert bnfreeze.lr_multipliers(loaded) == bnfreeze.lr_multipliers(model)
    assert bnfreeze.lr_multipliers(loaded)["stem/kernel"] == pytest.approx(0.1)
    reference = twin(loaded)
    reference.compile(OPT.Adam(0.01), "mse")
    reference.optimizer.build(reference.trainable_variables)
    # The twin gets the loaded optimizer's moments (estimates of the gradient, which no
    # learning rate enters), so the second steps differ only by the multipliers.
    for mine, theirs in zip(reference.optimizer.variables, loaded.optimizer.variables, strict=True):
        mine.assign(to_numpy(theirs))  # a copy: JAX donates the buffers fit reads
    moved, plain = step(loaded), step(reference)
    scale = {
        **dict.fromkeys(["stem/kernel", "stem/bias"], 0.1),
        **dict.fromkeys(["block2_dense/kernel", "block2_dense/bias"], 4.0),
    }
    assert_scaled(moved, plain, scale)


def test_loss_scale_optimizer_wrapper() -> None:
    if IS_TF_KERAS:
        import tf_keras

        wrap = tf_keras.mixed_precision.LossScaleOptimizer
    else:
        wrap = OPT.LossScaleOptimizer
    model = build()
    reference = twin(model)
    bnfreeze.set_lr_multipliers(model, {"block2_dense": 0.5})
    model.compile(wrap(OPT.Adam(0.01)), "mse")
    reference.compile(wrap(OPT.Adam(0.01)), "mse")
    moved, plain = step(model), step(reference)
    assert_scaled(moved, plain, dict.fromkeys(["block2_dense/kernel", "block2_dense/bias"], 0.5))


def test_layer_decay_gives_geometric_multipliers() -> None:
    model = build()
    mapping = bnfreeze.layer_decay(model, 0.5)
    assert list(mapping.values()) == [0.125, 0.25, 0.5, 1.0]
    bnfreeze.set_lr_multipliers(model, mapping)
    got = bnfreeze.lr_multipliers(model)
    assert got["stem/kernel"] == 0.125
    assert got["block1_dense/kernel"] == got["block1_bn/gamma"] == 0.25
    assert got["block2_dense/bias"] == 0.5
    assert "head/kernel" not in got  # x1: the full learning rate
    explicit = bnfreeze.layer_decay(model, 0.1, blocks=["stem", "block1", "block2"])
    assert list(explicit.values()) == pytest.approx([0.01, 0.1, 1.0])


def test_layer_decay_finds_the_blocks_of_resnet50() -> None:
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=3)
    mapping = bnfreeze.layer_decay(model, 0.9)
    keys = list(mapping)
    # stem, conv2 (3 blocks), conv3 (4), conv4 (6), conv5 (3), head
    assert len(keys) == 1 + 3 + 4 + 6 + 3 + 1
    assert keys[1] == "conv2_block1_*" and keys[-2] == "conv5_block3_*"
    assert "conv1_conv" in keys[0] and "predictions" in keys[-1]
    values_ = list(mapping.values())
    np.testing.assert_allclose(values_, [0.9 ** (len(keys) - 1 - i) for i in range(len(keys))])
    bnfreeze.set_lr_multipliers(model, mapping)
    got = bnfreeze.lr_multipliers(model)
    assert got["conv2_block1_1_conv/kernel"] == pytest.approx(0.9**16)
    assert got["conv5_block3_3_bn/gamma"] == pytest.approx(0.9)
    assert len(got) == len(model.trainable_weights) - 2  # all but the head's two


@pytest.mark.parametrize(
    "mapping, error, words",
    [
        ({"nope": 0.5}, bnfreeze.SelectionError, "nope"),
        ({"stem": -1.0}, bnfreeze.ArgumentError, "-1.0"),
        ({"stem": float("nan")}, bnfreeze.ArgumentError, "nan"),
        ({"stem": "fast"}, bnfreeze.ArgumentTypeError, "'fast'"),
        ("stem", bnfreeze.ArgumentTypeError, "dict"),
    ],
)
def test_bad_input_raises_and_changes_nothing(mapping: Any, error: type, words: str) -> None:
    model = build()
    bnfreeze.set_lr_multipliers(model, {"head": 0.5})
    before = bnfreeze.lr_multipliers(model)
    with pytest.raises(error, match=words):
        bnfreeze.set_lr_multipliers(
            model, {"stem": 2.0, **mapping} if isinstance(mapping, dict) else mapping
        )
    assert bnfreeze.lr_multipliers(model) == before


def test_bad_layer_decay_input() -> None:
    model = build()
    with pytest.raises(bnfreeze.ArgumentError, match=r"rate=1\.5"):
        bnfreeze.layer_decay(model, 1.5)
    with pytest.raises(bnfreeze.SelectionError, match="block9"):
        bnfreeze.layer_decay(model, 0.5, blocks=["stem", "block9"])
    plain = keras.Sequential([keras.Input((2,)), L.Dense(2), L.Dense(1)])
    with pytest.raises(bnfreeze.ArgumentError, match="blocks="):
        bnfreeze.layer_decay(plain, 0.5)


def test_layer_decay_finds_the_blocks_of_a_kerashub_backbone() -> None:
    keras_hub = pytest.importorskip("keras_hub", reason="KerasHub is installed with Keras 3")
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    mapping = bnfreeze.layer_decay(backbone, 0.5)
    assert list(mapping) == [
        ("vit_patching_and_embedding",),
        "vit_encoder/transformer_block_1",
        "vit_encoder/transformer_block_2",
        "vit_encoder/transformer_block_3",
        ("vit_encoder/ln",),
    ]
    bnfreeze.set_lr_multipliers(backbone, mapping)
    got = bnfreeze.lr_multipliers(backbone)
    # The attention layer's own variables sit inside a unit the walk does not open.
    inside = [k for k in got if k.startswith("vit_encoder/transformer_block_1/mha/")]
    assert inside and all(got[k] == 0.125 for k in inside)
    assert len(got) == len(backbone.trainable_weights) - 2  # all but the final norm's two


def test_weight_decay_leaves_out_norms_and_biases_with_the_documented_line() -> None:
    """The docs' one-liner: AdamW decays kernels only; a 1-D variable (BN gamma/beta, a
    bias) moves exactly as under Adam without decay, a kernel does not."""
    decayed, plain = build(), build()
    decayed.compile(OPT.AdamW(0.01, weight_decay=0.5), "mse")
    decayed.optimizer.exclude_from_weight_decay(
        var_list=[v for v in decayed.trainable_weights if len(v.shape) <= 1]
    )
    plain.compile(OPT.AdamW(0.01, weight_decay=0.0), "mse")
    moved, reference = step(decayed), step(plain)
    for key in ("stem/bias", "block1_bn/gamma", "block1_bn/beta", "head/bias"):
        np.testing.assert_allclose(moved[key], reference[key], rtol=1e-5, atol=1e-8)
    assert not np.allclose(moved["stem/kernel"], reference["stem/kernel"], rtol=1e-3)


#: Every built-in optimizer whose update is linear in its learning rate (Ftrl divides by
#: it: the multiplier scales its learning rate all the same, but not its update k-fold).
BUILT_IN = ["Adadelta", "Adafactor", "Adagrad", "Adamax", "Lamb", "Lion", "Nadam", "RMSprop"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_optimizer_scales_by_k(name: str) -> None:
    cls = getattr(OPT, name, None)
    if cls is None:
        pytest.skip(f"this Keras has no keras.optimizers.{name}")
    model = build()
    reference = twin(model)
    bnfreeze.set_lr_multipliers(model, {"stem": 0.25, "block2_dense": 2.0})
    model.compile(cls(learning_rate=0.01), "mse")
    reference.compile(cls(learning_rate=0.01), "mse")
    moved, plain = step(model), step(reference)
    scale = {
        **dict.fromkeys(["stem/kernel", "stem/bias"], 0.25),
        **dict.fromkeys(["block2_dense/kernel", "block2_dense/bias"], 2.0),
    }
    assert_scaled(moved, plain, scale)
