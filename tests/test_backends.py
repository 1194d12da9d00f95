"""Which Keras backend: freeze, unfreeze, audit, compare_phases and recalibrate work on
every Keras 3 backend (numpy and JAX here; PyTorch in its own nox session, and the
results against TensorFlow's in tests/test_backend_*.py).

Keras reads KERAS_BACKEND once, at its first import, so each backend runs in a subprocess.
The numpy backend needs scipy and the JAX one jax: the `backends` nox session installs
both (the flavour sessions do not, and skip here with the reason)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from typing import Any

import pytest

from bnfreeze._compat import IS_TF_KERAS, backend_name
from tests.helpers_backend import run_script

pytestmark = pytest.mark.skipif(
    IS_TF_KERAS, reason="tf-keras (Keras 2) runs on TensorFlow only: it has no other backend"
)

#: Run on the chosen backend: a Dense -> BatchNormalization -> Dropout model with known
#: moving statistics, frozen; its output in a training call against a numpy reference;
#: unfreeze's round trip; on JAX one fit step; then each analysis function.
SCRIPT = r"""
import json, sys
import numpy as np
import keras
import bnfreeze

def arrays(layer):
    return [keras.ops.convert_to_numpy(w) for w in layer.weights]

rng = np.random.default_rng(0)
model = keras.Sequential([
    keras.Input((4,)),
    keras.layers.Dense(3, name="dense"),
    keras.layers.BatchNormalization(name="bn"),
    keras.layers.Dropout(0.5, name="drop"),
])
bn = model.get_layer("bn")
bn.moving_mean.assign(np.array([1.0, -2.0, 0.5], "float32"))
bn.moving_variance.assign(np.array([4.0, 0.25, 1.0], "float32"))
config = model.get_config()
x = rng.normal(size=(16, 4)).astype("float32")
y = rng.normal(size=(16, 3)).astype("float32")

bnfreeze.freeze(model, ["bn", "drop"])
kernel, bias = arrays(model.get_layer("dense"))
gamma, beta, mean, var = arrays(bn)
reference = ((x @ kernel + bias) - mean) / np.sqrt(var + bn.epsilon) * gamma + beta
out = keras.ops.convert_to_numpy(model(x, training=True))
result = {
    "backend": keras.backend.backend(),
    "training_call_uses_moving_statistics": bool(np.allclose(out, reference, atol=1e-5)),
    "trainable": {layer.name: layer.trainable for layer in model.layers},
}
if keras.backend.backend() == "jax":
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = model.evaluate(x, y, batch_size=16, verbose=0)
    fit = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    result["fit_loss_equals_evaluate"] = bool(np.isclose(fit.history["loss"][0], before))
    result["bn_unchanged_by_fit"] = all(
        np.array_equal(a, b) for a, b in zip(arrays(bn), [gamma, beta, mean, var])
    )
    result["dense_trained_by_fit"] = not np.array_equal(arrays(model.get_layer("dense"))[0], kernel)

state = [arrays(layer) for layer in model.layers]
errors = {}
for name, call in [
    ("audit", lambda: bnfreeze.audit(model)),
    ("compare_phases", lambda: bnfreeze.compare_phases(model, x, y, loss="mse")),
    ("recalibrate", lambda: bnfreeze.recalibrate(model, x, verbose=0)),
]:
    try:
        call()
        errors[name] = None
    except Exception as error:
        errors[name] = [type(error).__name__, isinstance(error, bnfreeze.BackendError), str(error)]
result["errors"] = errors
result["unchanged_by_refused_calls"] = all(
    all(np.array_equal(a, b) for a, b in zip(arrays(layer), saved))
    for layer, saved in zip(model.layers, state)
)
bnfreeze.unfreeze(model)
result["unfreeze_restores_config"] = model.get_config() == config
print(json.dumps(result))
"""


def run_on(backend: str) -> dict[str, Any]:
    """SCRIPT's findings with KERAS_BACKEND=backend: in a fresh interpreter, or in this one
    when its Keras already runs on that backend (the session of that backend)."""
    if backend == backend_name():
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(SCRIPT, "<tests.test_backends.SCRIPT>", "exec"), {})
        found: dict[str, Any] = json.loads(output.getvalue().strip().splitlines()[-1])
    else:
        found = run_script(SCRIPT, backend)
    return found


def _needs(backend: str, *modules: str) -> Any:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"Keras's {backend} backend needs {', '.join(modules)}; this environment "
        f"lacks {', '.join(missing)} (the `backends(...)` nox sessions install them)",
    )


BACKENDS = [
    # keras 3.15's numpy backend imports jax (keras/src/backend/jax/core.py) and scipy.
    pytest.param("numpy", marks=_needs("numpy", "scipy", "jax"), id="numpy"),
    pytest.param("jax", marks=_needs("jax", "jax"), id="jax"),
    pytest.param("torch", marks=_needs("torch", "torch"), id="torch"),
]


@pytest.fixture(scope="module", params=BACKENDS)
def findings(request: Any) -> dict[str, Any]:
    return run_on(request.param)


@pytest.mark.subprocess
def test_freeze_pins_on_other_backends(findings):
    """On a non-TensorFlow backend, freeze pins BN to its moving statistics and Dropout
    off in a training call (the output equals the numpy inference formula), sets the
    trainable flags, and unfreeze restores the original config."""
    assert findings["backend"] in ("numpy", "jax", "torch")
    assert findings["training_call_uses_moving_statistics"] is True
    assert findings["trainable"] == {"dense": True, "bn": False, "drop": False}
    assert findings["unfreeze_restores_config"] is True


@pytest.mark.subprocess
def test_fit_on_jax_agrees_with_evaluate(findings):
    """On JAX, fit on a frozen BN reports evaluate's loss, leaves BN's variables as they
    were and trains the unfrozen Dense."""
    if findings["backend"] != "jax":
        pytest.skip(f"this test trains on JAX; not {findings['backend']!r}")
    assert findings["fit_loss_equals_evaluate"] is True
    assert findings["bn_unchanged_by_fit"] is True
    assert findings["dense_trained_by_fit"] is True


@pytest.mark.subprocess
@pytest.mark.parametrize("function", ["audit", "compare_phases", "recalibrate"])
def test_analysis_functions_run_on_other_backends(findings, function):
    """On JAX and numpy, audit, compare_phases and recalibrate run without error (their
    results are checked against TensorFlow's in tests/test_backend_*.py)."""
    assert findings["errors"][function] is None
