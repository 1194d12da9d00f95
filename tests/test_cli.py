"""The command line: ``python -m bnfreeze`` run in a subprocess with this flavour's python.

The demo's pieces (generated images, BN calibration, head training, the fit/evaluate
measurement) are also checked in-process against independent references: numpy moments
of each BN's inputs, Keras's own ``evaluate``, and the moving statistics themselves.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze import _demo
from bnfreeze._cli import main
from bnfreeze._compat import HONOURS_GRAPH_TRAINING, flavour_label, keras
from tests.helpers import snapshot, to_numpy

ROWS = (
    "guide pattern, base frozen (first stage)",
    "guide pattern, base unfrozen (as users write it)",
    "after bnfreeze.freeze(base)",
    "after bnfreeze.freeze(base), then base.trainable = True",
)
HAS_AUDIT = hasattr(bnfreeze, "audit")
needs_audit = pytest.mark.skipif(not HAS_AUDIT, reason="bnfreeze.audit is not written yet")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m bnfreeze *args`` with the flavour's interpreter and environment."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return subprocess.run(
        [sys.executable, "-m", "bnfreeze", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def error_line(stderr: str) -> str:
    """The CLI's own error line (TensorFlow may log to stderr at import, before it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


# --- general ------------------------------------------------------------------------


def test_version_names_package_and_flavour():
    """`--version` prints bnfreeze's version and the Keras flavour it runs on, exit 0."""
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"bnfreeze {bnfreeze.__version__} ({flavour_label()})"
    assert keras.__version__ in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "UsageError: the following arguments are required: COMMAND. See `bnfreeze --help`."),
        (
            ("demo", "--bogus"),
            "UsageError: unrecognized arguments: --bogus. See `bnfreeze --help`.",
        ),
        (
            ("frobnicate",),
            "UsageError: argument COMMAND: invalid choice: 'frobnicate' "
            "(choose from 'demo', 'audit', 'fold'). See `bnfreeze --help`.",
        ),
        (
            ("audit",),
            "UsageError: the following arguments are required: PATH. See `bnfreeze audit --help`.",
        ),
    ],
    ids=["no-command", "unknown-option", "unknown-command", "audit-without-path"],
)
def test_usage_errors_are_one_line_exit_2(capsys, args, expected):
    """Bad usage (in-process `main`): SystemExit(2) and exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == expected + "\n"


# --- demo ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_json() -> dict[str, Any]:
    result = run_cli("demo", "--quick", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_demo_json_rows_are_the_four_cases(demo_json):
    """`demo --quick --json` is one JSON document with the four cases, in order."""
    assert demo_json["flavour"] == flavour_label()
    assert [row["case"] for row in demo_json["rows"]] == list(ROWS)
    assert demo_json["batch_norm_layers"] == 5
    assert demo_json["seconds"] > 0


def test_demo_json_losses_are_consistent(demo_json):
    """Every row starts from the same weights, so evaluate (moving statistics) reports
    the same loss in every row; `match` says exactly whether fit's loss equals it; the
    head was trained to an evaluate loss of at most 0.30."""
    rows = demo_json["rows"]
    evaluate = [row["evaluate_loss"] for row in rows]
    assert max(evaluate) - min(evaluate) <= 1e-6 * max(1.0, evaluate[0])
    assert 0.0 < evaluate[0] <= 0.30 + 1e-5
    for row in rows:
        same = math.isclose(row["fit_loss"], row["evaluate_loss"], rel_tol=1e-4, abs_tol=1e-6)
        assert row["match"] is same, row
        # fit and evaluate differ only through BN: a mismatch means batch statistics.
        assert row["bn_statistics_in_fit"] == ("moving" if same else "batch"), row


def test_demo_json_shows_the_bug_and_the_fix(demo_json):
    """On keras 3.15 the guide pattern uses batch statistics in fit once the base is
    unfrozen (keras-team/keras#20285); after bnfreeze.freeze fit and evaluate agree."""
    rows = {row["case"]: row for row in demo_json["rows"]}
    assert rows[ROWS[0]]["match"] is True
    unfrozen = rows[ROWS[1]]
    if HONOURS_GRAPH_TRAINING:
        assert unfrozen["match"] is True
        assert unfrozen["bn_statistics_in_fit"] == "moving"
    else:
        assert unfrozen["match"] is False
        assert unfrozen["bn_statistics_in_fit"] == "batch"
        assert abs(unfrozen["fit_loss"] - unfrozen["evaluate_loss"]) > 1e-3
    for case in ROWS[2:]:
        assert rows[case]["match"] is True
        assert rows[case]["bn_statistics_in_fit"] == "moving"


def test_demo_json_audit_present_iff_audit_exists(demo_json):
    """The demo shows the audit before and after freeze exactly when bnfreeze.audit exists."""
    assert (demo_json["audit_before"] is not None) is HAS_AUDIT
    assert (demo_json["audit_after"] is not None) is HAS_AUDIT
    if HAS_AUDIT:
        # The audit agrees with the measured losses: a finding before freeze wherever
        # fit used batch statistics, none after freeze (the model recompiled).
        unfrozen = demo_json["rows"][1]
        if unfrozen["bn_statistics_in_fit"] == "batch":
            assert demo_json["audit_before"]["findings"]
        assert demo_json["audit_after"]["findings"] == []
        assert len(demo_json["audit_after"]["rows"]) == demo_json["batch_norm_layers"]


def test_demo_human_table(capsys, demo_json):
    """Without --json the demo (in-process `main`) prints a table: a header and one line
    per case with the same numbers as the subprocess's --json (the run is seeded)."""
    assert main(["demo", "--quick"]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert lines[header].split() == [
        "case",
        "fit",
        "loss",
        "evaluate",
        "loss",
        "match?",
        "BN",
        "in",
        "fit",
    ]
    table = lines[header + 2 : header + 2 + len(ROWS)]
    for line, row in zip(table, demo_json["rows"], strict=True):
        assert line.startswith(row["case"])
        fields = line[len(row["case"]) :].split()
        assert fields == [
            f"{row['fit_loss']:.4f}",
            f"{row['evaluate_loss']:.4f}",
            "yes" if row["match"] else "NO",
            row["bn_statistics_in_fit"],
        ]
    assert "- after bnfreeze.freeze, fit and evaluate report the same loss." in lines
    mismatched = [row for row in demo_json["rows"] if not row["match"]]
    assert sum(line.startswith("- guide pattern") for line in lines) == len(mismatched)
    assert ("keras-team/keras#20285" in stdout) is (not HONOURS_GRAPH_TRAINING)
    assert "\x1b[" not in stdout  # no colour codes


# --- the demo's pieces, in-process ----------------------------------------------------


def test_smooth_images_are_smooth_and_in_range():
    """Generated images lie in [0, 255] and neighbouring pixels differ far less than
    random pixels do."""
    images = _demo.smooth_images(4, 32, seed=0)
    assert images.shape == (4, 32, 32, 3)
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 255.0
    neighbours = np.abs(np.diff(images, axis=1)).mean()
    shuffled = np.random.default_rng(0).permutation(images.reshape(-1))
    assert neighbours < 0.2 * np.abs(np.diff(shuffled)).mean()


def test_calibration_sets_moments_of_each_bn_input():
    """After calibration every BN's moving mean/variance equal the numpy moments of that
    BN's inputs on the images (computed by a sub-model in inference mode), and the
    layers are left as they were (momentum, no per-instance `call`)."""
    base = _demo.mini_base(16)
    images = _demo.preprocess(_demo.smooth_images(8, 16, seed=3))
    count = _demo.calibrate_batch_norm(base, images)
    bns = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert count == len(bns) == 5
    for bn in bns:
        assert bn.momentum == 0.99
        assert "call" not in vars(bn)
        probe = keras.Model(base.input, bn.input)
        inputs = to_numpy(probe(images, training=False)).astype("float64")
        mean = inputs.mean(axis=(0, 1, 2))
        var = inputs.var(axis=(0, 1, 2))
        np.testing.assert_allclose(to_numpy(bn.moving_mean), mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(to_numpy(bn.moving_variance), var, rtol=1e-4, atol=1e-5)


def test_train_head_reaches_target_by_evaluate():
    """The head trained on one image reaches the target loss as Keras's evaluate sees it,
    and the base's variables are untouched."""
    base = _demo.mini_base(16)
    images = _demo.preprocess(_demo.smooth_images(8, 16, seed=3))
    _demo.calibrate_batch_norm(base, images)
    model = _demo.guide_model(base, classes=5)
    x, y = images[:1], np.array([2])
    before = snapshot(base)
    steps = _demo.train_head(model, base, x, y, target=0.5)
    assert steps > 0
    model.compile(loss="sparse_categorical_crossentropy")
    loss = float(np.asarray(model.evaluate(x, y, verbose=0)).reshape(-1)[0])
    assert loss <= 0.5 + 1e-4
    after = snapshot(base)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_measure_tells_batch_from_moving_statistics():
    """`measure` reports batch statistics (and a loss mismatch) for a model whose BN is
    trainable and called with training=True by fit, and moving statistics once the BN
    is frozen natively (`trainable=False`)."""
    base = _demo.mini_base(16)
    images = _demo.preprocess(_demo.smooth_images(8, 16, seed=3))
    _demo.calibrate_batch_norm(base, images)
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.GlobalAveragePooling2D(name="pool")(base(inputs))
    model = keras.Model(inputs, keras.layers.Dense(5, activation="softmax", name="head")(h))
    x, y = images[:1], np.array([1])
    _demo.train_head(model, base, x, y, target=0.3)
    saved = [(v, to_numpy(v).copy()) for v in model.weights]
    trained = _demo.measure("trainable", model, base, x, y)
    assert trained.bn_statistics_in_fit == "batch"
    assert trained.match is False
    for variable, value in saved:
        variable.assign(value)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    frozen = _demo.measure("frozen", model, base, x, y)
    assert frozen.bn_statistics_in_fit == "moving"
    assert frozen.match is True
    assert frozen.evaluate_loss == pytest.approx(trained.evaluate_loss, rel=1e-6)


# --- audit --------------------------------------------------------------------------


def _bn_model() -> Any:
    """A tiny guide-pattern model: a nested base with BN called with training=False."""
    i = keras.Input((4,))
    base = keras.Model(
        i,
        keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(3, name="d")(i)),
        name="base",
    )
    inputs = keras.Input((4,))
    h = base(inputs, training=False)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h), name="guide")
    model.compile(optimizer="sgd", loss="mse")
    return model


def _plain_model() -> Any:
    """No layer whose behaviour depends on the learning phase."""
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="d"), keras.layers.Dense(2, name="o")]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _save(model: Any, path: Any) -> str:
    model.save(str(path))
    return str(path)


def _library_report(path: str) -> Any:
    return bnfreeze.audit(keras.models.load_model(path, compile=False))


@needs_audit
def test_audit_subprocess_findings_exit_1_and_json(tmp_path):
    """`python -m bnfreeze audit PATH --json` prints what `bnfreeze.audit` reports for the
    same file loaded in-process, and exits 1 exactly when there are findings; on keras
    3.15 the guide pattern with an unfrozen base has findings (its training=False is
    ignored by fit, keras-team/keras#20285)."""
    path = _save(_bn_model(), tmp_path / "guide.keras")
    result = run_cli("audit", path, "--json")
    report = _library_report(path)
    assert result.returncode == (1 if report.findings else 0), result.stderr
    assert json.loads(result.stdout) == json.loads(json.dumps(report.to_dict(), default=str))
    if not HONOURS_GRAPH_TRAINING:
        assert result.returncode == 1


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("kind", ["bn", "frozen", "plain"])
@needs_audit
def test_audit_json_equals_library_report(tmp_path, capsys, kind, suffix):
    """`audit PATH --json` (in-process `main`) prints the library's report for the file,
    with exit status 1 exactly when it has findings; a model without phase-dependent
    layers has none, and on keras 3.15 freezing the base removes the finding."""
    model = _plain_model() if kind == "plain" else _bn_model()
    if kind == "frozen":
        bnfreeze.freeze(model.get_layer("base"))
    path = _save(model, tmp_path / f"model{suffix}")
    status = main(["audit", path, "--json"])
    captured = capsys.readouterr()
    report = _library_report(path)
    assert status == (1 if report.findings else 0), captured.err
    assert json.loads(captured.out) == json.loads(json.dumps(report.to_dict(), default=str))
    if kind == "plain" or (kind == "frozen" and not HONOURS_GRAPH_TRAINING):
        assert status == 0
    if kind == "bn" and not HONOURS_GRAPH_TRAINING:
        assert status == 1


@needs_audit
def test_audit_human_output_is_the_report(tmp_path, capsys):
    """Without --json the CLI prints `str(report)`: the table and the findings."""
    path = _save(_bn_model(), tmp_path / "model.keras")
    status = main(["audit", path])
    out = capsys.readouterr().out
    report = _library_report(path)
    assert out.rstrip("\n") == str(report).rstrip("\n")
    assert status == (1 if report.findings else 0)
    for finding in report.findings:
        assert str(finding) in out


def _garbage(tmp_path: Any, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(b"this is not a model\n" * 10)
    return str(path)


def test_audit_subprocess_unreadable_exit_2(tmp_path):
    """`python -m bnfreeze audit` on a file that is not a model: exit 2, nothing on
    stdout, no traceback, and a last stderr line `ErrorName: Cannot load '<path>' ...`."""
    path = _garbage(tmp_path, "broken.keras")
    result = run_cli("audit", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    name, _, message = error_line(result.stderr).partition(": ")
    assert name.isidentifier() and name[0].isupper()
    assert message.startswith(f"Cannot load '{path}' as a Keras model: ")


@pytest.mark.parametrize(
    ("make", "expected_prefix"),
    [
        (
            lambda p: str(p / "missing.keras"),
            "FileNotFoundError: No such file: '{path}'. Expected a .keras or .h5 model file.",
        ),
        (
            lambda p: str(p),
            "IsADirectoryError: '{path}' is a directory. Expected a .keras or .h5 model file",
        ),
        (
            lambda p: _garbage(p, "notes.txt"),
            "ValueError: Cannot read '{path}': expected a file whose name ends in .keras or .h5",
        ),
        (lambda p: _garbage(p, "broken.keras"), "Cannot load '{path}' as a Keras model: "),
        (lambda p: _garbage(p, "broken.h5"), "Cannot load '{path}' as a Keras model: "),
    ],
    ids=["missing", "directory", "wrong-suffix", "garbage-keras", "garbage-h5"],
)
def test_audit_unreadable_input_exit_2_one_line(tmp_path, capsys, make, expected_prefix):
    """Unreadable input (in-process `main`): status 2, nothing on stdout, exactly one line
    `ErrorName: message` naming the path on stderr."""
    path = make(tmp_path)
    status = main(["audit", path])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    line = captured.err.rstrip("\n")
    name, _, message = line.partition(": ")
    assert name.isidentifier() and name[0].isupper(), line
    expected = expected_prefix.format(path=path)
    if expected.startswith("Cannot load"):
        assert message.startswith(expected), line
        assert len(message) > len(expected)  # the loader's reason follows
    else:
        assert line.startswith(expected), line
