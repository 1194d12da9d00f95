"""`bnfreeze audit`: grouped and full tables, complete JSON, wrapped findings, and an exit
status that follows `--fail-on` exactly as `raise_for_findings(severity=...)` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

import bnfreeze
from bnfreeze._cli import main
from bnfreeze._compat import IS_TF_KERAS, KERAS_VERSION, keras
from tests.test_report import blocks_model

L = keras.layers
K315 = not IS_TF_KERAS and KERAS_VERSION < (3, 16, 0)
LEVELS = ("error", "warning", "info")


def _batch_of_one_dense() -> Any:
    """A BN fed batches of one with nothing to average over: an error."""
    inputs = keras.Input((6,), batch_size=1)
    h = L.BatchNormalization(name="bn")(L.Dense(4, name="dense")(inputs))
    return keras.Model(inputs, h, name="dense_batch_one")


def _batch_of_one_conv() -> Any:
    """A BN fed batches of one with 36 values per channel: a warning."""
    inputs = keras.Input((8, 8, 3), batch_size=1)
    h = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inputs))
    return keras.Model(inputs, L.GlobalAveragePooling2D(name="pool")(h), name="conv_batch_one")


def _base_frozen_head_dropout() -> Any:
    """freeze(model, "base") with a Dropout in the head: keras 3.15 records its default
    training=False when saving, which only keras 3.16+ would honour: info there, nothing
    elsewhere."""
    base = keras.Sequential(
        [keras.Input((6,)), L.Dense(8, name="dense"), L.BatchNormalization(name="bn")],
        name="base",
    )
    inputs = keras.Input((6,))
    h = L.Dropout(0.5, name="head_drop")(base(inputs, training=False))
    model = keras.Model(inputs, L.Dense(2, name="head")(h), name="guide")
    return bnfreeze.freeze(model, "base")


def _frozen() -> Any:
    """A whole model frozen by bnfreeze.freeze: nothing to report."""
    model = keras.Sequential(
        [keras.Input((6,)), L.Dense(8), L.BatchNormalization(), L.Dropout(0.5), L.Dense(2)],
        name="frozen",
    )
    return bnfreeze.freeze(model)


# model -> the worst severity its audit must report on this flavour (None: no finding)
MODELS: dict[str, tuple[Callable[[], Any], str | None]] = {
    "error": (_batch_of_one_dense, "error"),
    "warning": (_batch_of_one_conv, "warning"),
    "info-on-keras-3.15": (_base_frozen_head_dropout, "info" if K315 else None),
    "clean": (_frozen, None),
}


def _saved(model: Any, tmp_path: Any) -> str:
    path = str(tmp_path / f"{model.name}.keras")
    model.save(path)
    return path


@pytest.mark.parametrize("name", list(MODELS))
def test_fail_on_and_raise_for_findings_agree(name: str, tmp_path: Any, capsys: Any) -> None:
    """For every level, exit status 1 exactly when raise_for_findings(level) raises, and
    exactly when the model has a finding of that severity or worse; never: always 0."""
    build, worst = MODELS[name]
    path = _saved(build(), tmp_path)
    report = bnfreeze.audit(keras.models.load_model(path, compile=False))
    assert (max((LEVELS[::-1].index(f.severity) for f in report.findings), default=None)) == (
        None if worst is None else LEVELS[::-1].index(worst)
    )
    for level in LEVELS:
        expected = worst is not None and LEVELS.index(worst) <= LEVELS.index(level)
        try:
            report.raise_for_findings(level)  # type: ignore[arg-type]
            raised = False
        except bnfreeze.FindingsError:
            raised = True
        status = main(["audit", path, "--fail-on", level])
        assert (raised, status) == (expected, 1 if expected else 0), level
    assert main(["audit", path, "--fail-on", "never"]) == 0
    assert main(["audit", path]) == main(["audit", path, "--fail-on", "error"])
    capsys.readouterr()


def test_table_groups_by_default_and_all_shows_every_row(tmp_path: Any, capsys: Any) -> None:
    """Default output is str(report) (grouped); --all is to_text(group=False); --json is
    to_dict with every row."""
    path = _saved(blocks_model(), tmp_path)
    report = bnfreeze.audit(keras.models.load_model(path, compile=False))
    assert main(["audit", path]) == 0
    grouped = capsys.readouterr().out
    assert main(["audit", path, "--all"]) == 0
    full = capsys.readouterr().out
    assert main(["audit", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert grouped == str(report) + "\n"
    assert full == report.to_text(group=False) + "\n"
    assert len(grouped.splitlines()) < len(full.splitlines())
    every = [f"base/bn{i}" for i in range(5)] + ["head_drop"]
    assert all(f"\n{path}  " in full for path in every)
    assert [row["path"] for row in data["rows"]] == every


def test_findings_wrap_to_the_terminal_width(tmp_path: Any, capsys: Any, monkeypatch: Any) -> None:
    """With COLUMNS=64 every line after 'findings:' fits in 64 columns."""
    path = _saved(_batch_of_one_dense(), tmp_path)
    monkeypatch.setenv("COLUMNS", "64")
    assert main(["audit", path]) == 1
    findings = capsys.readouterr().out.split("\nfindings:\n", 1)[1]
    assert max(len(line) for line in findings.splitlines()) <= 64
    assert len(findings.splitlines()) > 4


@pytest.mark.subprocess
def test_command_wraps_at_100_columns_without_a_terminal(tmp_path: Any) -> None:
    """`python -m bnfreeze audit` with its output piped: findings wrap at 100 columns."""
    path = _saved(_batch_of_one_dense(), tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "bnfreeze", "audit", path, "--fail-on", "never"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    findings = result.stdout.split("\nfindings:\n", 1)[1].splitlines()
    assert 80 < max(len(line) for line in findings) <= 100


def test_unknown_fail_on_is_a_usage_error(capsys: Any) -> None:
    """--fail-on fatal: exit 2 and one UsageError line naming the choices."""
    assert main_exit(["audit", "model.keras", "--fail-on", "fatal"]) == 2
    assert capsys.readouterr().err == (
        "UsageError: argument --fail-on: invalid choice: 'fatal' (choose from 'error', "
        "'warning', 'info', 'never'). See `bnfreeze audit --help`.\n"
    )


def main_exit(argv: list[str]) -> int:
    """The status of ``main(argv)``, also when argparse exits."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
