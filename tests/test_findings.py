"""The finding registry: one source for codes, severities, meanings and fixes.

The findings table in ``docs/audit.md`` must say exactly what ``FINDING_CODES`` says,
and every registered code must have its rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import keras
from bnfreeze._findings import FINDING_CODES, RULES
from bnfreeze._report import SEVERITIES
from tests.helpers import compile_sgd, data, snapshot

L = keras.layers

DOCS = Path(__file__).resolve().parent.parent / "docs" / "audit.md"


def registry_table() -> list[str]:
    """The Markdown table the docs must hold, one line per registered code."""
    lines = [
        "| code | severity | what was observed | usual fix |",
        "|---|---|---|---|",
    ]
    for code, entry in FINDING_CODES.items():
        lines.append(f"| `{code}` | {entry.severity} | {entry.meaning} | {entry.fix} |")
    return lines


def docs_table() -> list[str]:
    """The findings table as written in docs/audit.md (the table under '## Findings')."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("\n## Findings\n", 1)[1]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| code |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:end]


def test_docs_findings_table_is_the_registry() -> None:
    """docs/audit.md lists every code with the registry's severity, meaning and fix."""
    assert docs_table() == registry_table()


def test_every_code_has_one_rule_and_a_known_severity() -> None:
    """Each registered code has a rule function and a severity from SEVERITIES."""
    assert set(RULES) == set(FINDING_CODES)
    assert len(set(RULES.values())) == len(FINDING_CODES)
    assert all(entry.severity in SEVERITIES for entry in FINDING_CODES.values())


# --- severities that match the risk ------------------------------------------------------


def _sequential_dropout() -> Any:
    return keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, name="dense"),
            L.BatchNormalization(name="bn"),
            L.Dropout(0.5, name="drop"),
            L.Dense(2, name="head"),
        ],
        name="seq_dropout",
    )


def _augmented_cnn() -> Any:
    inputs = keras.Input((8, 8, 3))
    h = L.RandomFlip("horizontal", name="flip")(inputs)
    h = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(h))
    h = L.Dropout(0.3, name="drop")(L.GlobalAveragePooling2D(name="pool")(h))
    return keras.Model(inputs, L.Dense(2, name="head")(h), name="augmented")


def _guide_with_head_dropout() -> Any:
    base = keras.Sequential(
        [keras.Input((6,)), L.Dense(8, name="dense"), L.BatchNormalization(name="bn")],
        name="base",
    )
    inputs = keras.Input((6,))
    h = L.Dropout(0.5, name="head_drop")(base(inputs, training=False))
    return keras.Model(inputs, L.Dense(2, name="head")(h), name="guide")


def _recurrent() -> Any:
    inputs = keras.Input((4, 6))
    h = L.LSTM(5, dropout=0.2, name="lstm")(inputs)
    h = L.GaussianNoise(0.1, name="noise")(L.BatchNormalization(name="bn")(h))
    return keras.Model(inputs, L.Dense(2, name="head")(h), name="recurrent")


FROZEN = {
    "sequential-dropout": (_sequential_dropout, None),
    "augmented-cnn": (_augmented_cnn, None),
    "guide-whole-model": (_guide_with_head_dropout, None),
    "guide-base-only": (_guide_with_head_dropout, "base"),
    "recurrent": (_recurrent, None),
}


@pytest.mark.parametrize("saved", [False, True], ids=["in-memory", "saved-and-loaded"])
@pytest.mark.parametrize("name", list(FROZEN))
def test_a_correctly_frozen_model_is_ok(name: str, saved: bool, tmp_path: Any) -> None:
    """freeze (whole model or base), compile, and optionally save/load: no warning or error."""
    build, layers = FROZEN[name]
    model = bnfreeze.freeze(build(), layers)
    model.compile(optimizer="sgd", loss="mse")
    if saved:
        model.save(str(tmp_path / "frozen.keras"))
        model = keras.models.load_model(str(tmp_path / "frozen.keras"))
    report = bnfreeze.audit(model)
    assert [(f.code, f.severity) for f in report.findings if f.severity != "info"] == []
    assert report.ok
    report.raise_for_findings()
    report.raise_for_findings("warning")


def _fires_in_fit(model: Any, x: np.ndarray, y: np.ndarray) -> bool:
    """One real fit step at learning rate 0: its loss differs from the no-dropout loss."""
    compile_sgd(model, lr=0.0)
    before = snapshot(model)
    loss = model.fit(x, y, batch_size=len(x), verbose=0, shuffle=False).history["loss"][0]
    for i, v in enumerate(model.weights):
        v.assign(before[f"{i}:{v.name}"])
    reference = float(np.mean((np.asarray(model(x, training=False)) - y) ** 2))
    return not np.isclose(loss, reference, rtol=1e-4, atol=1e-6)


def test_keep_dropout_is_not_reported_as_active_in_the_frozen_part() -> None:
    """keep_dropout=True: the Dropout fires in fit on purpose and no warning says otherwise;
    a Dropout in a part frozen by trainable=False alone is still reported."""
    x, y = data((6,), 32), data((2,), 32, seed=1)
    kept = bnfreeze.freeze(_sequential_dropout(), keep_dropout=True)
    report = bnfreeze.audit(kept)
    assert report.row("drop").fit.phase == "training"
    assert "active-in-frozen-part" not in [f.code for f in report.findings]
    assert report.ok
    assert _fires_in_fit(kept, x, y)
    plain = _sequential_dropout()
    plain.trainable = False
    warned = [f for f in bnfreeze.audit(plain).findings if f.code == "active-in-frozen-part"]
    assert [(f.path, f.severity) for f in warned] == [("drop", "warning")]
