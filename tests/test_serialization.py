"""Frozen models serialise like plain ones: get_config, clone_model, .keras and .h5.

Every built-in layer whose ``call`` takes ``training`` (enumerated from the installed Keras,
as the audit does) goes through freeze -> get_config -> clone -> .keras -> .h5, and each
copy keeps the pins: the same modes, and the same predictions as the original in ``fit``'s
phase (a pinned layer runs as at inference whatever ``training`` it receives).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import IS_TF_KERAS, KERAS_VERSION, keras
from bnfreeze._freeze import frozen_modes
from tests import helpers as h

L = keras.layers


def _layer_classes_taking_training() -> list[str]:
    names = []
    for name in sorted(dir(keras.layers)):
        cls = getattr(keras.layers, name)
        if not (inspect.isclass(cls) and issubclass(cls, keras.layers.Layer)):
            continue
        try:
            takes = "training" in inspect.signature(cls.call).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
            takes = False
        if takes:
            names.append(name)
    return names


TRAINING_LAYERS = _layer_classes_taking_training()

#: Classes that cannot be built here, standalone and offline.
SKIPPED = {
    "FlaxLayer": "wraps a Flax module: needs the JAX backend and flax",
    "JaxLayer": "wraps a JAX function: needs the JAX backend",
    "TorchModuleWrapper": "wraps a torch.nn.Module: needs the torch backend and torch",
    "DenseFeatures": "needs tf.feature_column input dicts (deprecated TF API, tf-keras only)",
    "Equalization": "Keras builds no graph through it (a functional model raises 'part of a cycle')",
}


@keras.saving.register_keras_serializable(package="bnfreeze_tests")
def doubled(x: Any) -> Any:
    """A named (hence safely serialisable) function for the Lambda case."""
    return x * 2.0


@dataclass(frozen=True)
class Case:
    """How to build one layer class into a small functional model."""

    make: Callable[[], Any]
    inputs: tuple[tuple[int, ...], ...] = ((4,),)
    call: str = "single"  # "single": layer(x); "list": layer([a, b]); "two": layer(a, b);
    # "cell": layer(x, states)[0] with the states as further inputs
    image: bool = False  # inputs are images with values in [0, 255]
    unsafe: bool = False  # Keras deserialises it only with safe mode off


_IMG = ((8, 8, 3),)
_SEQ = ((5, 3),)
_QV = ((3, 4), (5, 4))


def _image(make: Callable[[], Any]) -> Case:
    return Case(make, _IMG, image=True)


def _tfsm_layer() -> Any:
    """A TFSMLayer over a tiny SavedModel exported here (no download)."""
    path = os.path.join(_TFSM_DIR, "export")
    if not os.path.exists(path):
        inputs = keras.Input((4,))
        exported = keras.Model(inputs, L.Dense(3, name="tfsm_dense")(inputs))
        exported.export(path, verbose=False) if not IS_TF_KERAS else exported.export(path)
    return L.TFSMLayer(path, call_endpoint="serve")


_TFSM_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bnfreeze-tfsm")

CASES: dict[str, Case] = {
    "AdditiveAttention": Case(lambda: L.AdditiveAttention(dropout=0.5), _QV, "list"),
    "AlphaDropout": Case(lambda: L.AlphaDropout(0.5)),
    "Attention": Case(lambda: L.Attention(dropout=0.5), _QV, "list"),
    "AugMix": _image(lambda: L.AugMix()),
    "AutoContrast": _image(lambda: L.AutoContrast()),
    "BatchNormalization": Case(lambda: L.BatchNormalization()),
    "Bidirectional": Case(lambda: L.Bidirectional(L.LSTM(3, dropout=0.5)), _SEQ),
    "CenterCrop": _image(lambda: L.CenterCrop(4, 4)),
    "ContrastLimitedAdaptiveHistogramEqualization": _image(
        lambda: L.ContrastLimitedAdaptiveHistogramEqualization(value_range=(0, 255))
    ),
    "ConvLSTM1D": Case(lambda: L.ConvLSTM1D(2, 3, dropout=0.5), ((3, 6, 2),)),
    "ConvLSTM2D": Case(lambda: L.ConvLSTM2D(2, 3, dropout=0.5), ((3, 6, 6, 2),)),
    "ConvLSTM3D": Case(lambda: L.ConvLSTM3D(2, 3, dropout=0.5), ((2, 4, 4, 4, 1),)),
    "CutMix": _image(lambda: L.CutMix()),
    "Dense": Case(lambda: L.Dense(3)),
    "Dropout": Case(lambda: L.Dropout(0.5)),
    "EinsumDense": Case(lambda: L.EinsumDense("ab,bc->ac", output_shape=3)),
    "GRU": Case(lambda: L.GRU(3, dropout=0.5), _SEQ),
    "GRUCell": Case(lambda: L.GRUCell(3, dropout=0.5), ((4,), (3,)), "cell"),
    "GaussianDropout": Case(lambda: L.GaussianDropout(0.5)),
    "GaussianNoise": Case(lambda: L.GaussianNoise(0.5)),
    "GroupQueryAttention": Case(
        lambda: L.GroupQueryAttention(
            head_dim=2, num_query_heads=2, num_key_value_heads=1, dropout=0.5
        ),
        _QV,
        "two",
    ),
    "GroupedQueryAttention": Case(
        lambda: L.GroupedQueryAttention(
            head_dim=2, num_query_heads=2, num_key_value_heads=1, dropout=0.5
        ),
        _QV,
        "two",
    ),
    "LSTM": Case(lambda: L.LSTM(3, dropout=0.5), _SEQ),
    "LSTMCell": Case(lambda: L.LSTMCell(3, dropout=0.5), ((4,), (3,), (3,)), "cell"),
    "Lambda": Case(lambda: L.Lambda(doubled)),
    "MaxNumBoundingBoxes": _image(lambda: L.MaxNumBoundingBoxes(max_number=2)),
    "MixUp": _image(lambda: L.MixUp()),
    "Mosaic": _image(lambda: L.Mosaic()),
    "MultiHeadAttention": Case(
        lambda: L.MultiHeadAttention(num_heads=2, key_dim=2, dropout=0.5), _QV, "two"
    ),
    "Pipeline": _image(lambda: L.Pipeline([L.RandomFlip(), L.RandomContrast(0.5)])),
    "RNN": Case(lambda: L.RNN(L.SimpleRNNCell(3, dropout=0.5)), _SEQ),
    "RandAugment": _image(lambda: L.RandAugment()),
    "RandomBrightness": _image(lambda: L.RandomBrightness(0.5)),
    "RandomColorDegeneration": _image(lambda: L.RandomColorDegeneration(0.5)),
    "RandomColorJitter": _image(lambda: L.RandomColorJitter(brightness_factor=0.5)),
    "RandomContrast": _image(lambda: L.RandomContrast(0.5)),
    "RandomCrop": _image(lambda: L.RandomCrop(4, 4)),
    "RandomElasticTransform": _image(lambda: L.RandomElasticTransform()),
    "RandomErasing": _image(lambda: L.RandomErasing()),
    "RandomFlip": _image(lambda: L.RandomFlip()),
    "RandomGaussianBlur": _image(lambda: L.RandomGaussianBlur()),
    "RandomGrayscale": _image(lambda: L.RandomGrayscale(0.5)),
    "RandomHeight": _image(lambda: L.RandomHeight(0.5)),
    "RandomHue": _image(lambda: L.RandomHue(0.5)),
    "RandomInvert": _image(lambda: L.RandomInvert()),
    "RandomPerspective": _image(lambda: L.RandomPerspective()),
    "RandomPosterization": _image(lambda: L.RandomPosterization(factor=4)),
    "RandomRotation": _image(lambda: L.RandomRotation(0.2)),
    "RandomSaturation": _image(lambda: L.RandomSaturation(0.5)),
    "RandomSharpness": _image(lambda: L.RandomSharpness(0.5)),
    "RandomShear": _image(lambda: L.RandomShear(0.2, 0.2)),
    "RandomTranslation": _image(lambda: L.RandomTranslation(0.2, 0.2)),
    "RandomWidth": _image(lambda: L.RandomWidth(0.5)),
    "RandomZoom": _image(lambda: L.RandomZoom(0.2)),
    "Resizing": _image(lambda: L.Resizing(4, 4)),
    "SimpleRNN": Case(lambda: L.SimpleRNN(3, dropout=0.5), _SEQ),
    "SimpleRNNCell": Case(lambda: L.SimpleRNNCell(3, dropout=0.5), ((4,), (3,)), "cell"),
    "Solarization": _image(lambda: L.Solarization(value_range=(0, 255))),
    "SpatialDropout1D": Case(lambda: L.SpatialDropout1D(0.5), _SEQ),
    "SpatialDropout2D": Case(lambda: L.SpatialDropout2D(0.5), _IMG),
    "SpatialDropout3D": Case(lambda: L.SpatialDropout3D(0.5), ((2, 4, 4, 3),)),
    "SpectralNormalization": Case(lambda: L.SpectralNormalization(L.Dense(3))),
    "StackedRNNCells": Case(
        lambda: L.StackedRNNCells([L.SimpleRNNCell(3, dropout=0.5), L.SimpleRNNCell(3)]),
        ((4,), (3,), (3,)),
        "cell",
    ),
    "TFSMLayer": Case(_tfsm_layer, unsafe=True),
    "TimeDistributed": Case(lambda: L.TimeDistributed(L.Dropout(0.5)), _SEQ),
}


def build_case(name: str, seed: int = 0) -> tuple[Any, Any]:
    """A functional model around one layer of class ``name``, and inputs for it."""
    case = CASES[name]
    inputs = [keras.Input(shape) for shape in case.inputs]
    layer = case.make()
    if case.call == "list":
        out = layer(inputs)
    elif case.call == "two":
        out = layer(*inputs)
    elif case.call == "cell":
        states = inputs[1:]
        out = layer(inputs[0], states if len(states) > 1 else states[0])[0]
    else:
        out = layer(inputs[0])
    model = keras.Model(inputs, out, name="case")
    rng = np.random.default_rng(seed)
    xs = [
        rng.uniform(0, 255, (4, *s)).astype("float32")
        if case.image
        else rng.normal(size=(4, *s)).astype("float32")
        for s in case.inputs
    ]
    return model, (xs if len(xs) > 1 else xs[0])


OPS = ("config", "clone", "keras", "h5")


def _outputs(model: Any, x: Any, *, training: bool) -> np.ndarray:
    return h.to_numpy(model(x, training=training))


_SafeModeScope = importlib.import_module(f"{keras.__name__}.src.saving.serialization_lib").SafeModeScope


def _copy(op: str, model: Any, directory: str, *, safe: bool) -> Any:
    with _SafeModeScope(safe):
        if op == "config":
            config = model.get_config()
            return model.__class__.from_config(config)
        if op == "clone":
            return keras.models.clone_model(model)
    path = os.path.join(directory, f"model.{op}")
    model.save(path)
    return keras.models.load_model(path, safe_mode=safe)


def run_op(op: str, model: Any, x: Any, directory: str, *, safe: bool = True) -> Any:
    """Copy ``model`` by ``op`` and check the copy keeps its modes and predictions."""
    copy = _copy(op, model, directory, safe=safe)
    assert frozen_modes(copy) == frozen_modes(model)
    if op in ("config", "clone"):  # rebuilt from config: fresh variables, take the originals'
        copy.set_weights(model.get_weights())
    expected = _outputs(model, x, training=False)
    np.testing.assert_allclose(_outputs(copy, x, training=False), expected, rtol=1e-5, atol=1e-5)
    return copy
