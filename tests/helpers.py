"""Model builders and independent references shared by the test modules.

Everything here uses the flavour under test (``bnfreeze._compat.keras``), builds small
models, and gives BatchNormalization layers statistics far from the data they will see,
so that every mode shows in the loss. The references (numpy moments, snapshots, one real
``fit`` step) never call the code under test; they read models only through the stable
helpers ``_compat``, ``_kinds`` and ``_walk``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hypothesis
import numpy as np
import pytest
import tensorflow as tf

from bnfreeze._compat import IS_TF_KERAS, keras, to_numpy
from bnfreeze._kinds import is_batch_norm, is_pinned, pinned_mode
from bnfreeze._modes import ModeSpec
from bnfreeze._walk import walk

L = keras.layers
TF_KERAS = IS_TF_KERAS
#: The Keras backend the suite runs on ("tensorflow" for tf-keras).
BACKEND = "tensorflow" if IS_TF_KERAS else str(keras.backend.backend())


#: keras 3.15's ``jit_compile=True`` on PyTorch (torch.compile) raises torch 2.13's
#: DeprecationWarning for ``torch.jit.script_method`` inside ``fit`` (measured).
NO_JIT_COMPILE = pytest.mark.skipif(
    BACKEND == "torch",
    reason="PyTorch: keras 3.15's jit_compile=True (torch.compile) raises torch 2.13's "
    "DeprecationWarning for torch.jit.script_method inside fit (measured)",
)


def tensorflow_only(reason: str) -> Any:
    """Mark a test (or a parameter) that holds on the TensorFlow backend only: ``reason``
    says which TensorFlow feature it tests (a skip with that reason elsewhere)."""
    return pytest.mark.skipif(BACKEND != "tensorflow", reason=f"TensorFlow only: {reason}")


FAR_MEAN = -3.0
FAR_VAR = 0.05


# --- data and numpy references -----------------------------------------------------------


def data(
    shape: tuple[int, ...], n: int = 8, seed: int = 0, *, loc: float = 0.0, scale: float = 1.0
) -> np.ndarray:
    """``n`` float32 samples of ``shape`` drawn from a normal distribution (seeded)."""
    return np.random.default_rng(seed).normal(loc, scale, size=(n, *shape)).astype("float32")


def moments(a: Any, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """numpy mean and biased variance over ``axes``, in float64 (the reference)."""
    a = np.asarray(a, dtype=np.float64)
    return a.mean(axis=axes), a.var(axis=axes)


def activations(
    model: Any, name: str, x: Any, *, training: bool = False, batch: int | None = None
) -> np.ndarray:
    """The inputs of layer ``name``, computed by Keras itself through a sub-model.

    With ``batch``, the sub-model runs on slices of that many samples (what matters in
    training mode, where a BN upstream normalises each batch with its own statistics).
    """
    inputs = model.inputs if len(model.inputs) > 1 else model.inputs[0]
    sub = keras.Model(inputs, model.get_layer(name).input)
    n = len(tf.nest.flatten(x)[0])
    step = batch or n
    parts = []
    for start in range(0, n, step):
        xb = tf.nest.map_structure(lambda v, s=start: v[s : s + step], x)
        parts.append(to_numpy(sub(xb, training=training)))
    return np.concatenate(parts)


def examples(n: int) -> int:
    """How many examples a hypothesis test draws: ``n`` under the ``ci`` profile (the
    default), fewer under ``quick`` (the profile's ``max_examples`` caps it; conftest.py)."""
    return min(n, hypothesis.settings.default.max_examples)


# --- variables: snapshots, statistics, replicas --------------------------------------------


def snapshot(model: Any) -> dict[str, np.ndarray]:
    """Every variable of ``model`` by its unique path (index + name), as numpy copies."""
    return {f"{i}:{v.name}": to_numpy(v) for i, v in enumerate(model.weights)}


def restore(model: Any, saved: dict[str, np.ndarray]) -> None:
    """Assign a :func:`snapshot` back to ``model``'s variables."""
    for i, v in enumerate(model.weights):
        v.assign(saved[f"{i}:{v.name}"])


def assert_same_values(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], skip: Any = ()
) -> None:
    """Two snapshots hold the same variables with bit-for-bit equal values."""
    assert before.keys() == after.keys()
    for key in before:
        if key not in skip:
            np.testing.assert_array_equal(before[key], after[key], err_msg=key)


def model_state(model: Any) -> dict[str, Any]:
    """Everything a failed call must leave alone: config, values, classes, flags, pins."""
    nodes = walk(model)
    return {
        "config": model.get_config(),
        "values": snapshot(model),
        "classes": [type(n.layer) for n in nodes],
        "trainable": [n.layer.trainable for n in nodes],
        "pinned": frozen_modes(model),
    }


def assert_unchanged(model: Any, before: dict[str, Any]) -> None:
    """``model`` is exactly as :func:`model_state` recorded it."""
    after = model_state(model)
    assert_same_values(before["values"], after["values"])
    assert {k: v for k, v in after.items() if k != "values"} == {
        k: v for k, v in before.items() if k != "values"
    }


def layer_at(model: Any, path: str) -> Any:
    """The layer at ``path`` ("outer/inner/layer") of ``model``, found by the walker."""
    return {n.path: n.layer for n in walk(model)}[path]


def refused(
    error: type[Exception], function: Callable[..., Any], model: Any, *args: Any, **kwargs: Any
) -> str:
    """``function(model, *args, **kwargs)`` raises exactly ``error`` and leaves ``model`` as
    it was (validate, then mutate); returns the message for the caller to compare whole."""
    before = model_state(model)
    with pytest.raises(error) as info:
        function(model, *args, **kwargs)
    assert type(info.value) is error
    assert_unchanged(model, before)
    return str(info.value)


def bn_layers(model: Any) -> list[Any]:
    """Every BatchNormalization layer of ``model``, at any depth, in walk order."""
    return [n.layer for n in walk(model) if is_batch_norm(n.layer)]


def frozen_modes(model: Any) -> dict[str, str]:
    """Path -> pinned mode of every layer of ``model`` that bnfreeze pinned."""
    return {n.path: str(pinned_mode(n.layer)) for n in walk(model) if is_pinned(n.layer)}


def statistics(bn: Any) -> tuple[np.ndarray, np.ndarray]:
    """A BN's moving mean and moving variance, as numpy copies."""
    return to_numpy(bn.moving_mean), to_numpy(bn.moving_variance)


def set_far_statistics(model: Any, mean: float = FAR_MEAN, var: float = FAR_VAR) -> None:
    """Give every BN of ``model`` moving statistics far from standard-normal inputs."""
    for bn in bn_layers(model):
        shape = tuple(bn.moving_mean.shape)
        bn.moving_mean.assign(np.full(shape, mean, "float32"))
        bn.moving_variance.assign(np.full(shape, var, "float32"))


@functools.lru_cache(maxsize=1)
def mirrored() -> Any:
    """One two-replica MirroredStrategy per process, on the two logical CPUs of conftest.

    Two MirroredStrategy objects on the same devices reuse collective instance keys, and
    TensorFlow then mixes their all-reduces up.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def replica_values(variable: Any, strategy: Any) -> list[np.ndarray]:
    """The value each replica holds (not the first replica's copy only)."""
    value = getattr(variable, "value", None)
    if value is None or callable(value):
        value = variable
    return [to_numpy(v) for v in strategy.experimental_local_results(value)]


# --- fit, evaluate and what a mode does ---------------------------------------------------


def _batch(x: Any) -> int:
    return len(tf.nest.flatten(x)[0])


def fit_step(model: Any, x: Any, y: Any) -> float:
    """One real ``fit`` step on the whole of ``x`` (one batch); the loss ``fit`` reports."""
    history = model.fit(x, y, batch_size=_batch(x), epochs=1, verbose=0, shuffle=False)
    return float(history.history["loss"][0])


def evaluate_loss(model: Any, x: Any, y: Any) -> float:
    """The loss ``evaluate`` reports on the whole of ``x`` (one batch)."""
    result = model.evaluate(x, y, batch_size=_batch(x), verbose=0)
    return float(result[0] if isinstance(result, list) else result)


@dataclass(frozen=True)
class FitObservation:
    """What one real ``fit`` step did, against ``evaluate`` on the same batch before it."""

    fit_loss: float
    evaluate_loss: float
    changed: dict[str, dict[str, bool]]  # BN path -> variable name -> changed by the step


_BN_VARIABLES = ("moving_mean", "moving_variance", "gamma", "beta")


def _bn_values(model: Any) -> dict[str, dict[str, np.ndarray]]:
    return {
        n.path: {
            name: to_numpy(getattr(n.layer, name))
            for name in _BN_VARIABLES
            if getattr(n.layer, name, None) is not None
        }
        for n in walk(model)
        if is_batch_norm(n.layer)
    }


def observe_fit(model: Any, x: Any, y: Any) -> FitObservation:
    """Evaluate, then one fit step: the two losses and which BN variables the step changed."""
    evaluated = evaluate_loss(model, x, y)
    before = _bn_values(model)
    fitted = fit_step(model, x, y)
    after = _bn_values(model)
    changed = {
        path: {name: not np.array_equal(value, after[path][name]) for name, value in old.items()}
        for path, old in before.items()
    }
    return FitObservation(fitted, evaluated, changed)


def assert_follows_mode(seen: FitObservation, spec: ModeSpec, rtol: float = 1e-5) -> None:
    """The observed step did what ``spec`` says, for every BN (the model has no Dropout).

    Statistics used by ``fit``: the moving ones exactly when fit's loss equals evaluate's
    (the BN statistics are far from the data, so batch statistics show in the loss).
    Moving statistics updated, and gamma/beta trained: their variables changed.
    """
    if spec.batch_statistics:
        assert not np.isclose(seen.fit_loss, seen.evaluate_loss, rtol=1e-3), (spec.name, "loss")
    else:
        np.testing.assert_allclose(seen.fit_loss, seen.evaluate_loss, rtol=rtol)
    assert seen.changed, "no BatchNormalization layer observed"
    for path, changed in seen.changed.items():
        for name in ("moving_mean", "moving_variance"):
            assert changed[name] is spec.batch_statistics, (spec.name, path, name)
        for name in ("gamma", "beta"):
            if name in changed:
                assert changed[name] is spec.trains_affine, (spec.name, path, name)


# --- model kinds ----------------------------------------------------------------------------


def sequential() -> Any:
    """Dense -> BN -> Dense, as a Sequential."""
    return keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, name="dense"),
            L.BatchNormalization(name="bn"),
            L.Dense(2, name="head"),
        ],
        name="sequential",
    )


def functional() -> Any:
    """Dense -> BN -> ReLU -> Dense, as a functional model."""
    inputs = keras.Input((6,))
    h = L.Dense(8, name="dense")(inputs)
    h = L.BatchNormalization(name="bn")(h)
    h = L.Activation("relu", name="relu")(h)
    outputs = L.Dense(2, name="head")(h)
    return keras.Model(inputs, outputs, name="functional")


def conv(head_dtype: str | None = None) -> Any:
    """Conv2D -> BN -> global pooling -> Dense on 8x8x3 images."""
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = L.BatchNormalization(name="bn")(h)
    h = L.GlobalAveragePooling2D(name="pool")(h)
    outputs = L.Dense(2, name="head", dtype=head_dtype)(h)
    return keras.Model(inputs, outputs, name="conv")


def nested() -> Any:
    """Three levels: outer -> middle -> inner, BN at every level."""
    i = keras.Input((6,))
    inner = keras.Model(
        i, L.BatchNormalization(name="bn_inner")(L.Dense(8, name="d_inner")(i)), name="inner"
    )
    m = keras.Input((6,))
    h = inner(m)
    h = L.BatchNormalization(name="bn_middle")(h)
    middle = keras.Model(m, h, name="middle")
    o = keras.Input((6,))
    h = middle(o)
    h = L.BatchNormalization(name="bn_outer")(h)
    return keras.Model(o, L.Dense(2, name="head")(h), name="outer")


def shared() -> Any:
    """One Dense and one BN layer used twice."""
    dense = L.Dense(6, name="shared_dense")
    bn = L.BatchNormalization(name="shared_bn")
    inputs = keras.Input((6,))
    h = bn(dense(inputs))
    h = bn(dense(h))
    return keras.Model(inputs, L.Dense(2, name="head")(h), name="shared")


def multi_io() -> Any:
    """Two inputs, a BN on each branch, two outputs."""
    a = keras.Input((6,), name="a")
    b = keras.Input((4,), name="b")
    ha = L.BatchNormalization(name="bn_a")(L.Dense(8, name="dense_a")(a))
    hb = L.BatchNormalization(name="bn_b")(L.Dense(8, name="dense_b")(b))
    h = L.Concatenate(name="cat")([ha, hb])
    return keras.Model(
        [a, b], [L.Dense(2, name="out1")(h), L.Dense(1, name="out2")(h)], name="multi_io"
    )


class Subclassed(keras.Model):
    """BN as an attribute, in a list and in a dict."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense = L.Dense(8, name="dense")
        self.bn = L.BatchNormalization(name="bn_attr")
        self.blocks = [L.Dense(8, name="dense_list"), L.BatchNormalization(name="bn_list")]
        self.by_name = {"norm": L.BatchNormalization(name="bn_dict")}
        self.head = L.Dense(2, name="head")

    def call(self, inputs: Any, training: Any = None) -> Any:
        h = self.bn(self.dense(inputs), training=training)
        h = self.blocks[1](self.blocks[0](h), training=training)
        h = self.by_name["norm"](h, training=training)
        return self.head(h)


def subclassed() -> Any:
    """A built :class:`Subclassed` model."""
    model = Subclassed(name="subclassed")
    model(np.zeros((2, 6), "float32"))
    return model


BUILDERS: dict[str, Callable[[], Any]] = {
    "sequential": sequential,
    "functional": functional,
    "conv": conv,
    "nested": nested,
    "shared": shared,
    "multi_io": multi_io,
    "subclassed": subclassed,
}


def two_bn_conv() -> Any:
    """Conv -> BN -> ReLU -> Conv -> BN -> pool -> Dense: two BN layers, one feeding the other."""
    inputs = keras.Input((6, 6, 3))
    h = L.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.Activation("relu", name="relu")(h)
    h = L.Conv2D(5, 3, padding="same", name="conv2")(h)
    h = L.BatchNormalization(name="bn2")(h)
    h = L.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, L.Dense(2, name="head")(h), name="two_bn_conv")


def inputs_for(model: Any, n: int = 8, seed: int = 0) -> Any:
    """Standard-normal inputs matching the model's input shapes."""
    shapes = (
        [tuple(t.shape[1:]) for t in model.inputs] if getattr(model, "inputs", None) else [(6,)]
    )
    xs = [data(s, n, seed + k) for k, s in enumerate(shapes)]
    return xs if len(xs) > 1 else xs[0]


def targets_for(model: Any, n: int = 8, seed: int = 100) -> Any:
    """Standard-normal targets matching the model's output shapes."""
    outs = model.outputs if getattr(model, "outputs", None) else None
    shapes = [tuple(t.shape[1:]) for t in outs] if outs else [(2,)]
    ys = [data(s, n, seed + k) for k, s in enumerate(shapes)]
    return ys if len(ys) > 1 else ys[0]


def compile_sgd(model: Any, lr: float = 0.1, **kwargs: Any) -> Any:
    """Compile ``model`` with plain SGD and a mean-squared-error loss; returns it."""
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse", **kwargs)
    return model


# --- the transfer-learning guide's pattern ------------------------------------------------


@keras.saving.register_keras_serializable(package="bnfreeze_tests")
class SubBase(keras.Model):
    """A subclassed base, Dense -> BN, whose ``call`` passes ``training`` through (savable)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense = L.Dense(8, name="dense")
        self.bn = L.BatchNormalization(name="bn")

    def call(self, inputs: Any, training: Any = None) -> Any:
        return self.bn(self.dense(inputs), training=training)


class SubBaseNoTraining(SubBase):
    """A subclassed base, Dense -> BN, whose ``call`` has no ``training`` parameter."""

    def call(self, inputs: Any) -> Any:
        return self.bn(self.dense(inputs))


BASE_KINDS = ("functional", "sequential", "subclassed", "subclassed_no_training")


def base(kind: str = "sequential", name: str = "base") -> Any:
    """A stand-in for a pretrained backbone: Dense 'dense' -> BN 'bn' on (6,) inputs, built."""
    if kind == "functional":
        inputs = keras.Input((6,))
        return keras.Model(
            inputs, L.BatchNormalization(name="bn")(L.Dense(8, name="dense")(inputs)), name=name
        )
    if kind == "sequential":
        return keras.Sequential(
            [keras.Input((6,)), L.Dense(8, name="dense"), L.BatchNormalization(name="bn")],
            name=name,
        )
    model = {"subclassed": SubBase, "subclassed_no_training": SubBaseNoTraining}[kind](name=name)
    model(np.zeros((2, 6), "float32"))
    return model


@dataclass
class Guide:
    """A model in the guide's pattern and its parts (for independent forward passes)."""

    model: Any
    base: Any
    drop: Any
    head: Any


def guide(
    backbone: Any = None,
    *,
    training: bool | None = False,
    rate: float = 0.5,
    name: str = "guide",
) -> Guide:
    """Keras's transfer-learning guide: ``base(x, training=False)`` -> Dropout -> Dense.

    ``backbone`` defaults to a sequential :func:`base`; ``training=None`` calls it without
    a ``training`` argument (a plain nested model, not the guide's pattern).
    """
    part = base() if backbone is None else backbone
    inputs = keras.Input((6,))
    hidden = part(inputs) if training is None else part(inputs, training=training)
    drop, head = L.Dropout(rate, name="drop"), L.Dense(2, name="head")
    return Guide(keras.Model(inputs, head(drop(hidden)), name=name), part, drop, head)
