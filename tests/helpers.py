"""Model builders and independent references shared by the test modules.

Everything here uses the flavour under test (``bnfreeze._compat.keras``), builds small
models, and gives BatchNormalization layers statistics far from the data they will see,
so that every mode shows in the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bnfreeze._compat import IS_TF_KERAS, keras

L = keras.layers
FAR_MEAN = -3.0
FAR_VAR = 0.05


def to_numpy(value: Any) -> np.ndarray:
    """A variable or tensor as a numpy array (works in every flavour)."""
    if hasattr(value, "numpy"):
        return np.asarray(value.numpy())
    return np.asarray(keras.ops.convert_to_numpy(value))


def snapshot(model: Any) -> dict[str, np.ndarray]:
    """Every variable of ``model`` by its unique path (name + index), as numpy copies."""
    return {f"{i}:{v.name}": to_numpy(v).copy() for i, v in enumerate(model.weights)}


def bn_layers(model: Any) -> list[Any]:
    from bnfreeze._kinds import is_batch_norm
    from bnfreeze._walk import walk

    return [n.layer for n in walk(model) if is_batch_norm(n.layer)]


def set_far_statistics(model: Any, mean: float = FAR_MEAN, var: float = FAR_VAR) -> None:
    """Give every BN of ``model`` moving statistics far from standard-normal inputs."""
    for bn in bn_layers(model):
        shape = tuple(bn.moving_mean.shape)
        bn.moving_mean.assign(np.full(shape, mean, "float32"))
        bn.moving_variance.assign(np.full(shape, var, "float32"))


def data(shape: tuple[int, ...], n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


# --- model kinds ----------------------------------------------------------------------


def sequential() -> Any:
    model = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, name="dense"),
            L.BatchNormalization(name="bn"),
            L.Dense(2, name="head"),
        ],
        name="sequential",
    )
    return model


def functional() -> Any:
    inputs = keras.Input((6,))
    h = L.Dense(8, name="dense")(inputs)
    h = L.BatchNormalization(name="bn")(h)
    h = L.Activation("relu", name="relu")(h)
    outputs = L.Dense(2, name="head")(h)
    return keras.Model(inputs, outputs, name="functional")


def conv() -> Any:
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = L.BatchNormalization(name="bn")(h)
    h = L.GlobalAveragePooling2D(name="pool")(h)
    outputs = L.Dense(2, name="head")(h)
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


def inputs_for(model: Any, n: int = 8, seed: int = 0) -> Any:
    """Standard-normal inputs matching the model's input shapes."""
    shapes = (
        [tuple(t.shape[1:]) for t in model.inputs] if getattr(model, "inputs", None) else [(6,)]
    )
    xs = [data(s, n, seed + k) for k, s in enumerate(shapes)]
    return xs if len(xs) > 1 else xs[0]


def targets_for(model: Any, n: int = 8, seed: int = 100) -> Any:
    outs = model.outputs if getattr(model, "outputs", None) else None
    shapes = [tuple(t.shape[1:]) for t in outs] if outs else [(2,)]
    ys = [data(s, n, seed + k) for k, s in enumerate(shapes)]
    return ys if len(ys) > 1 else ys[0]


def compile_sgd(model: Any, lr: float = 0.1, **kwargs: Any) -> Any:
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse", **kwargs)
    return model


TF_KERAS = IS_TF_KERAS


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
