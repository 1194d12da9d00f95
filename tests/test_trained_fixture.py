"""The trained-state builders really leave no variable at a default value."""

from __future__ import annotations

import numpy as np
import pytest

from bnfreeze._compat import keras, to_numpy
from tests import trained


def _fresh_values(model):
    """The same architecture freshly built: what an initializer gives each variable."""
    clone = keras.models.clone_model(model)
    return [to_numpy(v) for v in clone.weights]


@pytest.mark.parametrize("build", [trained.image_model, trained.text_model], ids=["image", "text"])
def test_every_float_variable_differs_from_a_fresh_build(build):
    """No float variable keeps the value a fresh build (or the initializer) gives it."""
    if build is trained.text_model and not trained.has_string_tensors():
        pytest.skip("string tensors exist on the TensorFlow backend only")
    model = build()
    for variable, fresh in zip(model.weights, _fresh_values(model), strict=True):
        if "float" not in str(variable.dtype):
            continue
        value = to_numpy(variable)
        assert not np.allclose(value, fresh), variable.name
        assert not np.allclose(value, 0.0), variable.name
        assert not np.allclose(value, 1.0), variable.name


def test_image_model_normalization_is_adapted_and_predicts_finite():
    """The adapted Normalization changes the output: it is state that must be copied."""
    model = trained.image_model()
    x, _ = trained.image_data()
    (mean,) = [v for v in model.get_layer("norm").weights if trained._short(v) == "mean"]
    before = to_numpy(model(x, training=False))
    mean.assign(np.zeros(mean.shape, "float32"))
    trained._refresh_adapted(model)
    after = to_numpy(model(x, training=False))
    assert np.all(np.isfinite(before))
    assert np.max(np.abs(before - after)) > 1e-2


def test_text_model_lookup_keeps_its_vocabulary():
    """The lookup maps known words to their index and unknown words to the OOV index."""
    if not trained.has_string_tensors():
        pytest.skip("string tensors exist on the TensorFlow backend only")
    model = trained.text_model()
    lookup = model.get_layer("lookup")
    ids = to_numpy(lookup(np.array([["red", "blue", "unknown", "cyan"]])))
    assert ids.tolist() == [[1, 3, 0, 4]]
    x, _ = trained.text_data()
    assert np.all(np.isfinite(to_numpy(model.predict(x, verbose=0))))
