"""fold keeps everything that is not a folded BN: trained state, raw operations, masks,
output names; and a BN between pooling and a Dense folds into the Dense after it.

Every model carries trained state (``tests/trained.py``: adapted ``Normalization``,
lookup vocabularies, non-default values in every variable). The reference for each
prediction is the original model's ``predict_on_batch``; for folded weights, the BN
formula computed here in float64.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._cli import main
from bnfreeze._compat import IS_TF_KERAS, keras
from tests import helpers as h
from tests import trained as t
from tests.test_fold import batch_norms, shared_variables
from tests.test_fold_deploy import error_line

L = keras.layers
needs_strings = pytest.mark.skipif(
    not t.has_string_tensors(), reason="string tensors exist on the TensorFlow backend only"
)
needs_keras_ops = pytest.mark.skipif(IS_TF_KERAS, reason="tf-keras has no keras.ops")


def predictions(model: Any, x: Any) -> list[np.ndarray]:
    """The model's outputs from predict_on_batch (inference), flat, as float64 arrays."""
    out = model.predict_on_batch(x)
    flat = list(out.values()) if isinstance(out, dict) else out
    flat = flat if isinstance(flat, (list, tuple)) else [flat]
    return [np.asarray(h.to_numpy(y), np.float64) for y in flat]


def max_difference(original: Any, folded: Any, x: Any) -> tuple[float, float]:
    """(largest |folded - original|, largest |original|) over every output."""
    pairs = list(zip(predictions(original, x), predictions(folded, x), strict=True))
    return (
        max(float(np.abs(a - b).max()) for a, b in pairs),
        max(float(np.abs(a).max()) for a, _ in pairs),
    )


def assert_same(original: Any, folded: Any, x: Any, rtol: float = 1e-5) -> float:
    """The folded model predicts the original's outputs to float32 rounding; returns the
    largest difference."""
    difference, scale = max_difference(original, folded, x)
    assert scale > 0
    assert difference <= rtol * scale, (difference, scale)
    return difference


def fold_checked(model: Any, *, snapshot: bool = True) -> tuple[Any, Any]:
    """fold(model, return_report=True), checking that model is untouched (unless
    ``snapshot=False``) and that nothing is shared."""
    before = h.model_state(model) if snapshot else None
    folded, report = bnfreeze.fold(model, return_report=True)
    if before is not None:
        h.assert_unchanged(model, before)
    assert shared_variables(model, folded) == set()
    return folded, report


# --- trained state -------------------------------------------------------------------------


def test_adapted_normalization_keeps_its_statistics() -> None:
    """An adapted Normalization comes out with its mean and variance, and computes with them."""
    model = t.image_model()
    x, _ = t.image_data(8)
    folded, report = fold_checked(model)
    assert [f.batch_norm for f in report.folded] == ["bn1", "bn2"]
    old, new = model.get_layer("norm"), folded.get_layer("norm")
    for a, b in zip(old.weights, new.weights, strict=True):
        np.testing.assert_array_equal(h.to_numpy(b), h.to_numpy(a))
    assert_same(model, folded, x)


@needs_strings
def test_string_lookup_vocabulary_is_kept() -> None:
    """A StringLookup's vocabulary (and the numeric side's Normalization) survive fold."""
    model = t.text_model()
    x, _ = t.text_data(8)
    folded, report = fold_checked(model)
    assert [(f.batch_norm, f.into) for f in report.folded] == [("bn", "dense1")]
    new = folded.get_layer("lookup")
    assert new.get_vocabulary() == model.get_layer("lookup").get_vocabulary()
    assert_same(model, folded, x)


def _adapted_text_model() -> tuple[Any, Any]:
    """TextVectorization and StringLookup adapted on data (vocabularies not in their
    configs but in their state), two inputs, BN after each Dense; trained state."""
    import tensorflow as tf

    rng = np.random.default_rng(5)
    words = np.array(["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"])
    sentences = [" ".join(rng.choice(words, 6)) for _ in range(40)]
    tags = [str(w) for w in rng.choice(["x", "y", "z", "w"], 40)]
    vectorize = L.TextVectorization(max_tokens=12, output_sequence_length=6, name="vectorize")
    vectorize.adapt(sentences)
    lookup = L.StringLookup(name="tag_lookup")
    lookup.adapt(tags)
    assert vectorize.get_config()["vocabulary"] is None  # the state is not in the config
    assert lookup.get_config()["vocabulary"] is None
    text = keras.Input((1,), dtype="string", name="text")
    tag = keras.Input((1,), dtype="string", name="tag")
    a = L.Flatten()(L.Embedding(12, 4, name="embed")(vectorize(text)))
    b = L.Flatten()(L.Embedding(lookup.vocabulary_size(), 3, name="tag_embed")(lookup(tag)))
    x = L.BatchNormalization(name="bn")(L.Dense(5, name="dense")(L.Concatenate()([a, b])))
    model = t.give_trained_state(keras.Model([text, tag], L.Dense(2, name="out")(x)), seed=5)
    n = 8
    data = [
        tf.constant([[" ".join(rng.choice(words, 6))] for _ in range(n)]),
        tf.constant([[str(w)] for w in rng.choice(["x", "y", "z", "unseen"], n)]),
    ]
    return model, data


@needs_strings
def test_adapted_text_vectorization_and_lookup_keep_their_vocabularies() -> None:
    """Vocabularies learned by adapt (kept as assets, not config) survive fold."""
    model, x = _adapted_text_model()
    # tf-keras lists a TextVectorization's VocabWeightHandler among the model's weights,
    # which tests.helpers.snapshot cannot name.
    folded, report = fold_checked(model, snapshot=not IS_TF_KERAS)
    assert [f.batch_norm for f in report.folded] == ["bn"]
    for name in ("vectorize", "tag_lookup"):
        old, new = model.get_layer(name), folded.get_layer(name)
        assert new.get_vocabulary() == old.get_vocabulary()
    assert_same(model, folded, x)


# --- raw operations and masks -------------------------------------------------------------


def _times_two() -> Any:
    inputs = keras.Input((6,), name="x")
    hidden = L.BatchNormalization(name="bn1")(L.Dense(5, name="d1")(inputs)) * 2.0
    outputs = L.BatchNormalization(name="bn2")(L.Dense(3, name="d2")(hidden + 1.0))
    return keras.Model(inputs, outputs, name="times_two")


def _padded() -> Any:
    inputs = keras.Input((6, 6, 3), name="image")
    hidden = keras.ops.pad(inputs, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-1.0)
    hidden = L.BatchNormalization(name="bn1")(L.Conv2D(4, 3, name="conv")(hidden))
    hidden = keras.ops.pad(L.ReLU()(hidden), [[0, 0], [1, 1], [1, 1], [0, 0]])
    return keras.Model(inputs, L.MaxPooling2D(2)(hidden), name="padded")


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (_times_two, (6,)),
        pytest.param(_padded, (6, 6, 3), marks=needs_keras_ops),
    ],
    ids=["x-times-2", "keras-ops-pad"],
)
def test_raw_operations_are_carried_over(build: Any, shape: tuple[int, ...]) -> None:
    """Operations in the graph that are not layers (x * 2, keras.ops.pad) stay as they are."""
    model = t.give_trained_state(build())
    folded, report = fold_checked(model)
    assert report.kept == ()
    assert batch_norms(folded) == []
    assert_same(model, folded, h.data(shape, n=4))


def test_embedding_mask_feeds_later_layers() -> None:
    """Embedding(mask_zero=True)'s mask still reaches the pooling two layers later after
    fold: a zero-padded sequence predicts what the unpadded one does."""
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = L.Embedding(10, 4, mask_zero=True, name="embed")(tokens)
    x = L.Dense(5, activation="tanh", name="per_step")(x)  # passes the mask on
    x = L.GlobalAveragePooling1D(name="pool")(x)
    outputs = L.BatchNormalization(name="bn")(L.Dense(3, name="dense")(x))
    model = t.give_trained_state(keras.Model(tokens, outputs, name="masked"))
    data = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0], [6, 7, 8, 9, 1, 2]], "int32")
    folded, report = fold_checked(model)
    assert [(f.batch_norm, f.into) for f in report.folded] == [("bn", "dense")]
    assert_same(model, folded, data)
    (padded,) = predictions(folded, data[:1])
    (unpadded,) = predictions(folded, data[:1, :3])
    np.testing.assert_allclose(padded, unpadded, rtol=1e-5, atol=1e-6)
    (unmasked,) = predictions(folded, np.where(data[:1] == 0, 9, data[:1]))
    assert float(np.abs(unmasked - unpadded).max()) > 1e-3  # the padded steps would count


# --- output names ---------------------------------------------------------------------------


def test_batch_norm_output_keeps_the_output_names(tmp_path: Any) -> None:
    """A folded BN that is a model output gives its name to the absorbing layer: the output
    names stay, also after saving and loading."""
    inputs = keras.Input((6,), name="x")
    hidden = L.Dense(5, activation="relu", name="hidden")(inputs)
    score = L.BatchNormalization(name="score")(L.Dense(3, name="dense")(hidden))
    aux = L.Dense(2, name="aux")(hidden)
    model = t.give_trained_state(keras.Model(inputs, [score, aux], name="two_heads"))
    folded, report = fold_checked(model)
    assert [(f.batch_norm, f.into, f.renamed_to) for f in report.folded] == [
        ("score", "dense", "score")
    ]
    assert list(folded.output_names) == list(model.output_names) == ["score", "aux"]
    assert [layer.name for layer in folded.layers] == ["x", "hidden", "score", "aux"]
    assert str(report).splitlines()[-1] == (
        "  score -> dense (Dense, renamed 'score' to keep the output name)"
    )
    x = h.data((6,), n=4)
    assert_same(model, folded, x)
    path = str(tmp_path / "folded.keras")
    folded.save(path)
    loaded = keras.models.load_model(path)
    assert list(loaded.output_names) == ["score", "aux"]
    assert_same(model, loaded, x)


# --- the Dense after the BN -----------------------------------------------------------------


def _pooled_head(*, bias: bool, bn_after_dense: bool = False) -> Any:
    inputs = keras.Input((5, 5, 3), name="image")
    x = L.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.BatchNormalization(epsilon=1e-3, name="head_bn")(x)
    x = L.Dense(
        4, use_bias=bias, activation="softmax" if not bn_after_dense else None, name="head"
    )(x)
    if bn_after_dense:
        x = L.BatchNormalization(name="out_bn")(x)
    return t.give_trained_state(keras.Model(inputs, x, name="pooled"))


def _affine64(bn: Any) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (
        h.to_numpy(v).astype(np.float64)
        for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
    )
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_pool_batch_norm_dense_folds_into_the_dense_after(bias: bool) -> None:
    """pool -> BN -> Dense: W' = s[:, None] * W and b' = t @ W + b in float64, BN gone."""
    model = _pooled_head(bias=bias)
    folded, report = fold_checked(model)
    assert [(f.batch_norm, f.into, f.after, f.bias_added) for f in report.folded] == [
        ("head_bn", "head", True, not bias)
    ]
    assert report.kept == ()
    assert str(report).splitlines()[-1] == (
        f"  head_bn -> head (Dense, after it{', bias added' if not bias else ''})"
    )
    assert batch_norms(folded) == []
    dense = model.get_layer("head")
    kernel = h.to_numpy(dense.kernel).astype(np.float64)
    b = h.to_numpy(dense.bias).astype(np.float64) if bias else 0.0
    s, shift = _affine64(model.get_layer("head_bn"))
    new_kernel, new_bias = (h.to_numpy(w) for w in folded.get_layer("head").weights)
    np.testing.assert_array_equal(new_kernel, (s[:, None] * kernel).astype(np.float32))
    np.testing.assert_allclose(new_bias, shift @ kernel + b, rtol=1e-6, atol=1e-7)
    assert folded.get_layer("head").get_config()["activation"] == "softmax"
    assert_same(model, folded, h.data((5, 5, 3), n=4))


def test_dense_absorbs_a_batch_norm_on_each_side() -> None:
    """pool -> BN -> Dense -> BN: both fold into the Dense, rounded to float32 once."""
    model = _pooled_head(bias=True, bn_after_dense=True)
    folded, report = fold_checked(model)
    assert [(f.batch_norm, f.into, f.after) for f in report.folded] == [
        ("head_bn", "head", True),
        ("out_bn", "head", False),
    ]
    assert batch_norms(folded) == []
    assert_same(model, folded, h.data((5, 5, 3), n=4))


def test_batch_norm_read_by_more_than_the_dense_stays() -> None:
    """pool -> BN -> (Dense, Dense): two readers, nothing to fold into; kept and said."""
    inputs = keras.Input((5, 5, 3))
    x = L.GlobalAveragePooling2D(name="pool")(
        L.Conv2D(6, 3, name="conv", activation="relu")(inputs)
    )
    x = L.BatchNormalization(name="bn")(x)
    model = t.give_trained_state(
        keras.Model(inputs, [L.Dense(2, name="a")(x), L.Dense(3, name="b")(x)])
    )
    folded, report = fold_checked(model)
    assert [(k.batch_norm, k.reason, k.detail) for k in report.kept] == [
        (
            "bn",
            "not-after-foldable-layer",
            "follows 'pool' (GlobalAveragePooling2D), not a Dense, convolution or transposed "
            "convolution",
        )
    ]
    assert batch_norms(folded) == ["bn"]
    assert_same(model, folded, h.data((5, 5, 3), n=4))


# --- what fold cannot handle ------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="bnfreeze_tests")
class Fussy(keras.layers.Layer):
    """Passes its input through, but refuses to be called once ``refuse`` is set: a layer
    whose call fails on the rebuilt graph."""

    refuse = False

    def call(self, inputs: Any) -> Any:
        if Fussy.refuse:
            raise RuntimeError("Fussy layers refuse new graphs")
        return inputs


def test_cli_fold_of_a_model_fold_cannot_rebuild_exits_2(
    tmp_path: Any, capsys: Any, monkeypatch: Any
) -> None:
    """A layer that fails in the rebuilt graph: ModelError naming it (model untouched); the
    CLI prints it on one line, exits 2 and writes nothing."""
    inputs = keras.Input((6,))
    hidden = Fussy(name="fussy")(L.BatchNormalization(name="bn")(L.Dense(4, name="d")(inputs)))
    model = keras.Model(inputs, hidden)
    source, target = tmp_path / "in.keras", tmp_path / "out.keras"
    model.save(source)
    fold = bnfreeze.fold

    def fold_refused(*args: Any, **kwargs: Any) -> Any:  # the CLI's model is loaded by now
        Fussy.refuse = True
        return fold(*args, **kwargs)

    monkeypatch.setattr(bnfreeze, "fold", fold_refused)
    monkeypatch.setattr(Fussy, "refuse", False)
    before = h.model_state(model)
    with pytest.raises(bnfreeze.ModelError) as info:
        fold_refused(model)
    h.assert_unchanged(model, before)
    Fussy.refuse = False
    status = main(["fold", str(source), str(target)])
    message = str(info.value)
    assert message.startswith(
        "Cannot call layer 'fussy' (Fussy) in the folded model (RuntimeError: "
    )
    assert "Fussy layers refuse new graphs" in message
    assert message.endswith(
        "Expected every layer of the graph to accept the symbolic tensors it was called "
        "with, as rebuilding or loading the model needs: make it work with "
        "keras.models.clone_model, or fold without this layer."
    )
    assert status == 2
    captured = capsys.readouterr()
    assert error_line(captured.err) == f"ModelError: {' '.join(message.split())}"
    assert not os.path.exists(target)
