"""The private Keras API bnfreeze's symbolic audit rests on (``_compat.symbolic_pass``,
``_compat.current_stateless_scope``) and the JAX/PyTorch recalibrate pass runs in
(``_compat.predict_twin``): if a Keras release changes it, this fails first, with a
message that says what changed."""

from __future__ import annotations

import numpy as np
import pytest

from bnfreeze._compat import (
    IS_TF_KERAS,
    backend_name,
    current_stateless_scope,
    keras,
    predict_twin,
    symbolic_pass,
    to_numpy,
)

pytestmark = pytest.mark.skipif(IS_TF_KERAS, reason="tf-keras has no symbolic pass")


def test_symbolic_pass_records_writes_in_a_stateless_scope_and_applies_none():
    """Inside the pass a StatelessScope is active, a variable's assign is recorded there
    (not applied), inputs are placeholders with a free batch size, and the output spec
    comes back as a KerasTensor."""
    variable = keras.Variable(np.ones(3, "float32"), trainable=False)
    seen: dict[str, object] = {}

    def function(x):
        scope = current_stateless_scope()
        seen["scope"] = type(scope).__name__ if scope is not None else None
        variable.assign(variable + keras.ops.mean(x, axis=0))
        mapping = getattr(scope, "state_mapping", None)
        seen["recorded"] = mapping is not None and id(variable) in mapping
        return x * 2.0

    out = symbolic_pass(function, keras.KerasTensor((None, 3), dtype="float32"))
    assert seen == {"scope": "StatelessScope", "recorded": True}, (
        "Keras's compute_output_spec no longer runs the function inside a StatelessScope "
        "that records variable writes in `state_mapping` (bnfreeze._compat.symbolic_pass)"
    )
    assert isinstance(out, keras.KerasTensor) and tuple(out.shape)[1:] == (3,)
    assert current_stateless_scope() is None
    np.testing.assert_array_equal(to_numpy(variable), np.ones(3, "float32"))


def test_layer_calls_inside_the_pass_go_through_an_instance_call():
    """A layer called in the pass runs its instance ``call`` attribute (what
    ``_layers.intercepted`` sets), with a Python bool ``training``."""
    layer = keras.layers.Dropout(0.5)
    received = []

    def call(inputs, training=None):
        received.append(training)
        return inputs

    object.__setattr__(layer, "call", call)
    try:
        symbolic_pass(lambda x: layer(x, training=True), keras.KerasTensor((None, 2)))
    finally:
        layer.__dict__.pop("call", None)
    assert received and all(value is True for value in received)


def test_predict_twin_runs_its_step_and_leaves_the_model_as_it_was():
    """A twin's ``predict`` runs the step it was given in the trainer's loop; meanwhile the
    model's variables keep their values (Keras's JAX predict empties them for its loop)
    and afterwards the model has its own predict_step and predict function, unchanged."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile()
    x = np.arange(24, dtype="float32").reshape(8, 3)
    expected = model.predict(x, batch_size=2, verbose=0)
    function = model.predict_function
    weights = [to_numpy(v) for v in model.weights]
    original = model.predict_step
    jax = backend_name() == "jax"

    def step(*args):
        result = original(*args)
        return (result[0] * 2.0, result[1]) if jax else result * 2.0

    seen = []

    def batches():
        for i in range(0, 8, 2):
            seen.append([to_numpy(v) for v in model.weights])  # mid-loop, between steps
            yield (x[i : i + 2],)

    twin = predict_twin(model, step)
    doubled = twin.predict(batches(), steps=4, verbose=0)
    np.testing.assert_allclose(doubled, 2.0 * expected, rtol=1e-6)
    assert len(seen) == 4
    for values in seen:
        for value, weight in zip(values, weights, strict=True):
            np.testing.assert_array_equal(value, weight)
    assert "predict_step" not in model.__dict__
    assert model.predict_function is function, "the twin's predict replaced the model's"
    np.testing.assert_allclose(model.predict(x, batch_size=2, verbose=0), expected, rtol=1e-6)
