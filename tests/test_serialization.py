"""Frozen models serialise like plain ones: get_config, clone_model, .keras and .h5.

Every built-in layer whose ``call`` takes ``training`` (enumerated from the installed Keras,
as the audit does) goes through freeze -> get_config -> clone -> .keras -> .h5, and each
copy keeps the pins: the same modes, and the same predictions as the original in ``fit``'s
phase (a pinned layer runs as at inference whatever ``training`` it receives).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import IS_TF_KERAS, keras
from bnfreeze._freeze import frozen_modes
from bnfreeze._kinds import depends_on_phase
from bnfreeze._modes import MODES
from bnfreeze._walk import walk
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
    "FlaxLayer": "wraps a Flax module: needs flax, which the test sessions do not install",
    "DenseFeatures": "needs tf.feature_column input dicts (deprecated TF API, tf-keras only)",
    "Equalization": "Keras builds no graph through it (a functional model: 'part of a cycle')",
}
if h.BACKEND not in ("jax", "tensorflow") or IS_TF_KERAS:
    SKIPPED["JaxLayer"] = "wraps a JAX function: JAX or TensorFlow backend only"
elif importlib.util.find_spec("jax") is None:  # on TensorFlow Keras runs it through jax2tf
    SKIPPED["JaxLayer"] = "wraps a JAX function: needs jax, which this session does not install"
if h.BACKEND != "torch":
    SKIPPED["TorchModuleWrapper"] = "wraps a torch.nn.Module: PyTorch backend only"
if h.BACKEND != "tensorflow":
    SKIPPED["TFSMLayer"] = "TensorFlow only: wraps a TensorFlow SavedModel"
if h.BACKEND == "jax":
    SKIPPED["MixUp"] = "JAX without x64: Keras's MixUp asks for int64 indices (it warns)"


@keras.saving.register_keras_serializable(package="bnfreeze_tests")
def doubled(x: Any) -> Any:
    """A named (hence safely serialisable) function for the Lambda case."""
    return x * 2.0


@keras.saving.register_keras_serializable(package="bnfreeze_tests")
def jax_dense_init(rng: Any, inputs: Any) -> dict[str, Any]:
    """The JaxLayer case's ``init_fn``: a 3-unit dense layer's parameters."""
    import jax

    return {"kernel": jax.random.normal(rng, (inputs.shape[-1], 3)), "bias": jax.numpy.zeros(3)}


@keras.saving.register_keras_serializable(package="bnfreeze_tests")
def jax_dense_dropout(params: Any, rng: Any, inputs: Any, training: Any) -> Any:
    """The JaxLayer case's ``call_fn``: a dense layer, then dropout(0.5) when training."""
    import jax

    outputs = inputs @ params["kernel"] + params["bias"]
    if not training:
        return outputs
    kept = jax.random.bernoulli(rng, 0.5, outputs.shape)
    return jax.numpy.where(kept, outputs / 0.5, 0.0)


def _jax_layer() -> Any:
    return L.JaxLayer(jax_dense_dropout, init_fn=jax_dense_init)


def _torch_module_wrapper() -> Any:
    """A TorchModuleWrapper whose module runs differently in train() and eval()."""
    import torch

    module = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Dropout(0.5)
    )
    return L.TorchModuleWrapper(module, output_shape=(None, 3))


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
    "JaxLayer": Case(_jax_layer),
    "LSTM": Case(lambda: L.LSTM(3, dropout=0.5), _SEQ),
    "LSTMCell": Case(lambda: L.LSTMCell(3, dropout=0.5), ((4,), (3,), (3,)), "cell"),
    # tf-keras writes every Python function of a Lambda as code: loads only unsafe
    "Lambda": Case(lambda: L.Lambda(doubled), unsafe=IS_TF_KERAS),
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
    # its config holds the module pickled (torch.save): Keras loads it only unsafe
    "TorchModuleWrapper": Case(_torch_module_wrapper, unsafe=True),
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
    model = keras.Model(inputs if len(inputs) > 1 else inputs[0], out, name="case")
    rng = np.random.default_rng(seed)
    xs = [
        rng.uniform(0, 255, (4, *s)).astype("float32")
        if case.image
        else rng.normal(size=(4, *s)).astype("float32")
        for s in case.inputs
    ]
    return model, (xs if len(xs) > 1 else xs[0])


OPS = ("config", "clone", "keras", "h5")
_SafeModeScope = importlib.import_module(
    f"{keras.__name__}.src.saving.serialization_lib"
).SafeModeScope


def copy_model(op: str, model: Any, directory: str, *, safe: bool = True) -> Any:
    """``model`` rebuilt from its config, cloned, or saved and loaded (``.keras``, ``.h5``);
    a copy rebuilt from config gets the original's variable values."""
    with _SafeModeScope(safe):
        if op == "config":
            copy = model.__class__.from_config(model.get_config())
        elif op == "clone":
            copy = keras.models.clone_model(model)
        else:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"model.{op}")
            model.save(path)
            return keras.models.load_model(path, safe_mode=safe)
    copy.set_weights(model.get_weights())
    return copy


def outputs(model: Any, x: Any, *, training: bool = False) -> list[np.ndarray]:
    """The model's outputs on ``x`` as numpy arrays (one per output)."""
    out = model(x, training=training)
    return [h.to_numpy(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def assert_same_outputs(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


def trainable_flags(model: Any, *, containers: bool = True) -> list[tuple[str, bool]]:
    return [
        (n.path, bool(n.layer.trainable)) for n in walk(model) if containers or not n.is_container
    ]


def check_same_freeze(copy: Any, model: Any, x: Any) -> None:
    """Same pinned modes and trainable flags; same predictions, also in fit's phase."""
    assert frozen_modes(copy) == frozen_modes(model)
    assert trainable_flags(copy) == trainable_flags(model)
    expected = outputs(model, x)
    for training in (False, True):  # pinned layers run as at inference in both
        assert_same_outputs(outputs(copy, x, training=training), expected)


@pytest.mark.parametrize("name", TRAINING_LAYERS)
def test_every_training_layer_survives_config_clone_and_saving(name: str, tmp_path: Any) -> None:
    """Each built-in layer taking `training`, frozen, survives every copy that works unfrozen."""
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    assert name in CASES, f"{name} takes `training` in this Keras: add a case for it"
    case = CASES[name]
    plain_failures = {}
    for op in OPS:
        plain, x = build_case(name)
        try:
            copy_model(op, plain, str(tmp_path / f"plain-{op}"), safe=not case.unsafe)
        except Exception as exc:  # what Keras cannot do with the plain layer
            plain_failures[op] = f"{type(exc).__name__}: {str(exc)[:120]}"
    if len(plain_failures) == len(OPS):
        pytest.skip(f"Keras cannot copy a plain {name} at all: {plain_failures}")
    model, x = build_case(name)
    bnfreeze.freeze(model)
    phase = depends_on_phase(model.layers[-1]) if name != "Lambda" else True
    assert bool(frozen_modes(model)) == phase
    assert_same_outputs(outputs(model, x, training=True), outputs(model, x))
    for op in OPS:
        if op in plain_failures:
            continue
        copy = copy_model(op, model, str(tmp_path / f"frozen-{op}"), safe=not case.unsafe)
        check_same_freeze(copy, model, x)


@keras.saving.register_keras_serializable(package="bnfreeze_tests")
class Summed(keras.layers.Layer):
    """Takes its inputs as ``*inputs`` and ``training`` keyword-only, as TorchModuleWrapper."""

    def call(self, *inputs: Any, training: Any = None) -> Any:
        total = inputs[0] + inputs[1]
        return total * 10.0 if training else total


def test_a_pinned_layer_taking_its_inputs_as_varargs_keeps_them(tmp_path: Any) -> None:
    """Pinned, a layer whose ``training`` is keyword-only after ``*inputs`` gets every input
    and runs as at inference (its second input was replaced by ``training=False``)."""
    a_in, b_in = keras.Input((4,)), keras.Input((4,))
    model = keras.Model([a_in, b_in], Summed(name="summed")(a_in, b_in))
    x = [h.data((4,)), h.data((4,), seed=1)]
    bnfreeze.freeze(model)
    assert frozen_modes(model) == {"summed": "inference"}
    for training in (False, True):
        np.testing.assert_allclose(outputs(model, x, training=training)[0], x[0] + x[1], 1e-6)
    # tf-keras rebuilds no functional model calling a layer with two positional tensors
    for op in OPS if not IS_TF_KERAS else ():
        check_same_freeze(copy_model(op, model, str(tmp_path / op)), model, x)


def fit_updates_statistics(model: Any, x: Any, y: Any) -> bool:
    """One lr-0 ``fit`` step: did any BN's moving mean change? (Weights cannot.)"""
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    before = [h.to_numpy(bn.moving_mean).copy() for bn in h.bn_layers(model)]
    n = len(x[0]) if isinstance(x, list) else len(x)
    model.fit(x, y, batch_size=n, epochs=1, verbose=0, shuffle=False)
    after = [h.to_numpy(bn.moving_mean) for bn in h.bn_layers(model)]
    return any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_lambda_with_a_python_lambda_copies_after_freeze(tmp_path: Any) -> None:
    """The issue's case: get_config, clone, .keras and .h5 of a frozen model with a Lambda."""
    inputs = keras.Input((4,))
    hidden = L.Lambda(lambda t: t * 2.0, name="double")(L.Dense(4, name="dense")(inputs))
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(hidden))
    h.set_far_statistics(model)
    bnfreeze.freeze(model)
    assert frozen_modes(model) == {"double": "inference", "bn": "inference"}
    x = h.data((4,))
    model.get_config()  # raised in safe mode: it rebuilt the Lambda through from_config
    for op in OPS:  # a Python lambda loads only with safe mode off, frozen or not
        copy = copy_model(op, model, str(tmp_path / op), safe=False)
        check_same_freeze(copy, model, x)


@pytest.mark.parametrize("mode", ["inference", "adapt"])
@pytest.mark.parametrize("kind", sorted(h.BUILDERS))
def test_clone_model_keeps_the_pins(kind: str, mode: str) -> None:
    """clone_model of every model kind (it raised TypeError) keeps modes, flags, behaviour."""
    model = h.BUILDERS[kind]()
    h.set_far_statistics(model)
    bnfreeze.freeze(model, bn_mode=mode)
    clone = keras.models.clone_model(model)
    x, y = h.inputs_for(model), h.targets_for(model)
    if not clone.built:  # tf-keras clones a subclassed model unbuilt
        clone(x)
    clone.set_weights(model.get_weights())
    assert frozen_modes(clone) == frozen_modes(model) != {}
    # tf-keras's clone_model drops a nested functional model's own flag, frozen or not.
    assert trainable_flags(clone, containers=not IS_TF_KERAS) == trainable_flags(
        model, containers=not IS_TF_KERAS
    )
    assert_same_outputs(outputs(clone, x), outputs(model, x))
    assert fit_updates_statistics(clone, x, y) == MODES[mode].batch_statistics


@keras.saving.register_keras_serializable(package="bnfreeze_tests")
class AutoNamed(keras.Model):
    """A subclassed model whose layers Keras names (names differ in the loading session)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense = L.Dense(8)
        self.bn = L.BatchNormalization()
        self.drop = L.Dropout(0.5)
        self.head = L.Dense(2)

    def call(self, inputs: Any, training: Any = None) -> Any:
        hidden = self.bn(self.dense(inputs), training=training)
        return self.head(self.drop(hidden, training=training))


@pytest.mark.parametrize("mode", ["inference", "adapt"])
def test_subclassed_model_keeps_its_freeze_through_saving(mode: str, tmp_path: Any) -> None:
    """A subclassed model rebuilt by its constructor on load is frozen again as it was."""
    model = AutoNamed()
    x, y = h.data((6,)), h.data((2,), seed=5)
    model(x)
    h.set_far_statistics(model)
    bnfreeze.freeze(model, [model.dense, model.bn, model.drop], bn_mode=mode)
    path = str(tmp_path / "auto.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.bn.name != model.bn.name  # matched by position, not by Keras's names
    assert type(loaded) is type(model)
    assert bnfreeze._kinds.pinned_mode(loaded.bn) == mode
    assert bnfreeze._kinds.pinned_mode(loaded.drop) == "inference"
    assert [x.trainable for x in (loaded.dense, loaded.bn, loaded.head)] == [
        False,
        MODES[mode].trains_affine,
        True,
    ]
    np.testing.assert_array_equal(h.to_numpy(loaded.bn.moving_mean), FAR_MEAN_ROW)
    assert fit_updates_statistics(loaded, x, y) == MODES[mode].batch_statistics


FAR_MEAN_ROW = np.full((8,), h.FAR_MEAN, "float32")


@keras.saving.register_keras_serializable(package="bnfreeze_tests")
class Block(keras.layers.Layer):
    """A custom layer holding a BN, configured by its constructor arguments only."""

    def __init__(self, units: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.dense = L.Dense(units, name="inner_dense")
        self.bn = L.BatchNormalization(name="inner_bn")

    def call(self, inputs: Any, training: Any = None) -> Any:
        return self.bn(self.dense(inputs), training=training)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}


def test_custom_block_inside_a_functional_model_keeps_its_freeze(tmp_path: Any) -> None:
    """A custom block (its config holds no layers) in a functional model: pins survive .keras."""
    inputs = keras.Input((6,))
    outputs = L.Dense(2, name="head")(Block(name="block")(inputs))
    model = keras.Model(inputs, outputs)
    model.predict(h.data((6,)), verbose=0)
    h.set_far_statistics(model)
    bnfreeze.freeze(model, "block", bn_mode="affine")
    loaded = copy_model("keras", model, str(tmp_path))
    assert frozen_modes(loaded) == {"block/inner_bn": "affine"}
    check_same_freeze(loaded, model, h.data((6,)))


def test_unfreeze_returns_a_subclassed_model_to_its_own_class() -> None:
    """Once nothing inside is frozen, the model has its own class and config again."""
    model = AutoNamed()
    model(h.data((6,)))
    config = model.get_config()
    bnfreeze.freeze(model)
    assert type(model) is not AutoNamed and isinstance(model, AutoNamed)
    bnfreeze.unfreeze(model)
    assert type(model) is AutoNamed
    assert model.get_config() == config


def test_saved_forms_of_another_version_are_refused() -> None:
    """A pinned layer or a frozen container saved in an unknown format version: a clear error."""
    from bnfreeze._apply import FrozenContainer
    from bnfreeze._layers import Frozen

    with pytest.raises(bnfreeze.SavedFormatError) as info:
        Frozen.from_config({"version": 3, "name": "bn", "mode": "inference", "layer": {}})
    assert str(info.value) == (
        "Cannot load layer 'bn': it was saved by a bnfreeze that writes pinned layers in "
        "format version 3, and this bnfreeze reads format versions 1 and 2. Install the "
        "bnfreeze version that saved the model (or a newer one) to load it."
    )
    with pytest.raises(bnfreeze.SavedFormatError) as info:
        FrozenContainer.from_config({"version": 3, "name": "m", "container": {}, "layers": []})
    assert str(info.value) == (
        "Cannot load container 'm': it was saved by a bnfreeze that writes frozen containers "
        "in format version 3, and this bnfreeze reads format versions 1 and 2. Install the "
        "bnfreeze version that saved the model (or a newer one) to load it."
    )


class PickyModel(keras.Model):
    """A subclassed model whose subclasses must name a flavour: bnfreeze cannot subclass it."""

    def __init_subclass__(cls, *, flavour: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense = L.Dense(4, name="dense")
        self.bn = L.BatchNormalization(name="bn")

    def call(self, inputs: Any, training: Any = None) -> Any:
        return self.bn(self.dense(inputs), training=training)


def test_a_model_class_that_cannot_be_subclassed_is_frozen_with_one_warning() -> None:
    """The freeze holds, and freeze warns once that it will not survive saving."""
    model = PickyModel(name="picky")
    model(h.data((6,)))
    with pytest.warns(UserWarning) as record:
        bnfreeze.freeze(model)
    assert [str(w.message) for w in record] == [
        "bnfreeze cannot subclass PickyModel (TypeError: PickyModel.__init_subclass__() "
        "missing 1 required keyword-only argument: 'flavour'), so a frozen PickyModel loses "
        "its freeze when saved and loaded: its config rebuilds its layers. Call "
        "bnfreeze.freeze again after loading it."
    ]
    assert frozen_modes(model) == {"bn": "inference"}
    assert type(model) is PickyModel
    bnfreeze.freeze(model, bn_mode="affine")  # once per class: no second warning
    assert frozen_modes(model) == {"bn": "affine"}


@pytest.mark.parametrize("kind", sorted(h.BUILDERS))
def test_every_model_kind_keeps_its_freeze_through_saving(kind: str, tmp_path: Any) -> None:
    """.keras (and .h5 where Keras writes the kind) of every frozen model kind, shared layers
    and subclassed models included: the same modes, flags and predictions."""
    model = h.BUILDERS[kind]()
    h.set_far_statistics(model)
    bnfreeze.freeze(model, bn_mode="affine")
    x = h.inputs_for(model)
    for op in ("keras", "h5") if kind != "subclassed" else ("keras",):
        os.makedirs(tmp_path / op)
        path = str(tmp_path / op / f"model.{op}")
        model.save(path)
        loaded = keras.models.load_model(path, custom_objects={"Subclassed": h.Subclassed})
        check_same_freeze(loaded, model, x)
