"""The command line, run as users run it: the installed `bnfreeze` console script in a
subprocess, with its stdout and stderr compared exactly; usage errors, unreadable input
(file descriptors captured) and the audit's output through `main` in-process, with one
console-script run per path through the process (TensorFlow's start-up logging, exit
status). The demo's pieces are tested in test_demo.py."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import zipfile
from typing import Any

import numpy as np
import pytest

import bnfreeze
import bnfreeze._compat
from bnfreeze._cli import _wants_verbose, main
from bnfreeze._compat import HONOURS_GRAPH_TRAINING, flavour_label, keras

ROWS = (
    "guide pattern, base frozen (first stage)",
    "guide pattern, base unfrozen (as users write it)",
    "after bnfreeze.freeze(base)",
    "after bnfreeze.freeze(base), then base.trainable = True",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(os.path.dirname(sys.executable), "bnfreeze")


def _env(**changes: str | None) -> dict[str, str]:
    """This flavour's environment with this checkout first on the path and, unless a test
    sets it, no TF_CPP_MIN_LOG_LEVEL (the test suite sets one; users mostly do not)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cli(
    *args: str, timeout: float = 300, **env: str | None
) -> subprocess.CompletedProcess[str]:
    """The installed `bnfreeze` console script (as `pip install .` makes it), run on this
    checkout with this flavour's interpreter."""
    assert os.path.exists(SCRIPT), f"no console script at {SCRIPT}: install the package"
    return subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, env=_env(**env), timeout=timeout
    )


def _normalised(stderr: str) -> list[str]:
    """TensorFlow's log lines without their timestamp and thread id."""
    return [re.sub(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ", r"\1 ", line) for line in stderr.splitlines()]


@pytest.fixture(scope="module")
def tensorflow_start_up_logging() -> list[str]:
    """What importing bnfreeze (and TensorFlow) prints on stderr outside the command, with
    no TF_CPP_MIN_LOG_LEVEL set: the reference for what the command keeps back."""
    result = subprocess.run(
        [sys.executable, "-c", "import bnfreeze"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        check=True,
    )
    return _normalised(result.stderr)


# --- general ------------------------------------------------------------------------


def test_version_names_package_and_flavour(tmp_path):
    """`bnfreeze --version` prints bnfreeze's version and the Keras flavour it runs on
    (the version the imported Keras reports), exit 0, and nothing on stderr, without
    importing Keras; `python -m bnfreeze` is the same command."""
    expected = f"bnfreeze {bnfreeze.__version__} ({flavour_label()})\n"
    assert keras.__version__ in expected
    result = run_cli("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, expected, "")
    # Answered from the installed distributions' metadata: no Keras, no TensorFlow.
    assert not _modules_imported_by(tmp_path, "--version") & HEAVY
    module = subprocess.run(
        [sys.executable, "-m", "bnfreeze", "--version"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert (module.returncode, module.stdout, module.stderr) == (0, expected, "")


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
        (
            ("demo", "--seed", "x"),
            "UsageError: argument --seed: invalid int value: 'x'. See `bnfreeze demo --help`.",
        ),
    ],
    ids=["no-command", "unknown-option", "unknown-command", "audit-without-path", "bad-seed"],
)
def test_usage_errors_are_one_line_exit_2(capsys, args, expected):
    """Bad usage (in-process `main`): SystemExit(2) and exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == expected + "\n"


#: Runs the console script as its own process would, then writes the top-level packages
#: that process imported to the file named by argv[1] (also after SystemExit).
_LIST_IMPORTS = """
import json, runpy, sys
out, sys.argv = sys.argv[1], sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(out, "w") as file:
        json.dump(sorted({name.split(".")[0] for name in sys.modules}), file)
"""


def _modules_imported(
    tmp_path: Any, *args: str
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the console script with ``args`` in a fresh interpreter; return its result and
    the top-level packages the process had imported when it exited."""
    listing = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", _LIST_IMPORTS, str(listing), SCRIPT, *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    return result, set(json.loads(listing.read_text()))


#: What the command must not import to answer from its arguments and files alone.
HEAVY = {"keras", "tensorflow", "tf_keras", "jax", "torch"}


def _modules_imported_by(tmp_path: Any, *args: str) -> set[str]:
    """The top-level packages the console script with ``args`` had imported at its exit."""
    listing = tmp_path / "modules.json"
    listing.unlink(missing_ok=True)
    return _modules_imported(tmp_path, *args)[1]


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (("--help",), 0),
        (("audit", "--help"), 0),
        (("frobnicate",), 2),
        (("audit",), 2),
        (("fold", "in.keras"), 2),
    ],
    ids=["help", "audit-help", "unknown-command", "audit-without-path", "fold-without-out"],
)
def test_help_and_usage_errors_answer_before_keras_is_imported(tmp_path, args, status):
    """`bnfreeze --help` and usage errors are answered from the arguments alone: the
    process imports neither Keras nor TensorFlow (so it answers at once), prints the
    same help or one-line error as in-process `main`, and exits 0 or 2."""
    result, packages = _modules_imported(tmp_path, *args)
    assert result.returncode == status, result.stderr[-2000:]
    assert not packages & HEAVY, sorted(packages)
    assert "bnfreeze" in packages
    if status == 0:
        assert result.stdout.startswith(f"usage: bnfreeze {' '.join(args[:-1])}".rstrip())
    else:
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("UsageError: "), result.stderr


def test_audit_all_help_says_what_it_changes(capsys):
    """`bnfreeze audit --help` says that --all gives one row per layer and that rows are
    grouped without it (not the other way round)."""
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--all one table row per layer (by default, layers that behave alike share a row)" in text
    )


# --- stderr holds only our own messages --------------------------------------------------


def _garbage(tmp_path: Any, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(b"this is not a model\n" * 10)
    return str(path)


def _empty(tmp_path: Any, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(b"")
    return str(path)


def _truncated(tmp_path: Any, name: str) -> str:
    whole = tmp_path / f"whole_{name}"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(str(whole))
    data = whole.read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _zip_without_config(tmp_path: Any, name: str) -> str:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    return str(path)


CORRUPT = (
    "CorruptFileError: '{path}' is corrupt: it is neither a zip archive (the .keras format) "
    "nor an HDF5 file (the .h5 format), so it is truncated, damaged or not a model file. "
    "Expected a .keras or .h5 model file written by model.save()."
)
EMPTY = (
    "CorruptFileError: '{path}' is empty (0 bytes), so it holds no model. Expected a .keras "
    "or .h5 model file written by model.save()."
)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda p: str(p / "missing.keras"),
            "FileNotFoundError: No such file: '{path}'. Expected a .keras or .h5 model file.",
        ),
        (
            lambda p: str(p),
            "IsADirectoryError: '{path}' is a directory. Expected a .keras or .h5 model file "
            "(to audit a SavedModel directory, load it in Python and call bnfreeze.audit).",
        ),
        (
            lambda p: _garbage(p, "notes.txt"),
            "ValueError: Cannot read '{path}': expected a file whose name ends in .keras or "
            ".h5 (or .hdf5).",
        ),
        (lambda p: _empty(p, "empty.keras"), EMPTY),
        (lambda p: _empty(p, "empty.h5"), EMPTY),
        (lambda p: _garbage(p, "garbage.keras"), CORRUPT),
        (lambda p: _garbage(p, "garbage.h5"), CORRUPT),
        (lambda p: _truncated(p, "truncated.keras"), CORRUPT),
        (
            lambda p: _zip_without_config(p, "archive.keras"),
            "CorruptFileError: '{path}' is corrupt: it is a zip archive, as a .keras file is, "
            "but without the config.json every .keras file holds. Expected a .keras or .h5 "
            "model file written by model.save().",
        ),
    ],
    ids=[
        "missing",
        "directory",
        "wrong-suffix",
        "empty-keras",
        "empty-h5",
        "garbage-keras",
        "garbage-h5",
        "truncated-keras",
        "zip-without-config",
    ],
)
def test_unreadable_input_is_one_line_on_a_quiet_stderr(tmp_path, capfd, make, expected):
    """`bnfreeze audit` (in-process `main`) on input it cannot read: exit 2, nothing on
    stdout, and file descriptor 2 receives exactly one line `ErrorName: message`; a
    corrupt or empty file is called corrupt, not "File not found" as Keras says. That
    the command's own process adds nothing to it (TensorFlow's start-up logging kept
    back) is checked on one such file by the next test."""
    path = make(tmp_path)
    capfd.readouterr()
    status = main(["audit", path])
    captured = capfd.readouterr()
    assert (status, captured.out) == (2, "")
    assert captured.err == expected.format(path=path) + "\n"


def test_unreadable_input_from_the_command_is_one_line(tmp_path):
    """The console script, as users run it, on a truncated .keras file: exit 2, nothing on
    stdout, and stderr is exactly the one line, at once (no Keras imported)."""
    path = _truncated(tmp_path, "truncated.keras")
    result = run_cli("audit", path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == CORRUPT.format(path=path) + "\n"
    # Answered before Keras is imported, as every file refused without loading it.
    assert not _modules_imported_by(tmp_path, "audit", path) & HEAVY


def test_a_model_that_fails_to_load_is_one_line(tmp_path, capfd):
    """A file whose format is right but whose content Keras refuses (in-process `main`,
    file descriptors captured): one line naming the path and Keras's reason."""
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{not json")
    capfd.readouterr()
    status = main(["audit", str(path)])
    result = capfd.readouterr()
    assert (status, result.out) == (2, "")
    assert result.err.count("\n") == 1 and result.err.endswith("\n")
    name, _, message = result.err.rstrip("\n").partition(": ")
    assert name.isidentifier() and name[0].isupper(), result.err
    assert message.startswith(f"Cannot load '{path}' as a Keras model: "), result.err


def _refused_by_keras(tmp_path: Any, capfd: Any) -> tuple[str, str]:
    """A .keras file that passes the command's own checks and that Keras refuses to load
    (so the command imports TensorFlow), and the one line in-process `main` prints."""
    path = tmp_path / "refused.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{not json")
    capfd.readouterr()
    assert main(["audit", str(path)]) == 2
    line = capfd.readouterr().err.rstrip("\n")
    assert f": Cannot load '{path}' as a Keras model: " in line, line
    return str(path), line


@pytest.mark.subprocess
@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_lets_tensorflow_logging_through(
    tmp_path, capfd, where, tensorflow_start_up_logging
):
    """With -v/--verbose (before or after the command) stderr holds TensorFlow's start-up
    logging, as importing bnfreeze elsewhere prints it, then the command's own line. (The
    process reads the flag from its arguments before argparse does: each spelling in each
    place is read the same, checked in-process; each place runs once as a command.)"""
    path, line = _refused_by_keras(tmp_path, capfd)
    for flag in ("-v", "--verbose"):
        for arrangement in ((flag, "audit", path), ("audit", flag, path)):
            assert _wants_verbose(arrangement), arrangement
    assert not _wants_verbose(("audit", path)) and not _wants_verbose(("audit", "--", "-v"))
    args = ("-v", "audit", path) if where == "before" else ("audit", "--verbose", path)
    result = run_cli(*args)
    assert result.returncode == 2
    assert _normalised(result.stderr) == [*tensorflow_start_up_logging, line], args


@pytest.mark.subprocess
@pytest.mark.parametrize("level", ["0", "3"])
def test_a_log_level_set_by_the_user_wins(tmp_path, capfd, level, tensorflow_start_up_logging):
    """TF_CPP_MIN_LOG_LEVEL set by the user decides what of TensorFlow's start-up logging
    shows: everything at 0, nothing (no fatal line) at 3."""
    path, line = _refused_by_keras(tmp_path, capfd)
    result = run_cli("audit", path, TF_CPP_MIN_LOG_LEVEL=level)
    assert result.returncode == 2
    expected = [line]
    if level == "0":  # importing bnfreeze elsewhere at that level: TensorFlow's default,
        expected = [*tensorflow_start_up_logging, line]  # the fixture's (no level set)
    assert _normalised(result.stderr) == expected


# --- demo ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_json() -> dict[str, Any]:
    """`bnfreeze demo --quick --json`: exit 0, nothing on stderr, one JSON document."""
    result = run_cli("demo", "--quick", "--json")
    assert (result.returncode, result.stderr) == (0, "")
    return json.loads(result.stdout)


@pytest.mark.subprocess
def test_demo_json_rows_are_the_four_cases(demo_json):
    """`demo --quick --json` is one JSON document with the four cases, in order, and
    what the demo trained."""
    assert demo_json["flavour"] == flavour_label()
    assert demo_json["seed"] == 0
    assert [row["case"] for row in demo_json["rows"]] == list(ROWS)
    assert demo_json["batch_norm_layers"] == 5
    assert demo_json["training_steps"] == 120
    assert demo_json["seconds"] > 0


@pytest.mark.subprocess
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


@pytest.mark.subprocess
def test_demo_json_shows_the_bug_and_the_fix(demo_json):
    """On keras 3.15 the guide pattern uses batch statistics in fit once the base is
    unfrozen (keras-team/keras#20285) and fit's loss is higher than evaluate's; after
    bnfreeze.freeze fit and evaluate agree."""
    rows = {row["case"]: row for row in demo_json["rows"]}
    assert rows[ROWS[0]]["match"] is True
    unfrozen = rows[ROWS[1]]
    if HONOURS_GRAPH_TRAINING:
        assert unfrozen["match"] is True
        assert unfrozen["bn_statistics_in_fit"] == "moving"
    else:
        assert unfrozen["match"] is False
        assert unfrozen["bn_statistics_in_fit"] == "batch"
        assert unfrozen["fit_loss"] > unfrozen["evaluate_loss"] + 1e-3
    for case in ROWS[2:]:
        assert rows[case]["match"] is True
        assert rows[case]["bn_statistics_in_fit"] == "moving"


@pytest.mark.subprocess
def test_demo_json_audits_agree_with_the_rows(demo_json):
    """The demo's audits, complete in --json: a finding before freeze wherever fit used
    batch statistics, none after freeze, one row per BatchNormalization layer."""
    before, after = demo_json["audit_before"], demo_json["audit_after"]
    if demo_json["rows"][1]["bn_statistics_in_fit"] == "batch":
        assert before["findings"]
    assert after["findings"] == []
    assert len(before["rows"]) == len(after["rows"]) == demo_json["batch_norm_layers"]
    assert {row["fit"]["phase"] for row in after["rows"]} == {"inference"}


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


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("kind", ["bn", "frozen", "plain"])
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


@pytest.mark.subprocess
def test_audit_subprocess_json_and_a_quiet_stderr(tmp_path):
    """`bnfreeze audit PATH --json` prints what `bnfreeze.audit` reports for the same file
    loaded in-process, with nothing on stderr; on keras 3.15 the guide pattern with an
    unfrozen base has findings (its training=False is ignored by fit,
    keras-team/keras#20285)."""
    path = _save(_bn_model(), tmp_path / "guide.keras")
    result = run_cli("audit", path, "--json")
    report = _library_report(path)
    assert result.stderr == ""
    assert json.loads(result.stdout) == json.loads(json.dumps(report.to_dict(), default=str))
    if not HONOURS_GRAPH_TRAINING:
        assert report.findings


def test_fold_into_a_missing_directory_fails_before_loading(tmp_path):
    """`bnfreeze fold IN missing/dir/out.keras`: exit 2 with one line about OUT before IN
    is even read (a corrupt IN would otherwise be the error), and nothing is written."""
    garbage = _garbage(tmp_path, "garbage.keras")
    output = str(tmp_path / "missing" / "dir" / "out.keras")
    result = run_cli("fold", garbage, output)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"FileNotFoundError: Cannot write '{output}': there is no directory "
        f"'{os.path.dirname(output)}'. Expected OUT in an existing directory: create it "
        "first, or choose another path.\n"
    )
    assert not (tmp_path / "missing").exists()
    assert not _modules_imported_by(tmp_path, "fold", garbage, output) & HEAVY


@pytest.mark.subprocess
def test_audit_compile_keeps_keras_warnings_off_stderr(tmp_path):
    """`bnfreeze audit --compile` on a model saved with its optimizer state: Keras's
    UserWarning about the optimizer's variables stays off stderr (only -v shows it), and
    the output is the same audit."""
    model = _bn_model()
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0)  # Adam has slot variables now
    bnfreeze.freeze(model.get_layer("base"))
    path = _save(model, tmp_path / "compiled.keras")
    quiet = run_cli("audit", "--compile", "--fail-on", "never", path)
    assert (quiet.returncode, quiet.stderr) == (0, "")
    loud = run_cli("audit", "--compile", "--fail-on", "never", "-v", path)
    assert loud.stdout == quiet.stdout
    if not bnfreeze._compat.IS_TF_KERAS:
        assert "UserWarning" in loud.stderr
