"""audit and compare_phases: what the audit says must match what Keras really does.

Every claim about ``fit`` is checked against one real ``fit`` step on the same model
(moving statistics snapshotted before/after; Dropout firing read from the reported loss
against an independent forward pass), on whichever flavour runs the suite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import (
    IS_TF_KERAS,
    KERAS_VERSION,
    backend_name,
    flavour_label,
    keras,
    to_numpy,
)
from bnfreeze._nodes import recorded_training
from tests import helpers as h
from tests.helpers import (
    BUILDERS,
    compile_sgd,
    data,
    inputs_for,
    set_far_statistics,
    snapshot,
    targets_for,
)

L = keras.layers
K315 = not IS_TF_KERAS and KERAS_VERSION < (3, 16, 0)
K316 = not IS_TF_KERAS and KERAS_VERSION >= (3, 16, 0)
#: A Dropout of rate 0.9 that fired cannot give the loss of one that did not.
RATE = 0.9


# --- the KERAS_FACTS cases ---------------------------------------------------------------


class Outer(keras.Model):
    """A subclassed outer model: ``self.base(x, training=False)`` then ``self.drop(hidden)``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base = h.base()
        self.drop = L.Dropout(RATE, name="drop")
        self.head = L.Dense(2, name="head")

    def call(self, inputs: Any, training: Any = None) -> Any:
        return self.head(self.drop(self.base(inputs, training=False)))


@dataclass
class Case:
    model: Any
    part: Any  # the part holding the BN: called as part(x, training=...)
    drop: Any
    head: Any
    bn_path: str
    recorded_false: bool  # the graph records training=False for the part


def _graph_case(kind: str = "sequential", *, training: bool | None) -> Case:
    """A base of ``kind`` called with ``training`` (None: no argument) in an outer graph."""
    guide = h.guide(h.base(kind), training=training, rate=RATE, name="case")
    return Case(guide.model, guide.base, guide.drop, guide.head, "base/bn", training is False)


def _flat_layers() -> tuple[Any, Any, Any, Any]:
    """Dense, BN, Dropout and head layers for a one-level graph built by the caller."""
    return (
        L.Dense(8, name="dense"),
        L.BatchNormalization(name="bn"),
        L.Dropout(RATE, name="drop"),
        L.Dense(2, name="head"),
    )


def case_bn_untrainable() -> Case:
    case = _graph_case(training=None)
    case.part.get_layer("bn").trainable = False
    return case


def case_model_frozen() -> Case:
    case = _graph_case(training=None)
    case.model.trainable = False
    return case


def case_guide_unfrozen() -> Case:
    case = _graph_case(training=False)
    case.part.trainable = False
    case.part.trainable = True  # the guide's fine-tuning step
    return case


def case_guide_frozen() -> Case:
    case = _graph_case(training=False)
    case.part.trainable = False
    return case


def case_subclassed_base() -> Case:
    return _graph_case("subclassed", training=False)


def case_subclassed_base_no_training() -> Case:
    return _graph_case("subclassed_no_training", training=False)


def case_subclassed_outer() -> Case:
    model = Outer(name="outer")
    model(np.zeros((2, 6), "float32"))
    return Case(model, model.base, model.drop, model.head, "base/bn", False)


def case_bn_training_false() -> Case:
    inputs = keras.Input((6,))
    dense, bn, drop, head = _flat_layers()
    model = keras.Model(inputs, head(drop(bn(dense(inputs), training=False))), name="case")
    part = keras.Sequential([dense, bn])
    return Case(model, part, drop, head, "bn", True)


def case_clone_call_function() -> Case:
    """clone_model(..., call_function=...) injecting training=False into the BN (Keras 3)."""
    inputs = keras.Input((6,))
    dense, bn, drop, head = _flat_layers()
    original = keras.Model(inputs, head(drop(bn(dense(inputs)))), name="case")

    def call_function(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer is bn:
            kwargs["training"] = False
        return layer(*args, **kwargs)

    model = keras.models.clone_model(
        original, clone_function=lambda layer: layer, call_function=call_function
    )
    return Case(model, keras.Sequential([dense, bn]), drop, head, "bn", True)


CASES = {
    "bn_untrainable": case_bn_untrainable,
    "model_frozen": case_model_frozen,
    "guide_unfrozen": case_guide_unfrozen,
    "guide_frozen": case_guide_frozen,
    "subclassed_base": case_subclassed_base,
    "subclassed_base_no_training": case_subclassed_base_no_training,
    "subclassed_outer": case_subclassed_outer,
    "bn_training_false": case_bn_training_false,
    **({} if IS_TF_KERAS else {"clone_call_function": case_clone_call_function}),
}


def _mse(y: np.ndarray, pred: Any) -> float:
    return float(np.mean((to_numpy(pred) - y) ** 2))


@dataclass
class Measured:
    bn_batch: bool  # moving statistics changed in the fit step
    dropout_fired: bool


def measure_fit(case: Case, x: np.ndarray, y: np.ndarray) -> Measured:
    """One real fit step (SGD with learning rate 0); restores the weights afterwards."""
    model = case.model
    bn = h.layer_at(model, case.bn_path)
    compile_sgd(model, lr=0.0)
    saved = snapshot(model)
    before = to_numpy(bn.moving_mean)
    loss = h.fit_step(model, x, y)
    batch = not np.allclose(before, to_numpy(bn.moving_mean))
    h.restore(model, saved)
    # Independent reference: the same layers called eagerly, BN in the measured phase,
    # Dropout off. A rate-0.9 Dropout that fired cannot give the same loss.
    reference = _mse(y, case.head(case.drop(case.part(x, training=batch), training=False)))
    h.restore(model, saved)
    fired = not np.isclose(loss, reference, rtol=1e-4, atol=1e-6)
    return Measured(batch, fired)


@pytest.mark.parametrize("name", list(CASES))
def test_audit_matches_one_real_fit_step(name: str) -> None:
    """For every KERAS_FACTS case, the audit's fit column is what one real fit step does."""
    case = CASES[name]()
    set_far_statistics(case.model)
    x, y = data((6,), 8), data((2,), 8, seed=1)
    report = bnfreeze.audit(case.model)
    measured = measure_fit(case, x, y)
    bn_row, drop_row = report.row(case.bn_path), report.row("drop")
    assert bn_row.fit.updates_state is measured.bn_batch
    assert bn_row.fit.phase == ("training" if measured.bn_batch else "inference")
    assert drop_row.fit.phase == ("training" if measured.dropout_fired else "inference")
    assert bn_row.evaluate.phase == bn_row.predict.phase == "inference"
    codes = {(f.code, f.path) for f in report.findings}
    # The recorded training=False is flagged exactly when fit does not honour it (tf-keras
    # drops it from the node of a base whose call has no training parameter: no record).
    holder = case.part if "/" in case.bn_path else h.layer_at(case.model, case.bn_path)
    recorded = any(v is False for _n, v in recorded_training(holder))
    assert recorded is (case.recorded_false and not (IS_TF_KERAS and "no_training" in name))
    ignored = recorded and measured.bn_batch
    part_path = case.bn_path.split("/", 1)[0]
    assert (("graph-training-ignored", part_path) in codes) is ignored, report
    # A Dropout after the part that does not fire although fit passes training=True leaked.
    assert (("training-leak", "drop") in codes) is (not measured.dropout_fired), report


# Known flavour facts (KERAS_FACTS table), asserted in addition to the measurement above.
FACTS = {
    # case: {flavour: (bn uses batch statistics under fit, head Dropout fires under fit)}
    "guide_unfrozen": {"k315": (True, True), "tfk": (False, True), "k316": (False, False)},
    "guide_frozen": {"k315": (False, True), "tfk": (False, True), "k316": (False, False)},
    "subclassed_outer": {"k315": (False, False), "tfk": (False, True), "k316": (False, False)},
    "bn_training_false": {"k315": (True, True), "tfk": (False, True), "k316": (False, False)},
    "clone_call_function": {"k315": (True, True), "k316": (False, False)},
}
FLAVOUR = "tfk" if IS_TF_KERAS else ("k316" if K316 else "k315")


@pytest.mark.parametrize("name", [name for name in FACTS if FLAVOUR in FACTS[name]])
def test_audit_reports_the_known_flavour_facts(name: str) -> None:
    """The audit reproduces the KERAS_FACTS table for this flavour."""
    case = CASES[name]()
    report = bnfreeze.audit(case.model)
    batch, fires = FACTS[name][FLAVOUR]
    assert (report.row(case.bn_path).fit.phase == "training") is batch
    assert (report.row("drop").fit.phase == "training") is fires


def test_hard_coded_training_true_in_evaluate_matches_real_evaluate() -> None:
    """BN/Dropout called with training=True: the evaluate column matches a real evaluate."""
    inputs = keras.Input((6,))
    dense, bn, drop, head = _flat_layers()
    hidden = drop(bn(dense(inputs), training=True), training=True)
    model = keras.Model(inputs, head(hidden))
    set_far_statistics(model)
    x, y = data((6,), 8), data((2,), 8, seed=1)
    report = bnfreeze.audit(model)
    compile_sgd(model, lr=0.0)
    saved = snapshot(model)
    loss = model.evaluate(x, y, batch_size=8, verbose=0)
    updated = not np.allclose(
        saved[next(k for k in saved if "moving_mean" in k)], to_numpy(bn.moving_mean)
    )
    h.restore(model, saved)
    reference = _mse(y, head(drop(bn(dense(x), training=updated), training=False)))
    h.restore(model, saved)
    fired = not np.isclose(loss, reference, rtol=1e-4, atol=1e-6)
    row = report.row("bn")
    assert row.evaluate.updates_state is updated
    assert row.evaluate.phase == ("training" if updated else "inference")
    assert report.row("drop").evaluate.phase == ("training" if fired else "inference")
    assert updated is (not K315)  # KERAS_FACTS: 3.15 ignores it; tf-keras/3.16 update


@pytest.mark.slow
def test_resnet50_guide_pattern_every_bn_matches_one_fit_step() -> None:
    """ResNet50 (53 BN) in the guide's pattern: every BN row matches one real fit step."""
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    base.trainable = False
    inputs = keras.Input((64, 64, 3))
    hidden = L.GlobalAveragePooling2D(name="pool")(base(inputs, training=False))
    model = keras.Model(inputs, L.Dense(2, name="head")(hidden))
    base.trainable = True
    report = bnfreeze.audit(model)
    bns = [r for r in report.rows if r.class_name == "BatchNormalization"]
    assert len(bns) == 53
    compile_sgd(model, lr=0.0)
    before = {r.path: to_numpy(r.layer.moving_mean) for r in bns}
    model.fit(data((64, 64, 3), 2), data((2,), 2), batch_size=2, verbose=0)
    changed = {r.path: not np.allclose(before[r.path], to_numpy(r.layer.moving_mean)) for r in bns}
    assert {r.path: r.fit.updates_state for r in bns} == changed
    assert set(changed.values()) == {K315}  # KERAS_FACTS: only 3.15 ignores training=False
    frozen = bnfreeze.audit(bnfreeze.freeze(model, "resnet50"))
    # freeze on a compiled model updates what fit uses (tf-keras's compile-time record too)
    assert [f.code for f in frozen.findings] == []


# --- findings ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*BUILDERS, "guide", "outer"])
def test_model_frozen_with_defaults_has_no_findings(kind: str) -> None:
    """bnfreeze.freeze(model) with default settings leaves nothing to report."""
    if kind == "guide":
        model = case_guide_unfrozen().model
    elif kind == "outer":
        model = case_subclassed_outer().model
    else:
        model = BUILDERS[kind]()
    report = bnfreeze.audit(bnfreeze.freeze(model))
    assert report.findings == []
    assert all(r.fit.phase == "inference" and not r.fit.updates_state for r in report.rows)
    assert all(not r.fit.trains_weights for r in report.rows)
    report.raise_for_findings()


def test_frozen_part_whose_bn_still_uses_batch_statistics() -> None:
    """A BN made trainable again inside a frozen base is flagged, and really adapts in fit."""
    case = _graph_case(training=None)
    case.part.trainable = False
    case.part.get_layer("bn").trainable = True
    report = bnfreeze.audit(case.model)
    finding = [f for f in report.findings if f.code == "frozen-bn-batch-statistics"]
    assert [(f.path, f.severity) for f in finding] == [("base/bn", "error")]
    assert finding[0].fix == (
        "bnfreeze.freeze(model, 'base') pins it to its moving statistics "
        "(bn_mode='inference'), or choose bn_mode='adapt' if the statistics should follow "
        "the new data on purpose."
    )
    assert report.row("base/bn").fit.phase == "training"
    after = bnfreeze.audit(bnfreeze.freeze(case.model, "base"))
    assert [f.code for f in after.findings] == (["pinned-signature-default"] if K315 else [])


def test_dropout_active_inside_a_frozen_part() -> None:
    """A Dropout inside a frozen nested model still fires under fit: flagged as a warning."""
    base = keras.Sequential(
        [keras.Input((6,)), L.Dense(8, name="dense"), L.Dropout(0.5, name="inner_drop")],
        name="base",
    )
    inputs = keras.Input((6,))
    model = keras.Model(inputs, L.Dense(2, name="head")(base(inputs)))
    base.trainable = False
    report = bnfreeze.audit(model)
    findings = [f for f in report.findings if f.code != "pinned-signature-default"]
    assert [(f.code, f.path, f.severity) for f in findings] == [
        ("active-in-frozen-part", "base/inner_drop", "warning")
    ]
    assert findings[0].message == (
        "Dropout 'base/inner_drop' is in the frozen part 'base' but still runs its training "
        "behaviour under fit (it fires, adds noise or augments)."
    )
    assert not bnfreeze.audit(bnfreeze.freeze(model, "base")).findings  # inner_drop pinned


def test_trainable_changed_since_compile_is_flagged_until_recompile() -> None:
    """Changing trainable after fit without compile() is reported, and fit indeed ignores
    it (on JAX, where Keras's trainer pairs the optimizer's variables by position, fit
    raises: the finding says so). PyTorch's train step reads the current flags: nothing
    to report, and the next fit leaves the frozen layer alone."""
    model = BUILDERS["functional"]()
    compile_sgd(model, lr=0.1)
    x, y = inputs_for(model), targets_for(model)
    model.fit(x, y, epochs=1, verbose=0)
    model.get_layer("dense").trainable = False
    report = bnfreeze.audit(model)
    finding = [f for f in report.findings if f.code == "trainable-changed-since-compile"]
    if backend_name() == "torch":
        assert finding == []
        kernel = to_numpy(model.get_layer("dense").kernel)
        model.fit(x, y, epochs=1, verbose=0)
        np.testing.assert_array_equal(to_numpy(model.get_layer("dense").kernel), kernel)
        return
    assert len(finding) == 1 and finding[0].path == ""
    assert report.row("bn").fit.trains_weights  # fit still trains what it was built with
    kernel = to_numpy(model.get_layer("dense").kernel)
    if backend_name() == "jax":
        assert "2 variable(s) now frozen (dense/" in finding[0].message
        assert "the next fit raises a ValueError" in finding[0].message
        compile_sgd(model, lr=0.1)  # compiling again clears it (and fit works again)
        assert not [
            f for f in bnfreeze.audit(model).findings if f.code == "trainable-changed-since-compile"
        ]
        model.fit(x, y, epochs=1, verbose=0)
        model.get_layer("bn").trainable = False
        with pytest.raises(ValueError, match="1:1 to the trainable variables"):
            model.fit(x, y, epochs=1, verbose=0)  # (and leaves the model's variables empty)
        return
    assert "2 variable(s) now frozen are still trained by fit" in finding[0].message
    model.fit(x, y, epochs=1, verbose=0)
    assert not np.allclose(kernel, to_numpy(model.get_layer("dense").kernel))  # trained
    compile_sgd(model, lr=0.1)
    assert not [
        f for f in bnfreeze.audit(model).findings if f.code == "trainable-changed-since-compile"
    ]


@pytest.mark.distributed
@pytest.mark.parametrize("synchronized", [False, True], ids=["plain", "synchronized"])
def test_bn_in_training_mode_under_two_replicas(synchronized: bool) -> None:
    """Non-synchronized BN in training mode under a 2-replica MirroredStrategy is flagged."""
    with h.mirrored().scope():
        inputs = keras.Input((6,))
        hidden = L.BatchNormalization(name="bn", synchronized=synchronized)(L.Dense(8)(inputs))
        model = keras.Model(inputs, L.Dense(2)(hidden))
        compile_sgd(model)
    report = bnfreeze.audit(model)
    codes = [(f.code, f.path) for f in report.findings]
    assert codes == ([] if synchronized else [("unsynchronized-bn-replicas", "bn")])
    assert report.row("bn").fit.phase == "training"


@pytest.mark.parametrize(
    ("kind", "severity"), [("functional", "error"), ("conv", "warning")], ids=["dense", "conv"]
)
def test_bn_fed_batches_of_one(kind: str, severity: str) -> None:
    """A BN in training mode with batch_size=1: error without spatial dims, else warning."""
    model = BUILDERS[kind]()
    report = bnfreeze.audit(model, batch_size=1)
    assert [(f.code, f.path, f.severity) for f in report.findings] == [
        ("bn-batch-size-one", "bn", severity)
    ]
    assert bnfreeze.audit(model, batch_size=2).findings == []


@pytest.mark.skipif(IS_TF_KERAS, reason="tf-keras records only what the user passes")
def test_recorded_signature_default_is_the_cross_version_hazard() -> None:
    """A node recording Dropout's default training=False: an info on 3.15, observed on 3.16."""
    from bnfreeze._nodes import recorded_training, set_recorded_training

    inputs = keras.Input((6,))
    drop = L.Dropout(0.9, name="drop")
    model = keras.Model(inputs, L.Dense(2, name="head")(drop(L.Dense(8)(inputs))))
    for node in drop._inbound_nodes[:1]:
        set_recorded_training(node, False)  # what a file written by keras 3.15 holds
    assert [v for _n, v in recorded_training(drop)] == [False]
    report = bnfreeze.audit(model)
    finding = [f for f in report.findings if f.code == "pinned-signature-default"]
    assert [(f.path, f.severity) for f in finding] == [("drop", "error") if K316 else ("", "info")]
    fires = report.row("drop").fit.phase == "training"
    assert fires is K315
    # A real fit step agrees: with lr=0 the loss equals the no-dropout loss iff it did not fire.
    x, y = data((6,), 8), data((2,), 8, seed=1)
    compile_sgd(model, lr=0.0)
    saved = snapshot(model)
    loss = model.fit(x, y, batch_size=8, verbose=0).history["loss"][0]
    h.restore(model, saved)
    assert (not np.isclose(loss, _mse(y, model(x, training=False)), rtol=1e-4)) is fires


def test_recorded_training_true_on_augmentation_matches_real_predict() -> None:
    """RandomFlip recording training=True (a keras 3.15 file): predict column is measured.

    keras 3.16 honours it and leaks it: the BatchNormalization after it runs in training
    mode in predict and updates its moving statistics; keras 3.15 ignores it.
    """
    from bnfreeze._nodes import set_recorded_training

    inputs = keras.Input((8, 8, 3))
    flip = L.RandomFlip("horizontal", name="flip")
    hidden = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(flip(inputs)))
    model = keras.Model(inputs, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(hidden)))
    set_recorded_training(flip._inbound_nodes[0], True)
    report = bnfreeze.audit(model)
    bn = model.get_layer("bn")
    before = to_numpy(bn.moving_mean)
    model.predict(data((8, 8, 3), 4) + 3.0, verbose=0)
    updated = not np.allclose(before, to_numpy(bn.moving_mean))
    assert report.row("bn").predict.updates_state is updated
    assert updated is (not IS_TF_KERAS and not K315)
    leak = [(f.code, f.path) for f in report.findings if f.code == "training-leak"]
    assert leak == ([("training-leak", "bn")] if updated else [])


def test_layers_whose_phase_changes_nothing_raise_no_findings() -> None:
    """An LSTM without dropout (rate 0) is a row, but no finding is about it."""
    inputs = keras.Input((4, 6))
    hidden = L.LSTM(3, return_sequences=True, name="plain")(inputs)
    hidden = L.LSTM(3, dropout=0.2, name="with_dropout")(hidden)
    report = bnfreeze.audit(keras.Model(inputs, hidden))
    assert {r.path for r in report.rows} == {"plain", "with_dropout"}
    messages = " ".join(f.message for f in report.findings)
    assert "plain" not in messages
    assert ("with_dropout (training=False)" in messages) is K315


# --- rows --------------------------------------------------------------------------------


class Noisy(keras.layers.Layer):
    """A custom layer whose call takes training."""

    def call(self, inputs: Any, training: Any = None) -> Any:
        return inputs + 1.0 if training else inputs


def test_rows_cover_builtin_and_custom_phase_dependent_layers() -> None:
    """Rows: BN, noise, dropout, RNN, attention, spectral norm, custom; none for Dense."""
    inputs = keras.Input((4, 6))
    hidden = L.GaussianNoise(0.1, name="noise")(inputs)
    hidden = L.LSTM(6, dropout=0.2, return_sequences=True, name="lstm")(hidden)
    hidden = L.MultiHeadAttention(2, 3, dropout=0.1, name="mha")(hidden, hidden)
    hidden = L.BatchNormalization(name="bn")(hidden)
    hidden = Noisy(name="custom")(hidden)
    hidden = L.Flatten()(hidden)
    hidden = L.SpectralNormalization(L.Dense(3), name="sn")(hidden)
    model = keras.Model(inputs, L.Dense(2, name="head")(hidden))
    report = bnfreeze.audit(model)
    assert {r.path for r in report.rows} == {"noise", "lstm", "mha", "bn", "custom", "sn"}
    assert all(r.fit.phase == "training" for r in report.rows)
    assert all(r.evaluate.phase == "inference" for r in report.rows)
    assert report.row("sn").fit.updates_state and not report.row("sn").evaluate.updates_state
    assert report.row("bn").bn_mode is None and report.row("custom").class_name == "Noisy"
    # The spectral norm's power-iteration vector really changes in one fit step.
    sn = report.row("sn").layer
    state = next(iter(sn.non_trainable_weights))
    before = to_numpy(state)
    compile_sgd(model, lr=0.0)
    model.fit(data((4, 6), 4), data((2,), 4), verbose=0)
    assert not np.allclose(before, to_numpy(state))


def test_audit_changes_nothing() -> None:
    """Variables, seeds, optimizer state and the compiled train function are untouched."""
    model = keras.Sequential(
        [keras.Input((6,)), L.Dense(8), L.BatchNormalization(), L.Dropout(0.5), L.Dense(2)]
    )
    compile_sgd(model)
    x, y = data((6,), 8), data((2,), 8)
    model.fit(x, y, verbose=0)
    train_function = model.train_function
    before = [to_numpy(v) for v in [*model.variables, *model.optimizer.variables]]
    bnfreeze.audit(model)
    after = [to_numpy(v) for v in [*model.variables, *model.optimizer.variables]]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert model.train_function is train_function
    assert "call" not in vars(model.layers[1])  # the wrappers are gone


# --- rendering and errors ----------------------------------------------------------------


#: The finding of ``audit(functional(), batch_size=1)``, identical on every flavour: its
#: message and fix, and its text wrapped to 100 columns (what ``str`` gives off a terminal).
BATCH_OF_ONE_MESSAGE = (
    "BatchNormalization 'bn' uses batch statistics under fit and is fed batches of size 1: "
    "each statistic is computed from a single value: the variance is 0 and the output is "
    "beta whatever the input; its moving statistics follow single examples."
)
BATCH_OF_ONE_FIX = (
    "Train with larger batches, or pin it to its moving statistics with "
    "bnfreeze.freeze(model, 'bn', bn_mode='affine')."
)
BATCH_OF_ONE = (
    "[error] bn-batch-size-one at 'bn': BatchNormalization 'bn' uses batch statistics under "
    "fit and is\n"
    "  fed batches of size 1: each statistic is computed from a single value: the variance "
    "is 0 and the\n"
    "  output is beta whatever the input; its moving statistics follow single examples.\n"
    "  fix: Train with larger batches, or pin it to its moving statistics with "
    "bnfreeze.freeze(model,\n"
    "    'bn', bn_mode='affine')."
)
LEGEND = (
    "(training/inference: behaviour shown; +stats: moving statistics updated; +weights: "
    "weights trained)"
)


@pytest.fixture
def columns_100(monkeypatch: Any) -> None:
    """Text renderings wrap to the terminal: make it 100 columns wide."""
    monkeypatch.setenv("COLUMNS", "100")


def test_report_renders_rows_and_findings_as_text_html_and_json(columns_100: None) -> None:
    """print(report) is the table then each finding; the HTML and to_dict hold the same."""
    report = bnfreeze.audit(h.functional(), batch_size=1)
    flavour = flavour_label()
    assert str(report) == "\n".join(
        [
            f"audit of model 'functional' ({flavour}): 1 phase-dependent layer, 1 error",
            "",
            "path  class               trainable  bn_mode  fit                       "
            "evaluate   predict",
            "bn    BatchNormalization  yes        -        training +stats +weights  "
            "inference  inference",
            LEGEND,
            "",
            "findings:",
            BATCH_OF_ONE,
        ]
    )
    html = report._repr_html_()
    assert html.startswith(
        f"<div><p>audit of model <code>functional</code> ({flavour}): 1 phase-dependent "
        "layer, 1 error</p><table>"
    )
    assert (
        "<tr><td>bn</td><td>BatchNormalization</td><td>yes</td><td>-</td><td>training +stats "
        "+weights</td><td>inference</td><td>inference</td></tr>"
    ) in html
    assert html.endswith(
        "<ul><li><b>error</b> <code>bn-batch-size-one</code> at <code>bn</code>: "
        "BatchNormalization &#x27;bn&#x27; uses batch statistics under fit and is fed batches "
        "of size 1: each statistic is computed from a single value: the variance is 0 and the "
        "output is beta whatever the input; its moving statistics follow single examples."
        "<br><i>fix:</i> Train with larger batches, or pin it to its moving statistics with "
        "bnfreeze.freeze(model, &#x27;bn&#x27;, bn_mode=&#x27;affine&#x27;).</li></ul></div>"
    )
    message, fix = BATCH_OF_ONE_MESSAGE, BATCH_OF_ONE_FIX
    phase = {"phase": "inference", "updates_state": False, "trains_weights": False}
    assert json.loads(json.dumps(report.to_dict())) == {
        "model": "functional",
        "flavour": flavour,
        "rows": [
            {
                "path": "bn",
                "layer": "bn",
                "class_name": "BatchNormalization",
                "trainable": True,
                "bn_mode": None,
                "fit": {
                    "phase": "training",
                    "updates_state": True,
                    "trains_weights": True,
                    "training": True,
                },
                "evaluate": {**phase, "training": False},
                "predict": {**phase, "training": False},
                "recorded_training": None,
                "locked": False,
            }
        ],
        "findings": [
            {
                "code": "bn-batch-size-one",
                "severity": "error",
                "path": "bn",
                "message": message,
                "fix": fix,
            }
        ],
        "locked": [],
    }


def test_report_without_findings_says_so(columns_100: None) -> None:
    """A report with no findings ends with 'no findings' in text and HTML and lists none."""
    report = bnfreeze.audit(bnfreeze.freeze(h.functional()))
    assert report.findings == [] and report.ok
    assert str(report).endswith(f"inference  inference  inference\n{LEGEND}\n\nno findings")
    assert report._repr_html_().endswith("</table><p>no findings</p></div>")
    assert report.to_dict()["findings"] == []


def test_raise_for_findings(columns_100: None) -> None:
    """raise_for_findings raises FindingsError listing the findings, and validates severity."""
    report = bnfreeze.audit(BUILDERS["functional"](), batch_size=1)
    with pytest.raises(bnfreeze.FindingsError) as info:
        report.raise_for_findings()
    assert str(info.value) == (
        f"The audit of model 'functional' ({flavour_label()}) has 1 finding(s):\n{BATCH_OF_ONE}"
    )
    warned = bnfreeze.audit(BUILDERS["conv"](), batch_size=1)
    assert [f.severity for f in warned.findings] == ["warning"]
    warned.raise_for_findings("error")  # warnings only: an errors-only check passes
    with pytest.raises(bnfreeze.FindingsError) as warning:
        warned.raise_for_findings()
    assert str(warning.value).startswith(
        f"The audit of model 'conv' ({flavour_label()}) has 1 finding(s):\n"
        "[warning] bn-batch-size-one at 'bn': "
    )
    with pytest.raises(bnfreeze.ArgumentError) as bad:
        report.raise_for_findings("fatal")  # type: ignore[arg-type]
    assert str(bad.value) == (
        "Expected `severity` to be one of ('error', 'warning', 'info'). Received: severity='fatal'."
    )


def test_errors_name_what_was_received() -> None:
    """Bad arguments raise with what was received and expected (not a model: test_errors)."""
    model = BUILDERS["functional"]()
    assert h.refused(bnfreeze.ArgumentError, bnfreeze.audit, model, batch_size=0) == (
        "Expected `batch_size` to be a positive int or None. Received: batch_size=0."
    )
    with pytest.raises(bnfreeze.SelectionError) as missing:
        bnfreeze.audit(model).row("nope")
    assert str(missing.value) == (
        "No phase-dependent layer at 'nope' in the audit of model 'functional'. "
        "Expected one of ['bn']."
    )
    x, y = inputs_for(model), targets_for(model)
    assert h.refused(bnfreeze.ModelError, bnfreeze.compare_phases, model, x, y) == (
        "compare_phases received targets `y` but model 'functional' is not compiled with a "
        "loss. Expected model.compile(loss=...) first, or pass loss= (e.g. loss='mse')."
    )


def test_row_with_a_name_several_rows_share_asks_for_the_path() -> None:
    """report.row(name) raises when two rows end in that name, listing both; full paths work."""
    first, second = h.base(name="first"), h.base(name="second")
    inputs = keras.Input((6,))
    model = keras.Model(inputs, L.Add(name="add")([first(inputs), second(inputs)]))
    report = bnfreeze.audit(model)
    with pytest.raises(bnfreeze.SelectionError) as info:
        report.row("bn")
    assert str(info.value) == (
        "Layer name 'bn' is ambiguous in this audit; it matches ['first/bn', 'second/bn']. "
        "Pass the full path."
    )
    assert report.row("first/bn").layer is first.get_layer("bn")
    assert report.row("second/bn").layer is second.get_layer("bn")


# --- compare_phases ----------------------------------------------------------------------


def _two_bn_model() -> Any:
    inputs = keras.Input((6,))
    hidden = L.BatchNormalization(name="bn_near")(L.Dense(8, name="dense")(inputs))
    hidden = L.Dropout(0.2, name="drop")(hidden)
    hidden = L.BatchNormalization(name="bn_far")(hidden)
    return keras.Model(inputs, L.Dense(2, name="head")(hidden), name="two_bn")


def test_compare_phases_ranks_the_bn_with_far_statistics_first_and_changes_nothing() -> None:
    """The BN whose statistics are far from its inputs ranks first; no state changes."""
    model = _two_bn_model()
    bn_far = model.get_layer("bn_far")
    bn_far.moving_mean.assign(np.full((8,), 4.0, "float32"))
    bn_far.moving_variance.assign(np.full((8,), 0.05, "float32"))
    compile_sgd(model)
    x, y = data((6,), 16), data((2,), 16, seed=1)
    before = [to_numpy(v) for v in [*model.variables, *model.optimizer.variables]]
    result = bnfreeze.compare_phases(model, x, y)
    after = [to_numpy(v) for v in [*model.variables, *model.optimizer.variables]]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert result.layers[0].path == "bn_far"
    assert {e.path for e in result.layers} == {"bn_near", "drop", "bn_far"}
    assert result.layers[0].divergence > 5 * result.layers[1].divergence
    assert result.divergence > 0
    assert json.loads(json.dumps(result.to_dict()))["layers"][0]["path"] == "bn_far"
    assert str(result).splitlines()[0].startswith("loss: fit (training) ")


def test_compare_phases_losses_equal_evaluate_and_one_lr0_fit_step() -> None:
    """result.loss equals what evaluate and one learning-rate-0 fit step report."""
    model = BUILDERS["functional"]()
    set_far_statistics(model)
    compile_sgd(model, lr=0.0)
    x, y = inputs_for(model), targets_for(model)
    result = bnfreeze.compare_phases(model, x, y)
    explicit = bnfreeze.compare_phases(model, x, y, loss="mse")
    assert result.loss is not None
    evaluated = model.evaluate(x, y, batch_size=len(x), verbose=0)
    fitted = model.fit(x, y, batch_size=len(x), verbose=0, shuffle=False).history["loss"][0]
    np.testing.assert_allclose(result.loss["inference"], evaluated, rtol=1e-5)
    np.testing.assert_allclose(result.loss["training"], fitted, rtol=1e-5)
    assert result.loss["training"] != pytest.approx(result.loss["inference"], rel=0.1)
    assert explicit.loss == pytest.approx(result.loss, rel=1e-5)


def test_compare_phases_on_a_frozen_model_shows_no_divergence() -> None:
    """After bnfreeze.freeze, fit and evaluate agree: divergence 0, equal losses."""
    model = bnfreeze.freeze(BUILDERS["functional"]())
    set_far_statistics(model)
    compile_sgd(model)
    result = bnfreeze.compare_phases(model, inputs_for(model), targets_for(model))
    assert result.divergence == 0.0
    assert result.loss is not None and result.loss["training"] == result.loss["inference"]
    assert [e.divergence for e in result.layers] == [0.0]
