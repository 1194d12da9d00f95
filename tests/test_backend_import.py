"""No TensorFlow where it is not the backend: on Keras 3's JAX and PyTorch backends,
importing bnfreeze (and running its analysis functions) imports no ``tensorflow``.

Run in a fresh interpreter with this session's ``KERAS_BACKEND`` (the test process
itself imports TensorFlow for its references); on TensorFlow there is nothing to check.
"""

from __future__ import annotations

import pytest

from bnfreeze._compat import backend_name
from tests.helpers_backend import run_script

pytestmark = pytest.mark.skipif(
    backend_name() == "tensorflow", reason="TensorFlow is the backend: importing it is right"
)


def _run(script: str) -> dict[str, object]:
    found: dict[str, object] = run_script(script, backend_name())
    return found


def test_import_does_not_import_tensorflow():
    """`import bnfreeze` (and its CLI module) leaves `tensorflow` out of sys.modules."""
    found = _run(
        "import json, sys, bnfreeze, bnfreeze.callbacks, bnfreeze._cli\n"
        "print(json.dumps({'tf': sorted(m for m in sys.modules if m.split('.')[0] == "
        "'tensorflow')[:5]}))"
    )
    assert found == {"tf": []}


def test_analysis_functions_do_not_import_tensorflow():
    """audit, compare_phases and recalibrate on a small BN model import no TensorFlow."""
    found = _run(
        """
import json, sys
import numpy as np
import keras
import bnfreeze

model = keras.Sequential([
    keras.Input((6, 6, 2)),
    keras.layers.Conv2D(3, 3),
    keras.layers.BatchNormalization(name="bn"),
    keras.layers.Dropout(0.2),
    keras.layers.GlobalAveragePooling2D(),
    keras.layers.Dense(2),
])
x = np.random.default_rng(0).normal(size=(8, 6, 6, 2)).astype("float32")
y = np.random.default_rng(1).normal(size=(8, 2)).astype("float32")
done = []
for name, call in [
    ("audit", lambda: bnfreeze.audit(model)),
    ("compare_phases", lambda: bnfreeze.compare_phases(model, x, y, loss="mse")),
    ("recalibrate", lambda: bnfreeze.recalibrate(model, x, verbose=0)),
]:
    call()
    done.append(name)
tf = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")[:5]
print(json.dumps({"done": done, "tf": tf}))
"""
    )
    assert found == {"done": ["audit", "compare_phases", "recalibrate"], "tf": []}
