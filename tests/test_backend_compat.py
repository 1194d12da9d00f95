"""The private Keras API bnfreeze's symbolic audit rests on (``_compat.symbolic_pass``,
``_compat.current_stateless_scope``): if a Keras release changes it, this fails first,
with a message that says what changed."""

from __future__ import annotations

import numpy as np
import pytest

from bnfreeze._compat import (
    IS_TF_KERAS,
    current_stateless_scope,
    keras,
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
