"""compare_phases on every backend: the same losses, output divergence and ranked layers
as on TensorFlow, to float32 rounding, for a CNN with trained state in every layer.

On JAX and PyTorch the TensorFlow figures come from a fresh ``KERAS_BACKEND=tensorflow``
interpreter (TensorFlow is installed there). Whether the figures are right is
``tests/test_phases.py``'s job (losses against ``evaluate`` and a learning-rate-0 step).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import IS_TF_KERAS, backend_name, keras
from tests import helpers as h
from tests import trained
from tests.helpers_backend import run_script


def comparison(bn_mode: str | None = None) -> dict[str, Any]:
    """compare_phases on the trained CNN (optionally its first BN frozen), as plain data.
    Its Dropout is pinned off: random masks differ between backends."""
    keras.backend.clear_session()
    model = same_kernels(trained.image_model())
    bnfreeze.freeze(model, "drop")
    if bn_mode is not None:
        bnfreeze.freeze(model, "bn1", bn_mode=bn_mode)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = trained.image_data(8)
    before = h.model_state(model)
    result = bnfreeze.compare_phases(model, x, y)
    h.assert_unchanged(model, before)
    return {
        "loss": result.loss,
        "output": result.divergence,
        "layers": [
            [e.path, e.class_name, e.divergence, e.fit_phase, e.evaluate_phase]
            for e in result.layers
        ],
    }


def same_kernels(model: Any) -> Any:
    """Kernels from numpy (Keras's initializers draw differently on each backend)."""
    rng = np.random.default_rng(7)
    for variable in model.weights:
        if "kernel" in str(variable.name):
            shape = tuple(int(d) for d in variable.shape)
            variable.assign(rng.normal(0.0, 0.3, shape).astype("float32"))
    return model


def all_comparisons() -> dict[str, Any]:
    return {str(mode): comparison(mode) for mode in (None, "inference", "adapt")}


def _tensorflow_comparisons() -> dict[str, Any]:
    script = (
        "import json\nfrom tests.test_backend_phases import all_comparisons\n"
        "print(json.dumps(all_comparisons()))"
    )
    found: dict[str, Any] = run_script(script, "tensorflow")
    return found


@pytest.mark.skipif(
    IS_TF_KERAS or backend_name() == "tensorflow",
    reason="the reference is the TensorFlow backend itself",
)
def test_compare_phases_equals_tensorflow():
    """Losses, output divergence and every layer's divergence and phases equal the
    TensorFlow backend's, to float32 rounding (rtol 1e-4), for the plain and frozen CNN."""
    reference, here = _tensorflow_comparisons(), json.loads(json.dumps(all_comparisons()))
    assert list(here) == list(reference)
    for mode, ref in reference.items():
        got = here[mode]
        assert [row[:2] + row[3:] for row in got["layers"]] == [
            row[:2] + row[3:] for row in ref["layers"]
        ], mode
        np.testing.assert_allclose(
            [got["output"], *(row[2] for row in got["layers"])],
            [ref["output"], *(row[2] for row in ref["layers"])],
            rtol=1e-4,
            atol=1e-6,
            err_msg=mode,
        )
        np.testing.assert_allclose(
            [got["loss"]["training"], got["loss"]["inference"]],
            [ref["loss"]["training"], ref["loss"]["inference"]],
            rtol=1e-4,
            err_msg=mode,
        )


def test_compare_phases_runs_and_changes_nothing():
    """On this backend compare_phases ranks the unfrozen CNN's BN layers, shows nothing for
    BN frozen in inference mode, and changes no variable (checked inside)."""
    plain, frozen = comparison(), comparison("inference")
    divergence = {row[0]: row[2] for row in plain["layers"]}
    assert divergence["bn1"] > 0 and divergence["bn2"] > 0 and divergence.get("drop", 0) == 0
    frozen_bn1 = [row for row in frozen["layers"] if row[0] == "bn1"]
    assert frozen_bn1 == [] or frozen_bn1[0][2] == 0.0
