"""KerasHub models, built from config (no presets, no downloads), keep their freeze.

KerasHub backbones and tasks save their constructor arguments, not their layers, so
loading builds fresh layers (KERAS_FACTS fact 13). A frozen one carries its freeze
through saving, cloning and loading: the same modes and flags, the same predictions in
``fit``'s phase, and ``fit`` loss equal to ``evaluate`` loss on a reloaded classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import IS_TF_KERAS, keras
from bnfreeze._kinds import original_class, pinned_mode
from bnfreeze._modes import MODES
from bnfreeze._walk import walk
from tests import helpers as h
from tests.test_serialization import (
    assert_same_outputs,
    check_same_freeze,
    fit_updates_statistics,
    outputs,
)

if IS_TF_KERAS:
    pytest.skip("KerasHub builds Keras 3 models; this run is on tf-keras", allow_module_level=True)
keras_hub = pytest.importorskip(
    "keras_hub", reason="keras-hub is not installed (noxfile.py installs it for Keras 3)"
)
M = keras_hub.models


def _resnet(*, pre_activation: bool) -> Any:
    return M.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=pre_activation,
        image_shape=(32, 32, 3),
    )


BACKBONES: dict[str, Callable[[], Any]] = {
    "resnet_v1": lambda: _resnet(pre_activation=False),
    "resnet_v2": lambda: _resnet(pre_activation=True),
    "efficientnet": lambda: M.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 2],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["fused", "unfused"],
        stackwise_force_input_filters=[0, 0],
        stackwise_nores_option=[False, False],
        width_coefficient=1.0,
        depth_coefficient=1.0,
        input_shape=(32, 32, 3),
    ),
    "mobilenet_v3": lambda: M.MobileNetBackbone(
        stackwise_expansion=[[16], [24]],
        stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[8], [16]],
        stackwise_kernel_size=[[3], [3]],
        stackwise_num_strides=[[2], [1]],
        stackwise_se_ratio=[[0.25], [None]],
        stackwise_activation=[["relu"], ["hard_swish"]],
        stackwise_padding=[[1], [1]],
        output_num_filters=32,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=32,
        squeeze_and_excite=0.5,
        input_num_filters=8,
        image_shape=(32, 32, 3),
    ),
    "cspnet": lambda: M.CSPNetBackbone(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_depth=[1, 1],
        stackwise_strides=2,
        stackwise_num_filters=[8, 16],
        image_shape=(32, 32, 3),
        down_growth=True,
        bottle_ratio=(0.5, 1.0),
        block_ratio=(1.0, 0.5),
        expand_ratio=(2.0, 1.0),
        block_type="dark_block",
        stage_type="csp",
        stem_padding="same",
    ),
    "densenet": lambda: M.DenseNetBackbone(
        stackwise_num_repeats=[1, 1], growth_rate=8, image_shape=(32, 32, 3)
    ),
    "xception": lambda: M.XceptionBackbone(
        stackwise_conv_filters=[[8, 16], [32, 32], [64, 64]],
        stackwise_pooling=[False, True, False],
        image_shape=(64, 64, 3),
    ),
}
#: A different mode per backbone, so that every mode is saved and loaded somewhere.
MODE_OF = dict(zip(BACKBONES, ["inference", "affine", "adapt", "train"] * 2, strict=False))


def _images(model: Any) -> np.ndarray:
    return h.data(tuple(model.inputs[0].shape[1:]), n=4)


def _built(name: str) -> Any:
    backbone = BACKBONES[name]()
    h.set_far_statistics(backbone)
    return backbone


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_keeps_its_freeze_through_saving(name: str, tmp_path: Any) -> None:
    """Saved and loaded, a frozen backbone has its modes, flags, weights and behaviour."""
    mode = MODE_OF[name]
    backbone = _built(name)
    bnfreeze.freeze(backbone, bn_mode=mode)
    path = str(tmp_path / f"{name}.keras")
    backbone.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded).__name__ == type(backbone).__name__
    assert isinstance(loaded, original_class(backbone))  # the KerasHub class itself
    x = _images(backbone)
    if MODES[mode].batch_statistics:  # fit's phase differs from predict's on purpose
        assert bnfreeze._freeze.frozen_modes(loaded) == bnfreeze._freeze.frozen_modes(backbone)
        assert_same_outputs(outputs(loaded, x), outputs(backbone, x))
    else:
        check_same_freeze(loaded, backbone, x)
    trained = {v.path for v in backbone.trainable_weights}
    assert {v.path for v in loaded.trainable_weights} == trained
    y = np.zeros((4, *loaded.outputs[0].shape[1:]), "float32")
    assert fit_updates_statistics(loaded, x, y) == MODES[mode].batch_statistics


@pytest.mark.parametrize("name", ["resnet_v1", "efficientnet", "mobilenet_v3"])
def test_backbone_clone_keeps_its_pins(name: str) -> None:
    """clone_model of a frozen backbone (custom blocks included) keeps every pin."""
    backbone = _built(name)
    bnfreeze.freeze(backbone, bn_mode="affine")
    clone = keras.models.clone_model(backbone)
    clone.set_weights(backbone.get_weights())

    def pins(model: Any) -> list[tuple[str, bool, str | None]]:  # KerasHub renames blocks
        return [
            (type(n.layer).__name__, n.layer.trainable, pinned_mode(n.layer)) for n in walk(model)
        ]

    assert pins(clone) == pins(backbone)
    x = _images(backbone)
    assert_same_outputs(outputs(clone, x, training=True), outputs(backbone, x))


def test_reloaded_classifier_fit_loss_equals_evaluate_loss(tmp_path: Any) -> None:
    """The issue's case: a classifier with a frozen backbone, reloaded: fit == evaluate."""
    backbone = _built("resnet_v1")
    classifier = M.ResNetImageClassifier(backbone=backbone, num_classes=3, compile=False)
    bnfreeze.freeze(classifier, classifier.backbone)
    path = str(tmp_path / "classifier.keras")
    classifier.save(path)
    loaded = keras.models.load_model(path)
    x, y = _images(backbone), np.array([0, 1, 2, 1])
    loaded.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    statistics = [h.to_numpy(bn.moving_mean).copy() for bn in h.bn_layers(loaded)]
    evaluate_loss = loaded.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)["loss"]
    fit_loss = loaded.fit(x, y, batch_size=4, verbose=0, shuffle=False).history["loss"][0]
    assert np.isclose(fit_loss, evaluate_loss, rtol=1e-5)
    for before, bn in zip(statistics, h.bn_layers(loaded), strict=True):
        np.testing.assert_array_equal(before, h.to_numpy(bn.moving_mean))


def test_unfreeze_returns_a_backbone_to_its_own_class() -> None:
    """unfreeze(freeze(backbone)): the KerasHub class and config it had."""
    backbone = BACKBONES["densenet"]()
    config, cls = backbone.get_config(), type(backbone)
    bnfreeze.unfreeze(bnfreeze.freeze(backbone))
    assert type(backbone) is cls
    assert backbone.get_config() == config
