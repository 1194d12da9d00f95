"""The finding registry: one source for codes, severities, meanings and fixes.

The findings table in ``docs/audit.md`` must say exactly what ``FINDING_CODES`` says,
and every registered code must have its rule.
"""

from __future__ import annotations

from pathlib import Path

from bnfreeze._findings import FINDING_CODES, RULES
from bnfreeze._report import SEVERITIES

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
