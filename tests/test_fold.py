"""bnfreeze.fold on small models: what folds, what stays and why, and the input untouched.

The reference for every prediction is the original model called in inference mode; the
reference for the folded weights is the BN formula computed here in numpy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import BN_BASE, keras, tf_variable
from bnfreeze._kinds import is_pinned
from bnfreeze._walk import walk
from tests import helpers as h

L = keras.layers


# --- shared with test_fold_models.py and test_fold_deploy.py -------------------------------


def randomize_batch_norm(model: Any, seed: int = 0) -> None:
    """Give every BN non-trivial moving statistics and gamma/beta (some gamma negative)."""
    rng = np.random.default_rng(seed)
    for bn in h.bn_layers(model):
        shape = tuple(bn.moving_mean.shape)
        bn.moving_mean.assign(rng.normal(0.0, 1.0, shape).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.2, 3.0, shape).astype("float32"))
        if bn.scale:
            gamma = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
            bn.gamma.assign(gamma.astype("float32"))
        if bn.center:
            bn.beta.assign(rng.normal(0.0, 0.5, shape).astype("float32"))


def outputs_of(model: Any, x: Any) -> list[np.ndarray]:
    """The model's outputs in inference mode, flat, as numpy arrays."""
    import tensorflow as tf

    return [h.to_numpy(y) for y in tf.nest.flatten(model(x, training=False))]


def assert_same_predictions(original: Any, folded: Any, x: Any, rtol: float = 1e-5) -> None:
    """Largest difference <= rtol of the output scale (largest absolute output)."""
    for a, b in zip(outputs_of(original, x), outputs_of(folded, x), strict=True):
        scale = float(np.abs(a).max())
        assert scale > 0
        assert float(np.abs(a - b).max()) <= rtol * scale, (np.abs(a - b).max(), scale)


def plain_keras(model: Any) -> bool:
    """Every layer at any depth is a Keras class (no bnfreeze class, nothing pinned)."""
    return all(
        type(n.layer).__module__.split(".")[0] in ("keras", "tf_keras") and not is_pinned(n.layer)
        for n in walk(model, include_root=True)
    )


def shared_variables(a: Any, b: Any) -> set[int]:
    """Variables (Keras or the TensorFlow variable behind them) that both models hold."""
    ids_a = {id(v) for v in a.weights} | {id(tf_variable(v)) for v in a.weights}
    ids_b = {id(v) for v in b.weights} | {id(tf_variable(v)) for v in b.weights}
    return ids_a & ids_b


def batch_norms(model: Any) -> list[str]:
    return [n.path for n in walk(model) if isinstance(n.layer, BN_BASE)]


def reasons(report: Any) -> dict[str, tuple[str, str]]:
    return {k.batch_norm: (k.reason, k.detail) for k in report.kept}


# --- every foldable kind -----------------------------------------------------------------


def _multiplied(cls: Any, *args: int) -> Callable[[bool], Any]:
    """A depthwise or separable layer with depth_multiplier=2."""
    return lambda bias: cls(*args, depth_multiplier=2, use_bias=bias)


KINDS: dict[str, tuple[tuple[int, ...], Callable[[bool], Any]]] = {
    "dense": ((6,), lambda bias: L.Dense(5, use_bias=bias)),
    "dense-3d": ((4, 6), lambda bias: L.Dense(5, use_bias=bias)),
    "conv1d": ((9, 3), lambda bias: L.Conv1D(5, 3, use_bias=bias)),
    "conv2d": ((7, 7, 3), lambda bias: L.Conv2D(5, 3, padding="same", use_bias=bias)),
    "conv2d-groups": ((7, 7, 4), lambda bias: L.Conv2D(6, 3, groups=2, use_bias=bias)),
    "conv3d": ((5, 5, 5, 2), lambda bias: L.Conv3D(4, 3, use_bias=bias)),
    "depthwise1d": ((9, 3), _multiplied(L.DepthwiseConv1D, 3)),
    "depthwise2d": ((7, 7, 3), _multiplied(L.DepthwiseConv2D, 3)),
    "separable1d": ((9, 3), _multiplied(L.SeparableConv1D, 5, 3)),
    "separable2d": ((7, 7, 3), _multiplied(L.SeparableConv2D, 5, 3)),
    "conv1d-transpose": ((6, 3), lambda bias: L.Conv1DTranspose(4, 3, strides=2, use_bias=bias)),
    "conv2d-transpose": ((5, 5, 3), lambda bias: L.Conv2DTranspose(4, 3, strides=2, use_bias=bias)),
    "conv3d-transpose": ((4, 4, 4, 2), lambda bias: L.Conv3DTranspose(3, 3, use_bias=bias)),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_foldable_layer_absorbs_the_batch_norm(kind: str, bias: bool) -> None:
    """Layer -> BN becomes one layer (with a bias) that predicts what the pair predicted."""
    shape, make = KINDS[kind]
    inputs = keras.Input(shape)
    layer = make(bias)
    outputs = L.BatchNormalization(name="bn")(layer(inputs))
    model = keras.Model(inputs, outputs, name=kind.replace("-", "_"))
    randomize_batch_norm(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert [(f.batch_norm, f.into, f.into_class, f.bias_added) for f in report.folded] == [
        ("bn", layer.name, type(layer).__name__, not bias)
    ]
    assert report.kept == ()
    assert batch_norms(folded) == []
    new_layer = folded.get_layer("bn")  # the model's output: its name stays
    assert new_layer.use_bias
    expected = {**layer.get_config(), "use_bias": True, "name": "bn"}
    assert new_layer.get_config() == expected
    assert_same_predictions(model, folded, h.data(shape, n=4))


@pytest.mark.parametrize(
    ("center", "scale"),
    [(False, True), (True, False), (False, False)],
    ids=["no-center", "no-scale", "neither"],
)
def test_center_and_scale_off(center: bool, scale: bool) -> None:
    """A BN without beta, without gamma or without both folds (beta 0, gamma 1)."""
    inputs = keras.Input((7, 7, 3))
    hidden = L.Conv2D(4, 3, name="conv")(inputs)
    outputs = L.BatchNormalization(center=center, scale=scale, name="bn")(hidden)
    model = keras.Model(inputs, outputs)
    randomize_batch_norm(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert [f.into for f in report.folded] == ["conv"]
    assert_same_predictions(model, folded, h.data((7, 7, 3), n=4))


def test_fold_arithmetic_is_float64_rounded_once() -> None:
    """Kernel and bias are the BN's affine map applied in float64, rounded once to float32."""
    rng = np.random.default_rng(3)
    inputs = keras.Input((64,))
    dense = L.Dense(64, name="dense")
    bn = L.BatchNormalization(epsilon=1e-3, name="bn")
    model = keras.Model(inputs, bn(dense(inputs)))
    randomize_batch_norm(model, seed=3)
    dense.bias.assign(rng.normal(size=64).astype("float32"))
    kernel, bias = (h.to_numpy(v).astype(np.float64) for v in (dense.kernel, dense.bias))
    gamma, beta, mean, var = (
        h.to_numpy(v).astype(np.float64)
        for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
    )
    scale = gamma / np.sqrt(var + 1e-3)
    expected_kernel = (kernel * scale).astype(np.float32)
    expected_bias = ((bias - mean) * scale + beta).astype(np.float32)
    # The same formula in float32 rounds differently somewhere: this test can tell them apart.
    kernel32, scale32 = kernel.astype(np.float32), scale.astype(np.float32)
    assert np.any(kernel32 * scale32 != expected_kernel)
    folded = bnfreeze.fold(model)
    new_kernel, new_bias = (h.to_numpy(v) for v in folded.get_layer("bn").weights)
    np.testing.assert_array_equal(new_kernel, expected_kernel)
    np.testing.assert_allclose(new_bias, expected_bias, rtol=1e-6, atol=1e-6)


# --- the BN axis ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (lambda: L.Conv2D(4, 3, data_format="channels_first", name="conv"), (3, 7, 7)),
        (lambda: L.Conv1D(4, 3, data_format="channels_first", name="conv"), (3, 9)),
        (lambda: L.DepthwiseConv2D(3, data_format="channels_first", name="conv"), (3, 7, 7)),
    ],
    ids=["conv2d", "conv1d", "depthwise2d"],
)
def test_channels_first_batch_norm_on_axis_1_folds(layer: Any, shape: tuple[int, ...]) -> None:
    """channels_first convolution -> BN(axis=1) folds into the channels on axis 1."""
    inputs = keras.Input(shape)
    model = keras.Model(inputs, L.BatchNormalization(axis=1, name="bn")(layer()(inputs)))
    randomize_batch_norm(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert [f.into for f in report.folded] == ["conv"]
    assert_same_predictions(model, folded, h.data(shape, n=4))


@pytest.mark.parametrize(
    ("build", "shape", "detail"),
    [
        (
            lambda x: L.BatchNormalization(axis=-1, name="bn")(
                L.Conv2D(4, 3, data_format="channels_first", name="conv")(x)
            ),
            (3, 7, 7),
            "normalises axis [3] of the output of 'conv' (Conv2D), whose channel axis is 1",
        ),
        (
            lambda x: L.BatchNormalization(axis=1, name="bn")(L.Dense(5, name="conv")(x)),
            (4, 6),
            "normalises axis [1] of the output of 'conv' (Dense), whose channel axis is 2",
        ),
    ],
    ids=["channels-first-conv-last-axis", "dense-time-axis"],
)
def test_batch_norm_on_another_axis_stays(build: Any, shape: Any, detail: str) -> None:
    """A BN normalising an axis other than the layer's channels stays, and the report says so."""
    inputs = keras.Input(shape)
    model = keras.Model(inputs, build(inputs))
    randomize_batch_norm(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert reasons(report) == {"bn": ("axis-mismatch", detail)}
    assert batch_norms(folded) == ["bn"]
    assert_same_predictions(model, folded, h.data(shape, n=4))


# --- what stays, and why ---------------------------------------------------------------------


class _CustomBN(keras.layers.BatchNormalization):
    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        return super().call(inputs, training=False) * 2.0


class _Block(keras.layers.Layer):
    """A custom layer holding Conv -> BN: its call is Python code, not a graph."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conv = L.Conv2D(4, 3, padding="same", name="inner_conv")
        self.bn = L.BatchNormalization(name="inner_bn")

    def build(self, input_shape: Any) -> None:
        self.conv.build(input_shape)
        self.bn.build((*input_shape[:-1], 4))
        self.built = True

    def call(self, inputs: Any) -> Any:
        return self.bn(self.conv(inputs), training=False)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (*input_shape[:-1], 4)


def _kept_case(name: str) -> tuple[Any, str, str, str]:
    """(model, path of the BN that stays, reason, detail) for one reason to stay."""
    x = keras.Input((7, 7, 3), name="x")
    conv = L.Conv2D(3, 3, padding="same", name="conv")
    bn = L.BatchNormalization(name="bn")
    if name == "after-relu":
        out = bn(L.ReLU(name="relu")(conv(x)))
        detail = "follows 'relu' (ReLU), not a Dense, convolution or transposed convolution"
        return keras.Model(x, out), "bn", "not-after-foldable-layer", detail
    if name == "own-activation":
        out = bn(L.Conv2D(3, 3, padding="same", activation="relu", name="conv")(x))
        detail = "follows 'conv' (Conv2D), whose own activation is 'relu'"
        return keras.Model(x, out), "bn", "nonlinear-activation", detail
    if name == "other-consumer":
        c = conv(x)
        out = L.Add(name="add")([bn(c), c])
        detail = "the output of 'conv' (Conv2D) is also used elsewhere"
        return keras.Model(x, out), "bn", "output-used-elsewhere", detail
    if name == "model-output":
        c = conv(x)
        detail = "the output of 'conv' (Conv2D) is also used elsewhere"
        return keras.Model(x, [bn(c), c]), "bn", "output-used-elsewhere", detail
    if name == "shared-producer":
        out = L.Add(name="add")([bn(conv(x)), L.BatchNormalization(name="bn2")(conv(x))])
        detail = "follows 'conv' (Conv2D), which is called 2 times"
        return keras.Model(x, out), "bn", "shared-layer", detail
    if name == "shared-batch-norm":
        out = L.Add(name="add")([bn(conv(x)), bn(L.Conv2D(3, 1, name="conv2")(x))])
        detail = "the BatchNormalization is called 2 times"
        return keras.Model(x, out), "bn", "shared-layer", detail
    if name == "model-input":
        detail = "its input is an input of model 'm'"
        return keras.Model(x, conv(bn(x)), name="m"), "bn", "input-of-model", detail
    if name == "training-true":
        out = bn(conv(x), training=True)
        detail = "its call in the graph passes training=True"
        return keras.Model(x, out), "bn", "called-with-training", detail
    if name == "custom-batch-norm":
        out = _CustomBN(name="bn")(conv(x))
        detail = "a BatchNormalization subclass that overrides `call`"
        return keras.Model(x, out), "bn", "custom-batch-norm", detail
    if name == "custom-layer":
        out = _Block(name="block")(x)
        detail = (
            "inside 'block' (_Block), whose call is Python code, not a layer graph fold can rewrite"
        )
        return keras.Model(x, out), "block/inner_bn", "not-in-a-graph", detail
    raise AssertionError(name)


KEPT = [
    "after-relu",
    "own-activation",
    "other-consumer",
    "model-output",
    "shared-producer",
    "shared-batch-norm",
    "model-input",
    "training-true",
    "custom-batch-norm",
    "custom-layer",
]


@pytest.mark.parametrize("case", KEPT)
def test_batch_norm_that_cannot_fold_stays_with_its_reason(case: str) -> None:
    """Each BN that cannot fold stays as it is; the report names it and the reason."""
    model, path, reason, detail = _kept_case(case)
    randomize_batch_norm(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert reasons(report)[path] == (reason, detail)
    assert path not in [f.batch_norm for f in report.folded]
    assert path in batch_norms(folded)
    assert_same_predictions(model, folded, h.data((7, 7, 3), n=4))


def test_non_finite_scale_stays() -> None:
    """A BN whose moving_variance + epsilon is negative is not folded (its map is not finite)."""
    inputs = keras.Input((6,))
    dense = L.Dense(4, name="dense")
    bn = L.BatchNormalization(epsilon=1e-3, name="bn")
    model = keras.Model(inputs, bn(dense(inputs)))
    bn.moving_variance.assign(np.array([1.0, -1.0, 1.0, 1.0], "float32"))
    folded, report = bnfreeze.fold(model, return_report=True)
    assert reasons(report) == {
        "bn": (
            "non-finite-scale",
            "gamma / sqrt(moving_variance + epsilon) or its shift is not finite",
        )
    }
    assert batch_norms(folded) == ["bn"]


# --- model kinds -------------------------------------------------------------------------------


def test_nested_models_fold_inside_and_keep_their_structure() -> None:
    """BN inside nested models folds into its layer there; BN after a nested model folds
    into the Dense after it; BN last in a nested model, after another, stays."""
    model = h.nested()
    randomize_batch_norm(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert [(f.batch_norm, f.into, f.after) for f in report.folded] == [
        ("middle/inner/bn_inner", "middle/inner/d_inner", False),
        ("bn_outer", "head", True),  # the Dense after it
    ]
    assert reasons(report) == {
        "middle/bn_middle": (
            "not-after-foldable-layer",
            "follows 'middle/inner' (Functional), not a Dense, convolution or transposed "
            "convolution",
        ),
    }
    assert [n.path for n in walk(folded) if n.is_container] == ["middle", "middle/inner"]
    assert batch_norms(folded) == ["middle/bn_middle"]
    assert_same_predictions(model, folded, h.inputs_for(model))


def test_guide_pattern_keeps_the_recorded_training_argument() -> None:
    """base(x, training=False) in the outer graph is called the same way in the result."""
    from bnfreeze._nodes import recorded_training

    base = h.conv()
    inputs = keras.Input((8, 8, 3))
    hidden = base(inputs, training=False)
    model = keras.Model(inputs, L.Dense(2, name="out")(hidden))
    randomize_batch_norm(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert [(f.batch_norm, f.into) for f in report.folded] == [("conv/bn", "conv/conv")]
    new_base = folded.get_layer("conv")
    assert [value for _, value in recorded_training(new_base)] == [False]
    assert_same_predictions(model, folded, h.data((8, 8, 3), n=4))


def test_sequential_stays_sequential() -> None:
    """A Sequential model comes out as a Sequential model without the folded BN."""
    model = h.sequential()
    randomize_batch_norm(model)
    folded = bnfreeze.fold(model)
    assert isinstance(folded, keras.Sequential)
    assert [layer.name for layer in folded.layers] == ["dense", "head"]
    assert folded.name == model.name
    assert_same_predictions(model, folded, h.inputs_for(model))


def test_multiple_inputs_and_outputs() -> None:
    """Inputs and outputs keep their structure and names; both BN layers fold."""
    model = h.multi_io()
    randomize_batch_norm(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert [(f.batch_norm, f.into) for f in report.folded] == [
        ("bn_a", "dense_a"),
        ("bn_b", "dense_b"),
    ]
    assert [t.name.split(":")[0] for t in folded.inputs] == ["a", "b"]
    assert_same_predictions(model, folded, h.inputs_for(model))


def test_shared_nested_model_stays_shared() -> None:
    """A nested model called twice is folded once and called twice in the result."""
    inner_in = keras.Input((6,))
    inner = keras.Model(
        inner_in, L.BatchNormalization(name="bn")(L.Dense(4, name="d")(inner_in)), name="inner"
    )
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    model = keras.Model([a, b], L.Add(name="add")([inner(a), inner(b)]))
    randomize_batch_norm(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert [(f.batch_norm, f.into) for f in report.folded] == [("inner/bn", "inner/d")]
    nested = [layer for layer in folded.layers if isinstance(layer, keras.Model)]
    assert len(nested) == 1
    assert len(nested[0]._inbound_nodes) == 2
    assert_same_predictions(model, folded, h.inputs_for(model))


def test_lambda_layers_are_copied() -> None:
    """A model with a Lambda layer folds (Keras 3 would refuse to re-create the lambda)."""
    inputs = keras.Input((6,))
    hidden = L.Lambda(lambda t: t * 2.0 + 1.0, name="affine")(inputs)
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(L.Dense(4, name="d")(hidden)))
    randomize_batch_norm(model)
    folded = bnfreeze.fold(model)
    assert_same_predictions(model, folded, h.data((6,), n=4))


# --- the input model, and what comes out ----------------------------------------------------


@pytest.mark.parametrize("bn_mode", list(bnfreeze.BN_MODES))
def test_pinned_model_folds_its_moving_statistics_into_plain_layers(bn_mode: str) -> None:
    """Whatever bn_mode pins, fold uses the moving statistics; the result is plain Keras."""
    model = h.two_bn_conv()
    randomize_batch_norm(model)
    x = h.data((6, 6, 3), n=4)
    reference = outputs_of(model, x)
    bnfreeze.freeze(model, bn_mode=bn_mode)  # type: ignore[arg-type]
    before = h.model_state(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    assert [f.batch_norm for f in report.folded] == ["bn1", "bn2"]
    assert plain_keras(folded)
    h.assert_unchanged(model, before)
    for a, b in zip(reference, outputs_of(folded, x), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_input_untouched_and_nothing_shared() -> None:
    """The input keeps its config, values, classes and flags; no variable is shared."""
    model = h.nested()
    randomize_batch_norm(model)
    bnfreeze.freeze(model, "middle")
    before = h.model_state(model)
    folded = bnfreeze.fold(model)
    h.assert_unchanged(model, before)
    assert shared_variables(model, folded) == set()
    old_layers = {id(n.layer) for n in walk(model)}
    assert not old_layers & {id(n.layer) for n in walk(folded)}
    assert plain_keras(folded)


def test_copied_layers_keep_their_config_and_flags() -> None:
    """New layers have the original config (initializers included; the absorbing ones gain
    use_bias=True) and trainable flag."""
    model = h.two_bn_conv()
    randomize_batch_norm(model)
    model.get_layer("head").trainable = False
    inputs = keras.Input((6, 6, 3))
    hidden = L.ReLU(name="pre")(model(inputs))
    outer = keras.Model(inputs, L.BatchNormalization(name="kept_bn")(hidden))
    folded = bnfreeze.fold(outer)
    inner = folded.get_layer(model.name)
    for name in ("relu", "pool", "head"):
        assert inner.get_layer(name).get_config() == model.get_layer(name).get_config()
    for name in ("conv1", "conv2"):
        expected = {**model.get_layer(name).get_config(), "use_bias": True}
        assert inner.get_layer(name).get_config() == expected
    assert folded.get_layer("kept_bn").get_config() == outer.get_layer("kept_bn").get_config()
    assert [layer.trainable for layer in inner.layers] == [
        layer.trainable for layer in model.layers if layer.name not in ("bn1", "bn2")
    ]
    assert inner.get_layer("head").trainable is False


# --- the report ----------------------------------------------------------------------------------


def test_report_text_and_dict() -> None:
    """print(report) lists folded and kept BN layers; to_dict is JSON-serialisable."""
    x = keras.Input((7, 7, 3))
    block = keras.Model(x, L.BatchNormalization(name="bn")(L.ReLU(name="relu")(x)), name="block")
    inputs = keras.Input((7, 7, 3))
    hidden = L.Conv2D(3, 3, padding="same", use_bias=False, name="stem")(inputs)
    hidden = L.BatchNormalization(name="stem_bn")(hidden)
    model = keras.Model(inputs, block(hidden), name="net")
    _, report = bnfreeze.fold(model, return_report=True)
    assert str(report) == (
        "fold of model 'net': 1 of 2 BatchNormalization layers folded, 1 kept\n"
        "\n"
        "folded (BatchNormalization -> the layer that absorbed it):\n"
        "  stem_bn -> stem (Conv2D, bias added)\n"
        "\n"
        "kept (BatchNormalization: why):\n"
        "  block/bn: not-after-foldable-layer: follows 'block/relu' (ReLU), not a Dense, "
        "convolution or transposed convolution"
    )
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "model": "net",
        "folded": [
            {
                "batch_norm": "stem_bn",
                "into": "stem",
                "into_class": "Conv2D",
                "bias_added": True,
                "after": False,
                "renamed_to": None,
            }
        ],
        "kept": [
            {
                "batch_norm": "block/bn",
                "reason": "not-after-foldable-layer",
                "detail": "follows 'block/relu' (ReLU), not a Dense, convolution or "
                "transposed convolution",
            }
        ],
    }


def test_without_return_report_only_the_model() -> None:
    """fold(model) returns just the new model."""
    model = h.functional()
    folded = bnfreeze.fold(model)
    assert isinstance(folded, keras.Model)
    assert folded is not model


# --- refusals ------------------------------------------------------------------------------------


def test_subclassed_model_is_refused() -> None:
    """A subclassed model has no graph to rewrite: ModelError saying what to do, model untouched."""
    model = h.subclassed()
    before = h.model_state(model)
    with pytest.raises(bnfreeze.ModelError) as info:
        bnfreeze.fold(model)
    assert str(info.value) == (
        "Cannot fold model 'subclassed': it is a subclassed model (Subclassed) whose call() "
        "is Python code, so there is no layer graph to rewrite. Expected a functional or "
        "Sequential model. Rebuild it as a functional model from the same layers "
        "(keras.Model(inputs, outputs)), or fold the functional and Sequential models it "
        "holds one by one."
    )
    h.assert_unchanged(model, before)


def test_unbuilt_model_is_refused() -> None:
    """An unbuilt model gets ModelError saying how to build it."""
    model = keras.Sequential([L.Dense(4), L.BatchNormalization()], name="unbuilt")
    with pytest.raises(bnfreeze.ModelError) as info:
        bnfreeze.fold(model)
    assert str(info.value) == (
        "Expected a built model, but model 'unbuilt' is not built, so its layers have no "
        "variables yet. Call the model on data once, or call model.build(input_shape), "
        "before bnfreeze."
    )
    assert not model.built


def test_not_a_model_is_refused() -> None:
    """A layer is not a model: ModelError naming what was received."""
    layer = L.Dense(3, name="d")
    with pytest.raises(bnfreeze.ModelError) as info:
        bnfreeze.fold(layer)
    assert str(info.value) == (
        f"Expected `model` to be a keras.Model. Received: a Keras layer ({layer!r:.80}). "
        "Wrap layers in a model first, e.g. keras.Sequential([layer])."
    )


def test_return_report_must_be_bool() -> None:
    """return_report is checked first."""
    with pytest.raises(bnfreeze.ArgumentTypeError) as info:
        bnfreeze.fold(h.functional(), return_report="yes")  # type: ignore[call-overload]
    assert str(info.value) == (
        "Expected `return_report` to be a bool. Received: return_report='yes'."
    )


class _NoConfig(keras.layers.Layer):
    def __init__(self, factor: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, inputs: Any) -> Any:
        return inputs * self.factor

    def get_config(self) -> dict[str, Any]:  # forgets `factor`, a common mistake
        return {"name": self.name, "trainable": self.trainable}


def test_layer_that_cannot_be_recreated_is_refused() -> None:
    """A layer whose get_config misses a constructor argument: ModelError naming it."""
    inputs = keras.Input((6,))
    hidden = _NoConfig(2.0, name="odd")(inputs)
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(L.Dense(4, name="d")(hidden)))
    before = h.model_state(model)
    with pytest.raises(bnfreeze.ModelError) as info:
        bnfreeze.fold(model)
    message = str(info.value)
    assert message.startswith(
        "Cannot copy layer 'odd' (_NoConfig) into the folded model: re-creating it from its "
        "get_config() failed (TypeError: "
    )
    assert message.endswith(
        "Expected every layer to be re-creatable from its config, as saving a model needs: "
        "give the layer a complete get_config()."
    )
    assert "factor" in message
    h.assert_unchanged(model, before)
