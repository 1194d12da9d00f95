"""Models whose every layer carries trained state, as users' models do.

A freshly built model hides whole classes of bugs: a biases-are-zero, statistics-are-0/1,
``Normalization``-at-its-defaults model looks the same whether or not a piece of code
copied its state. :func:`give_trained_state` gives *every* float variable of a model a
seeded value that no initializer produces (BN statistics and gamma/beta, ``Normalization``
mean and variance, biases, kernels nudged off their initial values); the builders add the
state that variables do not hold (an adapted ``Normalization``, lookup vocabularies).

Nothing here calls bnfreeze: these are references, usable on every flavour and backend
(no TensorFlow import; string inputs only where the backend has string tensors).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnfreeze._compat import IS_TF_KERAS, keras, to_numpy

L = keras.layers

#: Variable names (last path component, without ``:0``) and how to make them non-default.
_POSITIVE = ("moving_variance", "variance")
_AROUND_ONE = ("gamma", "scale")
_CENTRED = ("moving_mean", "mean", "beta", "bias")


def _short(variable: Any) -> str:
    return str(variable.name).split("/")[-1].split(":")[0]


def give_trained_state(model: Any, seed: int = 0) -> Any:
    """Give every float variable of ``model`` a seeded, non-default value; return ``model``.

    Statistics are positive where they must be (variances), gamma/scale lie around 1,
    means/beta/biases around 0 but never 0, kernels stay near their initial scale. Integer
    variables (counters, seed states) are left as they are.
    """
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        dtype = str(getattr(variable, "dtype", ""))
        if "float" not in dtype:
            continue
        shape = tuple(int(d) for d in variable.shape)
        name = _short(variable)
        if name in _POSITIVE:
            value = rng.uniform(0.5, 2.0, shape)
        elif name in _AROUND_ONE:
            value = rng.uniform(0.6, 1.4, shape)
        elif name in _CENTRED:
            value = rng.normal(0.0, 0.5, shape)
        else:
            old = to_numpy(variable).astype(np.float64)
            scale = float(np.std(old)) or 0.1
            value = old + rng.normal(0.0, 0.25 * scale, shape)
        variable.assign(value.astype(to_numpy(variable).dtype))
    _refresh_adapted(model)
    return model


def _refresh_adapted(model: Any) -> None:
    """Keras 3's ``Normalization`` computes with tensors cached from its variables at
    ``adapt``/load (``finalize_state``): refresh them after assigning the variables."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, L.Normalization) and hasattr(layer, "finalize_state"):
            layer.finalize_state()


def image_model(seed: int = 0, *, classes: int = 3, size: int = 12) -> Any:
    """A functional CNN with trained state in every layer.

    Input -> adapted ``Normalization`` (data around 5 with scale 3, so its defaults are far
    from its state) -> Conv2D -> BN -> ReLU -> DepthwiseConv2D -> BN -> pooling -> Dropout
    -> Dense head. Every float variable then gets a non-default value.
    """
    rng = np.random.default_rng(seed + 1)
    norm = L.Normalization(name="norm")
    norm.adapt(rng.normal(5.0, 3.0, (32, size, size, 3)).astype("float32"))
    inputs = keras.Input((size, size, 3), name="image")
    x = norm(inputs)
    x = L.Conv2D(8, 3, padding="same", name="conv1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Activation("relu", name="relu1")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw2")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.Activation("relu", name="relu2")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dropout(0.25, name="drop")(x)
    outputs = L.Dense(classes, name="head")(x)
    return give_trained_state(keras.Model(inputs, outputs, name="trained_cnn"), seed)


def image_data(n: int = 16, seed: int = 0, *, size: int = 12, classes: int = 3) -> tuple:
    """Inputs around the adapted ``Normalization``'s statistics and integer labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(5.0, 3.0, (n, size, size, 3)).astype("float32")
    y = rng.integers(0, classes, (n,)).astype("int32")
    return x, y


VOCABULARY = ["red", "green", "blue", "cyan", "magenta"]


def text_model(seed: int = 0) -> Any:
    """A functional model over string tokens with a vocabulary, an adapted
    ``Normalization`` on a numeric side input, and BN; trained state everywhere.

    String tensors exist on the TensorFlow backend only (and in tf-keras).
    """
    rng = np.random.default_rng(seed + 2)
    tokens = keras.Input((4,), dtype="string", name="tokens")
    numbers = keras.Input((2,), name="numbers")
    lookup = L.StringLookup(vocabulary=VOCABULARY, name="lookup")
    norm = L.Normalization(name="num_norm")
    norm.adapt(rng.normal(-7.0, 2.0, (32, 2)).astype("float32"))
    t = L.Embedding(len(VOCABULARY) + 1, 6, name="embed")(lookup(tokens))
    t = L.Flatten(name="flat")(t)
    n = norm(numbers)
    x = L.Concatenate(name="join")([t, n])
    x = L.Dense(8, name="dense1")(x)
    x = L.BatchNormalization(name="bn")(x)
    outputs = L.Dense(2, name="head")(x)
    return give_trained_state(keras.Model([tokens, numbers], outputs, name="trained_text"), seed)


def text_data(n: int = 16, seed: int = 0) -> tuple:
    """String tokens (some out of vocabulary) and numbers for :func:`text_model`."""
    rng = np.random.default_rng(seed)
    words = np.array([*VOCABULARY, "unknown"])
    # A string tensor: Keras 3's data adapters refuse numpy string arrays. Strings exist
    # on the TensorFlow backend only, so TensorFlow is imported here, not above.
    import tensorflow as tf

    tokens = tf.constant(words[rng.integers(0, len(words), (n, 4))])
    numbers = rng.normal(-7.0, 2.0, (n, 2)).astype("float32")
    y = rng.integers(0, 2, (n,)).astype("int32")
    return [tokens, numbers], y


def has_string_tensors() -> bool:
    """Whether this backend can carry string tensors through a model (TensorFlow only)."""
    return IS_TF_KERAS or keras.backend.backend() == "tensorflow"
