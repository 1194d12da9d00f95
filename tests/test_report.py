"""The report's renderings: rows that behave alike grouped, every row on request, findings
wrapped to the terminal, and severities that `ok` and `raise_for_findings` read alike."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from typing import Any

import pytest

import bnfreeze
from bnfreeze._compat import keras
from tests.helpers import functional

L = keras.layers
TIMES = "\u00d7"  # the multiplication sign of a grouped row, "4 \u00d7 base/*"


def blocks_model() -> Any:
    """A base of five Dense -> BN blocks (``base/bn2`` frozen on its own) and a head Dropout."""
    base_in = keras.Input((6,))
    h = base_in
    for i in range(5):
        h = L.BatchNormalization(name=f"bn{i}")(L.Dense(6, name=f"dense{i}")(h))
    base = keras.Model(base_in, h, name="base")
    base.get_layer("bn2").trainable = False
    inputs = keras.Input((6,))
    outputs = L.Dense(2, name="head")(L.Dropout(0.5, name="head_drop")(base(inputs)))
    return keras.Model(inputs, outputs, name="blocks")


def path_cells(text: str) -> list[str]:
    """The path column of the table in a text report (the lines between header and legend)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("path "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("(training/"))
    return [re.split(r"\s{2,}", line)[0] for line in lines[start + 1 : end]]


def test_text_groups_rows_that_behave_alike_and_lists_the_one_that_differs() -> None:
    """Four alike BN under base/ are one line; the frozen bn2 and the head keep their rows."""
    report = bnfreeze.audit(blocks_model())
    text = str(report)
    assert path_cells(text) == [f"4 {TIMES} base/*", "base/bn2", "head_drop"]
    assert (
        f"(4 {TIMES} base/*: 4 BatchNormalization layers under base/ that behave alike; "
        "report.to_text(group=False) or `bnfreeze audit --all` shows every row)"
    ) in text.replace("\n ", " ")
    assert text == report.to_text(group=True)


def test_group_false_and_to_dict_show_every_row() -> None:
    """to_text(group=False), to_html(group=False) and to_dict have one entry per layer."""
    report = bnfreeze.audit(blocks_model())
    expected = [f"base/bn{i}" for i in range(5)] + ["head_drop"]
    assert path_cells(report.to_text(group=False)) == expected
    assert [row["path"] for row in json.loads(json.dumps(report.to_dict()))["rows"]] == expected
    assert report.to_html(group=False).count("<tr><td>") == 6


def test_html_groups_with_the_paths_behind_a_details_element() -> None:
    """The grouped HTML row names every path it stands for, and the notebook shows it."""
    report = bnfreeze.audit(blocks_model())
    html = report._repr_html_()
    assert html == report.to_html()
    assert html.count("<tr><td>") == 3
    assert (
        f"<details><summary>4 {TIMES} base/*</summary><code>base/bn0</code><br>"
        "<code>base/bn1</code><br><code>base/bn3</code><br><code>base/bn4</code></details>"
    ) in html


def test_rows_at_the_top_of_the_model_group_and_pairs_stay_rows() -> None:
    """Three alike BN in the model itself group as one line; two alike Dropouts stay rows."""
    inputs = keras.Input((6,))
    h = inputs
    for i in range(3):
        h = L.BatchNormalization(name=f"bn{i}")(L.Dense(6, name=f"dense{i}")(h))
    h = L.Dropout(0.2, name="drop_a")(h)
    h = L.Dropout(0.2, name="drop_b")(h)
    report = bnfreeze.audit(keras.Model(inputs, h, name="flat"))
    assert path_cells(str(report)) == [f"3 {TIMES} *", "drop_a", "drop_b"]
    assert f"(3 {TIMES} *: 3 BatchNormalization layers in the model that behave alike;" in str(
        report
    )


def _finding_lines(text: str) -> list[str]:
    return text.split("\nfindings:\n", 1)[1].splitlines()


def test_findings_wrap_to_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """With COLUMNS=60 no finding line is longer than 60; the words are the finding's own."""
    monkeypatch.setenv("COLUMNS", "60")
    report = bnfreeze.audit(functional(), batch_size=1)
    (finding,) = report.findings
    lines = _finding_lines(str(report))
    assert all(len(line) <= 60 for line in lines), lines
    fix_at = next(i for i, line in enumerate(lines) if line.startswith("  fix: "))
    head = " ".join(line.strip() for line in lines[:fix_at])
    fix = " ".join(line.strip() for line in lines[fix_at:])
    assert head == f"[error] bn-batch-size-one at 'bn': {finding.message}"
    assert fix == f"fix: {finding.fix}"
    assert all(line.startswith("  ") for line in lines[1:])
    assert str(finding) == "\n".join(lines)


def test_findings_wrap_to_100_columns_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without COLUMNS and without a terminal, finding lines wrap at 100 columns."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(sys, "__stdout__", io.StringIO())
    report = bnfreeze.audit(functional(), batch_size=1)
    lines = _finding_lines(str(report))
    assert max(len(line) for line in lines) <= 100 < len(str(report.findings[0]).replace("\n", " "))
    assert max(len(line) for line in lines) > 80


# --- severities ----------------------------------------------------------------------------


def _report(*severities: str) -> Any:
    findings = [
        bnfreeze.Finding("bn-batch-size-one", s, f"layer{i}", f"message {i}", f"fix {i}")  # type: ignore[arg-type]
        for i, s in enumerate(severities)
    ]
    return bnfreeze.AuditReport("m", "keras", [], findings)


@pytest.mark.parametrize(
    ("severities", "ok", "raises_at"),
    [
        ((), True, set()),
        (("info",), True, {"info"}),
        (("warning", "info"), False, {"info", "warning"}),
        (("error",), False, {"info", "warning", "error"}),
    ],
    ids=["none", "info", "warning", "error"],
)
def test_ok_ignores_info_and_raise_for_findings_fails_at_the_severity_or_worse(
    severities: tuple[str, ...], ok: bool, raises_at: set[str]
) -> None:
    """ok is False only for warnings and errors; raise_for_findings(s) fails on s or worse."""
    report = _report(*severities)
    assert report.ok is ok
    raised = set()
    for level in ("error", "warning", "info"):
        try:
            report.raise_for_findings(level)
        except bnfreeze.FindingsError:
            raised.add(level)
    assert raised == raises_at
    with pytest.raises(bnfreeze.FindingsError) if not ok else contextlib.nullcontext():
        report.raise_for_findings()  # the default is "warning", what ok checks


def test_the_counts_line_names_each_severity() -> None:
    """The first line counts findings by severity, 'no findings' when there are none."""
    assert _report("error", "info", "info").to_text().splitlines()[0] == (
        "audit of model 'm' (keras): 0 phase-dependent layers, 1 error, 2 info"
    )
    assert _report().to_text().splitlines()[0] == (
        "audit of model 'm' (keras): 0 phase-dependent layers, no findings"
    )


def test_unknown_severity_is_refused_naming_the_three() -> None:
    """raise_for_findings('fatal') raises ArgumentError listing error, warning and info."""
    with pytest.raises(bnfreeze.ArgumentError) as info:
        _report().raise_for_findings("fatal")  # type: ignore[arg-type]
    assert str(info.value) == (
        "Expected `severity` to be one of ('error', 'warning', 'info'). Received: severity='fatal'."
    )
