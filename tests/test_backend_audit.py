"""audit on every backend: Keras 3's symbolic pass (JAX, PyTorch) reports exactly what the
TensorFlow graph trace reports on the same models.

On the TensorFlow backend both tracers run in this process; on JAX and PyTorch the same
models are audited in a fresh ``KERAS_BACKEND=tensorflow`` interpreter (TensorFlow is
installed there) and compared with this backend's audit. That each audit matches what a
real ``fit`` step does is ``tests/test_audit.py``'s job (it runs on every backend).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pytest

import bnfreeze
from bnfreeze._audit import build_report
from bnfreeze._compat import IS_TF_KERAS, backend_name, keras
from tests import helpers as h
from tests import trained
from tests.helpers_backend import run_script

pytestmark = pytest.mark.skipif(IS_TF_KERAS, reason="tf-keras has no symbolic pass")

L = keras.layers


class Noisy(keras.layers.Layer):
    """A custom layer whose call takes training and counts its training calls (state)."""

    def build(self, input_shape: Any) -> None:
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, name="n")

    def call(self, inputs: Any, training: Any = None) -> Any:
        if training:
            self.calls.assign(self.calls + 1.0)
            return inputs + 1.0
        return inputs


def _many_kinds() -> Any:
    inputs = keras.Input((4, 6))
    hidden = L.GaussianNoise(0.1, name="noise")(inputs)
    hidden = L.LSTM(6, dropout=0.2, return_sequences=True, name="lstm")(hidden)
    hidden = L.MultiHeadAttention(2, 3, dropout=0.1, name="mha")(hidden, hidden)
    hidden = L.BatchNormalization(name="bn")(hidden)
    hidden = L.BatchNormalization(renorm=True, name="renorm")(hidden)
    hidden = Noisy(name="custom")(hidden)
    hidden = L.Flatten()(hidden)
    hidden = L.SpectralNormalization(L.Dense(3), name="sn")(hidden)
    return keras.Model(inputs, L.Dense(2, name="head")(hidden))


def _models() -> dict[str, Any]:
    """Name -> builder: the audit test cases, the helper models (plain and frozen in each
    mode), a trained CNN and a model with every kind of phase-dependent layer."""
    from tests.test_audit import CASES

    found: dict[str, Any] = {f"case-{k}": (lambda f=f: f().model) for k, f in CASES.items()}
    for kind, build in h.BUILDERS.items():
        found[kind] = build
        for mode in bnfreeze.BN_MODES:
            found[f"{kind}-{mode}"] = lambda b=build, m=mode: bnfreeze.freeze(b(), bn_mode=m)
    found["trained-cnn"] = trained.image_model
    found["trained-cnn-base-frozen"] = lambda: bnfreeze.freeze(trained.image_model(), "bn1")
    found["many-kinds"] = _many_kinds
    return found


def summary(report: Any) -> dict[str, Any]:
    """Everything an audit says, as plain data (the flavour label left out)."""
    rows = [
        {
            "path": r.path,
            "class": r.class_name,
            "trainable": r.trainable,
            "bn_mode": r.bn_mode,
            "fit": asdict(r.fit),
            "evaluate": asdict(r.evaluate),
            "predict": asdict(r.predict),
            "recorded": r.recorded_training,
        }
        for r in report.rows
    ]
    findings = [[f.code, f.path, f.severity, f.message] for f in report.findings]
    return {"rows": rows, "findings": findings}


def audit_all(symbolic: bool | None = None) -> dict[str, Any]:
    """The summary of every model's audit (symbolic: force the tracer, None: default)."""
    out = {}
    for name, build in _models().items():
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        out[name] = summary(build_report(build(), symbolic=symbolic))
    return out


def _tensorflow_audits() -> dict[str, Any]:
    """``audit_all()`` in a fresh interpreter on Keras's TensorFlow backend."""
    script = (
        "import json\nfrom tests.test_backend_audit import audit_all\n"
        "print(json.dumps(audit_all()))"
    )
    found: dict[str, Any] = run_script(script, "tensorflow", timeout=900)
    return found


def test_symbolic_audit_equals_the_tensorflow_graph_audit():
    """Every model's audit (rows, behaviours, findings and their messages) from this
    backend's tracer equals the TensorFlow graph trace's audit of the same model."""
    if backend_name() == "tensorflow":
        reference, here = audit_all(symbolic=False), audit_all(symbolic=True)
    else:
        reference, here = _tensorflow_audits(), json.loads(json.dumps(audit_all()))
    assert list(here) == list(reference)
    for name in reference:
        assert here[name] == reference[name], name


def test_symbolic_audit_sees_state_writes_and_changes_nothing():
    """The symbolic pass sees the writes of BN, renorm BN, spectral norm and a custom layer
    under fit and none under evaluate, and leaves every variable as it was."""
    model = _many_kinds()
    before = h.model_state(model)
    report = build_report(model, symbolic=True)
    h.assert_unchanged(model, before)
    updates = {r.path: (r.fit.updates_state, r.evaluate.updates_state) for r in report.rows}
    assert updates == {
        "noise": (False, False),
        "lstm": (False, False),
        "mha": (False, False),
        "bn": (True, False),
        "renorm": (True, False),
        "custom": (True, False),
        "sn": (True, False),
    }
