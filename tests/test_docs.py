"""The human mode tables say what ``bnfreeze._modes.MODES`` says.

``MODES`` is the one definition of the modes (and test_freeze checks that each mode behaves
as its entry says); the tables people read are parsed here and compared with it.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

import bnfreeze
import bnfreeze._modes
from bnfreeze._modes import MODES

ROOT = Path(__file__).resolve().parent.parent

#: What a mode promises in the words of the tables: (statistics used by fit, moving
#: statistics updated by fit, gamma/beta).
Promise = tuple[str, str, str]


def _promised_by_modes() -> dict[str, Promise]:
    return {
        name: (
            "batch" if spec.batch_statistics else "moving",
            "yes" if spec.batch_statistics else "no",
            "trained" if spec.trains_affine else "frozen",
        )
        for name, spec in MODES.items()
    }


def _section(text: str, heading: str) -> str:
    """The lines under the markdown heading ``heading``, up to the next heading of any level."""
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start:end])


def _table(text: str) -> list[list[str]]:
    """The one markdown table in ``text``: its header and body rows, cells stripped."""
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert cells, "no table found"
    assert all(set(c) <= set("-: ") for c in cells[1]), "the second row is not a separator"
    return [cells[0], *cells[2:]]


def _mode_name(cell: str) -> str:
    """'``"inference"`` (default)' -> 'inference'."""
    found = re.fullmatch(r'`+"(\w+)"`+(?: \(default\))?', cell)
    assert found, f"not a mode cell: {cell!r}"
    return found.group(1)


def _default_marked(table: list[list[str]]) -> list[str]:
    return [_mode_name(c) for row in table[1:] for c in row if c.endswith("(default)")]


def _freeze_default() -> str:
    return str(inspect.signature(bnfreeze.freeze).parameters["bn_mode"].default)


def _by_column(table: list[list[str]]) -> dict[str, Promise]:
    """A table with one row per mode and the columns of ``_modes``'s table."""
    header = [c.replace("`", "") for c in table[0]]
    columns = [
        header.index(title)
        for title in (
            "statistics used by fit",
            "moving statistics updated by fit",
            "gamma/beta",
        )
    ]
    assert header[0] == "bn_mode"
    return {
        _mode_name(row[0]): (row[columns[0]], row[columns[1]], row[columns[2]]) for row in table[1:]
    }


def test_the_modes_module_table_is_modes() -> None:
    """The table in the docstring of bnfreeze._modes lists every mode as MODES defines it."""
    text = bnfreeze._modes.__doc__ or ""
    assert _by_column(_table(text)) == _promised_by_modes()


def test_the_guide_table_is_modes() -> None:
    """docs/guide-freezing.md's 'Choosing a bn_mode' table lists every mode as MODES does."""
    text = (ROOT / "docs" / "guide-freezing.md").read_text(encoding="utf-8")
    table = _table(_section(text, "## Choosing a `bn_mode`"))
    assert _by_column(table) == _promised_by_modes()
    assert table[0][-1] == "when" and all(row[-1] for row in table[1:])


def test_the_docs_index_table_is_modes() -> None:
    """docs/index.md's mode table lists every mode as MODES does, and marks freeze's default."""
    text = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    table = _table(_section(text, "## What bnfreeze does"))
    assert _by_column(table) == _promised_by_modes()
    assert _default_marked(table) == [_freeze_default()]


def test_the_readme_two_by_two_table_is_modes() -> None:
    """README.md's 2x2 table (statistics x gamma/beta) places every mode where MODES does."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = _table(_section(text, "## The modes"))
    gamma_beta = []
    for title in table[0][1:]:
        found = re.fullmatch(r"gamma/beta (frozen|trained)", title)
        assert found, f"not a gamma/beta column: {title!r}"
        gamma_beta.append(found.group(1))
    placed: dict[str, Promise] = {}
    for row in table[1:]:
        found = re.fullmatch(
            r"\*\*(moving|batch) statistics\*\* in `fit`, (never updated|moving ones updated)",
            row[0],
        )
        assert found, f"not a statistics row: {row[0]!r}"
        statistics, updated = found.group(1), "no" if found.group(2) == "never updated" else "yes"
        for affine, cell in zip(gamma_beta, row[1:], strict=True):
            placed[_mode_name(cell)] = (statistics, updated, affine)
    assert placed == _promised_by_modes()
    assert _default_marked(table) == [_freeze_default()]


def test_the_api_reference_table_is_modes() -> None:
    """docs/api.md's Modes table lists every mode as MODES does, and marks freeze's default."""
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    table = _table(_section(text, "### Modes"))
    assert _by_column(table) == _promised_by_modes()
    assert _default_marked(table) == [_freeze_default()]


def test_errors_are_named_where_users_import_them() -> None:
    """Every public error class says `bnfreeze.Name` in tracebacks, is `bnfreeze.Name`,
    survives pickling with its message, and keeps its plain repr."""
    errors = [
        getattr(bnfreeze, name)
        for name in bnfreeze.__all__
        if isinstance(getattr(bnfreeze, name), type)
        and issubclass(getattr(bnfreeze, name), bnfreeze.BNFreezeError)
    ]
    assert len(errors) == 11
    for error in errors:
        name = error.__name__
        assert (error.__module__, getattr(bnfreeze, name)) == ("bnfreeze", error)
        instance = error("what was received; what was expected")
        assert traceback.format_exception_only(instance) == [
            f"bnfreeze.{name}: what was received; what was expected\n"
        ]
        restored = pickle.loads(pickle.dumps(instance))
        assert type(restored) is error and restored.args == instance.args
        assert repr(instance) == f"{name}('what was received; what was expected')"


#: Loads argv[1] with the installed flavour's Keras, without importing bnfreeze; prints
#: the error's first line (or LOADED) and whether bnfreeze got imported.
_LOAD_WITHOUT_BNFREEZE = """
import os, sys
if os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in ("1", "true", "yes"):
    import tf_keras as keras
else:
    import keras

def load():
    try:
        keras.models.load_model(sys.argv[1])
        print("LOADED")
    except Exception as error:
        print(type(error).__name__ + ": " + " ".join(str(error).split()))
    print("bnfreeze imported:", "bnfreeze" in sys.modules)


load()
import bnfreeze  # what the page tells the reader to do, and load again

load()
"""


@pytest.mark.subprocess
def test_a_frozen_model_needs_import_bnfreeze_to_load(tmp_path: Path) -> None:
    """What docs/guide-freezing.md says: a frozen .keras file does not load in a process
    that has not imported bnfreeze (Keras does not import bnfreeze for it), the error
    names the frozen layer's registered name, and after `import bnfreeze` it loads (one
    process: the load that failed, then the import and the same load again)."""
    from bnfreeze._compat import IS_TF_KERAS, keras

    inputs = keras.Input((4,))
    hidden = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    bnfreeze.freeze(model)
    path = str(tmp_path / "frozen.keras")
    model.save(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    plain = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_BNFREEZE, path],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    ).stdout.splitlines()
    assert plain[1] == "bnfreeze imported: False"
    expected = (
        "TypeError: Error when deserializing class 'BatchNormalization'"
        if IS_TF_KERAS
        else "TypeError: <class 'keras.src.models.functional.Functional'> could not be "
        "deserialized properly."
    )
    assert plain[0].startswith(expected), plain[0][:300]
    if not IS_TF_KERAS:  # tf-keras's message shows the layer's config without the name
        assert "'registered_name': 'bnfreeze>Frozen'" in plain[0]
    assert plain[2:] == ["LOADED", "bnfreeze imported: True"]
