"""bnfreeze.fold on real architectures (weights=None, nothing downloaded).

Each model gets random gamma/beta, then moving statistics calibrated on generated images
(``bnfreeze.recalibrate``), so every BN is a non-trivial affine map; the folded model must
predict what the original predicts on other images, within 1e-4 of the output scale.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import keras, to_numpy
from tests import helpers as h
from tests.test_fold import (
    assert_same_predictions,
    batch_norms,
    plain_keras,
    shared_variables,
)

A = keras.applications
L = keras.layers
SIZE = 64


def calibrate(model: Any, seed: int = 0) -> None:
    """Random gamma/beta, a Normalization's statistics set as loaded weights set them
    (EfficientNet), then moving statistics measured on 8 generated images.

    At 64x64: at 32x32 the last blocks see 1x1 maps, and a randomly initialised
    EfficientNetB0 calibrated on 8 images is so ill-conditioned there (activations in the
    thousands) that the original model alone is 1e-4 of its output scale away from its
    own float64 evaluation -- float32 rounding, not folding.
    """
    rng = np.random.default_rng(seed)
    for bn in h.bn_layers(model):
        shape = tuple(bn.moving_mean.shape)
        if bn.scale:
            bn.gamma.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
        if bn.center:
            bn.beta.assign(rng.normal(0.0, 0.5, shape).astype("float32"))
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, L.Normalization):  # non-default, as loaded weights set them
            for variable in layer.weights:
                name = str(variable.name).split("/")[-1].split(":")[0]
                low, high = {"mean": (-0.2, 0.2), "variance": (0.5, 2.0)}.get(name, (4, 4))
                shape = tuple(variable.shape)
                variable.assign(rng.uniform(low, high, shape).astype(to_numpy(variable).dtype))
            if hasattr(layer, "finalize_state"):
                layer.finalize_state()
    bnfreeze.recalibrate(model, images(8, seed + 100), batch_size=8, verbose=0)


def images(n: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)).astype("float32")


def application(constructor: Any, **kwargs: Any) -> Callable[[], Any]:
    def build() -> Any:
        with warnings.catch_warnings():  # MobileNetV2: "input_shape ... not in [96, ...]"
            warnings.simplefilter("ignore", UserWarning)
            return constructor(
                weights=None,
                include_top=False,
                pooling="avg",
                input_shape=(SIZE, SIZE, 3),
                **kwargs,
            )

    return build


def xception_like() -> Any:
    """Xception's entry flow in miniature: SeparableConv2D -> BN blocks with 1x1 residuals."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = L.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = L.Conv2D(16, 3, strides=2, use_bias=False, name="block1_conv1")(x)
    x = L.Activation("relu")(L.BatchNormalization(name="block1_conv1_bn")(x))
    for block, filters in ((2, 32), (3, 64)):
        residual = L.Conv2D(filters, 1, strides=2, padding="same", use_bias=False)(x)
        residual = L.BatchNormalization()(residual)
        if block > 2:
            x = L.Activation("relu")(x)
        x = L.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
        x = L.Activation("relu")(L.BatchNormalization()(x))
        x = L.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.MaxPooling2D(3, strides=2, padding="same")(x)
        x = L.Add()([x, residual])
    x = L.SeparableConv2D(128, 3, padding="same", use_bias=False)(x)
    x = L.Activation("relu")(L.BatchNormalization()(x))
    return keras.Model(inputs, L.GlobalAveragePooling2D()(x), name="xception_like")


# (builder, BN layers folded, BN layers kept). DenseNet121 is pre-activation: in each of its
# 58 conv blocks the BN after the 1x1 convolution folds and the one after the
# concatenation stays; so do the 3 transition blocks' and the final BN; the stem's folds.
MODELS: dict[str, tuple[Callable[[], Any], int, int]] = {
    "resnet50": (application(A.ResNet50), 53, 0),
    "mobilenetv2": (application(A.MobileNetV2), 52, 0),
    "efficientnetb0": (application(A.EfficientNetB0), 49, 0),
    "densenet121": (application(A.DenseNet121), 58 + 1, 58 + 3 + 1),
    "xception-like": (xception_like, 8, 0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_real_architecture_predicts_the_same(name: str) -> None:
    """Folded model predicts within 1e-4 of the output scale; every foldable BN folded."""
    build, n_folded, n_kept = MODELS[name]
    model = build()
    calibrate(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert (len(report.folded), len(report.kept)) == (n_folded, n_kept)
    assert {k.reason for k in report.kept} <= {"not-after-foldable-layer"}
    assert len(batch_norms(folded)) == n_kept
    assert_same_predictions(model, folded, images(), rtol=1e-4)


@pytest.mark.slow
def test_keras_application_inside_guide_pattern_model() -> None:
    """A frozen MobileNetV2 base inside the guide's model folds inside the nested base."""
    base = application(A.MobileNetV2, alpha=0.35)()
    calibrate(base)
    inputs = keras.Input((SIZE, SIZE, 3))
    hidden = base(inputs, training=False)
    outputs = L.Dense(3, name="head")(L.Dropout(0.2)(hidden))
    model = keras.Model(inputs, outputs, name="guide")
    bnfreeze.freeze(base)
    before = h.model_state(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert (len(report.folded), len(report.kept)) == (52, 0)
    assert report.folded[0].batch_norm == f"{base.name}/bn_Conv1"
    assert report.folded[0].into == f"{base.name}/Conv1"
    assert [layer.name for layer in folded.layers if isinstance(layer, keras.Model)] == [base.name]
    assert plain_keras(folded)
    h.assert_unchanged(model, before)
    assert shared_variables(model, folded) == set()
    assert_same_predictions(model, folded, images(), rtol=1e-4)
